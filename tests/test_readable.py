"""Readable at 80 columns: help shows every default whole, the rewards table fits, the score
bar says what runs between rows while the Proposer decomposes prompts, and Ctrl-C during
score, train or bench is one line saying how to resume (exit code 130)."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from asg_kit.cli import app
from asg_kit.micro import world

NARROW = {"COLUMNS": "80", "TERMINAL_WIDTH": "80"}
COMMANDS = [[], ["rewards"], ["score"], ["train"], ["check"], ["report"], ["micro", "pool"], ["micro", "train"],
            ["bench"], ["bench", "compare"], ["bench", "geneval-score"], ["bench", "save-data"]]  # fmt: skip


def _command(path):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _flat(text: str) -> str:
    """Help text with its box drawing and line breaks gone, so a folded word reads whole."""
    return re.sub(r"[\s│╭╮╰╯─]+", "", text)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "asgkit")
def test_help_fits_80_columns_and_shows_every_default_whole(path):
    result = CliRunner().invoke(app, [*path, "--help"], env=NARROW, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output
    flat = _flat(result.output)
    for param in _command(path).params:
        if not isinstance(param, click.Option) or not param.show_default or param.default in (None, False, (), []):
            continue
        shown = param.default if isinstance(param.default, str) else repr(param.default) if isinstance(param.default, float) else str(param.default)
        assert _flat(f"[default: {shown}]") in flat, (param.name, shown)


def test_rewards_table_is_readable_at_80_columns():
    result = CliRunner().invoke(app, ["rewards"], env=NARROW, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80 and "…" not in result.output
    from asg_kit.votefile import example_votes_path, load_vote_records, score_vote_records

    records = load_vote_records(example_votes_path())
    words = result.output.split()
    for record, score in zip(records, score_vote_records(records)):
        assert all(word in words for word in record.question.split()), record.question  # wrapped, never cut
        assert f"{score.d_ste:.3f}" in words and f"{score.proposer_reward:+.3f}" in words and score.bucket in words
        for value in set(score.solver_rewards) if not score.skip_reason else ():
            count = list(score.solver_rewards).count(value)
            assert re.search(rf"{re.escape(f'{value:+.3f}')} x{count}\b", result.output), (value, count)


@pytest.mark.janus
def test_score_says_when_the_proposer_decomposes_a_prompt(tmp_path):
    from asg_kit.adapters.registry import load_backbone
    from asg_kit.score import ScoreOptions, run_score

    rng = random.Random(0)
    folder = tmp_path / "free"
    folder.mkdir()
    for n, prompt in enumerate(["a red circle", "a red circle", "two blue squares"]):
        world.render(world.sample_scene(rng)).save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text(prompt)
    events = []
    run_score(load_backbone("micro"), folder, tmp_path / "out.jsonl", ScoreOptions(samples=1),
              progress=lambda n, total: events.append(("advance", n)), status=lambda text: events.append(("status", text)))  # fmt: skip
    said = [text for kind, text in events if kind == "status" and text]
    assert said == ["Proposer decomposing prompt 1/2: a red circle", "Proposer decomposing prompt 2/2: two blue squares"]
    # each decomposition is announced before that prompt's rows, and cleared after it
    first = events.index(("status", said[0]))
    assert events[first + 1] == ("status", "") and ("advance", 1) in events[first + 2:]
    assert [n for kind, n in events if kind == "advance"] == [0, 1, 1, 1]


# ---- Ctrl-C ----------------------------------------------------------------------------------


def _interrupt_when(command: list[str], ready, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``asgkit COMMAND``, send SIGINT (Ctrl-C) once ``ready()`` holds, and wait."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "80", "PYTHONWARNINGS": "ignore"}  # library deprecation notes are not ours
    process = subprocess.Popen([sys.executable, "-m", "asg_kit.cli", *command], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, f"finished before the interrupt: {process.communicate()}"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _one_resume_line(result) -> str:
    assert result.returncode == 130, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("interrupted: "), result.stderr[-2000:]
    return lines[0]


@pytest.mark.janus
def test_ctrl_c_during_score_says_how_to_resume(tmp_path):
    examples = Path(__file__).resolve().parents[1] / "examples" / "shapes_geneval"
    out = tmp_path / "scores.jsonl"
    result = _interrupt_when(["score", str(examples), "--out", str(out), "--samples", "1"], lambda: _lines(out) >= 1, tmp_path)
    line = _one_resume_line(result)
    assert str(out) in line and "run the same command again to resume" in line


@pytest.mark.janus
def test_ctrl_c_during_train_says_how_to_resume(tmp_path):
    from asg_kit.micro.pool import write_pool

    write_pool(3, tmp_path / "pool", seed=0)
    run = tmp_path / "run"
    command = ["train", "--images", str(tmp_path / "pool"), "--out", str(run), "--steps", "200", "--checkpoint-every", "2",
               "--solver-max-new-tokens", "4", "--proposer-max-new-tokens", "6"]  # fmt: skip
    result = _interrupt_when(command, lambda: (run / "checkpoint" / "state.json").is_file(), tmp_path)
    line = _one_resume_line(result)
    step = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert f"asgkit train --resume {run} (from its last checkpoint, step {step})" in line


@pytest.mark.janus
def test_ctrl_c_during_bench_says_how_to_resume(tmp_path):
    out = tmp_path / "bench"
    command = ["bench", "--out", str(out), "--per-kind", "2", "--per-category", "16", "--shapes-images", "4"]
    result = _interrupt_when(command, lambda: (out / "results.json").is_file(), tmp_path)  # shapes_vqa done, shapes_geneval running
    line = _one_resume_line(result)
    assert str(out / "results.json") in line and "run the same command again to resume" in line


@pytest.mark.janus
def test_check_table_is_readable_at_80_columns(tmp_path):
    result = CliRunner().invoke(app, ["check", "--json", str(tmp_path / "report.json")], env=NARROW, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80 and "…" not in result.output
    report = json.loads((tmp_path / "report.json").read_text())
    from asg_kit.cli import CHECK_NAME_WIDTH

    words, starts = result.output.split(), [line.split()[0] for line in result.output.splitlines() if line.strip()]
    for check in report["checks"]:
        name = check["name"]  # whole, or folded at the column's width onto the next lines
        assert all(name[i : i + CHECK_NAME_WIDTH] in starts for i in range(0, len(name), CHECK_NAME_WIDTH)), name
        assert all(word in words for word in check["detail"].split()), name
