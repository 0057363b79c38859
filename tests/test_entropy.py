import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asg_kit.rewards import RollingPercentile, reduce_first_k, solver_token_entropy, token_entropy


def naive_entropy(logits: torch.Tensor) -> torch.Tensor:
    z = logits.double()
    p = z.softmax(-1)
    plogp = torch.where(p > 0, p * z.log_softmax(-1), torch.zeros_like(p))
    h = -plogp.sum(-1)
    return torch.where(torch.isnan(h), torch.zeros_like(h), h)  # all-masked rows: 0


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    vocab=st.integers(1, 300),
    scale=st.sampled_from([0.1, 1.0, 10.0, 1e4]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    mask_share=st.sampled_from([0.0, 0.5, 0.95, 1.0]),
    chunk=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**16),
)
def test_matches_naive_formula_and_stays_in_range(shape, vocab, scale, dtype, mask_share, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * scale).clamp(-6e4, 6e4).to(dtype)
    masked = torch.rand(*shape, vocab, generator=g) < mask_share
    logits = logits.masked_fill(masked, -math.inf)
    got = token_entropy(logits, chunk_size=chunk)
    want = naive_entropy(logits.float())
    assert got.shape == logits.shape[:-1]
    assert got.dtype == torch.float32
    assert not torch.isnan(got).any()
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=0)
    assert (got >= 0).all() and (got <= math.log(vocab) + 1e-4).all()


def test_known_values():
    uniform = torch.zeros(2, 1000)
    assert token_entropy(uniform) == pytest.approx(math.log(1000), abs=1e-5)
    peaked = torch.tensor([[1e4, -1e4, 0.0]])
    assert token_entropy(peaked).item() == 0.0
    two_way = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    assert token_entropy(two_way).item() == pytest.approx(math.log(2), abs=1e-6)
    assert token_entropy(torch.full((1, 5), -math.inf)).item() == 0.0


def test_nan_and_positive_infinity_propagate_for_guards():
    bad = torch.tensor([[0.0, float("nan")], [0.0, math.inf], [0.0, 1.0]])
    got = token_entropy(bad)
    assert torch.isnan(got[0]) and torch.isnan(got[1]) and not torch.isnan(got[2])


def test_chunking_does_not_change_the_result():
    logits = torch.randn(7, 9, 501)
    assert torch.equal(token_entropy(logits, chunk_size=1), token_entropy(logits, chunk_size=1000))


def test_solver_token_entropy_takes_first_k_unmasked_positions():
    # Position entropies: log(2), 0, log(4), log(8), ... built from uniform blocks.
    vocab = 16

    def row(widths):
        out = torch.full((len(widths), vocab), -math.inf)
        for t, w in enumerate(widths):
            out[t, :w] = 0.0
        return out

    logits = torch.stack([row([2, 1, 4, 8, 1, 16, 16]), row([16, 2, 1, 4, 1, 1, 1])])
    h = token_entropy(logits)
    ste = solver_token_entropy(logits)  # first 5 positions
    assert ste.tolist() == pytest.approx([math.log(8), math.log(16)], abs=1e-6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    ste_masked = solver_token_entropy(logits, mask=mask, k=2)
    assert ste_masked.tolist() == pytest.approx([math.log(8), math.log(16)], abs=1e-6)
    mean = solver_token_entropy(logits, mask=mask, k=3, reduce="mean")
    assert mean[0].item() == pytest.approx((h[0, 2] + h[0, 3] + h[0, 4]).item() / 3, abs=1e-6)
    empty = solver_token_entropy(logits, mask=torch.zeros(2, 7, dtype=torch.bool))
    assert empty.tolist() == [0.0, 0.0]


def test_reduce_first_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="reduce"):
        reduce_first_k(torch.zeros(1, 3), reduce="median")
    with pytest.raises(ValueError, match="mask shape"):
        reduce_first_k(torch.zeros(1, 3), mask=torch.ones(1, 4))


def test_rolling_percentile_cold_start_uses_sigmoid():
    tracker = RollingPercentile()
    for i, x in enumerate([2.0, 0.5, 3.0, 1.0, 2.5, 0.1, 4.0]):
        assert len(tracker) == i
        assert tracker.update(x) == pytest.approx(1 / (1 + math.exp(-1.5 * (x - 2.0))))
    # The eighth value fills the warm-up: a percentile rank within the window it joined.
    assert tracker.update(2.2) == pytest.approx(4 / 8)  # 2.0, 0.5, 1.0 and 0.1 lie below
    assert tracker.rank(100.0) == pytest.approx(8 / 9)  # as if added, but rank() keeps nothing
    assert len(tracker) == 8


def test_rolling_percentile_skips_tiny_values_and_rolls():
    tracker = RollingPercentile(window=4, warmup=2)
    tracker.update(0.0)
    tracker.update(1e-7)
    assert len(tracker) == 0
    for x in [1.0, 2.0, 3.0, 4.0, 5.0]:
        tracker.update(x)
    assert list(tracker.values) == [2.0, 3.0, 4.0, 5.0]
    assert tracker.rank(3.5) == 0.25  # window as if 3.5 joined: [3, 4, 5, 3.5]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=0, max_size=300), st.floats(0, 10))
def test_rolling_percentile_is_in_unit_interval_and_resumes_exactly(history, probe):
    tracker = RollingPercentile()
    for x in history:
        assert 0.0 <= tracker.update(x) < 1.0 or len(tracker) < 8
    clone = RollingPercentile()
    clone.load_state_dict(tracker.state_dict())
    assert clone.rank(probe) == tracker.rank(probe)
    if len(tracker) >= 8:
        assert 0.0 <= tracker.rank(probe) < 1.0


def test_rolling_percentile_state_must_match_window():
    with pytest.raises(ValueError, match="window"):
        RollingPercentile(window=4).load_state_dict(RollingPercentile(window=8).state_dict())
