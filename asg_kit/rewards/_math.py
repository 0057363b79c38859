"""Scalar helpers shared by the reward formulas."""

from __future__ import annotations

import math


def clip(x: float, lo: float, hi: float) -> float:
    """``min(hi, max(lo, x))`` that keeps NaN as NaN (the builtins would hide it)."""
    if math.isnan(x):
        return math.nan
    return min(hi, max(lo, x))


def clip01(x: float) -> float:
    return clip(x, 0.0, 1.0)


def gaussian(x: float, center: float, width: float) -> float:
    """``exp(-(x - center)^2 / (2 * width^2))``."""
    return math.exp(-((x - center) ** 2) / (2.0 * width**2))
