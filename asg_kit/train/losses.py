"""The update rules' pieces as pure functions (SPEC section 4), each tested by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


def clipped_surrogate(advantage: torch.Tensor, logprob: torch.Tensor, reference_logprob: torch.Tensor, clip_ratio: float = 0.2, max_ratio: float = 10.0) -> torch.Tensor:
    """``max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))`` with ``rho = exp(l - l_ref)``
    (capped at 10), elementwise. The ratio is taken against the reference policy (adapters
    off), as in the released code: the clip is a trust region around the base model."""
    ratio = torch.exp(logprob - reference_logprob.detach()).clamp(max=max_ratio)
    return torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio))


def full_kl(logits: torch.Tensor, reference_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over real tokens of ``sum_v pi(v) (log pi(v) - log pi_ref(v))``."""
    logp = torch.log_softmax(logits.float(), -1)
    logq = torch.log_softmax(reference_logits.float().detach(), -1)
    per_token = (logp.exp() * (logp - logq)).sum(-1)
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def reward_weighted_regression(flow_mse: torch.Tensor, best_reward: float, weight: float = 0.5) -> torch.Tensor:
    """BLIP3o's published Generator update: ``(1 + w * clip01(r_best)) * MSE``, where MSE is
    the flow-matching loss of the generator on the SOURCE image given the spec prompt and
    ``r_best`` the best candidate's R_G. The weight lies in [1, 1 + w]: the reward only sets
    how strongly the real image is regressed onto, never pushes away from one."""
    if not math.isfinite(best_reward):
        raise ValueError(f"the best candidate's reward must be finite, got {best_reward}")
    return (1.0 + weight * min(1.0, max(0.0, best_reward))) * flow_mse


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean over the masked positions of (batch, tokens) values."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def group_advantages(rewards: Sequence[float], eps: float = 1e-6) -> list[float] | None:
    """GRPO's z-scored advantages ``(r - mean) / std`` over a group; None when std < eps
    (the group carries no preference, so the update is skipped)."""
    values = torch.tensor(list(rewards), dtype=torch.float64)
    std = values.std(unbiased=False).item() if len(values) > 1 else 0.0
    if std < eps:
        return None
    return ((values - values.mean()) / std).tolist()


def max_normalized_advantages(rewards: Sequence[float], baseline: float) -> list[float]:
    """The Proposer's advantages ``(r - b) / max |r - b|`` (all 0 when every r equals b)."""
    shifted = [r - baseline for r in rewards]
    top = max((abs(s) for s in shifted), default=0.0)
    return [s / top if top > 0 else 0.0 for s in shifted]


@dataclass
class EMABaseline:
    """``b <- m * b + (1 - m) * r``, starting at the first reward seen."""

    momentum: float = 0.6
    value: float | None = None

    def update(self, reward: float) -> float:
        if math.isfinite(reward):
            self.value = reward if self.value is None else self.momentum * self.value + (1.0 - self.momentum) * reward
        return self.value if self.value is not None else 0.0

    @property
    def current(self) -> float:
        return self.value if self.value is not None else 0.0


@dataclass
class AdaptiveKL:
    """``beta <- clip(beta * exp(rate * (KL - target) / target), low, high)``."""

    beta: float = 0.01
    target: float = 0.02
    rate: float = 0.10
    low: float = 1e-3
    high: float = 100.0

    def update(self, kl: float) -> float:
        if math.isfinite(kl):
            self.beta = min(self.high, max(self.low, self.beta * math.exp(self.rate * (kl - self.target) / self.target)))
        return self.beta
