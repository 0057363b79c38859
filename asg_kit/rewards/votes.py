"""Self-consistency over N Solver answers: vote statistics, informativeness, the adaptive
easy threshold and difficulty buckets (SPEC section 2)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from asg_kit.rewards._math import RollingWindow, clip01, gaussian
from asg_kit.rewards.answers import normalize_answer

Bucket = Literal["easy", "medium", "hard", "unsolvable"]


@dataclass(frozen=True)
class VoteStats:
    """Statistics of one question's answers.

    ``shares`` maps each normalised answer to its share p(a), most frequent first (ties in
    order of first appearance); ``entropy`` is H_SC = -sum p ln p in nats; ``majority`` is
    the first key of ``shares``, ``majority_share`` f = max p, ``margin`` m = p1 - p2
    (p2 = 0 when unanimous); ``labels`` are the normalised answers in sample order.
    """

    labels: tuple[str, ...]
    shares: dict[str, float]
    entropy: float
    majority: str
    majority_share: float
    margin: float

    @property
    def n(self) -> int:
        return len(self.labels)


def vote_stats(answers: Sequence[str], normalize: bool = True) -> VoteStats:
    """Vote statistics of ``answers`` (normalised with ``normalize_answer`` unless told not)."""
    if len(answers) == 0:
        raise ValueError("vote_stats needs at least one answer")
    labels = tuple(normalize_answer(a) if normalize else a for a in answers)
    counts = Counter(labels)  # insertion order = first appearance, kept by the stable sort
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    n = len(labels)
    shares = {label: count / n for label, count in ranked}
    entropy = max(0.0, -sum(p * math.log(p) for p in shares.values()))
    top = [p for _, p in zip(range(2), shares.values())] + [0.0]
    return VoteStats(labels, shares, entropy, ranked[0][0], top[0], top[0] - top[1])


def informativeness(
    stats: VoteStats,
    entropy_center: float = 0.675,
    entropy_width: float = 0.525,
    margin_max: float = 0.90,
) -> float:
    """How much learning signal a vote carries, in [0, 1].

    ``s = clip01(0.5 * exp(-(H_SC - 0.675)^2 / (2 * 0.525^2)) + 0.5 * max(0, 1 - m / 0.90))``
    (centre and width are the midpoint and half-span of the entropy band [0.15, 1.2]).
    """
    bump = gaussian(stats.entropy, entropy_center, entropy_width)
    return clip01(0.5 * bump + 0.5 * max(0.0, 1.0 - stats.margin / margin_max))


class EasyThreshold(RollingWindow):
    """Adaptive entropy threshold tau_easy below which a question counts as easy.

    ``tau_easy = clip(Q1 + 0.25 * IQR, 0.10, 1.2)`` over the last ``window`` vote entropies
    (linear-interpolated quartiles); with fewer than ``min_samples`` entropies (default: none
    yet) it is ``cold_value``, by default the lower bound. The released code waits for 32
    entropies and uses 0.15 until then: ``EasyThreshold(min_samples=32, cold_value=0.15)``.
    """

    def __init__(
        self,
        window: int = 256,
        iqr_weight: float = 0.25,
        lower: float = 0.10,
        upper: float = 1.2,
        min_samples: int = 1,
        cold_value: float | None = None,
    ) -> None:
        super().__init__(window)
        self.iqr_weight = iqr_weight
        self.lower = lower
        self.upper = upper
        self.min_samples = max(1, min_samples)
        self.cold_value = cold_value

    @property
    def value(self) -> float:
        if len(self.values) < self.min_samples:
            return self.lower if self.cold_value is None else self.cold_value
        q1, q3 = np.percentile(np.fromiter(self.values, dtype=float), [25.0, 75.0])
        return float(min(self.upper, max(self.lower, q1 + self.iqr_weight * (q3 - q1))))

    def update(self, entropy: float) -> float:
        """Add one vote entropy (NaN is ignored) and return the new threshold."""
        if math.isfinite(entropy):
            self.values.append(float(entropy))
        return self.value


def difficulty_bucket(
    stats: VoteStats,
    tau_easy: float,
    easy_share: float = 0.85,
    unsolvable_share: float = 0.20,
    hard_entropy: float = 0.90,
    hard_margin: float = 0.35,
) -> Bucket:
    """Bucket of a question from its vote, checked in this order:

    easy if H_SC <= tau_easy or f >= 0.85; unsolvable if f <= 0.20; hard if H_SC >= 0.90
    and m <= 0.35; else medium.
    """
    if stats.entropy <= tau_easy or stats.majority_share >= easy_share:
        return "easy"
    if stats.majority_share <= unsolvable_share:
        return "unsolvable"
    if stats.entropy >= hard_entropy and stats.margin <= hard_margin:
        return "hard"
    return "medium"
