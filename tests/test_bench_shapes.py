"""`asgkit bench` on the shapes world: the default job of the micro model, its results
file, resuming, and the table beside the recorded numbers."""

import json

import pytest
from typer.testing import CliRunner

from asg_kit.bench.run import BenchConfig, expand_tasks, run_bench
from asg_kit.cli import app
from conftest import perturb_roles

pytestmark = pytest.mark.janus

SMALL = ["--per-kind", "2", "--per-category", "1", "--shapes-images", "1"]


def test_presets_expand_in_order_without_duplicates():
    assert expand_tasks((), "micro") == ["shapes_vqa", "shapes_geneval"]
    assert expand_tasks((), "janus")[:2] == ["mmmu_val", "mmbench_en_dev"] and expand_tasks((), "janus")[-1] == "geneval"
    assert expand_tasks(("mmmu_val", "understanding", "shapes_vqa"), "janus") == [
        "mmmu_val", "mmbench_en_dev", "textvqa_val", "seedbench", "realworldqa", "mmvet", "mme", "shapes_vqa",
    ]  # fmt: skip


def test_bench_cli_runs_the_shapes_benchmarks_and_resumes(tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert "shapes-VQA" in result.output and "shapes-GenEval" in result.output and "shipped micro model" in result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"shapes_vqa", "shapes_geneval"}
    vqa, gen = results["tasks"]["shapes_vqa"], results["tasks"]["shapes_geneval"]
    assert vqa["samples"] == 12 and gen["prompts"] == 6
    assert vqa["paper_values"]["shapes-VQA"] == pytest.approx(100 * vqa["metrics"]["accuracy"])
    rows = [json.loads(line) for line in (out / "samples" / "shapes_vqa.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and vqa["metrics"]["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 12)
    assert (out / "shapes_geneval_grid.png").is_file()
    assert results["config"]["seed"] == 0 and results["model"]["solver_role"] == "solver" and results["environment"]["torch"]

    again = CliRunner().invoke(app, ["bench", "--out", str(out), *SMALL])
    assert again.exit_code == 0 and again.output.count("kept from the previous run") == 2
    assert json.loads((out / "results.json").read_text())["tasks"] == results["tasks"]
    changed = CliRunner().invoke(app, ["bench", "--out", str(out), "--per-kind", "1", "--per-category", "1", "--shapes-images", "1"])
    assert changed.exit_code == 0 and changed.output.count("kept from the previous run") == 1  # only shapes_geneval's settings match


def test_tasks_accumulate_in_one_folder_and_other_models_are_not_mixed_in(tmp_path):
    run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path), per_kind=1))
    results = run_bench(BenchConfig(tasks=("shapes_geneval",), out=str(tmp_path), per_category=1, shapes_images=1))
    assert set(results["tasks"]) == {"shapes_vqa", "shapes_geneval"} and results["model"]["model"] == "(shipped weights)"
    assert set(json.loads((tmp_path / "results.json").read_text())["tasks"]) == {"shapes_vqa", "shapes_geneval"}
    with pytest.raises(ValueError, match="results of another model, roles or seed .*--fresh"):
        run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path), per_kind=1, base=True))
    replaced = run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path), per_kind=1, base=True, fresh=True))
    assert set(replaced["tasks"]) == {"shapes_vqa"}


def test_base_flag_turns_the_roles_off(tmp_path):
    results = run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path), base=True, per_kind=1))
    assert results["model"]["solver_role"] is None and results["tasks"]["shapes_vqa"]["samples"] == 6


def test_trained_roles_from_a_run_folder(tmp_path):
    from asg_kit.adapters.registry import load_backbone

    micro = load_backbone("micro")
    perturb_roles(micro, scale=0.3)
    micro.save_roles(tmp_path / "run" / "checkpoint" / "roles")  # where `asgkit train` keeps them
    trained = run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path / "a"), roles=str(tmp_path / "run"), per_kind=3))
    base = run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path / "b"), per_kind=3))
    assert trained["model"]["roles"] == str(tmp_path / "run")
    answers = [json.loads(line)["answer"] for line in (tmp_path / "a" / "samples" / "shapes_vqa.jsonl").read_text().splitlines()]
    base_answers = [json.loads(line)["answer"] for line in (tmp_path / "b" / "samples" / "shapes_vqa.jsonl").read_text().splitlines()]
    assert answers != base_answers  # the perturbed Solver answered


def test_bad_options_are_reported_before_loading_anything(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--tasks", "geneval", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "needs GenEval's prompts" in result.output
    result = runner.invoke(app, ["bench", "--tasks", "geneval", "--geneval", str(tmp_path), "--geneval-mode", "official", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--detector-dir" in result.output
    result = runner.invoke(app, ["bench", "--base", "--roles", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "pass one of them" in result.output
    result = runner.invoke(app, ["bench", "--reference", "gpt-9", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown reference" in result.output


def test_judged_tasks_need_a_judge_key(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_TYPE", raising=False)
    result = CliRunner().invoke(app, ["bench", "--backbone", "janus", "--tasks", "understanding", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "mmbench_en_dev, mmvet score with lmms-eval's LLM judge" in result.output
    assert "OPENAI_API_KEY" in result.output and not (tmp_path / "results.json").exists()


def test_compare_sets_two_runs_beside_the_published_change(tmp_path):
    from asg_kit.bench.run import compare

    before = {"reference": "bagel", "tasks": {"geneval": {"paper_values": {"GenEval overall": 80.0, "GenEval counting": 70.0}}, "mmmu_val": {"paper_values": {"MMMU": 50.0}}}}  # fmt: skip
    after = {"reference": "bagel", "tasks": {"geneval": {"paper_values": {"GenEval overall": 83.5, "GenEval counting": 76.0}}}}
    rows = {row["metric"]: row for row in compare(before, after)}
    assert rows["GenEval overall"]["change"] == pytest.approx(3.5) and rows["GenEval overall"]["published_change"] == pytest.approx(3.0)
    assert rows["GenEval counting"]["published_base"] == 81 and rows["GenEval counting"]["published_asg"] == 87
    assert rows["MMMU"]["after"] is None and rows["MMMU"]["change"] is None and rows["MMMU"]["published_change"] == pytest.approx(3.5)
    for name, results in (("a", before), ("b", after)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    shown = CliRunner().invoke(app, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "+3.5" in shown.output and "+3.0" in shown.output
    missing = CliRunner().invoke(app, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "cannot read" in missing.output


def test_compare_refuses_runs_measured_differently(tmp_path):
    run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path / "a"), per_kind=1))
    run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path / "base"), per_kind=1, base=True))  # another model, same measurement
    run_bench(BenchConfig(tasks=("shapes_vqa",), out=str(tmp_path / "b"), per_kind=2, seed=1))
    runner = CliRunner()
    alike = runner.invoke(app, ["bench", "compare", str(tmp_path / "base"), str(tmp_path / "a")], env={"COLUMNS": "200"})
    assert alike.exit_code == 0 and "shapes-VQA" in alike.output and "WARNING" not in alike.output and "warning" not in alike.output
    refused = runner.invoke(app, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b")], env={"COLUMNS": "400"})
    assert refused.exit_code == 2 and "Traceback" not in refused.output and len(refused.output.strip().splitlines()) == 1
    assert "did not measure the same thing" in refused.output and "--allow-different" in refused.output
    assert "questions per kind 1 vs 2" in refused.output and "seed 0 vs 1" in refused.output and "items measured 6 vs 12" in refused.output
    shown = runner.invoke(app, ["bench", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--allow-different"], env={"COLUMNS": "400"})
    assert shown.exit_code == 0 and "WARNING: not like with like" in shown.output and "seed 0 vs 1" in shown.output and "shapes-VQA" in shown.output


def test_fresh_removes_the_previous_models_samples_and_grids(tmp_path):
    out = tmp_path / "bench"
    assert CliRunner().invoke(app, ["bench", "--out", str(out), *SMALL]).exit_code == 0
    assert (out / "samples" / "shapes_geneval.jsonl").is_file() and (out / "shapes_geneval_grid.png").is_file()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["bench", "--out", str(out), "--tasks", "shapes_vqa", "--base", "--fresh", *SMALL])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["shapes_vqa.jsonl"]
    assert not (out / "shapes_geneval_grid.png").exists() and (out / "notes.txt").read_text() == "mine"
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"shapes_vqa"} and results["model"]["solver_role"] is None
