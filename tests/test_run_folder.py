"""Reliability of `asgkit train` and its run folder, `micro pool`, `micro train`, `bench` and
`rewards`: outputs own their files, a kill at any point loses nothing, `--resume` does what
it says, and every user error is one line with exit code 2 before any work.

Runs use the shipped micro model on a few shapes-world renders with tiny token budgets."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from asg_kit.checks import UserError, folder_lock
from asg_kit.cli import app
from asg_kit.jsonl import cut_torn_line, recover_folder, swap_in_folder
from asg_kit.micro.pool import write_pool
from asg_kit.train.loop import TrainConfig, resume_config, train

TINY = ["--solver-max-new-tokens", "4", "--proposer-max-new-tokens", "6", "--checkpoint-every", "2", "--lr", "0.001"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pool") / "pool"
    write_pool(4, folder, seed=0)
    return folder


def tiny(pool, out, **overrides) -> TrainConfig:
    settings = dict(images=str(pool), out=str(out), steps=4, lr=1e-3, seed=3, checkpoint_every=2, solver_max_new_tokens=4,
                    proposer_max_new_tokens=6, spec_max_new_tokens=8, generator_candidates=2, spec_samples=1)  # fmt: skip
    return TrainConfig(**{**settings, **overrides})


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def without_time(found):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in found]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ---- ownership -----------------------------------------------------------------------------


@pytest.mark.janus
def test_an_existing_run_is_refused_without_resume_and_replaced_only_with_overwrite(pool, tmp_path):
    run = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(app, ["train", "--images", str(pool), "--out", str(run), "--steps", "2", *TINY]).exit_code == 0
    before = snapshot(run)
    line = one_error_line(runner.invoke(app, ["train", "--images", str(pool), "--out", str(run), "--steps", "3", *TINY]))
    assert "already holds a run" in line and f"--resume {run}" in line and "--overwrite" in line
    assert snapshot(run) == before  # metrics and checkpoint untouched
    result = runner.invoke(app, ["train", "--images", str(pool), "--out", str(run), "--steps", "1", "--overwrite", *TINY])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in rows(run)] == [0] and json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 1


@pytest.mark.janus
def test_resume_refuses_changed_settings_and_keeps_the_saved_total(pool, tmp_path):
    run = tmp_path / "run"
    train(tiny(pool, run, steps=4), stop_after=2)  # checkpoint at step 2 of 4
    runner = CliRunner()
    line = one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--lr", "0.5"]))
    assert "lr=0.001 (asked 0.5)" in line
    line = one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--images", str(tmp_path)]))
    assert "images=" in line
    # giving the saved values again is not a change
    result = runner.invoke(app, ["train", "--resume", str(run), "--lr", "0.001", "--seed", "3", "--images", str(pool)])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in rows(run)] == [0, 1, 2, 3]  # no --steps: the saved total of 4, not the default
    line = one_error_line(runner.invoke(app, ["train", "--resume", str(run), "--steps", "3"]))
    assert "at step 4 already" in line and "total" in line
    result = runner.invoke(app, ["train", "--resume", str(run), "--steps", "5", "--checkpoint-every", "1"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in rows(run)] == [0, 1, 2, 3, 4]  # --steps is the run's total
    assert json.loads((run / "config.json").read_text())["steps"] == 5


@pytest.mark.janus
def test_a_checkpoint_of_other_settings_is_never_resumed(pool, tmp_path):
    run = tmp_path / "run"
    train(tiny(pool, run, steps=4, lr=1e-3), stop_after=2)
    with pytest.raises(UserError, match="lr=0.001 .asked 0.01."):
        train(tiny(pool, run, steps=4, lr=1e-2), resume=True)
    # a config.json rewritten by hand (or by an older asg-kit on restart) does not match the checkpoint
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "lr": 0.01}))
    with pytest.raises(UserError, match="checkpoint was written with other settings"):
        train(tiny(pool, run, steps=4, lr=1e-2), resume=True)
    with pytest.raises(UserError, match="lr=0.01 .asked 0.5."):
        resume_config(run, lr=0.5)


@pytest.mark.janus
def test_a_second_process_on_one_run_folder_is_refused(pool, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from asg_kit.checks import folder_lock
            with folder_lock({str(run)!r}):
                print("held", flush=True)
                sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(CliRunner().invoke(app, ["train", "--images", str(pool), "--out", str(run), "--steps", "2", *TINY]))
        assert f"{run} is in use by another" in line and f"pid {holder.pid}" in line
        assert not (run / "metrics.jsonl").exists() and not (run / "config.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with folder_lock(run):  # released when its process ends
        pass


# ---- crash safety ----------------------------------------------------------------------------


def test_cut_torn_line_and_recover_folder(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert cut_torn_line(path) and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert not cut_torn_line(path) and not cut_torn_line(tmp_path / "missing.jsonl")
    final = tmp_path / "checkpoint"
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "state.json").write_text("previous")
    staged = tmp_path / "checkpoint.tmp"
    staged.mkdir()
    (staged / "state.json").write_text("next")
    # the state a kill between swap_in_folder's two renames leaves: the next swap must not clear .old first
    swap_in_folder(staged, final)
    assert (final / "state.json").read_text() == "next" and not (tmp_path / "checkpoint.old").exists()
    os.replace(final, tmp_path / "checkpoint.old")
    assert recover_folder(final) and (final / "state.json").read_text() == "next"
    assert not recover_folder(final)


@pytest.mark.janus
def test_a_torn_metrics_line_and_a_half_swapped_checkpoint_are_recovered_on_resume(pool, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(tiny(pool, whole, steps=6))
    train(tiny(pool, parts, steps=6), stop_after=5)  # checkpoint at step 4; rows 0..4 written
    with (parts / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "kind": "gener')  # killed during an append
    # killed between the two renames of the next swap: checkpoint/ moved aside, the new one not in place
    os.replace(parts / "checkpoint", parts / "checkpoint.old")
    (parts / "checkpoint.tmp").mkdir()
    notices, resumed = [], []
    train(tiny(pool, parts, steps=6), resume=True, notice=notices.append, log=lambda row: resumed.append(row["step"]))
    assert len(notices) == 1 and "recovered the previous one (step 4) from checkpoint.old" in notices[0]
    assert resumed == [4, 5]  # from the recovered checkpoint, not from scratch
    assert without_time(rows(parts)) == without_time(rows(whole))
    assert not (parts / "checkpoint.old").exists()


# ---- resume semantics -----------------------------------------------------------------------


@pytest.mark.janus
def test_paths_saved_in_a_run_resolve_from_the_run_not_the_current_directory(pool, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(pool, tmp_path / "work" / "pool")
    monkeypatch.chdir(tmp_path / "work")
    train(tiny("pool", "runs/a", steps=2), stop_after=1)
    saved = json.loads((tmp_path / "work" / "runs" / "a" / "config.json").read_text())
    assert saved["images"] == str(tmp_path / "work" / "pool") and saved["out"] == str(tmp_path / "work" / "runs" / "a")
    saved["images"] = "../../pool"  # a relative path written into a run: relative to the run folder
    (tmp_path / "work" / "runs" / "a" / "config.json").write_text(json.dumps(saved))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--resume", "work/runs/a"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in rows(tmp_path / "work" / "runs" / "a")] == [0, 1]


# ---- validation before work -----------------------------------------------------------------


@pytest.fixture
def bad_places(tmp_path, pool):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty").mkdir()
    return tmp_path


@pytest.mark.parametrize(
    "args, says",
    [
        (["--steps", "0"], "--steps 0: must be a whole number above 0"),
        (["--lr", "-1"], "--lr -1.0: must be a number above 0"),
        (["--lr", "nan"], "--lr nan"),
        (["--checkpoint-every", "0"], "--checkpoint-every 0"),
        (["--seed", "-3"], "--seed -3"),
        (["--backbone", "nope"], "unknown backbone 'nope'; registered backbones:"),
        (["--model", "{tmp}/no-model"], "no-model: no such folder"),
        (["--model", "{tmp}/a-file"], "a-file: is a file"),
        (["--model", "{tmp}/empty"], "no config.json"),
        (["--images", "{tmp}/nowhere"], "nowhere is not a folder"),
        (["--images", "{tmp}/empty"], "no images in"),
        (["--out", "{tmp}/a-file"], "--out {tmp}/a-file: is a file"),
        (["--out", "{tmp}/a-file/run"], "a-file is a file"),
        (["--out", "{pool}"], "is the input folder"),
        (["--out", "{pool}/run"], "inside the input folder"),
    ],
)
def test_train_user_errors_are_one_line_before_any_work(args, says, bad_places, pool):
    fill = lambda text: text.format(tmp=bad_places, pool=pool)  # noqa: E731
    base = {"--images": str(pool), "--out": str(bad_places / "run")}
    args = [fill(a) for a in args]
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    before = sorted(p.name for p in bad_places.iterdir())
    line = one_error_line(CliRunner().invoke(app, ["train", *args]))
    assert fill(says) in line
    assert sorted(p.name for p in bad_places.iterdir()) == before and not any(pool.glob("run"))  # nothing written


def test_resume_of_a_folder_without_a_run_is_one_line(tmp_path):
    line = one_error_line(CliRunner().invoke(app, ["train", "--resume", str(tmp_path)]))
    assert "holds no run to resume" in line
    line = one_error_line(CliRunner().invoke(app, ["train", "--resume", str(tmp_path), "--overwrite"]))
    assert "pass one of them" in line


def test_micro_pool_never_replaces_files(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["micro", "pool", "2", str(tmp_path / "p")]).exit_code == 0
    first = snapshot(tmp_path / "p")
    result = runner.invoke(app, ["micro", "pool", "4", str(tmp_path / "p")])  # grows: the same 2 images, then 2 more
    assert result.exit_code == 0 and sorted(snapshot(tmp_path / "p")) == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert {k: v for k, v in snapshot(tmp_path / "p").items() if k in first} == first
    assert snapshot(tmp_path / "p") == snapshot(write_pool(4, tmp_path / "q")[0].parent)  # as if written at once
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "000001.png").write_bytes(b"my own file")
    line = one_error_line(runner.invoke(app, ["micro", "pool", "3", str(tmp_path / "mine")]))
    assert "000001.png exists" in line and "never replaces" in line
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["000001.png"]  # nothing written
    assert (tmp_path / "mine" / "000001.png").read_bytes() == b"my own file"
    line = one_error_line(runner.invoke(app, ["micro", "pool", "3", str(tmp_path / "p"), "--seed", "1"]))
    assert "000000.png exists" in line
    assert "--image-size 0" in one_error_line(runner.invoke(app, ["micro", "pool", "3", str(tmp_path / "r"), "--image-size", "0"]))
    assert "is a file" in one_error_line(runner.invoke(app, ["micro", "pool", "3", str(tmp_path / "p" / "000000.png")]))


@pytest.mark.janus
def test_micro_train_resumes_only_with_its_own_settings(tmp_path):
    from asg_kit.micro.train import MicroTrainConfig, micro_config_for
    from asg_kit.micro.train import train as micro_train

    tiny_micro = dict(vq_steps=3, lm_steps=2, position_steps=1, position_batch=2, refine_steps=1, judge_steps=1, judge_batch=2, vq_batch=2, text_batch=2, image_batch=2, checkpoint_every=2, warmup=1, threads=1)
    run = tmp_path / "micro"
    micro_train(MicroTrainConfig(**tiny_micro, device="cpu"), run, stop_after=2)
    (run / "metrics.jsonl").open("a").write('{"stage": "vq", "st')  # a torn append
    with pytest.raises(UserError, match="seed=0 .asked 1."):
        micro_train(MicroTrainConfig(**{**tiny_micro, "seed": 1}), run)
    line = one_error_line(CliRunner().invoke(app, ["micro", "train", str(run), "--vq-steps", "9"]))
    assert "vq_steps=3 (asked 9)" in line
    assert "position_binding=False (asked True)" in one_error_line(CliRunner().invoke(app, ["micro", "train", str(run), "--binding"]))
    assert micro_config_for(run) == MicroTrainConfig(**tiny_micro)  # a bare re-run takes the saved settings, the device this machine's
    line = one_error_line(CliRunner().invoke(app, ["micro", "train", str(run), "--device", "cuda:99"]))
    assert "--device cuda:99" in line and ("no CUDA GPU" in line or "CUDA device(s)" in line)
    micro_train(micro_config_for(run), run)
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == [("vq", 0), ("vq", 2), ("lm", 0), ("lm", 1), ("position", 0), ("refine", 0), ("judge", 0)]  # each logged step once, no torn line
    with folder_lock(run):
        line = one_error_line(CliRunner().invoke(app, ["micro", "train", str(run)]))
        assert "in use by another" in line
    assert "go together" in one_error_line(CliRunner().invoke(app, ["micro", "train", str(tmp_path / "new"), "--start-stage", "refine"]))
    line = one_error_line(CliRunner().invoke(app, ["micro", "train", str(run), "--start-stage", "refine", "--from-model", str(run / "stages" / "position")]))
    assert "already holds a run" in line


# ---- role adapters, bench, rewards ----------------------------------------------------------


@pytest.mark.janus
def test_corrupt_role_adapters_are_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from asg_kit.adapters.registry import load_backbone

    micro = load_backbone("micro")
    micro.save_roles(tmp_path / "roles")
    micro.load_roles(tmp_path / "roles")  # the good ones load
    solver = tmp_path / "roles" / "solver" / "adapter_model.safetensors"
    weights = load_file(solver)
    save_file({"renamed." + k: v for k, v in weights.items()}, solver)
    with pytest.raises(UserError, match=r"solver/adapter_model.safetensors: \d+ key\(s\) match nothing"):
        micro.load_roles(tmp_path / "roles")
    save_file(dict(list(weights.items())[2:]), solver)
    with pytest.raises(UserError, match="of the role's weights are missing"):
        micro.load_roles(tmp_path / "roles")
    data = (tmp_path / "roles" / "proposer" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "roles" / "proposer" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="proposer/adapter_model.safetensors: not a readable safetensors file"):
        micro.load_roles(tmp_path / "roles")
    result = CliRunner().invoke(app, ["bench", "--roles", str(tmp_path / "roles"), "--tasks", "shapes_vqa", "--per-kind", "1", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "not a readable safetensors file" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, says",
    [
        (["--backbone", "nope", "--tasks", "shapes_vqa"], "unknown backbone 'nope'"),
        (["--backbone", "nope"], "unknown backbone 'nope'"),  # before the default task list needs --geneval
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--device", "toaster"], "is not a torch device"),
        (["--dtype", "float13"], "--dtype 'float13'"),
        (["--seed", "-1"], "--seed -1"),
        (["--model", "{tmp}/nowhere"], "nowhere: no such folder"),
        (["--roles", "{tmp}/nowhere"], "--roles {tmp}/nowhere: no such folder"),
        (["--out", "{tmp}/a-file"], "is a file"),
    ],
)
def test_bench_user_errors_are_one_line_before_any_work(args, says, tmp_path):
    (tmp_path / "a-file").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    line = one_error_line(CliRunner().invoke(app, ["bench", *args]))
    assert says.format(tmp=tmp_path) in line
    assert not (tmp_path / "out").exists()


@pytest.mark.janus  # lmms-eval's datasets needs a newer huggingface_hub than the transformers 4.46 venv has
def test_bench_offline_without_data_dir_fails_at_once(tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    began = time.time()
    result = CliRunner().invoke(app, ["bench", "--tasks", "mmmu_val", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--data-dir" in result.output and "HF_HUB_OFFLINE=1" in result.output, result.output
    assert "asgkit bench save-data mmmu_val" in result.output
    assert time.time() - began < 60 and not (tmp_path / "out").exists()


def test_rewards_checks_its_output_before_work(tmp_path):
    line = one_error_line(CliRunner().invoke(app, ["rewards", "--json", str(tmp_path)]))
    assert "is a folder" in line
    (tmp_path / "f").write_text("x")
    assert "is a file" in one_error_line(CliRunner().invoke(app, ["rewards", "--json", str(tmp_path / "f" / "out.json")]))


@pytest.mark.janus
def test_a_damaged_checkpoint_is_one_line_on_resume(pool, tmp_path):
    run = tmp_path / "run"
    train(tiny(pool, run, steps=4), stop_after=2)
    optimizer = run / "checkpoint" / "optimizer_solver.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    line = one_error_line(CliRunner().invoke(app, ["train", "--resume", str(run)]))
    assert "optimizer_solver.pt: cannot be read" in line
    roles = run / "checkpoint" / "roles" / "generator" / "adapter_model.safetensors"
    roles.write_bytes(roles.read_bytes()[:50])
    line = one_error_line(CliRunner().invoke(app, ["train", "--resume", str(run)]))
    assert "generator/adapter_model.safetensors: not a readable safetensors file" in line
