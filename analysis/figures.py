"""Paper figures (matplotlib Agg, PNG + PDF, log axes, colour by N with a colourbar).

Every function takes the prepared points and the fits dict (as written to fits.json), so
``plot_path`` can redraw figures without refitting.
"""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from analysis import isoflop, parametric, references  # noqa: E402
from analysis.laws import law_from_name  # noqa: E402
from analysis.numbers import fmt  # noqa: E402
from analysis.prepare import Points  # noqa: E402
from rundir import write_bytes_atomic  # noqa: E402

APPROACH_STYLE = {"1": ("tab:blue", "Approach 1 (envelope)"), "2": ("tab:orange", "Approach 2 (IsoFLOP)"),
                  "3": ("tab:green", "Approach 3 (parametric)")}  # fmt: skip
CMAP = "viridis"


def _sci_label(v, _pos=None) -> str:
    if not v > 0:
        return ""
    e = int(np.floor(np.log10(v) + 1e-9))
    m = v / 10.0**e
    return f"$10^{{{e}}}$" if abs(m - 1) < 1e-6 else f"${m:g}\\times10^{{{e}}}$"


def _tidy_log_axes(fig) -> None:
    """Readable log ticks: no crowded minor labels; 1-2-5 majors on short ranges; plain numbers for loss."""
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() != "log" or not (lo > 0 and hi > lo):
                continue
            axis.set_minor_formatter(NullFormatter())
            if np.log10(hi / lo) < 2:
                axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(_sci_label))
            if "loss" in axis.get_label_text():
                axis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _save(fig, out_dir: Path, name: str) -> list[str]:
    _tidy_log_axes(fig)
    paths = []
    try:
        for ext in ("png", "pdf"):
            path = out_dir / f"{name}.{ext}"
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=150)
            write_bytes_atomic(path, buf.getvalue())
            paths.append(str(path))
    finally:
        plt.close(fig)
    return paths


def _n_norm(pts: Points):
    n = pts.points["n_params"]
    return LogNorm(vmin=n.min(), vmax=max(n.max(), n.min() * 1.01))


def _colourbar(fig, ax, norm, label, cmap=CMAP):
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label=label)


def _conv_label(fits):
    return f"C, training FLOPs ({fits['flops_convention']})"


def plot_curves(pts: Points, fits: dict, out_dir: Path) -> list[str]:
    """Training curves (eval loss vs FLOPs) coloured by N, with the Approach-1 envelope."""
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    norm, cmap = _n_norm(pts), plt.get_cmap(CMAP)
    n_by_run = dict(zip(pts.points["run"], pts.points["n_params"]))
    if pts.has_curves:
        for run, g in pts.curves.groupby("run"):
            g = g.sort_values("flops")
            ax.plot(g["flops"], g["loss"], color=cmap(norm(n_by_run[run])), lw=0.9, alpha=0.8)
    else:
        ax.scatter(pts.points["flops"], pts.points["loss"], c=pts.points["n_params"], cmap=CMAP, norm=norm, s=14)
    env = fits.get("approaches", {}).get("1", {}).get("envelope")
    if env:
        ax.plot(env["flops"], env["loss"], "k.", ms=3, label="envelope (Approach 1)")
        ax.legend(loc="upper right")
    ax.set(xscale="log", yscale="log", xlabel=_conv_label(fits), ylabel="eval loss (nats/token)",
           title="Training curves and their lower envelope")  # fmt: skip
    _colourbar(fig, ax, norm, f"N ({pts.n_params_column})")
    return _save(fig, out_dir, "curves")


def plot_isoflop(pts: Points, fits: dict, out_dir: Path) -> list[str]:
    """Chinchilla Figure 3 style: IsoFLOP profiles with parabola minima, then N_opt and D_opt vs C."""
    a2 = fits.get("approaches", {}).get("2")
    if not a2:
        return []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), layout="constrained")
    p = a2["points"]
    budgets = np.array([b["flops"] for b in a2["budgets"]])
    norm = LogNorm(vmin=budgets.min(), vmax=max(budgets.max(), budgets.min() * 1.01))
    cmap = plt.get_cmap("plasma")
    pb, pn, pd_, pl = (np.asarray(p[k], float) for k in ("budget", "n_params", "tokens", "loss"))
    kind = np.asarray(p["kind"])
    ax = axes[0]
    for b in a2["budgets"]:
        col = cmap(norm(b["flops"]))
        sel = pb == b["flops"]
        ax.scatter(pn[sel & (kind == "final")], pl[sel & (kind == "final")], color=col, s=14)
        ax.scatter(pn[sel & (kind != "final")], pl[sel & (kind != "final")], color=col, s=14, marker="x")
        f = b["fit"]
        if f:
            xs = np.linspace(np.log(pn[sel].min()), np.log(pn[sel].max()), 100)
            if "c2" in f:  # whole-profile parabola
                ax.plot(np.exp(xs), f["c2"] * xs**2 + f["c1"] * xs + f["c0"], color=col, lw=1)
            else:  # Akima interpolant through the mean loss of each size
                prof = isoflop.make_profile(b["flops"], pn[sel], pd_[sel], pl[sel])
                ax.plot(np.exp(xs), isoflop.akima(prof.log_n, np.exp(prof.log_loss), xs), color=col, lw=1)
            ax.plot(f["n_opt"], f["loss_opt"], "v", color=col if f["inside"] else "grey", ms=8, mec="k")
    method = a2.get("approach2_method", "parabola")
    ax.set(xscale="log", xlabel=f"N ({pts.n_params_column})", ylabel="loss (nats/token)",
           title=f"IsoFLOP profiles, minima by {method} (x: interpolated)")  # fmt: skip
    _colourbar(fig, axes[-1], norm, f"IsoFLOP budget, {_conv_label(fits)}", cmap="plasma")
    used = [b["fit"] for b in a2["budgets"] if b["fit"] and b["fit"]["inside"]]
    cs = np.array([u["budget"] for u in used])
    grid = np.geomspace(budgets.min() / 2, budgets.max() * 2, 100)
    for ax, key, law_k, law_e, label in ((axes[1], "n_opt", "k_N", "a", "N_opt"), (axes[2], "tokens_opt", "k_D", "b", "D_opt")):
        ax.scatter(cs, [u[key] for u in used], c=cs, cmap="plasma", norm=norm, zorder=3)
        sd = np.array([u.get("log_n_opt_sd") or 0.0 for u in used])
        if sd.any():  # +- 1 sd of ln N* under the seed noise (the weights of the fit)
            y = np.array([u[key] for u in used])
            ax.errorbar(cs, y, yerr=[y - y * np.exp(-sd), y * np.exp(sd) - y], fmt="none", ecolor="grey", zorder=2)
        ax.plot(grid, a2[law_k] * grid ** a2[law_e], color="tab:orange", label=f"{label} ~ C^{a2[law_e]:.3f}")
        ax.set(xscale="log", yscale="log", xlabel=_conv_label(fits), ylabel=label)
        ax.legend()
    return _save(fig, out_dir, "isoflop")


def _band(samples_k, samples_e, grid, percentiles):
    k, e = np.asarray(samples_k, float), np.asarray(samples_e, float)
    ok = np.isfinite(k) & np.isfinite(e)
    if ok.sum() < 10:
        return None
    vals = k[ok, None] * grid[None, :] ** e[ok, None]
    return np.percentile(vals, percentiles, axis=0)


def plot_optimal(pts: Points, fits: dict, out_dir: Path) -> list[str]:
    """N_opt(C) and D_opt(C): our approaches with bootstrap bands, Chinchilla and Kaplan references.
    Nothing when no approach was fitted (references alone say nothing about these runs)."""
    if not fits.get("approaches"):
        return []
    c = pts.points["flops"]
    grid = np.geomspace(c.min() / 3, max(max(fits["budgets"]), c.max() * 3), 200)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    pct = fits.get("percentiles", [10, 90])
    fig.suptitle(f"Compute-optimal allocation (bands: {pct[0]:g}-{pct[1]:g}th percentile of the bootstrap over runs)")
    for ax, what in zip(axes, ("N", "D")):
        for a, res in fits.get("approaches", {}).items():
            col, label = APPROACH_STYLE[a]
            if a in ("1", "2"):
                k, e = (res["k_N"], res["a"]) if what == "N" else (res["k_D"], res["b"])
                ax.plot(grid, k * grid**e, color=col, label=f"{label}: {what}_opt ~ C^{e:.3f}")
                bs, band = res.get("bootstrap"), None
                if bs:
                    band = _band(bs["k_N" if what == "N" else "k_D"], bs["a" if what == "N" else "b"], grid, pct)
            else:
                fpt = res.get("flops_per_token") or {"k": 6.0, "c": 1.0}
                kc = (fpt["k"], fpt["c"])
                n_opt, d_opt = parametric.compute_optimal(res["params"], grid, kc)
                p3 = res["params"]
                e = p3["beta"] / (p3["alpha"] + kc[1] * p3["beta"])
                e = e if what == "N" else 1 - kc[1] * e
                ax.plot(grid, n_opt if what == "N" else d_opt, color=col,
                        label=f"{label}: {what}_opt ~ C^{e:.3f} (C = {kc[0]:.3g} N^{kc[1]:.3f} D)")  # fmt: skip
                bs, band = res.get("bootstrap"), None
                if bs:
                    prm = {k: np.asarray(bs[k])[:, None] for k in parametric.PARAM_NAMES}
                    nb, db = parametric.compute_optimal(prm, grid[None, :], kc)
                    band = np.nanpercentile(nb if what == "N" else db, pct, axis=0)
            if band is not None:
                ax.fill_between(grid, band[0], band[1], color=col, alpha=0.18, lw=0)
        env = fits.get("approaches", {}).get("1", {}).get("envelope")
        if env:
            ax.scatter(env["flops"], env["n_params"] if what == "N" else env["tokens"], s=6, color="tab:blue", alpha=0.5)
        a2 = fits.get("approaches", {}).get("2")
        if a2:
            used = [b["fit"] for b in a2["budgets"] if b["fit"] and b["fit"]["inside"]]
            ax.scatter([u["budget"] for u in used], [u["n_opt" if what == "N" else "tokens_opt"] for u in used],
                       marker="D", color="tab:orange", edgecolor="k", zorder=4, s=28)  # fmt: skip
        ref_n = references.chinchilla_table3_n_opt(grid)
        ax.plot(grid, ref_n if what == "N" else references.chinchilla_table3_d_opt(grid), "k--", lw=1,
                label="Chinchilla Table 3 (Hoffmann et al. 2022; C = 6ND)")  # fmt: skip
        cn, cd = parametric.compute_optimal(references.CHINCHILLA_APPROACH3, grid)
        ax.plot(grid, cn if what == "N" else cd, "k:", lw=1, label="Chinchilla Approach 3 published (a = 0.45; C = 6ND)")
        kn = references.kaplan_n_opt(grid)
        ax.plot(grid, kn if what == "N" else grid / (6 * kn), color="tab:red", ls="-.", lw=1,
                label="Kaplan et al. 2020 (N ~ C^0.73; C = 6ND)")  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel=_conv_label(fits),
               ylabel=f"{what}_opt ({'parameters' if what == 'N' else 'tokens'})",
               title=f"Compute-optimal {'model size N' if what == 'N' else 'training tokens D'}")  # fmt: skip
        ax.legend(fontsize=7, loc="upper left")
    return _save(fig, out_dir, "optimal")


def plot_isoloss(pts: Points, fits: dict, out_dir: Path) -> list[str]:
    """Chinchilla Figure 4 style: Approach-3 isoloss contours over (C, N) with the efficient frontier."""
    a3 = fits.get("approaches", {}).get("3")
    if not a3:
        return []
    prm = a3["params"]
    p = pts.points
    c_grid = np.geomspace(p["flops"].min() / 10, max(max(fits["budgets"]), p["flops"].max() * 10), 200)
    n_grid = np.geomspace(p["n_params"].min() / 10, p["n_params"].max() * 30, 200)
    cc, nn = np.meshgrid(c_grid, n_grid)
    loss = parametric.predict(prm, nn, cc / (6 * nn))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    lo_l, hi_l = p["loss"].min(), p["loss"].max()
    levels = np.unique(np.round(np.geomspace(max(prm["E"] + 0.01, lo_l - 2 * (hi_l - lo_l)), hi_l + 0.5 * (hi_l - lo_l), 14), 3))
    cs = ax.contour(cc, nn, loss, levels=levels, colors="grey", linewidths=0.8)
    ax.clabel(cs, fmt="%.2f", fontsize=7)
    n_opt, _ = parametric.compute_optimal(prm, c_grid)
    ax.plot(c_grid, n_opt, color="tab:blue", lw=2, label=f"efficient frontier N_opt ~ C^{a3['derived']['a']:.3f}")
    norm = _n_norm(pts)
    ax.scatter(6 * p["n_params"] * p["tokens"], p["n_params"], c=p["n_params"], cmap=CMAP, norm=norm, s=14,
               edgecolor="k", lw=0.3, label="runs", zorder=3)  # fmt: skip
    _colourbar(fig, ax, norm, f"N ({pts.n_params_column})")
    ax.set(xscale="log", yscale="log", xlabel="C = 6 N D (FLOPs)", ylabel=f"N ({pts.n_params_column})",
           title=f"Approach 3 isoloss contours: L = {fmt(prm['E'], 5)} + {fmt(prm['A'], 5)}/N^{fmt(prm['alpha'], 5)} + "
                 f"{fmt(prm['B'], 5)}/D^{fmt(prm['beta'], 5)}")  # fmt: skip
    ax.set_ylim(n_grid[0], n_grid[-1])
    ax.legend(loc="upper left")
    return _save(fig, out_dir, "isoloss")


def plot_kaplan(pts: Points, fits: dict, out_dir: Path) -> list[str]:
    """Kaplan panels: L(N), L(D) and L(C) data with fitted laws (whichever were fitted); a law the
    data cannot support shows its candidate points (hollow) and why it was not fitted."""
    panels = [(n, f) for n, f in fits.get("laws", {}).items() if len(f["data"]) == 2]  # single-input laws
    panels += list(fits.get("laws_unsupported", {}).items())
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False, layout="constrained")
    norm = _n_norm(pts)
    for ax, (name, f) in zip(axes[0], panels):
        var = next(k for k in f["data"] if k != "loss")
        x, y = np.asarray(f["data"][var]), np.asarray(f["data"]["loss"])
        if "reason" in f:  # not fitted: the candidates, and why
            ax.scatter(x, y, facecolors="none", edgecolors="grey", s=18, zorder=3, label="lowest loss per " + var)
            ax.text(0.03, 0.03, "not fitted: " + textwrap.fill(f["reason"], 60), transform=ax.transAxes, fontsize=6.5,
                    va="bottom", bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "grey"})  # fmt: skip
        else:
            if var == "N":
                ax.scatter(x, y, c=x, cmap=CMAP, norm=norm, s=18, zorder=3)
            else:
                ax.scatter(x, y, color="k", s=14, zorder=3)
            xs = np.geomspace(x.min() / 2, x.max() * 2, 200)
            ax.plot(xs, law_from_name(name)(f["params"], **{var: xs}), color="tab:red",
                    label=f"{f['formula']}\n" + ", ".join(f"{k}={fmt(v, 4)}" for k, v in f["params"].items()))  # fmt: skip
        xlabel = {"N": f"N ({fits.get('kaplan_n_column', 'n_params')})", "D": "D, training tokens",
                  "C": _conv_label(fits)}[var]  # fmt: skip
        ref = f["citation"].split(",")[0] + ", " + f["citation"].split(",")[-1].strip() if "," in f["citation"] else ""
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="loss (nats/token)", title=f"{name}  [{ref}]")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    _colourbar(fig, axes[0][-1], norm, f"N ({pts.n_params_column})")
    return _save(fig, out_dir, "kaplan")


def plot_residuals(pts: Points, fits: dict, out_dir: Path) -> list[str]:
    """Approach-3 log-loss residuals against N and D, coloured by N."""
    a3 = fits.get("approaches", {}).get("3")
    if not a3:
        return []
    r = np.asarray(a3["residuals_log"])
    p = pts.points
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, layout="constrained")
    norm = _n_norm(pts)
    for ax, col, label in ((axes[0], "n_params", f"N ({pts.n_params_column})"), (axes[1], "tokens", "D, training tokens")):
        ax.scatter(p[col], r, c=p["n_params"], cmap=CMAP, norm=norm, s=14)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel=label)
    axes[0].set_ylabel("log(predicted) - log(observed) loss")
    axes[0].set_title(f"Approach 3 residuals (RMS {np.sqrt(np.mean(r**2)):.4f})")
    _colourbar(fig, axes[1], norm, f"N ({pts.n_params_column})")
    return _save(fig, out_dir, "residuals")


FIGURES = (plot_curves, plot_isoflop, plot_optimal, plot_isoloss, plot_kaplan, plot_residuals)
# Drawn by the helper process when there is one: about half the quickstart's drawing time (the helper
# has fitted the laws meanwhile, about what this process spends on Approach 3 and the extrapolation check).
HELPER_FIGURES = ("plot_isoflop", "plot_optimal", "plot_isoloss")


def draw(names, pts: Points, fits: dict, out_dir) -> dict[str, list[str]]:
    """The figures of FIGURES named in ``names``: {name: written paths}."""
    by_name = {fn.__name__: fn for fn in FIGURES}
    return {name: by_name[name](pts, fits, Path(out_dir)) for name in names}


def draw_all(pts: Points, fits: dict, out_dir, helper=None) -> list[str]:
    """Every figure whose fit is present in ``fits``; returns the written paths.

    helper: an analysis.helper.Helper (helper_process) that draws HELPER_FIGURES meanwhile.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [fn.__name__ for fn in FIGURES]
    elsewhere = [n for n in names if n in HELPER_FIGURES] if helper is not None else []
    future = helper.submit(draw, elsewhere, pts, fits, out_dir) if elsewhere else None
    drawn = draw([n for n in names if n not in elsewhere], pts, fits, out_dir)
    if future is not None:
        drawn |= future.result()
    paths = [p for n in names for p in drawn[n]]
    from analysis.beyond import draw_all as draw_beyond  # its modules import this one

    return paths + draw_beyond(fits, out_dir)
