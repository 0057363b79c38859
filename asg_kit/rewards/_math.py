"""Helpers shared by the reward formulas: NaN-keeping clips, a Gaussian bump, a rolling window."""

from __future__ import annotations

import math
from collections import deque


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


class RollingWindow:
    """The last ``window`` values of a running statistic, saved and restored exactly."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.values: deque[float] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self.values)

    def state_dict(self) -> dict:
        return {"window": self.window, "values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        if int(state["window"]) != self.window:
            raise ValueError(f"state was saved with window={state['window']}, this {type(self).__name__} has {self.window}")
        self.values = deque((float(v) for v in state["values"]), maxlen=self.window)
