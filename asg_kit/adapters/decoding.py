"""Token-level pieces every adapter's own decode loop uses: drawing one token with its
behaviour log-prob from a per-request random stream, and batching rows."""

from __future__ import annotations

from typing import Sequence

import torch

from asg_kit.adapters.base import NonFiniteLogits


def draw_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> tuple[int, float]:
    """Sample one token from a row of logits; return it with its behaviour log-prob (under
    the distribution it was drawn from: temperature and top-p applied; greedy when
    ``temperature <= 0``, then the policy's own log-prob at temperature 1)."""
    if not torch.isfinite(logits).all():
        raise NonFiniteLogits("NaN or inf in the logits while sampling")
    if temperature <= 0:
        token = int(logits.argmax())
        return token, float(torch.log_softmax(logits, -1)[token])
    scaled = logits / temperature
    if top_p < 1.0:
        probs, order = torch.softmax(scaled, -1).sort(descending=True)
        outside = probs.cumsum(-1) - probs >= top_p  # keep the smallest set reaching top_p
        scaled = scaled.clone()
        scaled[order[outside]] = -torch.inf
    logprobs = torch.log_softmax(scaled, -1)
    token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
    return token, float(logprobs[token])


def left_pad(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack (length_i, hidden) rows left-padded: embeddings, attention mask, positions."""
    longest = max(row.shape[0] for row in rows)
    first = rows[0]
    embeds = first.new_zeros(len(rows), longest, first.shape[-1])
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=first.device)
    for i, row in enumerate(rows):
        embeds[i, longest - row.shape[0] :] = row
        mask[i, longest - row.shape[0] :] = 1
    return embeds, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all rows share, leaving every row at least one of its own."""
    limit = min(len(r) for r in rows) - 1
    length = 0
    while length < limit and all(r[length] == rows[0][length] for r in rows):
        length += 1
    return length
