"""Repeated data: the data-constrained law of Muennighoff et al. 2023 (Section 3.1, eqs. 5-7).

"Scaling Data-Constrained Language Models" replaces N and D in Chinchilla's law by their
effective values when data repeats:

    L(N, D, U_D) = E + A / N'^alpha + B / D'^beta
    D' = U_D + U_D R*_D (1 - exp(-R_D / R*_D)),   R_D = D / U_D - 1   (repeated epochs)
    N' = U_N + U_N R*_N (1 - exp(-R_N / R*_N)),   R_N = N / U_N - 1   (excess parameters)

U_D is the unique tokens seen: min(dataset_tokens, D). U_N is the compute-optimal size for
U_D unique tokens under the law's own Chinchilla part (Hoffmann et al. eq. 4 solved for
D_opt = U_D), capped at N:

    U_N = min(N, G (G U_D)^(beta / alpha)),   G = (alpha A / (beta B))^(1 / (alpha + beta)).

With the paper's constants this gives L(6.34e9, 242e9, 25e9) = 2.2256, the value the paper
quotes; the cruder U_N = U_D / 20 gives 2.2261. R*_D is the number of repetitions after which
the worth of repeated data has decayed by 1 - 1/e (15.4 in the paper: about 4 epochs are
nearly as good as fresh data).

Fitted as least squares on log loss (``analysis.laws.fit_law``), all 7 parameters jointly,
started from a Chinchilla fit of the same runs crossed with a grid of R*_D, R*_N. (The paper
fits its Chinchilla part on single-epoch runs first; a CPU sweep has too few of those.)
"""

from __future__ import annotations

import itertools

import numpy as np

from analysis import references
from analysis.beyond import bootstrap_law
from analysis.figures import _save, plt
from analysis.laws import Law, chinchilla, fit_law
from analysis.load import AnalysisError
from analysis.report import _g as fmt
from analysis.report import _iv as iv

NAME = "data_constrained"
PARAM_NAMES = ("E", "A", "B", "alpha", "beta", "R_D_star", "R_N_star")
FORMULA = "L = E + A / N'^alpha + B / D'^beta; D' = U_D + U_D R*_D (1 - exp(-R_D / R*_D)), R_D = D / U_D - 1; N' likewise"
CITATION = "Muennighoff et al. 2023, Scaling Data-Constrained Language Models, eqs. 5-7"
COLUMNS = ("dataset_tokens",)  # besides N, D and loss


def effective(unique, repeats, r_star):
    """U + U R* (1 - exp(-R / R*)): unique count ``unique`` repeated ``repeats`` extra times is worth this many fresh."""
    unique, repeats, r_star = (np.asarray(v, dtype=np.float64) for v in (unique, repeats, r_star))
    return unique + unique * r_star * -np.expm1(-repeats / r_star)


def unique_params(params, unique_tokens, n_params):
    """U_N = min(N, G (G U_D)^(beta/alpha)): the compute-optimal size for U_D tokens (parameters)."""
    alpha, beta = np.asarray(params["alpha"], float), np.asarray(params["beta"], float)
    g = (alpha * np.asarray(params["A"], float) / (beta * np.asarray(params["B"], float))) ** (1.0 / (alpha + beta))
    with np.errstate(over="ignore"):
        n_for_u = g * (g * np.asarray(unique_tokens, float)) ** (beta / alpha)
    return np.minimum(np.asarray(n_params, float), n_for_u)


def effective_tokens(params, tokens, dataset_tokens):
    """D' for D training tokens drawn from a pool of ``dataset_tokens`` unique tokens."""
    d = np.asarray(tokens, float)
    u = np.minimum(np.asarray(dataset_tokens, float), d)
    return effective(u, d / u - 1.0, params["R_D_star"])


def effective_params(params, n_params, tokens, dataset_tokens):
    """N' for N parameters trained on a pool of ``dataset_tokens`` unique tokens."""
    n = np.asarray(n_params, float)
    u_n = unique_params(params, np.minimum(np.asarray(dataset_tokens, float), np.asarray(tokens, float)), n)
    return effective(u_n, n / u_n - 1.0, params["R_N_star"])


def predict(params, n_params, tokens, dataset_tokens):
    """L(N, D, U_D) in nats per token; ``dataset_tokens`` >= D means no repetition (Chinchilla's law)."""
    n_eff = effective_params(params, n_params, tokens, dataset_tokens)
    d_eff = effective_tokens(params, tokens, dataset_tokens)
    return params["E"] + params["A"] / n_eff ** params["alpha"] + params["B"] / d_eff ** params["beta"]


def _to_params(th) -> dict[str, float]:
    a, b, e, alpha, beta, rd, rn = (float(v) for v in th)
    with np.errstate(over="ignore"):
        return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": alpha, "beta": beta,
                "R_D_star": float(np.exp(rd)), "R_N_star": float(np.exp(rn))}  # fmt: skip


def _from_params(p) -> np.ndarray:
    return np.array([np.log(p["A"]), np.log(p["B"]), np.log(p["E"]), p["alpha"], p["beta"],
                     np.log(p["R_D_star"]), np.log(p["R_N_star"])])  # fmt: skip


def _raw(th, x):
    # alpha, beta <= 0 would make U_N and the power terms meaningless: steer the fit away
    if th[3] <= 1e-6 or th[4] <= 1e-6:
        return np.full(x["N"].shape, np.inf)
    return predict(_to_params(th), x["N"], x["D"], x["U"])


def _starts(x, loss):
    base = fit_law(chinchilla(), loss, N=x["N"], D=x["D"]).theta
    return [np.concatenate([base, [np.log(rd), np.log(rn)]]) for rd, rn in itertools.product((2.0, 15.0, 100.0), (1.0, 5.0, 30.0))]


def law() -> Law:
    """The data-constrained law as an ``analysis.laws.Law`` with inputs N, D and U (dataset_tokens)."""
    return Law(
        name=NAME, formula=FORMULA, citation=CITATION, inputs=("N", "D", "U"), param_names=PARAM_NAMES,
        raw=_raw, to_params=_to_params, from_params=_from_params, starts=_starts,
    )  # fmt: skip


def fit(n_params, tokens, dataset_tokens, loss, theta0=None):
    """Fit the law to runs (N parameters, D tokens, pool of dataset_tokens unique tokens, loss in nats/token).

    Returns an ``analysis.laws.FittedLaw`` whose params are E, A, B, alpha, beta, R_D_star, R_N_star.
    Raises AnalysisError unless some runs repeat their data (dataset_tokens < D): without
    repetition R*_D and R*_N are not identified.
    """
    d, u = np.asarray(tokens, float), np.asarray(dataset_tokens, float)
    if d.shape == u.shape and not np.any(u < d * (1 - 1e-9)):
        raise AnalysisError(f"{NAME}: no run repeats its data (dataset_tokens < tokens in none of them); R*_D cannot be fitted")
    return fit_law(law(), loss, theta0=theta0, N=n_params, D=tokens, U=dataset_tokens)


def fit_points(points, counts_BR, percentiles) -> dict:
    """Fit to prepared points (columns n_params, tokens, dataset_tokens, loss) with bootstrap intervals."""
    n, d, u, loss = (points[c].to_numpy(float) for c in ("n_params", "tokens", "dataset_tokens", "loss"))
    fitted = fit(n, d, u, loss)
    out = fitted.to_dict()
    out["data"] = {"run": points["run"].tolist(), "n_params": n.tolist(), "tokens": d.tolist(),
                   "dataset_tokens": u.tolist(), "loss": loss.tolist()}  # fmt: skip
    out["predicted_loss"] = fitted(N=n, D=d, U=u).tolist()
    # worth of data repeated 4 and 16 times (the paper: 4 epochs are nearly as good as new data)
    out["effective_data_fraction"] = {
        str(ep): float(effective(1.0, ep - 1.0, fitted.params["R_D_star"]) / ep) for ep in (2, 4, 8, 16, 40)
    }
    out.update(bootstrap_law(fitted, {"N": n, "D": d, "U": u}, loss, counts_BR, percentiles))
    return out


def report_lines(res: dict) -> list[str]:
    """report.md section: fitted constants next to the paper's, and the worth of repeated epochs."""
    ref = references.MUENNIGHOFF2023
    lines = [f"## Repeated data: {res['formula']}", "", f"({res['citation']})", "",
             "| parameter | fitted | interval | Muennighoff et al. 2023 |", "| --- | --- | --- | --- |"]  # fmt: skip
    for k in PARAM_NAMES:
        lines.append(f"| {k} | {fmt(res['params'][k], 4)} | {iv(res, k)} | {ref[k]:g} |")
    frac = ", ".join(f"{ep} epochs: {v:.2f}" for ep, v in res["effective_data_fraction"].items())
    lines += ["", f"- {res['n_points']} runs, RMS log residual {res['rmse_log_loss']:.4f}; converged: {res['converged']}",
              f"- worth of repeated data (D' / D for a pool seen that many times): {frac}",
              "- U_N (the base of N') is the compute-optimal size for U_D unique tokens under the fitted Chinchilla "
              "part, capped at N", ""]  # fmt: skip
    return lines


def draw(res: dict, out_dir) -> list[str]:
    """Loss against epochs (D / U_D) per pool and model size: runs as points, the fitted law as lines."""
    data = res["data"]
    n, d, u, loss = (np.asarray(data[k], float) for k in ("n_params", "tokens", "dataset_tokens", "loss"))
    epochs = d / u
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    pools, sizes = np.unique(u), np.unique(n)
    markers = "osD^v<>p*"
    cmap = plt.get_cmap("viridis")
    for j, size in enumerate(sizes):
        colour = cmap(j / max(len(sizes) - 1, 1))
        for i, pool in enumerate(pools):
            sel = (u == pool) & (n == size)
            if not sel.any():
                continue
            ax.scatter(epochs[sel], loss[sel], color=colour, marker=markers[i % len(markers)], zorder=3,
                       label=f"N={size:.3g}, U_D={pool:.3g}")  # fmt: skip
            grid = np.geomspace(epochs[sel].min(), epochs[sel].max(), 60)
            ax.plot(grid, predict(res["params"], size, grid * pool, pool), color=colour, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("epochs over the unique pool (D / U_D)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"data-constrained law: R*_D = {fmt(res['params']['R_D_star'], 3)}, R*_N = {fmt(res['params']['R_N_star'], 3)}")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return _save(fig, out_dir, "data_constrained")

