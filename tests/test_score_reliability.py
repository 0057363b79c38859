"""`asgkit score` reliability: outputs owned by one job, results that depend on content and
settings only (resumed == uninterrupted, row for row), rows kept as they finish, checks
before any work, hostile input. Judged by the shipped micro model."""

import json
import random
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from asg_kit.adapters.registry import load_backbone
from asg_kit.cli import app
from asg_kit.folders import discover
from asg_kit.images import load_image
from asg_kit.micro import world
from asg_kit.score import Judge, ScoreOptions, ScoreOutput, ScoreSetupError, job_path, lock_path, run_score

pytestmark = pytest.mark.janus
runner = CliRunner()
MICRO = Judge("micro")


@pytest.fixture(scope="module")
def judge():
    return load_backbone("micro")


def renders(n, seed=0):
    rng = random.Random(seed)
    return [world.render(world.sample_scene(rng)) for _ in range(n)]


def sidecar_folder(folder, groups, seed=0):
    """``groups``: {prompt: number of images}; files g<i>_<n>.png with sidecar prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    images = iter(renders(sum(groups.values()), seed))
    for g, (prompt, count) in enumerate(groups.items()):
        for n in range(count):
            next(images).save(folder / f"g{g}_{n}.png")
            (folder / f"g{g}_{n}.txt").write_text(prompt)
    return folder


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_image(path):
    found = rows(path)
    assert len({r["image"] for r in found}) == len(found), "duplicate rows"
    return {r["image"]: r for r in found}


class Interrupt:
    """A progress callback that stops the run (as Ctrl-C would) after ``after`` new rows."""

    def __init__(self, after):
        self.after, self.calls = after, 0

    def __call__(self, advance, total):
        self.calls += 1
        if self.calls > 1 and self.calls - 1 >= self.after:  # the first call reports what was already done
            raise KeyboardInterrupt


def score_cli(folder, *extra):
    return runner.invoke(app, ["score", str(folder), *extra])


def one_line_error(result):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    text = result.stderr.strip()
    assert text.startswith("error:") and "\n" not in text, text
    return text


# 1. Output ownership ------------------------------------------------------------------------


def test_foreign_files_at_out_are_refused_untouched(tmp_path):
    folder = sidecar_folder(tmp_path / "imgs", {"a red circle": 2})
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"my notes\nlast line without newline")
    png = folder / "g0_0.png"
    png_bytes = png.read_bytes()
    mapped = tmp_path / "mapped"
    mapped.mkdir()
    renders(1)[0].save(mapped / "a.png")
    (mapped / "prompts.jsonl").write_text('{"file": "a.png", "prompt": "a circle"}\n')
    cases = [
        (folder, notes, "not an output of asgkit score"),
        (folder, png, "an image of the folder"),
        (mapped, mapped / "prompts.jsonl", "mapping file"),
        (folder, folder / "g0_0.txt", "prompt file"),
        (folder, folder, "is a folder"),
        (folder, folder / "new.png", "image's extension"),
        (folder, tmp_path / "res.jsonl", "res.job.json exists and is not a job record"),
    ]
    (tmp_path / "res.job.json").write_text("my own notes\n")
    for source, out, expected in cases:
        before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}
        text = one_line_error(score_cli(source, "--out", str(out), "--samples", "1"))
        assert expected in text, (out, text)
        assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
    assert notes.read_bytes() == b"my notes\nlast line without newline" and png.read_bytes() == png_bytes
    assert not job_path(notes).exists() and not lock_path(notes).exists()
    # --fresh never replaces an input; it does replace a file that is no input of the job.
    assert "an image of the folder" in one_line_error(score_cli(folder, "--out", str(png), "--fresh"))
    result = score_cli(folder, "--out", str(notes), "--fresh", "--samples", "1")
    assert result.exit_code == 0, result.output
    assert sorted(by_image(notes)) == ["g0_0.png", "g0_1.png"]


def test_rows_of_another_job_are_refused_and_fresh_replaces_them(judge, tmp_path):
    one = sidecar_folder(tmp_path / "one", {"a red circle": 2})
    two = sidecar_folder(tmp_path / "two", {"a blue square": 2}, seed=3)
    out = tmp_path / "scores.jsonl"
    run_score(judge, one, out, ScoreOptions(samples=1), judge=MICRO)
    written = out.read_bytes()
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"prompt": "a red circle", "questions": [{"question": "is there a circle ?", "expected": "yes"}]}) + "\n")
    others = [
        (two, ScoreOptions(samples=1), "folder"),
        (one, ScoreOptions(samples=2), "samples"),
        (one, ScoreOptions(samples=1, seed=1), "seed"),
        (one, ScoreOptions(samples=1, questions=questions), "questions"),
        (one, ScoreOptions(samples=1, difficulty=True), "mode"),
    ]
    for folder, options, differs in others:
        with pytest.raises(ScoreSetupError, match=differs):
            run_score(judge, folder, out, options, judge=MICRO)
        assert out.read_bytes() == written
    with pytest.raises(ScoreSetupError, match="model"):
        run_score(judge, one, out, ScoreOptions(samples=1), judge=Judge("micro", model=str(tmp_path)))
    # The same job resumes (nothing to do), --fresh starts over with the new settings.
    run_score(judge, one, out, ScoreOptions(samples=1), judge=MICRO)
    assert out.read_bytes() == written
    run_score(judge, two, out, ScoreOptions(samples=2, fresh=True), judge=MICRO)
    fresh = by_image(out)
    assert sorted(fresh) == ["g0_0.png", "g0_1.png"] and {r["prompt"] for r in fresh.values()} == {"a blue square"}
    assert all(len(q["answers"]) == 2 for r in fresh.values() for q in r["questions"])


def test_error_rows_are_retried_once_the_input_is_fixed(judge, tmp_path):
    folder = sidecar_folder(tmp_path / "imgs", {"a red circle": 2})
    (folder / "g0_1.txt").unlink()
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a red circle")
    out = tmp_path / "s.jsonl"
    run_score(judge, folder, out, ScoreOptions(samples=1), judge=MICRO)
    first = by_image(out)
    assert first["g0_1.png"]["status"] == "error" and first["broken.png"]["status"] == "error"
    (folder / "g0_1.txt").write_text("a red circle")
    renders(1, 9)[0].save(folder / "broken.png")
    summary = run_score(judge, folder, out, ScoreOptions(samples=1), judge=MICRO)
    again = by_image(out)  # one row per image: the error rows were replaced
    assert {r["status"] for r in again.values()} == {"scored"} and summary["errors"] == 0 and summary["scored"] == 3
    assert again["g0_0.png"]["image"] == first["g0_0.png"]["image"]


def test_a_second_concurrent_run_is_refused(tmp_path):
    folder = sidecar_folder(tmp_path / "imgs", {"a red circle": 1})
    out = tmp_path / "s.jsonl"
    with ScoreOutput(folder, out, discover(folder), ScoreOptions(samples=1), MICRO):
        text = one_line_error(score_cli(folder, "--out", str(out), "--samples", "1"))
        assert "another asgkit score is writing" in text
    assert not out.exists() or out.read_bytes() == b""


# 2. Results depend on content and settings only ------------------------------------------


def test_identical_images_score_alike_and_a_deleted_sibling_leaves_rows_as_a_fresh_run(judge, tmp_path):
    folder = sidecar_folder(tmp_path / "imgs", {"a photo of a circle": 3})
    shutil.copy(folder / "g0_0.png", folder / "g0_9.png")  # a byte-identical twin, last in the group
    (folder / "g0_9.txt").write_text("a photo of a circle")
    out = tmp_path / "s.jsonl"
    run_score(judge, folder, out, ScoreOptions(samples=2), judge=MICRO)
    got = by_image(out)
    twin, original = dict(got["g0_9.png"]), dict(got["g0_0.png"])
    for row in (twin, original):
        del row["image"]
    assert twin == original
    # Without a sibling: the answers and caption of the others do not move, and the rows
    # (diversity shares included) are what a fresh run on the smaller folder writes.
    (folder / "g0_2.png").unlink()
    run_score(judge, folder, out, ScoreOptions(samples=2), judge=MICRO)
    resumed = by_image(out)
    fresh_out = tmp_path / "fresh.jsonl"
    run_score(judge, folder, fresh_out, ScoreOptions(samples=2), judge=MICRO)
    fresh = by_image(fresh_out)
    for key in ("g0_0.png", "g0_1.png", "g0_9.png"):
        assert resumed[key] == fresh[key]
        assert resumed[key]["questions"] == got[key]["questions"] and resumed[key]["caption"] == got[key]["caption"]
    summary = json.loads((tmp_path / "s.summary.json").read_text())
    assert summary["scored"] == 3  # the deleted image's row is kept in the file, not counted


def _cut_runs(judge, folder, out, options, cuts):
    for after in cuts:
        with pytest.raises(KeyboardInterrupt):
            run_score(judge, folder, out, options, progress=Interrupt(after), judge=MICRO)
    with out.open("a") as handle:  # and a kill in the middle of writing a row
        handle.write('{"image": "g0_2.png", "status": "sc')
    return run_score(judge, folder, out, options, judge=MICRO)


def test_generation_scores_resumed_after_interrupts_equal_an_uninterrupted_run(judge, tmp_path):
    folder = sidecar_folder(tmp_path / "imgs", {"a photo of a red circle": 3, "two blue squares": 3})
    options = ScoreOptions(samples=2)
    whole = run_score(judge, folder, tmp_path / "whole.jsonl", options, judge=MICRO)
    cut = _cut_runs(judge, folder, tmp_path / "cut.jsonl", options, cuts=(2, 1, 2))  # cuts inside both groups
    assert rows(tmp_path / "cut.jsonl") == rows(tmp_path / "whole.jsonl")
    assert cut["per_prompt"] == whole["per_prompt"]


def test_difficulty_resumed_after_interrupts_equals_an_uninterrupted_run(judge, tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    for n, image in enumerate(renders(11, 4)):  # past the d_STE warm-up of 8: the rolling rank is used
        image.save(folder / f"{n:02d}.png")
    options = ScoreOptions(difficulty=True)
    run_score(judge, folder, tmp_path / "whole.jsonl", options, judge=MICRO)
    for after in (3, 4):
        with pytest.raises(KeyboardInterrupt):
            run_score(judge, folder, tmp_path / "cut.jsonl", options, progress=Interrupt(after), judge=MICRO)
    run_score(judge, folder, tmp_path / "cut.jsonl", options, judge=MICRO)
    whole, cut = rows(tmp_path / "whole.jsonl"), rows(tmp_path / "cut.jsonl")
    assert [(r["question"], r["bucket"], r["d_ste"]) for r in cut] == [(r["question"], r["bucket"], r["d_ste"]) for r in whole]
    assert cut == whole


# 3. Rows are kept as they finish ------------------------------------------------------------


def test_a_group_interrupted_late_keeps_its_finished_rows(judge, tmp_path, monkeypatch):
    folder = sidecar_folder(tmp_path / "imgs", {"a photo of a circle": 4})
    out = tmp_path / "s.jsonl"
    calls = {"n": 0}
    real = type(judge).caption

    def killed_on_the_fourth_caption(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(judge), "caption", killed_on_the_fourth_caption)
    with pytest.raises(KeyboardInterrupt):
        run_score(judge, folder, out, ScoreOptions(samples=1), judge=MICRO)
    assert [r["image"] for r in rows(out)] == ["g0_0.png", "g0_1.png", "g0_2.png"]


# 4. Checks before any work ----------------------------------------------------------------------


def test_bad_options_are_one_line_before_any_work(tmp_path):
    folder = sidecar_folder(tmp_path / "imgs", {"a red circle": 1})
    bad_questions = tmp_path / "q.jsonl"
    bad_questions.write_text('{"prompt": "a", "questions": []}\n{oops\n')
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (["--backbone", "nope"], "unknown backbone"),
        (["--model", str(tmp_path / "missing")], "missing: no such folder"),
        (["--model", str(a_file)], "is a file"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--device", "toaster"], "is not a torch device"),
        (["--dtype", "float8"], "--dtype"),
        (["--seed", "-1"], "--seed"),
        (["--questions", str(bad_questions)], f"{bad_questions}:2"),
        (["--questions", str(tmp_path / "none.jsonl")], "not a file"),
        (["--out", str(a_file / "s.jsonl")], "is a file"),
        (["--max-pixels", "0"], "--max-pixels"),
        (["--difficulty", "--questions", str(bad_questions)], "pass one of them"),
    ]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for extra, expected in cases:
        assert expected in one_line_error(score_cli(folder, *extra)), extra
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


# 5. Hostile input ---------------------------------------------------------------------------------


def test_hostile_prompts_and_pixels_get_reason_rows(judge, tmp_path):
    folder = sidecar_folder(tmp_path / "imgs", {"a red circle": 1})
    renders(1, 7)[0].save(folder / "long.png")
    (folder / "long.txt").write_text("a red circle " * 65_000)  # 845 kB
    array = np.asarray(renders(1, 8)[0].convert("L"), dtype=np.float32) / 255.0
    array[:4, :4] = np.nan
    Image.fromarray(array, mode="F").save(folder / "nan.tif")
    (folder / "nan.txt").write_text("a red circle")
    Image.new("RGB", (300, 300), "red").save(folder / "big.png")
    (folder / "big.txt").write_text("a red circle")
    out = tmp_path / "s.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        run_score(judge, folder, out, ScoreOptions(samples=1, max_pixels=200 * 200), judge=MICRO)
    got = by_image(out)
    assert got["long.png"]["status"] == "error" and "prompt too long: 844999 characters" in got["long.png"]["error"]
    assert got["nan.tif"]["status"] == "scored" and any("non-finite" in n for n in got["nan.tif"]["notes"])
    assert got["big.png"]["status"] == "error" and "too large: 300x300" in got["big.png"]["error"]
    assert got["g0_0.png"]["status"] == "scored"


def test_images_up_to_the_limit_are_downscaled(tmp_path):
    Image.new("RGB", (5000, 4000), "blue").save(tmp_path / "wide.png")
    loaded = load_image(tmp_path / "wide.png")
    assert loaded.image.width * loaded.image.height <= 4096 * 4096 and "downscaled from 5000x4000" in loaded.notes[0]


def test_a_killed_process_resumes_to_the_uninterrupted_rows(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = sidecar_folder(tmp_path / "imgs", {"a photo of a red circle": 4, "two blue squares": 4})
    command = [sys.executable, "-m", "asg_kit.cli", "score", str(folder), "--samples", "1"]
    # every row from a one-thread process: float sums (cosines) change in the 8th digit with the thread count
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "--out", str(tmp_path / "whole.jsonl")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    out = tmp_path / "cut.jsonl"
    process = subprocess.Popen([*command, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait() == -signal.SIGKILL
    assert 2 <= out.read_bytes().count(b"\n") < 8  # killed mid-run, rows kept
    subprocess.run([*command, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)  # the lock died with the process
    assert rows(out) == rows(tmp_path / "whole.jsonl")


def test_a_model_folder_that_cannot_load_is_one_line_and_writes_nothing(tmp_path):
    folder = sidecar_folder(tmp_path / "imgs", {"a red circle": 1})
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    out = tmp_path / "s.jsonl"
    assert "could not load" in one_line_error(score_cli(folder, "--model", str(broken), "--out", str(out)))
    assert not out.exists() and not job_path(out).exists()
