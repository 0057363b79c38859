"""`asgkit train --report-to`: every scalar of metrics.jsonl reaches the tracker, read back
with TensorBoard's own event-file reader; the Generator's candidates every K steps; a resumed
run continues the same log; wandb offline writes a local run. Short micro runs."""

import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image

from asg_kit.checks import UserError
from asg_kit.micro.pool import write_pool
from asg_kit.train.loop import TrainConfig, resume_config, train
from asg_kit.train.trackers import RunningCounts, candidate_strip, step_scalars

pytestmark = pytest.mark.janus  # the micro backbone runs on transformers' Janus classes


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trackers") / "pool"
    write_pool(4, folder, seed=0)
    return folder


def tiny(pool, out, **overrides) -> TrainConfig:
    settings = dict(images=str(pool), out=str(out), steps=5, lr=1e-3, seed=3, checkpoint_every=2, solver_max_new_tokens=4,
                    proposer_max_new_tokens=6, spec_max_new_tokens=8, generator_candidates=2, spec_samples=1,
                    spec_quality_min=0.0, alignment_min=0.0)  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_step_scalars_and_running_counts():
    row = {"step": 7, "kind": "understanding", "beta": 0.01, "question": "what?", "bucket": "hard", "d_ste": 0.25,
           "solver_rewards": [1.0, 0.0, 0.5], "solver_skip": None, "proposer_skip": "no preference in the group",
           "generation_rewards": [float("nan"), 0.5], "answers": ["a", "b"], "kl": float("inf")}  # fmt: skip
    assert step_scalars(row) == {"beta": 0.01, "d_ste": 0.25, "solver_rewards/mean": 0.5, "solver_rewards/min": 0.0, "solver_rewards/max": 1.0,
                                 "generation_rewards/mean": 0.5, "generation_rewards/min": 0.5, "generation_rewards/max": 0.5}  # fmt: skip
    counts = RunningCounts([row])
    after = counts.add({"step": 8, "kind": "generation", "skip": "non-finite logits: solver", "generator_skip": "non-finite logits: solver"})
    assert after == {"buckets/hard": 1.0, "skips/proposer/no preference in the group": 1.0, "steps/understanding": 1.0,
                     "skips/step/non-finite logits": 1.0, "skips/generator/non-finite logits": 1.0, "steps/generation": 1.0}  # fmt: skip
    strip = candidate_strip([Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")], [0.1, 0.9], side=32)
    assert strip.size == (72, 48) and strip.getpixel((2, 2)) == (255, 0, 0) and strip.getpixel((40, 2)) == (0, 0, 255)


def test_tensorboard_gets_every_scalar_of_metrics_jsonl_and_resume_continues_it(pool, tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'asg-kit[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    config = tiny(pool, run, report_to="tensorboard", log_images_every=5)
    train(config, stop_after=3)  # killed after step 2, checkpoint at 2: step 2 is logged twice
    train(resume_config(run), resume=True)
    found = rows(run)
    assert [r["step"] for r in found] == [0, 1, 2, 3, 4]

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    counts = RunningCounts()
    for row in found:  # metrics.jsonl is the source of truth: each of its scalars, once per step
        expected = {**step_scalars(row), **counts.add(row)}
        assert expected
        for name, value in expected.items():
            logged = [e for e in events.Scalars(name) if e.step == row["step"]]
            assert len(logged) == 1 and logged[0].value == pytest.approx(value, rel=1e-5, abs=1e-6), (name, row["step"], logged)
    for name in ("beta", "d_ste", "entropy", "solver_rewards/mean", "proposer_reward", "generation_rewards/mean", "s_cyc/mean", "steps/generation"):
        assert name in tags["scalars"], name
    assert any(t.startswith("buckets/") for t in tags["scalars"]) and any(t.startswith("skips/") for t in tags["scalars"])
    # every 5 steps: the first generation step's candidates, a strip labelled with R_G
    pictures = events.Images("generator/candidates")
    assert [p.step for p in pictures] == [3]
    assert pictures[0].width == 2 * (128 + 4) and pictures[0].height == 128 + 16
    assert "generator/candidates/text_summary" in tags["tensors"]
    text = events.Tensors("generator/candidates/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "R_G" in text and f"{found[3]['generation_rewards'][0]:.4f}" in text


def test_resume_may_change_the_device_but_not_the_dtype(pool, tmp_path):
    run = tmp_path / "run"
    train(tiny(pool, run, steps=2, generation_per_cycle=0), stop_after=1)
    assert resume_config(run, device="cpu", report_to="none").device == "cpu"
    with pytest.raises(UserError, match="dtype=None .asked 'bfloat16'."):
        resume_config(run, dtype="bfloat16")
    with pytest.raises(UserError, match="--report-to 'mlflow'"):
        train(tiny(pool, tmp_path / "other", report_to="mlflow"))


def test_wandb_offline_writes_a_local_run(pool, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'asg-kit[wandb]')")
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    (tmp_path / "home").mkdir()
    env.update(OMP_NUM_THREADS="1", WANDB_SILENT="true", HOME=str(tmp_path / "home"))  # no API key, no `wandb login`: offline, no network
    settings = tmp_path / "config.json"
    settings.write_text(json.dumps(tiny(pool, run, steps=4, report_to="wandb", log_images_every=1).__dict__))
    script = f"import json; from asg_kit.train.loop import TrainConfig, train; train(TrainConfig(**json.load(open({str(settings)!r}))))"
    # its own process: wandb's service and environment stay out of the other tests
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), list((run / "wandb").iterdir())
    run_id = (run / "wandb" / "run_id").read_text().strip()
    assert offline[0].name.endswith(run_id)
    assert math.isfinite(rows(run)[0]["beta"])


@pytest.mark.parametrize("args, says", [
    (["--report-to", "mlflow"], "--report-to 'mlflow': use one of none, tensorboard, wandb"),
    (["--log-images-every", "-1"], "--log-images-every -1"),
    (["--dtype", "float8"], "--dtype 'float8'"),
])  # fmt: skip
def test_tracker_and_dtype_mistakes_are_one_line_before_any_work(args, says, pool, tmp_path):
    from typer.testing import CliRunner

    from asg_kit.cli import app

    result = CliRunner().invoke(app, ["train", "--images", str(pool), "--out", str(tmp_path / "run"), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and says in lines[0], result.output
    assert not (tmp_path / "run").exists()
