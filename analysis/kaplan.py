"""Which runs each Kaplan law is defined on.

Kaplan et al. 2020 define L(N) as the loss of models not limited by data (trained to
convergence, or early-stopped at large D) and L(D) as the loss of models not limited by size.
Fitted to an IsoFLOP sweep's final losses they are something else: every run there stops short
of convergence. So each single-variable law keeps only the frontier run of each value of its
variable (the lowest loss at that N, or at that D), and only where the data show that the other
variable no longer limits it: a run with half (or less) of the other variable reached a loss
within CONVERGED_REL of it. For L(N) that is another run of the same N with <= half the tokens,
else the run's own training curve at half its tokens (a mid-run loss of a schedule stretched to
the full run, so a conservative test); for L(D), a run on the same tokens with <= half the
parameters. Where too few values of the variable pass, the law is not fitted and the report and
the figure say why.
"""

from __future__ import annotations

import numpy as np

from analysis.approaches import interp_loglog

CONVERGED_REL = 0.01  # "no longer limited": half the other variable costs < 1% more loss
SAME_TOKENS_DEX = 0.005  # runs on the same token count (L(D) evidence), in decades

# law base name -> (variable, the variable that must not limit it)
SINGLE = {"kaplan_N": ("N", "D"), "kaplan_D": ("D", "N")}


def _half_evidence(other, loss, same):
    """Per run i: loss of the run j in the same group (same[i, j]) with the largest other_j <= other_i / 2,
    relative to loss_i, minus 1 (NaN where no such run)."""
    rel = np.full(loss.size, np.nan)
    for i in range(loss.size):
        cand = np.flatnonzero(same[i] & (other <= 0.5 * other[i] * (1 + 1e-9)))
        if cand.size:
            j = cand[np.argmax(other[cand])]
            rel[i] = loss[j] / loss[i] - 1.0
    return rel


def selection(name: str, pts) -> dict | None:
    """For kaplan_N / kaplan_D (with or without +E): which runs the law is defined on.

    Returns None for other laws, else {"variable", "use" (bool per run: the frontier run of its
    value, shown not limited by the other variable), "n_values", "n_supported", "evidence" (per
    frontier value: relative loss of the half-other-variable comparison, NaN without one),
    "fitted_on" (text)}.
    """
    base = name.partition("+")[0]
    if base not in SINGLE:
        return None
    var, other_var = SINGLE[base]
    p = pts.points
    n, d, loss = (p[c].to_numpy(float) for c in ("n_params_kaplan", "tokens", "loss"))
    if var == "N":
        key, other = n, d
        same = n[:, None] == n[None, :]
        rel = _half_evidence(other, loss, same)
        if pts.has_curves:  # no shorter run of this size: the run's own curve at half its tokens
            curves = {r: g for r, g in pts.curves.groupby("run")}
            for i, run in enumerate(p["run"]):
                g = curves.get(run)
                if np.isnan(rel[i]) and g is not None and len(g) >= 2 and g["tokens"].gt(0).all():
                    half = float(interp_loglog(0.5 * d[i], g["tokens"], g["loss"]))
                    if np.isfinite(half):
                        rel[i] = half / loss[i] - 1.0
        how = "another run of that size with <= half the tokens (else its own training curve at half its tokens)"
    else:
        key, other = d, n
        same = np.abs(np.log10(d[:, None] / d[None, :])) <= SAME_TOKENS_DEX
        rel = _half_evidence(other, loss, same)
        how = "another run on those tokens with <= half the parameters"
    use = np.zeros(loss.size, bool)
    frontier = []
    seen = np.zeros(loss.size, bool)
    for i in np.argsort(key):
        if seen[i]:
            continue
        members = np.flatnonzero(same[i])
        seen[members] = True
        best = members[np.argmin(loss[members])]
        frontier.append(best)
        use[best] = bool(rel[best] < CONVERGED_REL)
    return {
        "variable": var, "use": use, "n_values": len(frontier), "n_supported": int(use.sum()),
        "evidence": {"value": key[frontier].tolist(), "loss": loss[frontier].tolist(),
                     "rel_loss_at_half": [None if np.isnan(rel[i]) else float(rel[i]) for i in frontier]},
        "fitted_on": (f"the lowest loss at each {var}, where {how} came within {CONVERGED_REL:.0%} of it "
                      f"(not limited by {other_var}): {int(use.sum())} of {len(frontier)} values of {var}"),
    }  # fmt: skip


def unsupported_reason(name: str, sel: dict, needed: int) -> str:
    """Why the data cannot support the law (fewer than ``needed`` values of its variable pass)."""
    var, other = SINGLE[name.partition("+")[0]]
    ev = [r for r in sel["evidence"]["rel_loss_at_half"] if r is not None]
    half = "tokens" if var == "N" else "parameters"
    seen = (f"half the {half} cost {min(ev):.1%} to {max(ev):.1%} more loss where a comparison exists" if ev
            else f"no run with half the {half} to compare with")  # fmt: skip
    return (f"L({var}) is the loss of models not limited by {other}; {sel['n_supported']} of {sel['n_values']} values "
            f"of {var} came within {CONVERGED_REL:.0%} of it ({seen}); the law needs >= {needed}")
