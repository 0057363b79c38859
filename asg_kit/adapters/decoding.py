"""Token-level pieces every adapter's own loops use: batching requests, drawing one token
with its behaviour log-prob from a per-request random stream, left-padding rows, and
teacher-forced scoring of completions."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from asg_kit.adapters.base import AnswerRequest, NonFiniteLogits, TextSample, TokenScores
from asg_kit.rewards.entropy import token_entropy


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


def sample_in_batches(
    requests: Sequence[AnswerRequest],
    seed: int,
    sample_batch: Callable[[list[AnswerRequest], list[int]], list[TextSample]],
    text_apart: bool = False,
) -> list[TextSample]:
    """Sample every request, batched as all adapters batch them: requests that pass the same
    image object decode together (one prefill of their shared prefix, image included);
    requests alone with their image decode together as one batch (with ``text_apart``,
    requests without an image form a batch of their own). A request's stream is seeded by
    its own ``seed``, else by ``seed + its index``, so batching never changes what it draws."""
    by_image: dict[int, list[int]] = {}
    for index, request in enumerate(requests):
        by_image.setdefault(id(request.image), []).append(index)
    shared = [indices for indices in by_image.values() if len(indices) > 1 and not (text_apart and requests[indices[0]].image is None)]
    alone = [indices[0] for indices in by_image.values() if len(indices) == 1 and not (text_apart and requests[indices[0]].image is None)]
    textual = [i for indices in by_image.values() if text_apart and requests[indices[0]].image is None for i in indices]
    results: list[TextSample | None] = [None] * len(requests)
    for indices in [*shared, *([alone] if alone else []), *([textual] if textual else [])]:
        batch = [requests[i] for i in indices]
        seeds = [r.seed if r.seed is not None else seed + i for r, i in zip(batch, indices)]
        for index, sample in zip(indices, sample_batch(batch, seeds)):
            results[index] = sample
    return results  # type: ignore[return-value]


class RowSampler:
    """The per-row bookkeeping of a batched decode loop: one random stream per row, the
    drawn tokens with their behaviour log-probs and the policy's entropies, and which rows
    have stopped (finished rows are fed ``pad_id``)."""

    def __init__(self, batch: Sequence[AnswerRequest], seeds: Sequence[int], stop_ids: set[int] | frozenset[int], pad_id: int, device) -> None:
        self.batch, self.stop_ids, self.pad_id = batch, stop_ids, pad_id
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.tokens: list[list[int]] = [[] for _ in batch]
        self.logprobs: list[list[float]] = [[] for _ in batch]
        self.entropies: list[list[float]] = [[] for _ in batch]
        self.finished = [False] * len(batch)

    def step(self, logits: torch.Tensor) -> list[int]:
        """Draw each unfinished row's next token from its (rows, vocab) logits; return the
        tokens to feed back."""
        step_entropy = token_entropy(logits)
        fed = []
        for row, request in enumerate(self.batch):
            if self.finished[row]:
                fed.append(self.pad_id)
                continue
            token, logprob = draw_token(logits[row], request.temperature, request.top_p, self.generators[row])
            self.tokens[row].append(token)
            self.logprobs[row].append(logprob)
            self.entropies[row].append(float(step_entropy[row]))
            self.finished[row] = token in self.stop_ids
            fed.append(token)
        return fed

    @property
    def done(self) -> bool:
        return all(self.finished)

    def samples(self, decode: Callable[[list[int]], str]) -> list[TextSample]:
        return [
            TextSample(text=decode(ids), token_ids=ids, logprobs=torch.tensor(lp), entropies=torch.tensor(ent), finished=stopped)
            for ids, lp, ent, stopped in zip(self.tokens, self.logprobs, self.entropies, self.finished)
        ]


def check_completions(requests: Sequence[AnswerRequest], completions: Sequence[Sequence[int]]) -> None:
    """What ``score_completions`` needs: one non-empty completion per request."""
    if len(requests) != len(completions):
        raise ValueError(f"{len(requests)} requests but {len(completions)} completions")
    if any(len(c) == 0 for c in completions):
        raise ValueError("every completion needs at least one token")


def score_tail(hidden: torch.Tensor, targets: Sequence[Sequence[int]], head: Callable[[torch.Tensor], torch.Tensor], keep_logits: bool = False) -> TokenScores:
    """Teacher-forced scores of each row's last ``len(target)`` tokens, read from the hidden
    states just before them through ``head`` (rows are left-padded, so every row's targets
    end at the last position). Logits of padding positions are zero when kept."""
    longest, width = max(len(t) for t in targets), hidden.shape[1]
    index = torch.zeros(len(targets), longest, dtype=torch.long, device=hidden.device)
    mask = torch.zeros(len(targets), longest, dtype=torch.bool, device=hidden.device)
    target = torch.zeros(len(targets), longest, dtype=torch.long, device=hidden.device)
    for row, tokens in enumerate(targets):
        n = len(tokens)
        index[row, :n] = torch.arange(width - n - 1, width - 1, device=hidden.device)
        mask[row, :n] = True
        target[row, :n] = torch.as_tensor(list(tokens), device=hidden.device)
    logits = head(hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))).float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
    with torch.no_grad():
        entropies = token_entropy(logits.detach())
    return TokenScores(
        logprobs=logprobs.masked_fill(~mask, 0.0),
        entropies=entropies.masked_fill(~mask, 0.0),
        mask=mask,
        logits=logits.masked_fill(~mask[..., None], 0.0) if keep_logits else None,
    )
