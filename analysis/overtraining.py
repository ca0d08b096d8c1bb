"""Over-training: loss against compute and the token multiplier (Gadre et al. 2024, eq. 4).

"Language models scale reliably with over-training and on downstream tasks" writes the loss
of a model trained with C FLOPs at token multiplier M = D / N as

    L(C, M) = E + (a M^eta + b M^-eta) C^-eta,

Chinchilla's law with alpha = beta rewritten in (C, M) (C = 6 N D). At fixed C the loss is
lowest at M* = (b / a)^(1 / (2 eta)); training at another M costs

    loss penalty   L(C, M) - L(C, 20)                       (shrinks with C as C^-eta)
    compute factor ((a M^eta + b M^-eta) / (a 20^eta + b 20^-eta))^(1 / eta)

the second being how many times the compute of an M = 20 run the M run needs for the same
loss (independent of C). C is taken in the fit's FLOP convention and M = D / N with the fit's N,
so fit with ``flops="6N"`` or ``"6ND"`` and the matching N for C = 6 N D.
Fitted as least squares on log loss (``analysis.laws.fit_law``) from a grid of starts.
"""

from __future__ import annotations

import itertools

import numpy as np

from analysis.beyond import bootstrap_law
from analysis.figures import _save, plt
from analysis.laws import Law, fit_law
from analysis.report import _g as fmt
from analysis.report import _iv as iv

NAME = "overtraining"
PARAM_NAMES = ("E", "a", "b", "eta")
FORMULA = "L(C, M) = E + (a M^eta + b M^-eta) C^-eta, M = D / N"
CITATION = "Gadre et al. 2024, Language models scale reliably with over-training and on downstream tasks, eq. 4"
COLUMNS = ()  # N, D, C and loss are always there
REFERENCE_M = 20.0
REPORT_MULTIPLIERS = (5.0, 10.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0)


def predict(params, flops, multiplier):
    """L(C, M) in nats per token; C in FLOPs, M = D / N tokens per parameter."""
    c, m = np.asarray(flops, float), np.asarray(multiplier, float)
    eta = params["eta"]
    return params["E"] + (params["a"] * m**eta + params["b"] * m**-eta) * c**-eta


def optimal_multiplier(params) -> float:
    """M* = (b / a)^(1 / (2 eta)): the tokens per parameter of lowest loss at any fixed compute."""
    return float((params["b"] / params["a"]) ** (1.0 / (2.0 * params["eta"])))


def loss_penalty(params, multiplier, flops, reference=REFERENCE_M):
    """L(C, M) - L(C, reference) at fixed compute C (nats per token)."""
    return predict(params, flops, multiplier) - predict(params, flops, reference)


def compute_factor(params, multiplier, reference=REFERENCE_M):
    """Compute an M run needs for the loss of a ``reference`` run, as a multiple of that run's compute."""
    m, eta = np.asarray(multiplier, float), params["eta"]
    shape = params["a"] * m**eta + params["b"] * m**-eta
    return (shape / (params["a"] * reference**eta + params["b"] * reference**-eta)) ** (1.0 / eta)


def _to_params(th) -> dict[str, float]:
    with np.errstate(over="ignore"):
        return {"E": float(np.exp(th[2])), "a": float(np.exp(th[0])), "b": float(np.exp(th[1])), "eta": float(th[3])}


def _from_params(p) -> np.ndarray:
    return np.array([np.log(p["a"]), np.log(p["b"]), np.log(p["E"]), p["eta"]])


def _raw(th, x):
    eta = th[3]
    log_c, log_m = np.log(x["C"]), np.log(x["M"])
    return np.exp(th[2]) + np.exp(th[0] + eta * log_m - eta * log_c) + np.exp(th[1] - eta * log_m - eta * log_c)


def _starts(x, loss):
    log_c, log_m = np.median(np.log(x["C"])), np.median(np.log(x["M"]))
    out = []
    for eta, e_frac, ratio in itertools.product((0.05, 0.1, 0.2, 0.4), (0.0, 0.5, 0.8), (0.1, 1.0, 10.0)):
        e = max(e_frac * loss.min(), 1e-3)
        scale = max(np.median(loss) - e, 1e-3)
        # a M^eta = ratio * b M^-eta at the median M, the two summing to the median excess loss
        log_b = np.log(scale / (1.0 + ratio)) + eta * log_c + eta * log_m
        log_a = np.log(ratio * scale / (1.0 + ratio)) + eta * log_c - eta * log_m
        out.append([log_a, log_b, np.log(e), eta])
    return out


def law() -> Law:
    """The over-training law as an ``analysis.laws.Law`` with inputs C (FLOPs) and M (tokens per parameter)."""
    return Law(
        name=NAME, formula=FORMULA, citation=CITATION, inputs=("C", "M"), param_names=PARAM_NAMES,
        raw=_raw, to_params=_to_params, from_params=_from_params, starts=_starts,
    )  # fmt: skip


def fit(flops, multiplier, loss, theta0=None):
    """Fit L(C, M) to runs (C in FLOPs, M = D / N, loss in nats/token); an ``analysis.laws.FittedLaw``."""
    return fit_law(law(), loss, theta0=theta0, C=flops, M=multiplier)


def summary(params, flops) -> dict:
    """M*, and the loss penalty and compute factor of each REPORT_MULTIPLIERS value against M = 20 at ``flops``."""
    m = np.asarray(REPORT_MULTIPLIERS)
    return {
        "M_opt": optimal_multiplier(params),
        "at_flops": float(flops),
        "multipliers": m.tolist(),
        "loss_penalty": loss_penalty(params, m, flops).tolist(),
        "compute_factor": compute_factor(params, m).tolist(),
    }


def fit_points(points, counts_BR, percentiles) -> dict:
    """Fit to prepared points (n_params, tokens, flops, loss) with bootstrap intervals."""
    n, d, c, loss = (points[k].to_numpy(float) for k in ("n_params", "tokens", "flops", "loss"))
    m = d / n
    fitted = fit(c, m, loss)
    out = fitted.to_dict()
    out["data"] = {"run": points["run"].tolist(), "flops": c.tolist(), "multiplier": m.tolist(), "loss": loss.tolist()}
    out["predicted_loss"] = fitted(C=c, M=m).tolist()
    out["penalty"] = summary(fitted.params, c.max())
    out.update(bootstrap_law(fitted, {"C": c, "M": m}, loss, counts_BR, percentiles))
    return out


def report_lines(res: dict) -> list[str]:
    """report.md section: E, a, b, eta; M*; the penalty table against M = 20 at the largest run's compute."""
    p, pen = res["params"], res["penalty"]
    lines = [f"## Over-training: {res['formula']}", "", f"({res['citation']})", "",
             "| parameter | fitted | interval |", "| --- | --- | --- |"]  # fmt: skip
    lines += [f"| {k} | {fmt(p[k], 4)} | {iv(res, k)} |" for k in PARAM_NAMES]
    lines += ["", f"- {res['n_points']} runs, M from {min(res['data']['multiplier']):.3g} to {max(res['data']['multiplier']):.3g}; "
              f"RMS log residual {res['rmse_log_loss']:.4f}; converged: {res['converged']}",
              f"- lowest loss at fixed compute at M* = (b/a)^(1/(2 eta)) = {pen['M_opt']:.3g} tokens per parameter", "",
              f"| M | loss penalty vs M = 20 at C = {pen['at_flops']:.3g} | compute for the loss of M = 20 (x) |",
              "| --- | --- | --- |"]  # fmt: skip
    lines += [f"| {m:g} | {dl:+.4f} | {cf:.3g} |" for m, dl, cf in zip(pen["multipliers"], pen["loss_penalty"], pen["compute_factor"])]
    return lines + [""]


def draw(res: dict, out_dir) -> list[str]:
    """Loss against M at each compute budget (runs within 0.05 decades grouped): points and the fitted law."""
    c, m, loss = (np.asarray(res["data"][k], float) for k in ("flops", "multiplier", "loss"))
    key = np.round(np.log10(c) * 20.0) / 20.0
    groups = np.unique(key)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    grid = np.geomspace(m.min() / 1.5, m.max() * 1.5, 100)
    for i, g in enumerate(groups):
        sel = key == g
        colour = cmap(i / max(len(groups) - 1, 1))
        budget = float(np.exp(np.mean(np.log(c[sel]))))
        ax.scatter(m[sel], loss[sel], color=colour, zorder=3, label=f"C = {budget:.3g}")
        ax.plot(grid, predict(res["params"], budget, grid), color=colour, lw=1)
    ax.axvline(res["penalty"]["M_opt"], color="grey", ls=":", lw=1, label=f"M* = {res['penalty']['M_opt']:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("token multiplier M = D / N")
    ax.set_ylabel("loss (nats/token)")
    p = res["params"]
    ax.set_title(f"over-training law: E={fmt(p['E'])}, a={fmt(p['a'])}, b={fmt(p['b'])}, eta={fmt(p['eta'])}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir, "overtraining")
