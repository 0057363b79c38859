"""The micro model's training script: it runs its five stages, exports a loadable Janus, and a
run stopped and resumed from its checkpoint ends bit-identical to one never stopped."""

import json

import pytest
import torch
from safetensors.torch import load_file

from asg_kit.adapters.janus import JanusAdapter
from asg_kit.micro.train import MicroTrainConfig, Phases, train

pytestmark = pytest.mark.janus

TINY = dict(vq_steps=3, lm_steps=3, position_steps=2, position_pass=0.0, position_batch=2, refine_steps=3, judge_steps=2, judge_batch=3, vq_batch=2, text_batch=2, image_batch=2, patch_batch=2, checkpoint_every=2, warmup=1, threads=1)


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
    with pytest.raises(UserError, match="position_pass"):
        train(MicroTrainConfig(**{**TINY, "position_pass": 75}), tmp_path / "bad")
    with pytest.raises(UserError, match="position-phase-cap"):
        train(MicroTrainConfig(**{**TINY, "position_phase_cap": 0}), tmp_path / "bad")


def test_run_saved_before_the_curriculum_gate_resumes_with_fixed_phases(tmp_path):
    from asg_kit.micro.train import micro_config_for

    run = tmp_path / "old"
    assert train(MicroTrainConfig(**TINY), run, stop_after=2).name == "checkpoint"
    saved = json.loads((run / "config.json").read_text())
    del saved["position_pass"], saved["position_binding"]  # as a release without the gate wrote it
    (run / "config.json").write_text(json.dumps(saved))
    config = micro_config_for(run)
    assert config.position_pass == 0.0 and config.position_binding is False
    train(config, run)  # not refused as changed settings


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


def test_curriculum_phase_goes_on_until_its_check_passes_or_hits_its_cap():
    checked = []

    def check(phase):  # phase 0 never passes; phase 1 passes at its first check
        checked.append(phase)
        return 1.0 if phase == 1 else 0.0

    phases = Phases(("two", "three", "any"), steps=6, passing=0.75, every=2, cap=3)
    drawn, rows, step = [], [], 0
    while not phases.done(step):
        drawn.append(phases.mix(step))
        rows.append(phases.after(step, check))
        step += 1
    # phase 0: its share (2 steps), checked then and every 2 steps, moved on at 3 times its share
    assert drawn == ["two"] * 6 + ["three"] * 2 + ["any"] * 2
    assert [r for r in rows if r] == [
        {"phase": 0, "phase_steps": 2, "check_accuracy": 0.0},
        {"phase": 0, "phase_steps": 4, "check_accuracy": 0.0},
        {"phase": 0, "phase_steps": 6, "check_accuracy": 0.0},
        {"phase": 1, "phase_steps": 2, "check_accuracy": 1.0},
    ]
    assert checked == [0, 0, 0, 1] and phases.state() == {"phase": 2, "phase_start": 8}
    # ungated: equal fixed phases, never checked
    fixed = Phases(("two", "three", "any"), steps=6)
    assert [fixed.mix(s) for s in range(6)] == ["two", "two", "three", "three", "any", "any"] and fixed.done(6) and not fixed.after(1, check)
    # a phase without a share is skipped, gated or not
    assert Phases(("two", "three", "any"), steps=2, passing=0.75).mix(0) == "three"


def test_gated_curriculum_resumed_mid_phase_equals_uninterrupted(tmp_path):
    # a tiny random model never answers every held-out question: each phase runs to its cap
    gated = MicroTrainConfig(**{**TINY, "position_binding": True, "position_steps": 4, "position_pass": 1.0, "position_check_every": 1, "position_check_questions": 3, "position_phase_cap": 2})
    whole = load_file(train(gated, tmp_path / "whole") / "model.safetensors")
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "check_accuracy" in r]
    assert [(r["phase"], r["phase_steps"]) for r in checks] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(0 <= r["check_accuracy"] < 1 for r in checks)
    assert max(r["step"] for r in rows if r["stage"] == "position") == 6  # 2 + 2 + 2 + the last phase's 1
    before = TINY["vq_steps"] + TINY["lm_steps"]
    assert train(gated, tmp_path / "parts", stop_after=before + 3).name == "checkpoint"  # inside phase 1
    assert json.loads((tmp_path / "parts" / "checkpoint" / "progress.json").read_text()) == {"stage": "position", "step": 3, "phase": 1, "phase_start": 2}
    parts = load_file(train(gated, tmp_path / "parts") / "model.safetensors")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    resumed = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed) == len(rows) and all(a | {"seconds": 0} == b | {"seconds": 0} for a, b in zip(rows, resumed))  # no row lost or doubled


def test_run_started_at_a_stage_from_an_export_ends_as_the_whole_run(tmp_path):
    from asg_kit.checks import UserError

    config = MicroTrainConfig(**TINY)
    whole = load_file(train(config, tmp_path / "whole") / "model.safetensors")
    later = train(config, tmp_path / "later", start=("refine", tmp_path / "whole" / "stages" / "position"))
    # the model it began from stands as the stage before's, as in the whole run
    assert sorted(p.name for p in (tmp_path / "later" / "stages").iterdir()) == ["judge", "position", "refine"]
    rows = [json.loads(line) for line in (tmp_path / "later" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"refine", "judge"}
    c = load_file(later / "model.safetensors")
    assert all(torch.equal(whole[k], c[k]) for k in whole)
    with pytest.raises(UserError, match="already holds a run"):
        train(config, tmp_path / "later", start=("refine", tmp_path / "whole" / "stages" / "position"))
    with pytest.raises(UserError, match="start-stage 'vq'"):
        train(config, tmp_path / "bad", start=("vq", tmp_path / "whole" / "model"))
    with pytest.raises(UserError, match="no model.safetensors"):
        train(config, tmp_path / "bad", start=("judge", tmp_path / "whole" / "stages"))


def test_curriculum_that_gives_up_starts_over_with_the_binding_drill_as_the_rescue_command_does(tmp_path):
    """A phase that reaches its cap below the pass mark starts the curriculum over from
    stages/lm with the binding drill: the first try's rows stay, the second try's carry
    attempt 2, the model ends as ``--binding --start-stage position --from-model
    RUN/stages/lm`` ends, and a run killed inside the second try resumes to the same model
    with no row lost or doubled."""
    from dataclasses import replace

    # a tiny random model never answers every held-out question: each phase runs to its cap
    config = MicroTrainConfig(**{**TINY, "position_steps": 4, "position_pass": 1.0, "position_check_every": 1, "position_check_questions": 3, "position_phase_cap": 2})
    notices = []
    whole = load_file(train(config, tmp_path / "whole", notice=notices.append) / "model.safetensors")
    assert len(notices) == 1 and "starting the curriculum over" in notices[0] and "binding drill" in notices[0]
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    checks = [(r.get("attempt", 1), r["phase"], r["phase_steps"]) for r in rows if "check_accuracy" in r]
    assert checks == [(1, 0, 1), (1, 0, 2), (2, 0, 1), (2, 0, 2), (2, 1, 1), (2, 1, 2), (2, 2, 1), (2, 2, 2)]  # once only
    assert [r["stage"] for r in rows if r.get("attempt") == 2] == ["position"] * 7  # 2 + 2 + 2 + the last phase's 1

    rescue = train(replace(config, position_binding=True), tmp_path / "rescue", start=("position", tmp_path / "whole" / "stages" / "lm"))
    assert all(torch.equal(whole[k], v) for k, v in load_file(rescue / "model.safetensors").items())

    before = TINY["vq_steps"] + TINY["lm_steps"]
    assert train(config, tmp_path / "parts", stop_after=before + 2 + 3).name == "checkpoint"  # inside the second try
    assert json.loads((tmp_path / "parts" / "checkpoint" / "progress.json").read_text())["attempt"] == 2
    parts = load_file(train(config, tmp_path / "parts") / "model.safetensors")
    assert all(torch.equal(whole[k], parts[k]) for k in whole)
    resumed = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert len(resumed) == len(rows) and all(a | {"seconds": 0} == b | {"seconds": 0} for a, b in zip(rows, resumed))
    without = MicroTrainConfig(**{**TINY, "position_retry": False, "position_steps": 4, "position_pass": 1.0, "position_check_every": 1, "position_check_questions": 3, "position_phase_cap": 2})
    train(without, tmp_path / "no-retry")
    assert not any("attempt" in json.loads(line) for line in (tmp_path / "no-retry" / "metrics.jsonl").read_text().splitlines())
