"""The micro model's training script: it runs its five stages, exports a loadable Janus, and a
run stopped and resumed from its checkpoint ends bit-identical to one never stopped."""

import json

import pytest
import torch
from safetensors.torch import load_file

from asg_kit.adapters.janus import JanusAdapter
from asg_kit.micro.train import MicroTrainConfig, train

pytestmark = pytest.mark.janus

TINY = dict(vq_steps=3, lm_steps=3, position_steps=2, position_batch=2, refine_steps=3, judge_steps=2, judge_batch=3, vq_batch=2, text_batch=2, image_batch=2, patch_batch=2, checkpoint_every=2, warmup=1, threads=1)


def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path):
    config = MicroTrainConfig(**TINY)
    whole = train(config, tmp_path / "whole")
    assert train(config, tmp_path / "parts", stop_after=2).name == "checkpoint"  # inside the VQ stage
    assert json.loads((tmp_path / "parts" / "checkpoint" / "progress.json").read_text()) == {"stage": "vq", "step": 2}
    assert train(config, tmp_path / "parts", stop_after=2).name == "checkpoint"  # inside the LM stage
    assert train(config, tmp_path / "parts", stop_after=3).name == "checkpoint"  # inside the position curriculum
    assert json.loads((tmp_path / "parts" / "checkpoint" / "progress.json").read_text()) == {"stage": "position", "step": 1}
    assert train(config, tmp_path / "parts", stop_after=2).name == "checkpoint"  # inside the refine stage
    assert json.loads((tmp_path / "parts" / "checkpoint" / "progress.json").read_text()) == {"stage": "refine", "step": 1}
    assert train(config, tmp_path / "parts", stop_after=3).name == "checkpoint"  # inside the judge stage
    assert json.loads((tmp_path / "parts" / "checkpoint" / "progress.json").read_text()) == {"stage": "judge", "step": 1}
    parts = train(config, tmp_path / "parts")
    a, b = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"vq", "lm", "position", "refine", "judge"} and all(r["loss"] == r["loss"] for r in rows)
    assert all(r["patch_loss"] > 0 and r["image_loss"] > 0 for r in rows if r["stage"] in ("lm", "refine", "judge"))
    assert all(r["patch_loss"] == 0 and r["image_loss"] == 0 and r["text_loss"] > 0 for r in rows if r["stage"] == "position")
    # stopped exactly between two stages: the next starts fresh, not from the last one's optimizer
    for boundary in (TINY["vq_steps"], TINY["vq_steps"] + TINY["lm_steps"] + TINY["position_steps"], sum(TINY[f"{s}_steps"] for s in ("vq", "lm", "position", "refine"))):
        assert train(config, tmp_path / f"at-{boundary}", stop_after=boundary).name == "checkpoint"
        c = load_file(train(config, tmp_path / f"at-{boundary}") / "model.safetensors")
        assert all(torch.equal(a[k], c[k]) for k in a)


def test_each_stage_leaves_the_model_as_a_shorter_run_ends(tmp_path):
    full = tmp_path / "full"
    final = load_file(train(MicroTrainConfig(**TINY), full) / "model.safetensors")
    assert sorted(p.name for p in (full / "stages").iterdir()) == ["judge", "lm", "position", "refine"]
    curriculum = load_file(train(MicroTrainConfig(**{**TINY, "refine_steps": 0, "judge_steps": 0}), tmp_path / "short") / "model.safetensors")
    assert sorted(p.name for p in (tmp_path / "short" / "stages").iterdir()) == ["lm", "position"]  # a skipped stage leaves nothing
    at_position, at_judge = load_file(full / "stages" / "position" / "model.safetensors"), load_file(full / "stages" / "judge" / "model.safetensors")
    assert all(torch.equal(at_position[k], curriculum[k]) for k in curriculum)
    assert all(torch.equal(at_judge[k], final[k]) for k in final)
    assert not all(torch.equal(at_position[k], final[k]) for k in final)
    JanusAdapter.from_pretrained(full / "stages" / "lm")


def test_refine_stage_trains_all_but_the_tokenizer(tmp_path):
    without = load_file(train(MicroTrainConfig(**{**TINY, "refine_steps": 0, "judge_steps": 0}), tmp_path / "two") / "model.safetensors")
    refined = load_file(train(MicroTrainConfig(**TINY), tmp_path / "three") / "model.safetensors")
    changed = {k for k in without if not torch.equal(without[k], refined[k])}
    for part in ("model.vision_model.", "model.language_model.", "model.generation_head."):
        assert any(k.startswith(part) for k in changed), part
    assert not any(k.startswith("model.vqmodel.") for k in changed)


def test_position_curriculum_trains_understanding_only(tmp_path):
    without = load_file(train(MicroTrainConfig(**{**TINY, "position_steps": 0, "refine_steps": 0, "judge_steps": 0}), tmp_path / "two") / "model.safetensors")
    curriculum = load_file(train(MicroTrainConfig(**{**TINY, "refine_steps": 0, "judge_steps": 0}), tmp_path / "three") / "model.safetensors")
    changed = {k for k in without if not torch.equal(without[k], curriculum[k])}
    for part in ("model.vision_model.", "model.aligner.", "model.language_model."):
        assert any(k.startswith(part) for k in changed), part
    assert not any(k.startswith(("model.vqmodel.", "model.generation_head.", "model.generation_aligner.", "model.generation_embeddings.")) for k in changed)


def test_refine_and_curriculum_settings_are_checked(tmp_path):
    from asg_kit.checks import UserError

    with pytest.raises(UserError, match="refine-steps"):
        train(MicroTrainConfig(**{**TINY, "refine_steps": -1}), tmp_path / "bad")
    with pytest.raises(UserError, match="position-steps"):
        train(MicroTrainConfig(**{**TINY, "position_steps": 1.5}), tmp_path / "bad")
    with pytest.raises(UserError, match="position-batch"):
        train(MicroTrainConfig(**{**TINY, "position_batch": 0}), tmp_path / "bad")
    with pytest.raises(UserError, match="judge-steps"):
        train(MicroTrainConfig(**{**TINY, "judge_steps": True}), tmp_path / "bad")
    with pytest.raises(UserError, match="judge_lr"):
        train(MicroTrainConfig(**{**TINY, "judge_lr": 0.0}), tmp_path / "bad")


def test_exported_model_loads_as_janus_with_unit_codebook(tmp_path):
    export = train(MicroTrainConfig(**TINY), tmp_path / "run")
    backbone = JanusAdapter.from_pretrained(export)
    codebook = backbone.model.model.vqmodel.quantize.embedding.weight
    assert torch.allclose(codebook.norm(dim=1), torch.ones(len(codebook)), atol=1e-5)
    out = backbone.generate_images(["a photo of a red circle"], n=1, seed=0)
    assert out.images[0][0].size == (64, 64)


def test_stage_rates_warm_up_then_decay_hold_or_anneal():
    from asg_kit.micro.train import stage_lr

    config = MicroTrainConfig(warmup=10, lm_min_lr_share=0.1)
    for stage in ("lm", "position", "refine", "judge"):
        assert stage_lr(config, stage, 0, 100, 1.0) == pytest.approx(0.1) and stage_lr(config, stage, 9, 100, 1.0) == 1.0
    assert stage_lr(config, "lm", 55, 100, 1.0) == pytest.approx(0.55) and stage_lr(config, "lm", 99, 100, 1.0) == pytest.approx(0.1, abs=1e-3)
    assert stage_lr(config, "refine", 99, 100, 2.0) == stage_lr(config, "position", 50, 100, 2.0) == 2.0
    judge = [stage_lr(config, "judge", step, 100, 1.0) for step in range(10, 100)]
    assert judge[:66] == [1.0] * 66  # steps 10-75
    assert all(a > b for a, b in zip(judge[65:], judge[66:])) and judge[-1] < 0.01
