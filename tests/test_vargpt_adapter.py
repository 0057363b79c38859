"""VARGPT-v1.1 through its upstream code: a tiny random-weight checkpoint built from the real
upstream classes (shared/upstream/VARGPT-v1.1), loaded like a real one; the conformance checker,
training cycles with an exact resume, `asgkit score`, `asgkit bench` and torchrun.

Runs in the VARGPT environment (pip install -e '.[vargpt]': transformers 4.46) with
ASGKIT_UPSTREAM set to a folder holding VARGPT-v1.1/; skipped otherwise (conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from typer.testing import CliRunner

from asg_kit import prompts
from asg_kit.adapters.base import AnswerRequest
from asg_kit.adapters.tiny_vargpt import write_tiny_vargpt
from asg_kit.adapters.vargpt import VARGPTAdapter
from asg_kit.cli import app
from asg_kit.images import load_image
from asg_kit.micro.pool import write_pool
from asg_kit.train.loop import TrainConfig, train

pytestmark = pytest.mark.vargpt

UPSTREAM = str(Path(os.environ.get("ASGKIT_UPSTREAM", "")) / "VARGPT-v1.1")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "shapes_geneval"
SPEC = "draw : a red circle | what color is the circle ? red | what shape is it ? circle"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny_vargpt(tmp_path_factory.mktemp("vargpt") / "tiny", upstream=UPSTREAM, seed=0)


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pool")
    write_pool(4, folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def speaking(tiny, pool, tmp_path_factory) -> Path:
    """The tiny checkpoint after a few real gradient steps on its own weights so that, asked for a
    spec, it writes SPEC: random weights write unparseable specs of quality 0, whose candidates
    all tie, and the Generator update would never run."""
    adapter = VARGPTAdapter.from_pretrained(tiny, upstream=UPSTREAM, lora=None)
    images = [load_image(p).image for p in sorted(pool.iterdir())[:2]]
    requests = [AnswerRequest(image, prompts.PROPOSER_SPEC) for image in images]
    completion = adapter.encode_completion(SPEC)
    optimizer = torch.optim.Adam([p for p in adapter.model.model.parameters()] + list(adapter.model.lm_head.parameters()), lr=1e-2)
    adapter.model.train()
    for _ in range(40):
        optimizer.zero_grad()
        scores = adapter.score_completions(requests, [completion] * len(requests))
        (-scores.logprobs.sum()).backward()
        optimizer.step()
    adapter.model.eval()
    folder = tmp_path_factory.mktemp("vargpt") / "speaking"
    adapter.model.save_pretrained(folder, safe_serialization=True)
    for path in tiny.iterdir():
        if not path.name.startswith(("model", "config")):
            shutil.copy(path, folder / path.name)
    return folder


def rows_of(folder: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def config_for(model: Path, pool: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(backbone="vargpt", model=str(model), upstream=UPSTREAM, images=str(pool), out=str(out), steps=10, lr=1e-3, seed=3,
                solver_max_new_tokens=5, proposer_max_new_tokens=32, spec_max_new_tokens=32, generator_candidates=2, spec_samples=1,
                checkpoint_every=2, unsolvable_share=0.0, easy_share=1.01, spec_quality_min=0.0, alignment_min=0.0)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


# ---- the adapter ---------------------------------------------------------------------------


def test_asgkit_check_passes_on_the_tiny_checkpoint():
    """The issue's acceptance command: builds the tiny instance from the upstream classes, writes
    it as a checkpoint, loads it through from_pretrained and runs every conformance check."""
    result = runner.invoke(app, ["check", "--backbone", "vargpt", "--tiny", "--upstream", UPSTREAM])
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output


def test_answers_never_start_an_image_and_n_images_match_one_at_a_time(tiny, pool):
    adapter = VARGPTAdapter.from_pretrained(tiny, upstream=UPSTREAM)
    with torch.no_grad():  # make <|image_gen_start|> the overwhelming favourite of the language head
        adapter.model.lm_head.weight[adapter.gen_start_id] = adapter.model.model.norm.weight * 50
    image = load_image(sorted(pool.iterdir())[0]).image
    samples = adapter.sample_answers([AnswerRequest(image, "what color is it ?", temperature=1.0, seed=s) for s in range(3)], max_new_tokens=8)
    assert all(adapter.gen_start_id not in s.token_ids for s in samples)
    assert all(len(s.token_ids) == 8 for s in samples)  # sampling went on: the start token was only masked

    together = adapter.generate_images(["a red circle"], n=3, seed=5)
    alone = [adapter.generate_images(["a red circle"], n=1, seed=5 + j) for j in range(3)]
    assert torch.equal(together.rollout.tokens, torch.cat([a.rollout.tokens for a in alone]))
    # batched float arithmetic (guidance 3 and tau 0.5 amplify it) moves log-probs by ~1e-4
    assert torch.allclose(together.rollout.behaviour_logprobs, torch.cat([a.rollout.behaviour_logprobs for a in alone]), atol=2e-3)
    tokens = sum(h * w for _, h, w in adapter.scale_schedule())
    assert together.rollout.tokens.shape == (3, tokens, 32) and together.images[0][0].size == (64, 64)
    assert not any(Path.cwd().glob("*.png"))  # upstream's path would cv2.imwrite output.png here
    # guidance reads 512 rows of unconditional context: a longer prompt loses its tail, not the run
    long = adapter.generate_images(["a red circle " * 300], n=1, seed=0)
    assert len(long.rollout.prompt_ids[0]) < 512 and long.rollout.tokens.shape[0] == 1


def test_one_image_equals_upstreams_own_generate_path(tiny, tmp_path, monkeypatch):
    """Upstream's path: generate() -> <|image_gen_start|> -> forward(inference_image_gen=True),
    which seeds from the wall clock (frozen here) and writes the image with cv2; the adapter's
    draw with that seed and upstream's settings (CFG 3, tau 0.5, top-k 900, top-p 0.97) is the
    same image."""
    import importlib
    import time

    from PIL import Image
    from transformers import LogitsProcessor, LogitsProcessorList

    adapter = VARGPTAdapter.from_pretrained(tiny, upstream=UPSTREAM, lora=None)
    model = adapter.model
    importlib.import_module("patching_utils.patching").patching(model)
    model._IMAGE_GEN_PATH = str(tmp_path / "upstream.png")
    ids = torch.tensor([adapter.generation_prompt_ids("a red circle")])

    class StartImage(LogitsProcessor):  # random weights never choose the start token themselves
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == ids.shape[1]:
                scores = torch.full_like(scores, -torch.inf)
                scores[:, adapter.gen_start_id] = 0.0
            return scores

    monkeypatch.setattr(time, "time", lambda: 1.234)  # upstream's seed: int(time.time() * 1000)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                       logits_processor=LogitsProcessorList([StartImage()]))  # fmt: skip
    monkeypatch.undo()
    model.past_hidden_states = None
    upstream_image = Image.open(tmp_path / "upstream.png").convert("RGB")
    ours = adapter.generate_images(["a red circle"], n=1, guidance_scale=3.0, temperature=0.5, seed=1234)
    assert ours.images[0][0].tobytes() == upstream_image.tobytes() and ours.images[0][0].size == upstream_image.size


def test_scale_weighted_logprobs_give_the_released_sequence_weighting(tiny):
    adapter = VARGPTAdapter.from_pretrained(tiny, upstream=UPSTREAM)
    rollout = adapter.generate_images(["a blue square"], n=2, seed=1).rollout
    with torch.no_grad():
        plain = adapter.generation_logprobs(rollout)
        adapter.scale_weighted_logprobs = True
        weighted = adapter.generation_logprobs(rollout)
    schedule = adapter.scale_schedule()
    areas = [h * w for _, h, w in schedule]
    weights = [areas[-1] / a for a in areas]
    expected, start = 0.0, 0
    for area, weight in zip(areas, weights):  # the released code: per-scale mean, weighted by last area / area
        expected = expected + weight / sum(weights) * plain[:, start : start + area].mean(-1)
        start += area
    assert torch.allclose(weighted.mean(-1), expected, atol=1e-4)
    # in training mode (the loop's update), upstream's drop-path and condition dropout stay off:
    # the reference policy's teacher forcing is deterministic
    adapter.scale_weighted_logprobs = False
    adapter.model.train(True)
    with torch.no_grad():  # drop-path 0.1 on 2 rows would leave 8 calls unchanged with p ~ 0.03
        calls = [adapter.generation_logprobs(rollout) for _ in range(8)]
    adapter.model.train(False)
    assert all(torch.equal(calls[0], other) for other in calls[1:]) and torch.allclose(calls[0], plain, atol=1e-4)


# ---- training ------------------------------------------------------------------------------


def test_training_cycles_update_every_role_and_resume_exactly(speaking, pool, tmp_path):
    train(config_for(speaking, pool, tmp_path / "whole"))
    rows = rows_of(tmp_path / "whole")
    assert [r["kind"] for r in rows] == ["understanding"] * 3 + ["generation"] * 2 + ["understanding"] * 3 + ["generation"] * 2
    assert any(r.get("solver_skip") is None and "solver_loss" in r for r in rows)
    generated = [r for r in rows if r["kind"] == "generation"]
    assert any(r["spec_quality"] > 0 for r in generated)  # taught specs parse into question/answer pairs
    assert any(r["generator_skip"] is None and "generator_loss" in r for r in generated)  # the GRPO update ran
    state = json.loads((tmp_path / "whole" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10

    train(config_for(speaking, pool, tmp_path / "parts"), stop_after=3)  # killed after step 2; checkpoint at 2
    train(config_for(speaking, pool, tmp_path / "parts"), resume=True)
    assert without_time(rows_of(tmp_path / "parts")) == without_time(rows)
    from safetensors.torch import load_file

    for role in ("proposer", "solver", "generator"):
        a = load_file(tmp_path / "whole" / "checkpoint" / "roles" / role / "adapter_model.safetensors")
        b = load_file(tmp_path / "parts" / "checkpoint" / "roles" / role / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the Generator's adapter reaches Infinity and the generation projectors
    assert any(k.startswith("base_model.model.vargpt_gen.") for k in a) and any("image_gen_projector" in k for k in a)


def test_asgkit_train_cli_runs_cycles_and_resumes(tiny, pool, tmp_path):
    common = ["--backbone", "vargpt", "--model", str(tiny), "--upstream", UPSTREAM, "--images", str(pool), "--out", str(tmp_path / "run"),
              "--solver-max-new-tokens", "4", "--proposer-max-new-tokens", "6", "--checkpoint-every", "5", "--guidance", "3"]  # fmt: skip
    result = runner.invoke(app, ["train", "--steps", "5", *common])
    assert result.exit_code == 0, result.output
    assert [r["kind"] for r in rows_of(tmp_path / "run")] == ["understanding"] * 3 + ["generation"] * 2
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--steps", "7"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in rows_of(tmp_path / "run")] == list(range(7))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["upstream"] == str(Path(UPSTREAM).resolve())  # saved absolute, as every path of a run


def test_missing_checkout_or_checkpoint_is_one_line(tiny, pool, tmp_path):
    common = ["train", "--backbone", "vargpt", "--images", str(pool), "--out", str(tmp_path / "run"), "--steps", "1"]
    # a fresh process: here the checkout is imported already, and $ASGKIT_UPSTREAM would be the fallback
    env = {k: v for k, v in os.environ.items() if k != "ASGKIT_UPSTREAM"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run([sys.executable, "-m", "asg_kit.cli", *common, "--model", str(tiny), "--upstream", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "8c67c263497a4f303b3e9668b49217d70bd47a44" in output and "Traceback" not in output
    (tmp_path / "not-a-checkpoint").mkdir()
    result = runner.invoke(app, [*common, "--model", str(tmp_path / "not-a-checkpoint"), "--upstream", UPSTREAM])
    assert result.exit_code == 2 and "not-a-checkpoint" in result.output and "Traceback" not in result.output


def test_two_processes_under_torchrun(tiny, pool, tmp_path):
    config = config_for(tiny, pool, tmp_path / "ddp", steps=4, checkpoint_every=4, understanding_per_cycle=1, generation_per_cycle=1)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.__dict__))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "asg_kit.train.loop", str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = rows_of(tmp_path / "ddp"), rows_of(tmp_path / "ddp", "metrics.rank1.jsonl")
    assert len(first) == len(second) == 4
    state = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())
    assert set(state["ranks"]) == {"0", "1"} and state["step"] == 4


# ---- score and bench -------------------------------------------------------------------------


def test_asgkit_score_judges_the_example_folder(tiny, tmp_path):
    folder = tmp_path / "examples"
    for name in sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())[:2]:
        shutil.copytree(EXAMPLES / name, folder / name)
    images = sorted(folder.glob("*/samples/*.png"))
    result = runner.invoke(app, ["score", str(folder), "--backbone", "vargpt", "--model", str(tiny), "--upstream", UPSTREAM, "--samples", "1"])
    assert result.exit_code == 0, result.output
    out = rows_of(folder, "asg_scores.jsonl")
    assert len(out) == len(images) and {r["status"] for r in out} == {"scored"}
    assert all(0.0 <= r["reward"] <= 1.0 or r["reward"] < 0 for r in out)


def test_asgkit_bench_runs_the_shapes_tasks(tiny, tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--backbone", "vargpt", "--model", str(tiny), "--upstream", UPSTREAM, "--tasks", "shapes", "--out", str(out),
                                 "--per-kind", "1", "--per-category", "1", "--shapes-images", "1", "--guidance", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"shapes_vqa", "shapes_geneval"}
    assert results["tasks"]["shapes_geneval"]["prompts"] == 6
