"""The training loop: loss pieces by hand, a short run through every branch, exact resume,
NaN guards, and two processes under torchrun."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from asg_kit.adapters.tiny_janus import build_tiny_janus
from asg_kit.micro.pool import write_pool
from asg_kit.train.losses import (
    AdaptiveKL,
    EMABaseline,
    clipped_surrogate,
    full_kl,
    group_advantages,
    masked_mean,
    max_normalized_advantages,
    reward_weighted_regression,
)
from asg_kit.train.loop import TrainConfig, step_kind, train

# ---- the loss pieces, by hand -----------------------------------------------------------


def test_clipped_surrogate():
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    out = clipped_surrogate(a, lp, torch.zeros(4), clip_ratio=0.2)
    # A>0, rho=1.5: max(-1.5, -1.2) = -1.2; A<0, rho=1.5: max(1.5, 1.2) = 1.5
    # A>0, rho=0.5: max(-0.5, -0.8) = -0.5; A<0, rho=0.5: max(0.5, 0.8) = 0.8
    assert out.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8])
    assert clipped_surrogate(torch.tensor([1.0]), torch.tensor([5.0]), torch.tensor([0.0])).item() == pytest.approx(-1.2)


def test_full_kl_and_masked_mean():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])  # p = (.5,.5), (.75,.25)
    reference = torch.zeros(1, 2, 2)  # q = (.5, .5)
    mask = torch.tensor([[True, True]])
    kl_second = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert full_kl(logits, reference, mask).item() == pytest.approx(kl_second / 2)
    assert full_kl(logits, reference, torch.tensor([[False, True]])).item() == pytest.approx(kl_second)
    assert masked_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]])).item() == 2.0


def test_baseline_advantages_and_beta():
    baseline = EMABaseline(0.6)
    assert baseline.current == 0.0
    assert baseline.update(1.0) == 1.0 and baseline.update(0.0) == pytest.approx(0.6)
    baseline.update(float("nan"))
    assert baseline.current == pytest.approx(0.6)
    assert group_advantages([1.0, 2.0, 3.0]) == pytest.approx([-1.224745, 0.0, 1.224745], abs=1e-6)
    assert group_advantages([0.4, 0.4, 0.4]) is None
    assert max_normalized_advantages([0.2, 0.5, 1.0], 0.5) == pytest.approx([-0.6, 0.0, 1.0])
    assert max_normalized_advantages([0.5, 0.5], 0.5) == [0.0, 0.0]
    kl = AdaptiveKL(beta=0.01, target=0.02, rate=0.10)
    assert kl.update(0.04) == pytest.approx(0.01 * math.exp(0.1))
    assert kl.update(0.02) == pytest.approx(0.01 * math.exp(0.1))
    assert AdaptiveKL(beta=1e-3).update(0.0) == 1e-3  # clipped at the floor
    assert AdaptiveKL(beta=100.0).update(10.0) == 100.0


def test_reward_weighted_regression_by_hand():
    mse = torch.tensor([2.0, 4.0], requires_grad=True)
    loss = reward_weighted_regression(mse, 0.6)  # (1 + 0.5 * 0.6) = 1.3
    assert torch.allclose(loss, torch.tensor([2.6, 5.2]))
    loss.sum().backward()
    assert torch.allclose(mse.grad, torch.tensor([1.3, 1.3]))
    assert torch.allclose(reward_weighted_regression(torch.tensor([2.0]), 1.7), torch.tensor([3.0]))  # clipped to 1
    assert torch.allclose(reward_weighted_regression(torch.tensor([2.0]), -0.4), torch.tensor([2.0]))  # clipped to 0
    assert torch.allclose(reward_weighted_regression(torch.tensor([2.0]), 1.0, weight=0.25), torch.tensor([2.5]))
    with pytest.raises(ValueError):
        reward_weighted_regression(torch.tensor([2.0]), float("nan"))


def test_schedule_is_three_understanding_then_two_generation():
    config = TrainConfig()
    assert [step_kind(config, s) for s in range(6)] == ["understanding"] * 3 + ["generation"] * 2 + ["understanding"]
    assert {step_kind(TrainConfig(understanding_per_cycle=0), s) for s in range(5)} == {"generation"}


# ---- runs on a tiny Janus ------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    model, processor = build_tiny_janus(seed=1)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    write_pool(6, root / "pool", seed=0)
    (root / "pool" / "broken.png").write_bytes(b"not a png")
    return root


def config_for(setup, out, **overrides):
    base = dict(backbone="janus", model=str(setup / "model"), images=str(setup / "pool"), out=str(out), steps=6, lr=1e-3, seed=3,
                solver_max_new_tokens=5, proposer_max_new_tokens=6, spec_max_new_tokens=8, generator_candidates=2, spec_samples=1,
                checkpoint_every=2, unsolvable_share=0.0, easy_share=1.01, spec_quality_min=0.0, alignment_min=0.0)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def rows_of(folder, name="metrics.jsonl"):
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def without_time(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.mark.janus
def test_short_run_takes_every_branch_and_checkpoints(setup, tmp_path):
    train(config_for(setup, tmp_path / "run", steps=10))
    rows = rows_of(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(10))
    assert {r["kind"] for r in rows} == {"understanding", "generation"}
    understanding = [r for r in rows if r["kind"] == "understanding" and "skip" not in r]
    assert any(r["solver_skip"] is None and "solver_loss" in r for r in understanding)  # the Solver updated
    assert any(r["proposer_skip"] is None for r in understanding)
    assert all(len(r["answers"]) == 7 and 0 <= r["d_ste"] <= 1 for r in understanding)
    generation = [r for r in rows if r["kind"] == "generation" and "skip" not in r]
    assert generation and all(r["generator_skip"] for r in generation)  # random specs: no preference
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10 and (tmp_path / "run" / "checkpoint" / "roles" / "solver" / "adapter_model.safetensors").is_file()


@pytest.mark.janus
def test_unreadable_images_are_skipped_with_a_reason(setup, tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    for n in range(3):
        (pool / f"bad{n}.png").write_bytes(b"")
    write_pool(1, pool)
    train(config_for(setup, tmp_path / "run", images=str(pool), steps=4, understanding_per_cycle=1, generation_per_cycle=0))
    rows = rows_of(tmp_path / "run")
    skipped = [r for r in rows if r.get("skip") == "unreadable image"]
    assert skipped and all("empty file" in r["detail"] for r in skipped)
    assert len(skipped) < len(rows)


@pytest.mark.janus
def test_resumed_run_equals_uninterrupted(setup, tmp_path):
    train(config_for(setup, tmp_path / "whole"))
    train(config_for(setup, tmp_path / "parts"), stop_after=3)  # killed after step 2; checkpoint at 2
    train(config_for(setup, tmp_path / "parts"), resume=True)
    assert without_time(rows_of(tmp_path / "parts")) == without_time(rows_of(tmp_path / "whole"))
    from safetensors.torch import load_file

    for role in ("proposer", "solver", "generator"):
        a = load_file(tmp_path / "whole" / "checkpoint" / "roles" / role / "adapter_model.safetensors")
        b = load_file(tmp_path / "parts" / "checkpoint" / "roles" / role / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.janus
def test_nan_never_reaches_the_weights(setup, tmp_path):
    from asg_kit.adapters.janus import JanusAdapter

    backbone = JanusAdapter.from_pretrained(setup / "model")
    with torch.no_grad():
        for p in backbone.trainable_parameters("solver"):
            p.fill_(float("nan"))
    backbone.save_roles(tmp_path / "nan-roles")
    config = config_for(setup, tmp_path / "run", steps=3, understanding_per_cycle=1, generation_per_cycle=0)
    train(config, stop_after=0)  # writes config.json only
    (tmp_path / "run" / "checkpoint").mkdir()
    (tmp_path / "nan-roles").rename(tmp_path / "run" / "checkpoint" / "roles")
    fresh = TrainConfig(**json.loads((tmp_path / "run" / "config.json").read_text()))
    for role in ("proposer", "solver", "generator"):
        torch.save(torch.optim.AdamW(backbone.trainable_parameters(role)).state_dict(), tmp_path / "run" / "checkpoint" / f"optimizer_{role}.pt")
    tracker = {"percentile": {"window": 128, "values": []}, "easy": {"window": 256, "values": []}, "solver_baseline": None, "proposer_baseline": None}
    (tmp_path / "run" / "checkpoint" / "state.json").write_text(json.dumps({"step": 0, "beta": 0.01, "ranks": {"0": tracker}}))
    train(fresh, resume=True)
    rows = rows_of(tmp_path / "run")
    assert len(rows) == 3 and all("non-finite" in r["skip"] or r["skip"] == "unreadable image" for r in rows)
    assert any("non-finite" in r["skip"] for r in rows)
    reloaded = JanusAdapter.from_pretrained(setup / "model")
    reloaded.load_roles(tmp_path / "run" / "checkpoint" / "roles")
    assert all(torch.isfinite(p).all() for role in ("proposer", "generator") for p in reloaded.trainable_parameters(role))


@pytest.mark.janus
def test_two_processes_under_torchrun(setup, tmp_path):
    config = config_for(setup, tmp_path / "ddp", steps=4)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.__dict__))
    import socket

    with socket.socket() as probe:  # a free port, so parallel or leftover runs never collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "asg_kit.train.loop", str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = rows_of(tmp_path / "ddp"), rows_of(tmp_path / "ddp", "metrics.rank1.jsonl")
    assert len(first) == len(second) == 4
    assert [r["image"] for r in first] != [r["image"] for r in second]  # each rank its own images
    state = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())
    assert set(state["ranks"]) == {"0", "1"} and state["step"] == 4


@pytest.mark.janus
def test_asgkit_train_cli_starts_and_resumes(setup, tmp_path):
    from typer.testing import CliRunner

    from asg_kit.cli import app

    runner = CliRunner()
    common = ["--solver-max-new-tokens", "4", "--proposer-max-new-tokens", "6", "--checkpoint-every", "1"]
    result = runner.invoke(app, ["train", "--backbone", "janus", "--model", str(setup / "model"), "--images", str(setup / "pool"), "--steps", "2", "--out", str(tmp_path / "run"), *common])
    assert result.exit_code == 0, result.output
    assert len(rows_of(tmp_path / "run")) == 2
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in rows_of(tmp_path / "run")] == [0, 1, 2]
    result = runner.invoke(app, ["train", "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--model", str(setup / "model"), "--backbone", "janus"])
    assert result.exit_code == 2 and "nowhere" in result.output
    assert runner.invoke(app, ["train"]).exit_code == 2
