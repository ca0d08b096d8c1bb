"""Published compute-optimal allocations, drawn as reference lines next to our fits."""

from __future__ import annotations

import numpy as np

PF_DAY = 8.64e19  # FLOPs in one petaflop/s-day

# Hoffmann et al. 2022, Section 3.3: Approach 3 fit to the Chinchilla runs (mean Huber terms).
CHINCHILLA_APPROACH3 = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}

# Hoffmann et al. 2022, Table 3 (Approach 1): model size, compute-optimal FLOPs, tokens.
CHINCHILLA_TABLE3 = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)

# Besiroglu et al. 2024 (Epoch AI), "Chinchilla Scaling: A replication attempt", refit of Approach 3.
EPOCH_APPROACH3 = {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.348, "beta": 0.366}

# Kaplan et al. 2020, Section 6.1 / Figure 14: N_opt(C_min) ~ 1.3e9 (C_min / PF-day)^0.73
# (non-embedding parameters).
KAPLAN_N_OPT = {"k": 1.3e9, "exponent": 0.73}


def chinchilla_table3_n_opt(flops):
    """N_opt(C) from a least-squares line through Hoffmann et al. Table 3 (exponent ~ 0.50)."""
    n, c, _ = np.array(CHINCHILLA_TABLE3).T
    slope, intercept = np.polyfit(np.log(c), np.log(n), 1)
    return np.exp(intercept) * np.asarray(flops, float) ** slope


def chinchilla_table3_d_opt(flops):
    """D_opt(C) from a least-squares line through Hoffmann et al. Table 3 (exponent ~ 0.50)."""
    _, c, d = np.array(CHINCHILLA_TABLE3).T
    slope, intercept = np.polyfit(np.log(c), np.log(d), 1)
    return np.exp(intercept) * np.asarray(flops, float) ** slope


def kaplan_n_opt(flops):
    """Kaplan et al. 2020: N_opt = 1.3e9 (C / PF-day)^0.73; D_opt = C / (6 N_opt)."""
    return KAPLAN_N_OPT["k"] * (np.asarray(flops, float) / PF_DAY) ** KAPLAN_N_OPT["exponent"]

# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", Section 3.1 / Appendix A:
# the data-constrained law fitted to their runs (R*_D, R*_N: the repetitions of data and of
# excess parameters at which their worth has decayed by 1 - 1/e).
MUENNIGHOFF2023 = {"E": 1.8691, "A": 520.8, "B": 1487.7, "alpha": 0.35266, "beta": 0.35266,
                   "R_D_star": 15.39, "R_N_star": 5.31}  # fmt: skip
