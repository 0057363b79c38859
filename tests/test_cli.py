import json

from typer.testing import CliRunner

import asg_kit
from asg_kit.cli import app

runner = CliRunner()


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and asg_kit.__version__ in result.output
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "rewards" in result.output


def test_rewards_on_shipped_example_writes_json(tmp_path):
    out = tmp_path / "scores.json"
    result = runner.invoke(app, ["rewards", "--json", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert len(scores) == 8
    assert scores[0]["majority"] == "3" and scores[0]["bucket"] in ("medium", "hard")
    assert scores[1]["bucket"] == "easy" and scores[1]["skip_reason"] == "easy question"
    assert all(len(s["solver_rewards"]) == 7 for s in scores)


def test_rewards_reports_the_bad_line(tmp_path):
    bad = tmp_path / "votes.jsonl"
    bad.write_text('{"replies": ["<answer>a</answer>"], "ste": 1.0}\n\n{"replies": [], "ste": 1.0}\n')
    result = runner.invoke(app, ["rewards", str(bad)])
    assert result.exit_code == 2
    assert "votes.jsonl:3" in result.output and "replies" in result.output
    bad.write_text('{"replies": ["x"], "ste": NaN}\n')
    result = runner.invoke(app, ["rewards", str(bad)])
    assert result.exit_code == 2 and "finite" in result.output
    bad.write_text("")
    result = runner.invoke(app, ["rewards", str(bad)])
    assert result.exit_code == 2 and "no vote records" in result.output
    result = runner.invoke(app, ["rewards", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "missing.jsonl" in result.output


def test_train_refuses_an_unknown_reward_form(tmp_path):
    from asg_kit.micro.pool import write_pool

    write_pool(1, tmp_path / "pool")
    result = CliRunner().invoke(app, ["train", "--images", str(tmp_path / "pool"), "--out", str(tmp_path / "run"), "--steps", "1", "--reward-form", "paper"])
    assert result.exit_code == 2 and "reward_form 'paper'" in result.output
