"""Token-level uncertainty: softmax entropy, Solver Token Entropy (STE) and its rolling
percentile normalisation (SPEC section 2)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from asg_kit.rewards._math import RollingWindow

# One chunk holds about this many logits (16 MiB in float32), whatever the vocabulary.
_CHUNK_ELEMENTS = 1 << 22
# Masked (-inf) logits are lifted to this before exp so that 0 * log(0) never becomes NaN.
_FLOOR = -1e30


def token_entropy(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Entropy in nats of softmax over the last dimension.

    ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``, evaluated as
    ``H = log s - sum_v e_v * (z_v - m) / s`` with ``m = max z``, ``e = exp(z - m)``,
    ``s = sum e``.

    Works for any leading shape and for float32, bfloat16 and float16 input. The math runs
    in float32, ``chunk_size`` rows at a time (default: about 4M logits per chunk), so the
    extra memory is about two chunk-sized float32 buffers instead of several full-size
    float32 copies of ``logits``. Masked entries (``-inf``) contribute nothing; a row that
    is masked everywhere has entropy 0. Finite and ``-inf`` logits never give NaN; NaN or
    ``+inf`` in a row give NaN for that row, so that callers' NaN guards still see them.

    Returns float32 of shape ``logits.shape[:-1]``, each value in ``[0, log V]``.
    """
    if logits.ndim == 0:
        raise ValueError("token_entropy needs at least one dimension (the vocabulary)")
    vocab = logits.shape[-1]
    leading = logits.shape[:-1]
    rows = logits.reshape(-1, vocab)
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
    if vocab == 0 or rows.shape[0] == 0:
        return out.zero_().reshape(leading)
    step = chunk_size or max(1, _CHUNK_ELEMENTS // vocab)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        peak = chunk.amax(dim=-1, keepdim=True).float()
        # All-masked rows have max -inf; shifting by 0 keeps them at -inf instead of NaN.
        peak = torch.where(peak == -math.inf, torch.zeros_like(peak), peak)
        shifted = chunk - peak  # promotes to float32: the only full-chunk upcast
        shifted.clamp_(min=_FLOOR)
        weights = shifted.exp()
        total = weights.sum(dim=-1)
        weighted = weights.mul_(shifted).sum(dim=-1)
        entropy = total.clamp_min(torch.finfo(torch.float32).tiny).log() - weighted / total.clamp_min(
            torch.finfo(torch.float32).tiny
        )
        out[start : start + step] = entropy.clamp_min(0.0)
    return out.reshape(leading)


def reduce_first_k(
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    k: int = 5,
    reduce: Literal["max", "mean"] = "max",
) -> torch.Tensor:
    """Reduce each row of ``values`` (batch, tokens) over its first ``k`` unmasked positions.

    ``out_b = max_{t in first_k(b)} values[b, t]`` (or the mean). Rows with no unmasked
    position give 0.
    """
    if values.ndim != 2:
        raise ValueError(f"expected (batch, tokens), got shape {tuple(values.shape)}")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    valid = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if valid.shape != values.shape:
        raise ValueError(f"mask shape {tuple(valid.shape)} does not match {tuple(values.shape)}")
    chosen = valid & (valid.cumsum(dim=-1) <= k)
    count = chosen.sum(dim=-1)
    values = values.float()
    if reduce == "max":
        picked = values.masked_fill(~chosen, -math.inf).amax(dim=-1)
    else:
        picked = values.masked_fill(~chosen, 0.0).sum(dim=-1) / count.clamp_min(1)
    return torch.where(count > 0, picked, torch.zeros_like(picked))


def solver_token_entropy(
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    k: int = 5,
    reduce: Literal["max", "mean"] = "max",
) -> torch.Tensor:
    """Solver Token Entropy per sequence.

    ``STE_raw = max_{t <= k} H_t`` over the first ``k`` generated (unmasked) positions of a
    greedy decode, ``H_t = token_entropy(logits[:, t])``; ``reduce="mean"`` averages
    instead. ``logits`` is (batch, tokens, vocab) for the generated positions; ``mask``
    (batch, tokens) marks real tokens (padding after EOS is False). Only the columns that
    can hold a chosen position are evaluated.
    """
    if logits.ndim != 3:
        raise ValueError(f"expected logits of shape (batch, tokens, vocab), got {tuple(logits.shape)}")
    if mask is None:
        logits = logits[:, :k]
    else:
        chosen = mask.to(torch.bool) & (mask.to(torch.bool).cumsum(dim=-1) <= k)
        last = int(chosen.any(dim=0).nonzero().max()) + 1 if chosen.any() else 1
        logits, mask = logits[:, :last], mask[:, :last]
    return reduce_first_k(token_entropy(logits), mask, k=k, reduce=reduce)


class RollingPercentile(RollingWindow):
    """Percentile-rank difficulty ``d_STE`` of a raw STE value.

    ``x`` joins the window of the last ``window`` values (unless ``x <= min_value``), then
    ``d = |{e in window : e < x}| / |window|``, which lies in [0, 1). While the window
    holds fewer than ``warmup`` values: ``d = sigmoid(slope * (x - center))``. ``update``
    keeps ``x``; ``rank`` returns what ``update`` would, without keeping it (for screening
    candidate questions).

    ``form="released"``: a value ``x <= min_value`` (a decode with no uncertainty) gets
    ``d = 0`` also during the cold start, as in the released code, instead of the sigmoid
    (about 0.047); after the cold start both give 0.
    """

    def __init__(
        self,
        window: int = 128,
        warmup: int = 8,
        slope: float = 1.5,
        center: float = 2.0,
        min_value: float = 1e-6,
        form: Literal["asg-kit", "released"] = "asg-kit",
    ) -> None:
        super().__init__(window)
        if form not in ("asg-kit", "released"):
            raise ValueError(f"form must be 'asg-kit' or 'released', got {form!r}")
        self.warmup = warmup
        self.slope = slope
        self.center = center
        self.min_value = min_value
        self.form = form

    def _kept(self, x: float) -> bool:
        return math.isfinite(x) and x > self.min_value

    def rank(self, x: float) -> float:
        x = float(x)
        if math.isnan(x):
            return math.nan
        if self.form == "released" and x <= self.min_value:
            return 0.0
        window = list(self.values)
        if self._kept(x):
            window = (window + [x])[-self.window :]
        if len(window) < self.warmup:
            return 1.0 / (1.0 + math.exp(-self.slope * (x - self.center)))
        return sum(v < x for v in window) / len(window)

    def update(self, x: float) -> float:
        d = self.rank(x)
        if self._kept(float(x)):
            self.values.append(float(x))
        return d
