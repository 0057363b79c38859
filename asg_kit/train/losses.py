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


def flow_matching_error(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching error ``mean_{tokens, channels} (v_theta - (eps - x_0))^2``
    of (samples, ...) velocities against their targets: (samples,)."""
    return ((velocity.float() - target.float()) ** 2).flatten(1).mean(-1)


def velocity_drift(velocity: torch.Tensor, reference_velocity: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean (v_theta - v_ref)^2`` against the reference (adapters off, no
    gradient): the rectified-flow update's stand-in for the KL to the reference, (samples,)."""
    return ((velocity.float() - reference_velocity.detach().float()) ** 2).flatten(1).mean(-1)


def advantage_weighted_flow_loss(advantage: torch.Tensor, error: torch.Tensor, drift: torch.Tensor, beta: float) -> torch.Tensor:
    """The published BAGEL Generator update over L candidates:
    ``(1/L) sum_k [A_k * FM_k + beta * D_k]`` with ``FM_k`` the flow-matching error of
    candidate k, ``D_k`` its velocity drift from the reference and ``A_k`` its z-scored
    advantage. A positive advantage pulls the flow toward the candidate, a negative one
    pushes it away; the drift term keeps both near the base model."""
    advantage = advantage.to(error.device, error.dtype)
    return (advantage * error + beta * drift).mean()
