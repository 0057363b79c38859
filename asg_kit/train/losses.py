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


def group_advantages(rewards: Sequence[float], eps: float = 1e-6, unbiased: bool = False) -> list[float] | None:
    """GRPO's z-scored advantages ``(r - mean) / std`` over a group; None when std < eps
    (the group carries no preference, so the update is skipped). ``std`` is the population
    standard deviation (as BAGEL's released updater); ``unbiased=True`` divides by
    ``n - 1`` as VARGPT's released updater (``torch.std``), which makes the advantages
    ``sqrt((n - 1) / n)`` times as large (0.816 for n = 3)."""
    values = torch.tensor(list(rewards), dtype=torch.float64)
    std = values.std(unbiased=unbiased).item() if len(values) > 1 else 0.0
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


def sde_step(x: torch.Tensor, t: float | torch.Tensor, dt: float | torch.Tensor, velocity: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step for a rectified flow whose time runs from 1 (noise) to 0 (data)
    with ``x <- x - v dt`` (``v = eps - x_0``, BAGEL's convention): the predicted clean
    latent ``x0 = x - t v``, the score ``s = -(x - (1 - t) x0) / t^2``, and the transition
    ``N(mean, std^2)`` with ``mean = x - (v - eta^2 s / 2) dt``, ``std = eta sqrt(dt)``.
    ``eta = 0`` is the Euler ODE step. Returns (mean, std)."""
    t = torch.as_tensor(t, dtype=torch.float32)
    dt = torch.as_tensor(dt, dtype=torch.float32)
    x, velocity = x.float(), velocity.float()
    predicted_clean = x - t * velocity
    score = -(x - (1 - t) * predicted_clean) / t**2
    mean = x - (velocity - 0.5 * noise_level**2 * score) * dt
    return mean, noise_level * dt.sqrt()


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """Per-sample log N(x; mean, std^2) averaged over its elements (Flow-GRPO's convention,
    so that one clip range fits any latent size): (samples,) for (samples, ...) inputs."""
    std = torch.as_tensor(std, dtype=torch.float32)
    density = -((x.float() - mean.float()) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return density.flatten(1).mean(-1)


def sde_transitions(latents: torch.Tensor, timesteps: torch.Tensor, velocities: torch.Tensor, noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A recorded SDE trajectory under given velocities: ``latents`` (rows, steps + 1, ...)
    at ``timesteps`` (steps + 1,), ``velocities`` (rows, steps, ...). Returns the per-step
    log-probs of the recorded transitions (rows, steps), the Gaussian means (rows, steps,
    ...) and standard deviations (steps,), as :func:`sde_step` defines them."""
    velocities = velocities.to(latents.device)
    means, stds, logprobs = [], [], []
    for i in range(latents.shape[1] - 1):
        mean, std = sde_step(latents[:, i], timesteps[i], timesteps[i] - timesteps[i + 1], velocities[:, i], noise_level)
        means.append(mean)
        stds.append(std)
        logprobs.append(gaussian_logprob(latents[:, i + 1], mean, std))
    return torch.stack(logprobs, 1), torch.stack(means, 1), torch.stack(stds)


def gaussian_mean_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians of one std per step, element-averaged as the log-probs:
    ``mean (mu - mu_ref)^2 / (2 std^2)``, (rows, steps) for (rows, steps, ...) means."""
    gap = ((mean.float() - reference_mean.detach().float()) ** 2).flatten(2).mean(-1)
    return gap / (2 * std.float() ** 2)
