"""Learning rate and batch size against compute (DeepSeek-AI 2024, "DeepSeek LLM", Section 3.1).

At each compute budget C, sweep the peak learning rate eta and the batch size B (tokens per
step); keep the runs whose loss is within ``fraction`` of the budget's best (the near-optimal
band; DeepSeek used 0.25% on large runs, our default 1% suits noisy CPU runs); fit, by least
squares in log-log over all kept runs,

    eta_opt(C) = k_eta C^e_eta,    B_opt(C) = k_B C^e_B       (DeepSeek: 0.3118 C^-0.1250, 0.2920 C^0.3271).

The rule is also written as a sweep recipe (``sweeps.recipe.Recipe`` keys lr_ref, n_ref,
lr_exponent, batch_tokens_ref, batch_exponent): with C = 6 N D and the runs' median tokens
per parameter M, C = 6 M N^2, so eta_opt = k_eta (6 M)^e_eta N^(2 e_eta), and likewise B.
Runs are grouped into budgets when their C agree within ``BUDGET_TOLERANCE_DEX``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analysis.bootstrap import intervals
from analysis.figures import _save, plt
from analysis.load import AnalysisError
from analysis.report import _g as fmt
from analysis.report import _iv as iv
from rundir import write_text_atomic

NAME = "lr_scaling"
COLUMNS = ("lr", "batch_tokens")
NEAR_OPTIMAL = 0.01  # runs within 1% of their budget's best loss are near-optimal
BUDGET_TOLERANCE_DEX = 0.02  # runs whose C agree within this many decades share a budget
RULE_FILE = "lr_rule.yaml"
CITATION = "DeepSeek-AI 2024, DeepSeek LLM: Scaling Open-Source Language Models with Longtermism, Section 3.1"


def budget_groups(flops, tol_dex=BUDGET_TOLERANCE_DEX) -> np.ndarray:
    """Group index per run: runs sorted by C start a new budget where C jumps by more than tol_dex decades."""
    log_c = np.log10(np.asarray(flops, float))
    order = np.argsort(log_c)
    group = np.cumsum(np.r_[0, np.diff(log_c[order]) > tol_dex])
    out = np.empty(log_c.size, int)
    out[order] = group
    return out


def near_optimal(flops, loss, fraction=NEAR_OPTIMAL, groups=None) -> np.ndarray:
    """Mask of runs whose loss is at most (1 + fraction) x the lowest loss of their budget."""
    loss = np.asarray(loss, float)
    groups = budget_groups(flops) if groups is None else groups
    best = np.full(groups.max() + 1, np.inf)
    np.minimum.at(best, groups, loss)
    return loss <= best[groups] * (1.0 + fraction)


def _on_edge(best, swept) -> bool:
    """The best value is the smallest or largest of several swept: the optimum is not bracketed."""
    return bool(np.unique(swept).size > 1 and (best <= swept.min() or best >= swept.max()))


def _power_fit(x, y) -> tuple[float, float]:
    """(k, e) of y = k x^e by least squares on logs."""
    e, log_k = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_k)), float(e)


def fit(flops, lr, batch_tokens, loss, fraction=NEAR_OPTIMAL) -> dict:
    """eta_opt(C) and B_opt(C) through the near-optimal runs; C in FLOPs, lr peak, batch in tokens per step.

    Returns {"eta": {"k", "exponent"}, "batch": {"k", "exponent"}, "near_optimal": mask list,
    "budgets": [{"flops", "best_lr", "best_batch_tokens", "best_loss"}]}.
    Raises AnalysisError unless the near-optimal runs span at least 2 budgets.
    """
    c, eta, b, loss = (np.asarray(v, float) for v in (flops, lr, batch_tokens, loss))
    groups = budget_groups(c)
    keep = near_optimal(c, loss, fraction, groups)
    if np.unique(groups).size < 2:
        raise AnalysisError(f"{NAME}: the runs form {np.unique(groups).size} compute budget(s) (C within "
                            f"{BUDGET_TOLERANCE_DEX} decades); eta_opt(C) needs at least 2")  # fmt: skip
    budgets = []
    for g in np.unique(groups):
        sel = np.flatnonzero(groups == g)
        i = sel[np.argmin(loss[sel])]
        budgets.append({"flops": float(np.exp(np.mean(np.log(c[sel])))), "n_runs": int(sel.size),
                        "best_lr": float(eta[i]), "best_batch_tokens": float(b[i]), "best_loss": float(loss[i]),
                        "lr_on_edge": _on_edge(eta[i], eta[sel]), "batch_on_edge": _on_edge(b[i], b[sel])})  # fmt: skip
    k_eta, e_eta = _power_fit(c[keep], eta[keep])
    if np.unique(b[keep]).size > 1:
        k_b, e_b = _power_fit(c[keep], b[keep])
    else:  # one batch size swept: B_opt is that size, flat in C
        k_b, e_b = float(b[keep][0]), 0.0
    return {"eta": {"k": k_eta, "exponent": e_eta}, "batch": {"k": k_b, "exponent": e_b},
            "near_optimal": keep.tolist(), "budgets": budgets, "fraction": fraction}  # fmt: skip


def recipe_rule(res: dict, n_params, tokens) -> dict:
    """The fitted rule as sweep recipe keys, at the runs' median tokens per parameter M (C = 6 M N^2)."""
    n, d = np.asarray(n_params, float), np.asarray(tokens, float)
    m = float(np.median(d / n))
    n_ref = float(np.exp(np.median(np.log(n))))
    c_ref = 6.0 * m * n_ref**2
    e_eta, e_b = res["eta"]["exponent"], res["batch"]["exponent"]
    return {
        "lr_ref": res["eta"]["k"] * c_ref**e_eta, "n_ref": n_ref, "lr_exponent": -2.0 * e_eta,
        "batch_tokens_ref": int(round(res["batch"]["k"] * c_ref**e_b)), "batch_exponent": 2.0 * e_b,
        "tokens_per_param": m,
    }  # fmt: skip


def fit_points(points, counts_BR, percentiles) -> dict:
    """Fit to prepared points (flops, loss, lr, batch_tokens, n_params, tokens), bootstrap over runs."""
    c, eta, b, loss = (points[k].to_numpy(float) for k in ("flops", "lr", "batch_tokens", "loss"))
    res = fit(c, eta, b, loss)
    res["data"] = {"run": points["run"].tolist(), "flops": c.tolist(), "lr": eta.tolist(), "batch_tokens": b.tolist(),
                   "loss": loss.tolist()}  # fmt: skip
    res["params"] = {"k_eta": res["eta"]["k"], "e_eta": res["eta"]["exponent"], "k_B": res["batch"]["k"],
                     "e_B": res["batch"]["exponent"]}  # fmt: skip
    res["recipe"] = recipe_rule(res, points["n_params"], points["tokens"])
    res["citation"] = CITATION
    if counts_BR is not None and len(counts_BR):
        samples = {k: [] for k in res["params"]}
        for counts in counts_BR:
            rows = np.repeat(np.arange(len(loss)), counts)
            try:
                r = fit(c[rows], eta[rows], b[rows], loss[rows])
                vals = (r["eta"]["k"], r["eta"]["exponent"], r["batch"]["k"], r["batch"]["exponent"])
            except (AnalysisError, ValueError, np.linalg.LinAlgError):
                vals = (np.nan,) * 4
            for k, v in zip(samples, vals):
                samples[k].append(v)
        res["intervals"] = intervals(samples, percentiles)
    return res


def rule_yaml(res: dict, flops_convention: str = "") -> str:
    """lr_rule.yaml: the power laws in C and the same rule as ``recipe:`` keys for a sweep spec."""
    r = res["recipe"]
    return (
        f"# eta_opt(C) and B_opt(C) fitted by chinchax ({NAME}: {CITATION}) on runs within "
        f"{100 * res['fraction']:g}% of each budget's best loss.\n"
        f"# C in FLOPs ({flops_convention or 'the fit convention'}); B in tokens per optimiser step.\n"
        f"eta_opt: {{k: {res['eta']['k']:.6g}, exponent: {res['eta']['exponent']:.6g}}}    # eta_opt = k C^exponent\n"
        f"batch_tokens_opt: {{k: {res['batch']['k']:.6g}, exponent: {res['batch']['exponent']:.6g}}}\n"
        f"# The same rule for sweeps.recipe.Recipe, at {r['tokens_per_param']:.3g} tokens per parameter (C = 6 M N^2); "
        "paste into a spec's recipe: section.\n"
        f"recipe: {{lr_ref: {r['lr_ref']:.6g}, n_ref: {r['n_ref']:.6g}, lr_exponent: {r['lr_exponent']:.6g}, "
        f"batch_tokens_ref: {r['batch_tokens_ref']}, batch_exponent: {r['batch_exponent']:.6g}}}\n"
    )


def write_files(res: dict, out_dir, flops_convention: str = "") -> dict:
    """Write lr_rule.yaml into out_dir; returns {"lr_rule": path}."""
    path = Path(out_dir) / RULE_FILE
    write_text_atomic(path, rule_yaml(res, flops_convention))
    return {"lr_rule": str(path)}


def report_lines(res: dict) -> list[str]:
    """report.md section: the two power laws with intervals, the best run per budget, the recipe form."""
    p, r = res["params"], res["recipe"]
    lines = ["## Learning rate and batch size against compute (DeepSeek LLM 2024)", "", f"({res['citation']})", "",
             f"Fitted on the {sum(res['near_optimal'])} of {len(res['near_optimal'])} runs within "
             f"{100 * res['fraction']:g}% of their budget's best loss:", "",
             f"- eta_opt(C) = {fmt(p['k_eta'], 4)} C^{p['e_eta']:.4f}{iv(res, 'e_eta', 3)}",
             f"- B_opt(C) = {fmt(p['k_B'], 4)} C^{p['e_B']:.4f}{iv(res, 'e_B', 3)} tokens per step",
             f"- as a recipe (lr_rule.yaml): lr_ref {fmt(r['lr_ref'], 4)} at n_ref {fmt(r['n_ref'], 4)}, lr_exponent "
             f"{r['lr_exponent']:.4f}, batch_tokens_ref {r['batch_tokens_ref']}, batch_exponent {r['batch_exponent']:.4f}",
             "", "| C | runs | best lr | best batch (tokens) | best loss |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {b['flops']:.3g} | {b['n_runs']} | {b['best_lr']:.3g} | {b['best_batch_tokens']:.4g} | {b['best_loss']:.4f} |"
              for b in res["budgets"]]  # fmt: skip
    lines.append("")
    for key, what in (("lr_on_edge", "learning rate"), ("batch_on_edge", "batch size")):
        edge = [f"{b['flops']:.3g}" for b in res["budgets"] if b.get(key)]
        if edge:
            lines.append(f"- the best {what} lies at the edge of the swept values at C = {', '.join(edge)}: the optimum "
                         f"is not bracketed there, so the fitted {what} rule is a bound, not an estimate; widen the sweep")  # fmt: skip
    return lines + [""]


def draw(res: dict, out_dir) -> list[str]:
    """Loss over lr per budget (best batch at each lr) with the fitted eta_opt(C); lr and B of near-optimal runs over C."""
    c, eta, b, loss = (np.asarray(res["data"][k], float) for k in ("flops", "lr", "batch_tokens", "loss"))
    keep = np.asarray(res["near_optimal"], bool)
    groups = budget_groups(c)
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    ax = axes[0]
    for g in np.unique(groups):
        sel = groups == g
        colour = cmap(g / max(groups.max(), 1))
        budget = float(np.exp(np.mean(np.log(c[sel]))))
        lrs = np.unique(eta[sel])
        best = [loss[sel & (eta == x)].min() for x in lrs]
        ax.plot(lrs, best, "-o", color=colour, ms=4, label=f"C = {budget:.3g}")
        ax.scatter(eta[sel & keep], loss[sel & keep], s=60, facecolors="none", edgecolors=colour)
        ax.axvline(res["eta"]["k"] * budget ** res["eta"]["exponent"], color=colour, ls="--", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="loss (nats/token)",
           title="loss over lr (best batch); dashed: fitted eta_opt(C)")  # fmt: skip
    ax.legend(fontsize=7)
    grid = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
    for ax, y, key, label in ((axes[1], eta, "eta", "peak learning rate"), (axes[2], b, "batch", "batch (tokens per step)")):
        ax.scatter(c[~keep], y[~keep], color="lightgrey", s=12, label="other runs")
        ax.scatter(c[keep], y[keep], color="tab:blue", s=20, label="near-optimal runs")
        k, e = res[key]["k"], res[key]["exponent"]
        ax.plot(grid, k * grid**e, color="tab:red", label=f"{fmt(k, 3)} C^{e:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel=label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir, "lr_scaling")
