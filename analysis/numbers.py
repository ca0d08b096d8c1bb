"""One way to print a fitted number, shared by report.md and the figures' legends."""

from __future__ import annotations

import math


def fmt(x, digits=3) -> str:
    """``digits`` significant digits; round-off such as -4e-17 or a constant at its bound 0
    (1.9e-28) reads as 0; missing or non-finite values as a dash."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return "0" if abs(x) < 1e-12 else f"{x:.{digits}g}"
