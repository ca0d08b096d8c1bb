"""Scaling laws as small objects: named parameters, a formula, a citation, and a fit.

Kaplan et al. 2020, "Scaling Laws for Neural Language Models" (arXiv:2001.08361):
    L(N)     = (N_c / N)^alpha_N                                 eq. 1.1
    L(D)     = (D_c / D)^alpha_D                                 eq. 1.2
    L(C_min) = (C_c / C)^alpha_C                                 eq. 1.3
    L(N, D)  = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D  eq. 1.5
    L(N, S)  = (N_c / N)^alpha_N + (S_c / S)^alpha_S              eq. 1.6
each optionally plus an irreducible loss E (Henighan et al. 2020 form).
Hoffmann et al. 2022 (Chinchilla), eq. 2:  L(N, D) = E + A / N^alpha + B / D^beta.
Saturating compute frontier:  L(C) = E + (C_0 / C)^gamma.

Fits minimise the sum of squared log-loss residuals (scipy least_squares, trust region)
from a few starts; scale constants are fitted as logs so they stay positive.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np
from scipy.optimize import least_squares

from analysis.load import AnalysisError


@dataclasses.dataclass(frozen=True)
class Law:
    """A scaling law L(inputs; params).

    ``raw`` maps (theta, inputs dict of arrays) to predicted loss, where theta holds the fit
    coordinates; ``to_params`` turns theta into the named parameters; ``starts`` gives
    starting thetas from the data.
    """

    name: str
    formula: str
    citation: str
    inputs: tuple[str, ...]
    param_names: tuple[str, ...]
    raw: Callable
    to_params: Callable
    from_params: Callable
    starts: Callable

    def __call__(self, params: dict, **inputs) -> np.ndarray:
        """Predicted loss (nats/token) for named ``params`` at ``inputs`` (e.g. N=..., D=...)."""
        return self.raw(self.from_params(params), {k: np.asarray(inputs[k], float) for k in self.inputs})

    def fit(self, loss, theta0=None, **inputs) -> "FittedLaw":
        """Fit to observed ``loss`` at ``inputs``; theta0 overrides the multi-start (warm start)."""
        return fit_law(self, loss, theta0=theta0, **inputs)


@dataclasses.dataclass(frozen=True)
class FittedLaw:
    law: Law
    params: dict[str, float]
    theta: np.ndarray
    rmse_log: float  # root-mean-square log-loss residual
    n_points: int
    converged: bool

    def __call__(self, **inputs):
        return self.law(self.params, **inputs)

    def to_dict(self) -> dict:
        return {
            "law": self.law.name, "formula": self.law.formula, "citation": self.law.citation,
            "params": self.params, "rmse_log_loss": self.rmse_log, "n_points": self.n_points,
            "converged": self.converged,
        }  # fmt: skip


def _power(logc, alpha, x):
    # (X_c / X)^alpha computed in logs for range safety
    return np.exp(alpha * (logc - np.log(x)))


def _single(var: str, sym: str, exp_name: str, irreducible: bool, eq: str) -> Law:
    names = (f"{sym}_c", exp_name) + (("E",) if irreducible else ())

    def raw(th, x):
        out = _power(th[0], th[1], x[var])
        return out + np.exp(th[2]) if irreducible else out

    def to_params(th):
        p = {names[0]: float(np.exp(th[0])), exp_name: float(th[1])}
        if irreducible:
            p["E"] = float(np.exp(th[2]))
        return p

    def from_params(p):
        th = [np.log(p[names[0]]), p[exp_name]]
        return np.array(th + ([np.log(p["E"])] if irreducible else []))

    def starts(x, loss):
        lx = np.log(x[var])
        out = []
        for alpha in (0.05, 0.1, 0.3, 0.7):
            for e_frac in ((0.0, 0.5, 0.9) if irreducible else (0.0,)):
                e = e_frac * loss.min()
                # choose X_c so the law passes through the geometric-middle point
                lc = np.median(lx) + np.log(max(np.median(loss) - e, 1e-3)) / alpha
                out.append([lc, alpha] + ([np.log(max(e, 1e-3))] if irreducible else []))
        return out

    formula = (f"L({sym}) = " + ("E + " if irreducible else "") + f"({sym}_c / {sym})^{exp_name}")
    return Law(
        name=f"kaplan_{sym}" + ("_E" if irreducible else ""), formula=formula,
        citation=f"Kaplan et al. 2020, Scaling Laws for Neural Language Models, {eq}",
        inputs=(var,), param_names=names, raw=raw, to_params=to_params, from_params=from_params, starts=starts,
    )  # fmt: skip


def kaplan_n(irreducible=False) -> Law:
    """L(N) = [E +] (N_c / N)^alpha_N, N non-embedding parameters (Kaplan et al. 2020, eq. 1.1)."""
    return _single("N", "N", "alpha_N", irreducible, "eq. 1.1")


def kaplan_d(irreducible=False) -> Law:
    """L(D) = [E +] (D_c / D)^alpha_D, D training tokens (Kaplan et al. 2020, eq. 1.2)."""
    return _single("D", "D", "alpha_D", irreducible, "eq. 1.2")


def kaplan_c(irreducible=False) -> Law:
    """L(C_min) = [E +] (C_c / C)^alpha_C on the compute-efficient frontier (Kaplan et al. 2020, eq. 1.3)."""
    return _single("C", "C", "alpha_C", irreducible, "eq. 1.3")


def saturating_c() -> Law:
    """L(C) = E + (C_0 / C)^gamma: the compute frontier with an irreducible floor E."""
    law = _single("C", "C", "gamma", True, "")
    return dataclasses.replace(
        law, name="saturating_C", formula="L(C) = E + (C_0 / C)^gamma", param_names=("C_0", "gamma", "E"),
        citation="Henighan et al. 2020, Scaling Laws for Autoregressive Generative Modeling, L = L_inf + (x_0 / x)^alpha",
        to_params=lambda th: {"C_0": float(np.exp(th[0])), "gamma": float(th[1]), "E": float(np.exp(th[2]))},
        from_params=lambda p: np.array([np.log(p["C_0"]), p["gamma"], np.log(p["E"])]),
    )  # fmt: skip


def kaplan_nd(irreducible=False) -> Law:
    """L(N, D) = [E +] [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (Kaplan et al. 2020, eq. 1.5)."""
    names = ("N_c", "alpha_N", "D_c", "alpha_D") + (("E",) if irreducible else ())

    def raw(th, x):
        inner = _power(th[0], th[1] / th[3], x["N"]) + np.exp(th[2] - np.log(x["D"]))
        out = inner ** th[3]
        return out + np.exp(th[4]) if irreducible else out

    def to_params(th):
        p = {"N_c": float(np.exp(th[0])), "alpha_N": float(th[1]), "D_c": float(np.exp(th[2])), "alpha_D": float(th[3])}
        if irreducible:
            p["E"] = float(np.exp(th[4]))
        return p

    def from_params(p):
        th = [np.log(p["N_c"]), p["alpha_N"], np.log(p["D_c"]), p["alpha_D"]]
        return np.array(th + ([np.log(p["E"])] if irreducible else []))

    def starts(x, loss):
        ln, ld = np.median(np.log(x["N"])), np.median(np.log(x["D"]))
        out = []
        for an, ad in itertools.product((0.05, 0.1, 0.3), (0.05, 0.1, 0.3)):
            for e_frac in ((0.0, 0.7) if irreducible else (0.0,)):
                e = e_frac * loss.min()
                half = max(np.median(loss) - e, 1e-3) ** (1 / ad) / 2  # each term half of the inner sum
                out.append([ln + np.log(half) * ad / an, an, ld + np.log(half), ad] + ([np.log(max(e, 1e-3))] if irreducible else []))
        return out

    return Law(
        name="kaplan_ND" + ("_E" if irreducible else ""),
        formula="L(N, D) = " + ("E + " if irreducible else "") + "[(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D",
        citation="Kaplan et al. 2020, Scaling Laws for Neural Language Models, eq. 1.5",
        inputs=("N", "D"), param_names=names, raw=raw, to_params=to_params, from_params=from_params, starts=starts,
    )  # fmt: skip


def kaplan_ns(irreducible=False) -> Law:
    """L(N, S) = [E +] (N_c/N)^alpha_N + (S_c/S)^alpha_S, S optimiser steps (Kaplan et al. 2020, eq. 1.6)."""
    names = ("N_c", "alpha_N", "S_c", "alpha_S") + (("E",) if irreducible else ())

    def raw(th, x):
        out = _power(th[0], th[1], x["N"]) + _power(th[2], th[3], x["S"])
        return out + np.exp(th[4]) if irreducible else out

    def to_params(th):
        p = {"N_c": float(np.exp(th[0])), "alpha_N": float(th[1]), "S_c": float(np.exp(th[2])), "alpha_S": float(th[3])}
        if irreducible:
            p["E"] = float(np.exp(th[4]))
        return p

    def from_params(p):
        th = [np.log(p["N_c"]), p["alpha_N"], np.log(p["S_c"]), p["alpha_S"]]
        return np.array(th + ([np.log(p["E"])] if irreducible else []))

    def starts(x, loss):
        ln, ls = np.median(np.log(x["N"])), np.median(np.log(x["S"]))
        out = []
        for an, a_s in itertools.product((0.05, 0.1, 0.3, 0.7), (0.05, 0.1, 0.3, 0.7)):
            for e_frac in ((0.0, 0.7) if irreducible else (0.0,)):
                e = e_frac * loss.min()
                half = max(np.median(loss) - e, 2e-3) / 2
                out.append([ln + np.log(half) / an, an, ls + np.log(half) / a_s, a_s] + ([np.log(max(e, 1e-3))] if irreducible else []))
        return out

    return Law(
        name="kaplan_NS" + ("_E" if irreducible else ""),
        formula="L(N, S) = " + ("E + " if irreducible else "") + "(N_c / N)^alpha_N + (S_c / S)^alpha_S",
        citation="Kaplan et al. 2020, Scaling Laws for Neural Language Models, eq. 1.6",
        inputs=("N", "S"), param_names=names, raw=raw, to_params=to_params, from_params=from_params, starts=starts,
    )  # fmt: skip


def chinchilla() -> Law:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2).

    This generic least-squares fit is for comparison; Approach 3 proper (Huber on log loss
    from the 4,500-point grid) is ``analysis.parametric.fit_parametric``.
    """

    def raw(th, x):
        return np.exp(th[2]) + np.exp(th[0] - th[3] * np.log(x["N"])) + np.exp(th[1] - th[4] * np.log(x["D"]))

    def to_params(th):
        return {"E": float(np.exp(th[2])), "A": float(np.exp(th[0])), "B": float(np.exp(th[1])), "alpha": float(th[3]), "beta": float(th[4])}

    def from_params(p):
        return np.array([np.log(p["A"]), np.log(p["B"]), np.log(p["E"]), p["alpha"], p["beta"]])

    def starts(x, loss):
        return [[a, b, e, al, be] for a in (2.0, 6.0) for b in (2.0, 6.0) for e in (-0.5, 0.5) for al in (0.3, 0.6) for be in (0.3, 0.6)]

    return Law(
        name="chinchilla", formula="L(N, D) = E + A / N^alpha + B / D^beta",
        citation="Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, eq. 2",
        inputs=("N", "D"), param_names=("E", "A", "B", "alpha", "beta"), raw=raw, to_params=to_params,
        from_params=from_params, starts=starts,
    )  # fmt: skip


LAWS = {
    "kaplan_N": kaplan_n, "kaplan_D": kaplan_d, "kaplan_C": kaplan_c, "kaplan_ND": kaplan_nd,
    "kaplan_NS": kaplan_ns, "saturating_C": saturating_c, "chinchilla": chinchilla,
}  # fmt: skip


def law_from_name(name: str) -> Law:
    """A law from its name in LAWS, with "+E" appended for an irreducible term (e.g. "kaplan_N+E")."""
    base, _, extra = name.partition("+")
    if base not in LAWS or extra not in ("", "E") or (extra and base in ("saturating_C", "chinchilla")):
        raise AnalysisError(f"unknown law {name!r}; choose from {sorted(LAWS)} (append '+E' for an irreducible term)")
    if base in ("saturating_C", "chinchilla"):  # E is part of these laws already
        return LAWS[base]()
    return LAWS[base](irreducible=extra == "E")


def fit_law(law: Law, loss, theta0=None, **inputs) -> FittedLaw:
    """Least squares on log-loss residuals from the law's starts (or ``theta0``); best kept."""
    loss = np.asarray(loss, float).ravel()
    x = {k: np.asarray(inputs[k], float).ravel() for k in law.inputs}
    n_par = len(law.param_names)
    for name, arr in [("loss", loss)] + list(x.items()):
        if arr.size != loss.size:
            raise AnalysisError(f"{law.name}: {name} has {arr.size} values, loss has {loss.size}")
        bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
        if bad.size:
            raise AnalysisError(f"{law.name}: {name} must be finite and > 0; bad at positions {bad[:10].tolist()}")
    for name, arr in x.items():
        if np.unique(arr).size < 2:
            raise AnalysisError(f"{law.name} needs at least 2 distinct values of {name}, got {np.unique(arr).size}")
    if loss.size <= n_par:
        raise AnalysisError(f"{law.name} has {n_par} parameters and needs more than {n_par} points, got {loss.size}")
    log_loss = np.log(loss)

    def resid(th):
        with np.errstate(all="ignore"):
            r = np.log(law.raw(th, x)) - log_loss
        return np.where(np.isfinite(r), r, 1e3)

    starts = [theta0] if theta0 is not None else law.starts(x, loss)
    best = None
    for th0 in starts:
        res = least_squares(resid, np.asarray(th0, float), method="trf", x_scale="jac", max_nfev=2000)
        if best is None or res.cost < best.cost:
            best = res
    r = resid(best.x)
    with np.errstate(over="ignore"):  # a degenerate fit (exponent -> 0) sends a scale constant to inf
        params = law.to_params(best.x)
    finite = all(np.isfinite(v) for v in params.values())
    return FittedLaw(
        law=law, params=params, theta=best.x, rmse_log=float(np.sqrt(np.mean(r**2))),
        n_points=int(loss.size), converged=bool(best.status > 0) and finite,
    )  # fmt: skip
