"""The micro study (bench/micro_asg.py): its statistics, its diagnoses, and a tiny study end to
end (files, skipping finished runs, resuming a killed one without duplicates)."""

from __future__ import annotations

import json
import math

import pytest

from asg_kit.micro import diagnostics as diag
from asg_kit.micro import world
from asg_kit.micro.pool import pool_scenes, write_pool
from conftest import load_bench_script


def test_t_critical_known_values():
    assert diag.t_critical(1) == pytest.approx(12.706)
    assert diag.t_critical(2) == pytest.approx(4.303)
    assert diag.t_critical(4) == pytest.approx(2.776)
    assert diag.t_critical(30) == pytest.approx(2.042)
    assert diag.t_critical(120) == pytest.approx(1.980, abs=2e-3)  # the table's value for df 120
    with pytest.raises(ValueError):
        diag.t_critical(0)


def test_mean_ci_by_hand():
    # mean 2.5, s = sqrt(5/3), half-width t(3) s / 2 = 3.182 * 1.290994 / 2
    ci = diag.mean_ci([1, 2, 3, 4])
    assert ci.mean == pytest.approx(2.5)
    assert ci.low == pytest.approx(2.5 - 2.053971, abs=1e-5)
    assert ci.high == pytest.approx(2.5 + 2.053971, abs=1e-5)
    assert ci.n == 4 and ci.excludes_zero()
    assert not diag.mean_ci([-1, 2]).excludes_zero()
    one = diag.mean_ci([0.3])
    assert (one.mean, one.low, one.high, one.n) == (0.3, None, None, 1) and not one.excludes_zero()
    with pytest.raises(ValueError):
        diag.mean_ci([])


def test_standard_errors_by_hand():
    assert diag.binomial_se([1, 1, 0, 0]) == pytest.approx(0.25)
    assert diag.binomial_se([1, 1, 1]) == 0.0
    # category a: [1, 0] -> 0.25 / 2; b: [1, 1, 1, 0] -> 0.1875 / 4; sqrt(sum) / 2 categories
    se = diag.category_means_se([1, 0, 1, 1, 1, 0], ["a", "a", "b", "b", "b", "b"])
    assert se == pytest.approx(math.sqrt(0.125 + 0.046875) / 2)
    assert diag.category_means_se([1, 0, 0, 1], ["a"] * 4) == pytest.approx(diag.binomial_se([1, 0, 0, 1]))
    # paired: differences [0, 1, 0, 0] -> variance 0.1875, SE sqrt(0.1875 / 4)
    assert diag.paired_se([1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(math.sqrt(0.1875 / 4))
    assert diag.paired_se([1, 0, 1], [1, 0, 1]) == 0.0
    assert diag.paired_category_means_se([1, 0, 1, 1], [1, 0, 1, 1], ["a", "a", "b", "b"]) == 0.0
    interval = diag.normal_interval(0.5, 0.1)
    assert (interval.low, interval.high) == (pytest.approx(0.5 - 0.196, abs=1e-4), pytest.approx(0.5 + 0.196, abs=1e-4))


def test_pool_scenes_are_the_pool_images(tmp_path):
    from PIL import Image

    paths = write_pool(3, tmp_path / "pool", seed=5)
    for path, scene in zip(paths, pool_scenes(3, seed=5)):
        with Image.open(path) as image:
            assert image.convert("RGB").tobytes() == world.render(scene).tobytes()
    assert pool_scenes(3, seed=5) != pool_scenes(3, seed=6)


def test_solver_majority_truth_from_the_pool():
    scenes = pool_scenes(4, seed=3)
    qa0 = world.scene_questions(scenes[0])[0]
    qa1 = next(qa for qa in world.scene_questions(scenes[1]) if qa.kind == "count")
    wrong = str(int(qa1.answer) + 1)
    rows = [
        {"step": 0, "kind": "understanding", "image": "000000.png", "question": qa0.question.upper().replace(" ?", "?"), "answers": [qa0.answer, "x", qa0.answer],
         "bucket": "medium", "solver_skip": None},
        {"step": 1, "kind": "understanding", "image": "000001.png", "question": qa1.question, "answers": [qa1.answer, wrong, wrong],
         "bucket": "medium", "solver_skip": None},
        {"step": 2, "kind": "understanding", "image": "000002.png", "question": "why is the sky blue ?", "answers": ["yes"]},
        {"step": 3, "kind": "generation", "image": "000003.png"},
        {"step": 5, "kind": "understanding", "image": "000000.png", "question": qa0.question, "answers": ["zzz", "zzz", qa0.answer]},
    ]  # fmt: skip
    found = diag.solver_majority_truth(rows, scenes, bin_size=5)
    overall = found["overall"]
    assert (overall["questions"], overall["parsable"], overall["majority_right"]) == (4, 3, 1)
    assert overall["greedy_right_rate"] == pytest.approx(2 / 3)
    assert [(b["steps"], b["questions"], b["parsable"], b["majority_right"]) for b in found["bins"]] == [([0, 4], 3, 2, 1), ([5, 9], 1, 1, 0)]
    assert found["bins"][0]["kinds"][qa1.kind] == {"asked": 1 + (qa0.kind == qa1.kind), "majority_right": int(qa0.kind == qa1.kind)}
    assert overall["kinds"][qa0.kind]["asked"] == 2 + (qa0.kind == qa1.kind)
    # rows without a bucket or a solver_skip field (the last one) count in neither
    assert overall["buckets"] == {"medium": {"parsable": 2, "majority_right": 1}}
    assert overall["updated"] == {"parsable": 2, "majority_right": 1}


def test_proposer_question_items_pair_each_question_with_one_of_its_kind():
    scenes = pool_scenes(6, seed=3)
    asked = [next(qa for qa in world.scene_questions(scenes[i]) if qa.kind == kind) for i, kind in ((0, "count"), (1, "exist"), (2, "color"))]
    rows = [{"step": i, "kind": "understanding", "image": f"{i:06d}.png", "question": qa.question} for i, qa in enumerate(asked)]
    rows += [{"step": 3, "kind": "understanding", "image": "000003.png", "question": "why is the sky blue ?"},
             {"step": 4, "kind": "generation", "image": "000004.png"},
             {"step": 9, "kind": "understanding", "image": "000005.png", "question": world.scene_questions(scenes[5])[0].question}]  # fmt: skip
    chosen, same_kind = diag.proposer_question_items(rows, scenes, before_step=5)
    assert [(item.question, item.answer, item.kind) for item in chosen] == [(qa.question, qa.answer, qa.kind) for qa in asked]
    assert [item.scene for item in chosen] == [item.scene for item in same_kind] == scenes[:3]
    for item in same_kind:  # a real question of the same kind about that image, with its true answer
        assert (item.question, item.answer, item.kind) in {(qa.question, qa.answer, qa.kind) for qa in world.scene_questions(item.scene)}
    assert [item.kind for item in same_kind] == ["count", "exist", "color"]
    assert diag.proposer_question_items(rows, scenes, before_step=5) == (chosen, same_kind)  # seeded


def test_skip_counts():
    rows = [
        {"step": 0, "solver_skip": None, "proposer_skip": None, "bucket": "hard"},
        {"step": 1, "solver_skip": "easy question", "proposer_skip": "no preference in the group", "bucket": "easy"},
        {"step": 2, "generator_skip": "spec not aligned with its image"},
        {"step": 3, "generator_skip": None},
        {"step": 4, "generator_skip": "spec not aligned with its image"},
    ]
    counts = diag.skip_counts(rows)
    assert counts["solver"] == {"updated": 1, "easy question": 1}
    assert counts["generator"] == {"spec not aligned with its image": 2, "updated": 1}
    assert counts["bucket"] == {"hard": 1, "easy": 1}
    assert diag.mean_generation_rewards([{"step": 3, "generation_rewards": [0.2, 0.4]}, {"step": 4}]) == [(3, pytest.approx(0.3))]


def _study():
    return load_bench_script("micro_asg")


TINY = ["--steps", "4", "--evals", "2", "--seeds", "1", "--pool", "6", "--per-kind", "1", "--per-category", "1", "--images", "1", "--bin", "2"]


def test_study_arguments_refused_with_one_line(capsys):
    study = _study()
    with pytest.raises(SystemExit) as exit:
        study.parse_args(["--variants", "full,bogus"])
    assert exit.value.code == 2 and "bogus" in capsys.readouterr().err
    assert study.parse_args(["--variants", "no STE, full"]).variants == ["no_ste", "full"]
    assert study.marks_of(600, 2) == [300, 600]
    assert study.parse_args(["--seeds", "3", "--only-seeds", "2, 0"]).only_seeds == [0, 2]
    for bad, says in (("3", "seeds 0..2"), ("x", "whole numbers"), (",", "one or more"), ("-1", ">= 0")):
        with pytest.raises(SystemExit):
            study.parse_args(["--seeds", "3", "--only-seeds", bad])
        assert says in capsys.readouterr().err, bad


@pytest.mark.janus  # the micro model (main environment)
def test_tiny_study_end_to_end_resumes_without_duplicates(tmp_path, capsys, monkeypatch):
    from asg_kit.checks import UserError
    from asg_kit.train import loop

    study = _study()
    out = tmp_path / "study"
    args = [*TINY, "--out", str(out), "--variants", "full", "--judge-prompts", "1"]
    results = study.main(args)
    for name in ("results.json", "results.md", "diagnosis.md", "curves.png", "base.json", "full-s0/study.json", "full-s0/metrics.jsonl"):
        assert (out / name).is_file(), name
    run = json.loads((out / "full-s0" / "study.json").read_text())
    assert [p["step"] for p in run["points"]] == [2, 4] and run["judge"]["prompts"] == 1
    point = run["points"][-1]
    assert len(point["vqa"]["correct"]) == point["vqa"]["n"] == 6 and len(point["geneval"]["tags"]) == 6
    row = results["variants"]["full"]
    assert row["n"] == 1 and row["vqa"]["delta"]["method"].startswith("paired per-item SE")
    assert "full method" in (out / "results.md").read_text() and "n=1" in (out / "results.md").read_text()
    assert results["diagnosis"]["variants"]["full"][0]["solver_majority"]["overall"]["questions"] >= 1
    first_bin = results["diagnosis"]["variants"]["full"][0]["solver_majority"]["bins"][0]
    selection = results["diagnosis"]["selection"].get("full", {"n": 0})  # the base model on the Proposer's first-bin questions
    assert selection["n"] == (first_bin["parsable"] if first_bin["steps"][0] == 0 else 0)
    assert selection["n"] == 0 or 0.0 <= selection["chosen"] <= 1.0
    metrics = [json.loads(line)["step"] for line in (out / "full-s0" / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [0, 1, 2, 3]

    # Again: nothing trained or measured again.
    before = (out / "full-s0" / "study.json").read_text(), (out / "full-s0" / "metrics.jsonl").read_text()
    capsys.readouterr()
    study.main(args)
    assert "full-s0  step" not in capsys.readouterr().out
    assert ((out / "full-s0" / "study.json").read_text(), (out / "full-s0" / "metrics.jsonl").read_text()) == before

    # Results lost after the first mark (killed before writing the second): measured again, once.
    run["points"] = run["points"][:1]
    del run["judge"]
    (out / "full-s0" / "study.json").write_text(json.dumps(run))
    study.main(args)
    again = json.loads((out / "full-s0" / "study.json").read_text())
    assert [p["step"] for p in again["points"]] == [2, 4] and "judge" in again
    assert (out / "full-s0" / "metrics.jsonl").read_text() == before[1]

    # Other settings in the same folder: refused with one line.
    with pytest.raises(UserError, match="other settings"):
        study.main([*args[:1], "6", *args[2:]])

    # Killed during training after the first mark: resumes from the checkpoint, no row twice.
    real_train, calls = loop.train, []

    def killed_in_second_segment(config, resume=False, stop_after=None, **kw):
        calls.append(stop_after)
        if len(calls) == 2:
            real_train(config, resume=resume, stop_after=1, **kw)
            raise KeyboardInterrupt
        return real_train(config, resume=resume, stop_after=stop_after, **kw)

    killed = tmp_path / "killed"
    monkeypatch.setattr(loop, "train", killed_in_second_segment)
    with pytest.raises(KeyboardInterrupt):
        study.main([*TINY, "--out", str(killed), "--variants", "full", "--judge-prompts", "0"])
    monkeypatch.setattr(loop, "train", real_train)
    assert [p["step"] for p in json.loads((killed / "full-s0" / "study.json").read_text())["points"]] == [2]
    study.main([*TINY, "--out", str(killed), "--variants", "full", "--judge-prompts", "0"])
    resumed = json.loads((killed / "full-s0" / "study.json").read_text())
    assert [p["step"] for p in resumed["points"]] == [2, 4]
    rows = [json.loads(line) for line in (killed / "full-s0" / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = [json.loads(line) for line in (out / "full-s0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [(r["kind"], r["image"], r.get("question")) for r in rows] == [(r["kind"], r["image"], r.get("question")) for r in uninterrupted]


@pytest.mark.janus  # the micro model (main environment)
def test_evaluate_shapes_is_asgkit_bench(tmp_path):
    from asg_kit.adapters.registry import load_backbone
    from asg_kit.bench.run import BenchConfig, run_bench

    bench = BenchConfig(per_kind=1, per_category=1, shapes_images=2, base=True, out=str(tmp_path / "bench"))
    measured = diag.evaluate_shapes(load_backbone("micro"), bench, None, None)
    tasks = run_bench(bench)["tasks"]
    assert measured["vqa"]["accuracy"] == pytest.approx(tasks["shapes_vqa"]["metrics"]["accuracy"])
    assert measured["geneval"]["overall"] == pytest.approx(tasks["shapes_geneval"]["metrics"]["overall"])
    vqa, gen = measured["vqa"], measured["geneval"]
    assert vqa["n"] == 6 and vqa["accuracy"] == pytest.approx(sum(vqa["correct"]) / 6)
    assert vqa["se"] == pytest.approx(diag.binomial_se(vqa["correct"]))
    assert gen["n"] == 12 and gen["se"] == pytest.approx(diag.category_means_se(gen["correct"], gen["tags"]))
    assert diag.bench_settings(BenchConfig()) == {"per_kind": 50, "per_category": 16, "images": 4, "guidance": 5.0, "temperature": 1.0, "seed": 0}


@pytest.mark.janus
def test_judge_detector_agreement_bookkeeping():
    from asg_kit.adapters.registry import load_backbone
    from asg_kit.micro import benchmarks

    metadata = benchmarks.geneval_prompts(1, seed=0)[:3]
    found = diag.judge_detector_agreement(load_backbone("micro"), metadata, candidates=3, generator_role=None)
    assert found["prompts"] == 3 and len(found["per_prompt"]) == 3
    pairs = agree = ties = top = right = 0
    for prompt, meta in zip(found["per_prompt"], metadata):
        rewards, verdicts = prompt["rewards"], prompt["detector_right"]
        assert prompt["prompt"] == meta["prompt"] and len(rewards) == len(verdicts) == 3
        for i in range(3):
            for j in range(3):
                if verdicts[i] and not verdicts[j]:
                    pairs += 1
                    agree += rewards[i] > rewards[j]
                    ties += rewards[i] == rewards[j]
        top += verdicts[rewards.index(max(rewards))]
        right += sum(verdicts)
    assert (found["separated_pairs"], found["judge_agrees"], found["judge_ties"]) == (pairs, agree, ties)
    assert found["top_candidate_right"] == pytest.approx(top / 3) and found["mean_candidate_right"] == pytest.approx(right / 9)


@pytest.mark.janus  # the micro model (main environment)
def test_one_call_per_seed_shares_one_study(tmp_path, capsys):
    study = _study()
    out = tmp_path / "study"
    args = [*TINY, "--out", str(out), "--variants", "full", "--seeds", "2", "--judge-prompts", "0"]
    first = study.main([*args, "--only-seeds", "1"])
    assert not (out / "full-s0").exists() and first["variants"]["full"]["seeds"] == [1]
    capsys.readouterr()
    second = study.main([*args, "--only-seeds", "0"])
    assert "seed(s) 1 found" in capsys.readouterr().out
    assert second["variants"]["full"]["seeds"] == [0, 1]
    whole = study.main(args)  # both finished: nothing runs again, the same report
    assert whole["variants"]["full"] == second["variants"]["full"]
