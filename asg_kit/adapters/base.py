"""The one protocol every unified backbone implements, and the records it returns.

A backbone is a frozen unified model with one LoRA adapter per role. Everything the method
needs from it is below; everything backbone-specific lives in that backbone's adapter.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import torch
from PIL import Image

from asg_kit.prompts import CAPTION as CAPTION_PROMPT
from asg_kit.prompts import EMBED_PROBE

ROLES = ("proposer", "solver", "generator")
GenerationParadigm = Literal["ar_tokens", "rectified_flow", "diffusion"]


class NonFiniteLogits(FloatingPointError):
    """The model produced NaN or inf logits while sampling: nothing can be drawn."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA of every role (SPEC: r=16, alpha=32, dropout 0.05 on the language model's
    attention and MLP projections)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AnswerRequest:
    """One text completion to sample: an image (or None), the full user prompt, and its
    decoding settings. ``temperature <= 0`` is greedy. ``seed`` fixes this request's own
    random stream, so a request samples the same text alone or in any batch. Requests that
    pass the same image object share its encoding and their common prompt prefix."""

    image: Image.Image | None
    prompt: str
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class TextSample:
    """A sampled completion. ``token_ids`` include the end-of-sequence token when the
    model produced one (``finished``). ``logprobs`` are the behaviour log-probs of each
    token under the distribution it was drawn from (temperature and top-p applied; for
    greedy rows, the policy at temperature 1); ``entropies`` are the full-vocabulary
    entropies of the policy (temperature 1) at each step."""

    text: str
    token_ids: list[int]
    logprobs: torch.Tensor
    entropies: torch.Tensor
    finished: bool


@dataclass
class TokenScores:
    """Teacher-forced scores of completions, padded to (batch, longest completion):
    per-token log-probs and entropies under the active role, the mask of real tokens and,
    when asked for, the full logits (for full-vocabulary KL)."""

    logprobs: torch.Tensor
    entropies: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor | None = None


@dataclass
class ImageRollout:
    """What image generation did, enough to recompute differentiable log-probs: the
    conditional prompt ids of each row, the sampled image tokens (rows = prompts x n, in
    prompt order), the behaviour log-probs (CFG and temperature applied) and the settings.
    A continuous generator (paradigm "diffusion") has no tokens: ``tokens`` and
    ``behaviour_logprobs`` have 0 columns and ``latents`` holds what its flow produced."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    prompt_index: list[int]
    tokens: torch.Tensor
    behaviour_logprobs: torch.Tensor
    guidance_scale: float
    temperature: float
    seeds: list[int] = field(default_factory=list)
    latents: torch.Tensor | None = None


@dataclass
class FlowRollout:
    """What rectified-flow generation did, enough to recompute differentiable velocities:
    the conditional prompt ids of each row (rows = prompts x n, in prompt order) and the
    trajectory. ``latents`` (rows, steps + 1, tokens, channels) holds x_t at every time of
    ``timesteps`` (steps + 1 values from 1 = noise down to 0 = data): ``latents[:, 0]`` is
    the seeded initial noise, ``latents[:, -1]`` the generated latent. ``guidance`` (steps,)
    is the CFG scale each step applied (1 outside the guidance interval); ``image_size`` is
    (height, width) in pixels. ``noise_level`` is the SDE's eta (0: the deterministic ODE),
    each step then a Gaussian transition (``asg_kit.train.losses.sde_step``)."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    prompt_index: list[int]
    latents: torch.Tensor
    timesteps: torch.Tensor
    guidance: torch.Tensor
    guidance_scale: float
    image_size: tuple[int, int]
    seeds: list[int] = field(default_factory=list)
    noise_level: float = 0.0


@dataclass
class NoisedLatents:
    """Flow-matching inputs for a rollout's generated latents x_0: fresh noise eps at a
    time t per row, ``noisy = (1 - t) x_0 + t eps`` and the target velocity ``eps - x_0``."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


@dataclass
class GeneratedImages:
    """Images per prompt and the rollout: an :class:`ImageRollout` (token sequences) for
    "ar_tokens" backbones, a :class:`FlowRollout` (latent trajectories) for "rectified_flow"."""

    images: list[list[Image.Image]]
    rollout: ImageRollout | FlowRollout


@runtime_checkable
class UnifiedBackbone(Protocol):
    """What Ask, Solve, Generate needs from a unified multimodal model."""

    name: str
    generation_paradigm: GenerationParadigm
    roles: tuple[str, ...]

    def role(self, name: str | None) -> AbstractContextManager[None]:
        """Make ``name`` the active LoRA role inside the block; ``None`` is the reference
        policy (every adapter off)."""
        ...

    def trainable_parameters(self, role: str) -> list[torch.nn.Parameter]: ...

    def save_roles(self, path: str | Path) -> None:
        """Write each role's adapter as safetensors in peft's layout (``path/<role>/``)."""
        ...

    def load_roles(self, path: str | Path) -> None: ...

    def sample_answers(self, requests: Sequence[AnswerRequest], max_new_tokens: int = 96, seed: int = 0) -> list[TextSample]:
        """Sample one completion per request under the active role. Requests without a
        seed of their own use ``seed + their index``."""
        ...

    def score_completions(
        self, requests: Sequence[AnswerRequest], completions: Sequence[Sequence[int]], keep_logits: bool = False
    ) -> TokenScores:
        """Teacher-forced log-probs and entropies of ``completions`` (token ids) after each
        request's prompt, under the active role; differentiable when grad is enabled."""
        ...

    def caption(
        self, images: Sequence[Image.Image], prompt: str = CAPTION_PROMPT, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0
    ) -> list[str]: ...

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(batch, hidden): L2-normalised masked mean of the base model's last hidden
        state (adapters off)."""
        ...

    def embed_image_text(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor: ...

    def generate_images(
        self, prompts: Sequence[str], n: int = 1, guidance_scale: float = 5.0, temperature: float = 1.0, seed: int = 0
    ) -> GeneratedImages:
        """``n`` images per prompt under the active role, with classifier-free guidance."""
        ...

    def generation_logprobs(self, rollout: ImageRollout) -> torch.Tensor:
        """(rows, image tokens) log-probs of the rollout's tokens under the active role,
        teacher-forced on the conditional branch; differentiable when grad is enabled."""
        ...


@runtime_checkable
class ConformanceHooks(Protocol):
    """Two optional members beyond ``UnifiedBackbone`` that the conformance checker
    (``asg_kit.adapters.conformance``) uses; every adapter in this package has them.

    ``generator_loss`` is the paradigm's differentiable Generator objective for a rollout of
    ``generate_images``, under the active role, as a scalar with every sample weighted 1
    (no rewards): what the training loop's Generator update backpropagates, reduced to its
    gradient path. "ar_tokens": the mean negative ``generation_logprobs``;
    "rectified_flow" / "diffusion": the flow-matching / denoising loss recomputed on the
    rollout's stored states. The checker proves with it that the Generator update reaches
    the generator adapter only, and every one of its LoRA weights. An "ar_tokens" backbone
    without it is checked through ``generation_logprobs``; the other paradigms need it.

    ``prompt_ids`` are the token ids the adapter builds for a user prompt (``tokenizer``
    is its tokenizer): the checker proves that special-token strings in prompt text are
    never encoded as special tokens.
    """

    tokenizer: Any

    def prompt_ids(self, text: str, with_image: bool) -> list[int]: ...

    def generator_loss(self, rollout: ImageRollout | FlowRollout) -> torch.Tensor: ...


@runtime_checkable
class FlowGenerator(Protocol):
    """What a "rectified_flow" backbone adds for the Generator update (the training loop's
    flow branch): fresh flow-matching noise for a rollout's generated latents, and the
    velocities the active role predicts for noisy latents, conditioned on each row's prompt
    and differentiable when grad is enabled."""

    def noised_latents(self, rollout: FlowRollout, seed: int = 0) -> NoisedLatents: ...

    def velocities(self, rollout: FlowRollout, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def guided_velocities(self, rollout: FlowRollout) -> torch.Tensor:
        """(rows, steps, tokens, channels): the velocity each rollout step applied (its
        guidance included), recomputed under the active role, differentiable (Flow-GRPO)."""
        ...
