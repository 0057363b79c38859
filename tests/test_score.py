"""`asgkit score` on every layout, on a folder of bad files, and resumed after a kill."""

import json
import random

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from asg_kit.adapters.tiny_janus import build_tiny_janus
from asg_kit.cli import app
from asg_kit.images import BadImage, load_image
from asg_kit.micro import world

pytestmark = pytest.mark.janus
runner = CliRunner()


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-janus")
    model, processor = build_tiny_janus(seed=2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def score(judge_dir, folder, *extra):
    return runner.invoke(app, ["score", str(folder), "--backbone", "janus", "--model", str(judge_dir), *extra])


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def renders(n, seed=0):
    rng = random.Random(seed)
    return [world.render(world.sample_scene(rng)) for _ in range(n)]


def test_geneval_layout(judge_dir, tmp_path):
    metas = [
        {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}], "prompt": "a photo of a red circle"},
        {"tag": "counting", "include": [{"class": "square", "count": 2}], "exclude": [{"class": "square", "count": 3}], "prompt": "a photo of two squares"},
    ]
    for index, meta in enumerate(metas):
        folder = tmp_path / "gen" / f"{index:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for n, image in enumerate(renders(3, index)):
            image.save(folder / "samples" / f"{n:04d}.png")
    result = score(judge_dir, tmp_path / "gen")
    assert result.exit_code == 0, result.output
    out = rows(tmp_path / "gen" / "asg_scores.jsonl")
    assert len(out) == 6 and {r["status"] for r in out} == {"scored"}
    first = next(r for r in out if r["image"] == "00000/samples/0000.png")
    assert first["tag"] == "colors" and first["spec_source"] == "geneval metadata"
    assert [q["question"] for q in first["questions"]] == ["what color is the circle ?", "is there a circle ?"]
    assert all(len(q["answers"]) == 2 for q in first["questions"])
    assert 0.0 <= first["reward"] <= 1.0 and 0.0 <= first["s_div"] <= 1.0 and "caption" in first
    summary = json.loads((tmp_path / "gen" / "asg_scores.summary.json").read_text())
    assert summary["scored"] == 6 and set(summary["per_category"]) == {"colors", "counting"}
    assert summary["layout"] == "geneval"


def test_mapping_and_sidecar_layouts_with_user_questions(judge_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for n, image in enumerate(renders(2)):
        image.save(flat / f"img{n}.png")
    (flat / "prompts.jsonl").write_text(
        json.dumps({"file": "img0.png", "prompt": "a blue square", "questions": [{"question": "what color is the square ?", "expected": "blue"}]}) + "\n"
        + json.dumps({"file": "img1.png", "prompt": "a red circle"}) + "\n"
    )
    user = tmp_path / "checks.jsonl"
    user.write_text(json.dumps({"prompt": "a red circle", "questions": [{"question": "is there a circle ?", "expected": "yes"}]}) + "\n")
    result = score(judge_dir, flat, "--questions", str(user), "--out", str(tmp_path / "flat.jsonl"))
    assert result.exit_code == 0, result.output
    out = {r["image"]: r for r in rows(tmp_path / "flat.jsonl")}
    assert out["img0.png"]["spec_source"] == "mapping file" and out["img1.png"]["spec_source"] == "user"

    side = tmp_path / "side"
    side.mkdir()
    for n, image in enumerate(renders(2, 5)):
        image.save(side / f"é{n}.png")
    (side / "é0.txt").write_text("un cercle rouge ✓")
    result = score(judge_dir, side)
    assert result.exit_code == 0, result.output
    out = {r["image"]: r for r in rows(side / "asg_scores.jsonl")}
    assert out["é0.png"]["status"] == "scored" and out["é0.png"]["spec_source"] == "proposer"
    assert out["é1.png"]["status"] == "error" and "no é1.txt" in out["é1.png"]["error"]


def _bad_folder(folder):
    folder.mkdir()
    good = renders(1)[0]
    cases = {}
    (folder / "empty.png").write_bytes(b"")
    cases["empty.png"] = "empty file"
    buffer = folder / "whole.png"
    good.save(buffer)
    (folder / "truncated.png").write_bytes(buffer.read_bytes()[:200])
    buffer.unlink()
    cases["truncated.png"] = "corrupt or truncated"
    (folder / "text.png").write_text("this is not a picture")
    cases["text.png"] = "not an image"
    Image.new("RGB", (10000, 9000)).save(folder / "huge.png")  # over Pillow's decompression-bomb limit
    cases["huge.png"] = "too large"
    good.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.asarray(good.convert("L"), dtype=np.uint16) * 257)).save(folder / "sixteen.png")
    good.convert("RGBA").save(folder / "alpha.png")
    good.convert("P").save(folder / "palette.png")
    good.save(folder / "anim.gif", save_all=True, append_images=[good.rotate(90)])
    for name in ("cmyk.jpg", "sixteen.png", "alpha.png", "palette.png", "anim.gif", "empty.png", "truncated.png", "text.png", "huge.png"):
        (folder / name).with_suffix(".txt").write_text("a photo of a circle")
    good.save(folder / "noprompt.png")
    cases["noprompt.png"] = "missing prompt"
    return cases


def test_bad_files_are_reported_and_the_rest_scored(judge_dir, tmp_path):
    cases = _bad_folder(tmp_path / "bad")
    result = score(judge_dir, tmp_path / "bad")
    assert result.exit_code == 0, result.output
    out = {r["image"]: r for r in rows(tmp_path / "bad" / "asg_scores.jsonl")}
    for name, reason in cases.items():
        assert out[name]["status"] == "error" and reason in out[name]["error"], (name, out[name])
    for name in ("cmyk.jpg", "sixteen.png", "alpha.png", "palette.png", "anim.gif"):
        assert out[name]["status"] == "scored", out[name]
    assert "first frame" in out["anim.gif"]["notes"][0]
    summary = json.loads((tmp_path / "bad" / "asg_scores.summary.json").read_text())
    assert summary["errors"] == len(cases) and summary["scored"] == 5


def test_load_image_conversions(tmp_path):
    Image.new("I;16", (8, 8), 1000).save(tmp_path / "a.png")
    loaded = load_image(tmp_path / "a.png")
    assert loaded.image.mode == "RGB" and "8 bits" in loaded.notes[0]
    with pytest.raises(BadImage, match="cannot read"):
        load_image(tmp_path / "missing.png")


def test_empty_and_all_bad_folders_fail_clearly(judge_dir, tmp_path):
    (tmp_path / "none").mkdir()
    result = score(judge_dir, tmp_path / "none")
    assert result.exit_code == 2 and "no images" in result.output
    result = score(judge_dir, tmp_path / "missing")
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "mapped").mkdir()
    renders(1)[0].save(tmp_path / "mapped" / "a.png")
    (tmp_path / "mapped" / "metadata.jsonl").write_text('{"file": "a.png", "prompt": "x"}\n{not json\n')
    result = score(judge_dir, tmp_path / "mapped")
    assert result.exit_code == 2 and "metadata.jsonl:2" in result.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    (tmp_path / "bad" / "x.txt").write_text("a circle")
    result = score(judge_dir, tmp_path / "bad")
    assert result.exit_code == 1 and "no image could be scored" in result.output


def test_resume_after_kill_skips_done_and_never_duplicates(judge_dir, tmp_path):
    folder = tmp_path / "side"
    folder.mkdir()
    for n, image in enumerate(renders(4)):
        image.save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text("a photo of a circle")
    assert score(judge_dir, folder).exit_code == 0
    out = folder / "asg_scores.jsonl"
    lines = out.read_text().splitlines()
    # A kill after two rows, in the middle of writing the third.
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    result = score(judge_dir, folder)
    assert result.exit_code == 0, result.output
    again = rows(out)
    assert sorted(r["image"] for r in again) == ["0.png", "1.png", "2.png", "3.png"]
    assert again[:2] == [json.loads(line) for line in lines[:2]]


def test_difficulty_mode_on_unlabeled_images(judge_dir, tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    for n, image in enumerate(renders(3)):
        image.save(folder / f"{n}.png")
    result = score(judge_dir, folder, "--difficulty")
    assert result.exit_code == 0, result.output
    out = rows(folder / "asg_difficulty.jsonl")
    assert len(out) == 3
    for row in out:
        assert row["bucket"] in ("easy", "medium", "hard", "unsolvable")
        assert len(row["answers"]) == 7 and len(row["candidates"]) >= 1
        assert 0.0 <= row["d_ste"] <= 1.0 and row["entropy"] >= 0.0


def test_reward_form_released_is_a_recorded_setting(judge_dir, tmp_path):
    from asg_kit.rewards.generation import diversity_contributions

    folder = tmp_path / "side"
    folder.mkdir()
    images = renders(2, seed=4)  # two candidates: where the released diversity term differs most
    for n, image in enumerate(images):
        image.save(folder / f"{n}.png")
        (folder / f"{n}.txt").write_text("a photo of a red circle")
    out = tmp_path / "released.jsonl"
    result = score(judge_dir, folder, "--samples", "1", "--reward-form", "released", "--out", str(out))
    assert result.exit_code == 0, result.output
    shares = sorted(r["s_div"] for r in rows(out))
    assert shares == pytest.approx(sorted(diversity_contributions(images, form="released")))
    assert shares != pytest.approx(sorted(diversity_contributions(images)))  # the switch changes the diversity term
    assert json.loads(out.with_suffix(".job.json").read_text())["reward_form"] == "released"
    refused = score(judge_dir, folder, "--samples", "1", "--out", str(out))  # asg-kit's rules do not resume released rows
    assert refused.exit_code == 2 and "reward_form" in refused.output
    bad = score(judge_dir, folder, "--reward-form", "paper", "--out", str(tmp_path / "bad.jsonl"))
    assert bad.exit_code == 2 and "--reward-form paper" in bad.output
