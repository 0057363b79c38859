"""The HTML score report: built from real score outputs, read back, and opened in a real
headless browser (Debian's chromium; `.ci/run` installs it)."""

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from asg_kit.adapters.registry import load_backbone
from asg_kit.micro import world
from asg_kit.report import write_score_report
from asg_kit.score import ScoreOptions, run_score

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "shapes_geneval"
pytestmark = pytest.mark.janus  # the micro judge needs transformers' Janus


class Rows(HTMLParser):
    """Rows of every table: each a list of (cell text, cell attributes, image sources)."""

    def __init__(self):
        super().__init__()
        self.rows, self.cell, self.images = [], None, []

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = ["", dict(attrs), []]
        elif tag == "img" and self.cell is not None:
            self.cell[2].append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(tuple(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[0] += data


def parse(path):
    parser = Rows()
    parser.feed(Path(path).read_text())
    return parser.rows


@pytest.fixture(scope="module")
def judge():
    return load_backbone("micro")


@pytest.fixture(scope="module")
def generation_output(tmp_path_factory, judge):
    folder = tmp_path_factory.mktemp("gen")
    for group in ("00000", "00003"):  # one object, then colours
        shutil.copytree(EXAMPLES / group, folder / group)
    (folder / "00003" / "samples" / "0002.png").write_bytes(b"not a png")  # a row that is an error
    out = tmp_path_factory.mktemp("rows") / "scores.jsonl"  # apart from the images: the job record says where they are
    run_score(judge, folder, out, ScoreOptions(samples=1, seed=0))
    return folder, out


def test_generation_report_holds_every_image_question_and_component(generation_output, tmp_path):
    folder, out = generation_output
    html_path = write_score_report(out, folder, tmp_path / "report.html")
    written = [json.loads(line) for line in out.read_text().splitlines() if '"image"' in line]
    rows = parse(html_path)
    names = {row["image"] for row in written}
    image_rows = [r for r in rows if r and r[0][1].get("data-value") in names]
    assert len(image_rows) == len(written) == 6
    assert sum(bool(r[0][2]) for r in image_rows) == 5  # the broken file has no thumbnail, only its reason
    for row in written:
        match = next(r for r in rows if r and r[0][1].get("data-value") == row["image"])
        text = " ".join(cell[0] for cell in match)
        if row["status"] == "scored":
            assert row["prompt"] in text and row["caption"] in text
            for q in row["questions"]:
                assert q["question"] in text and q["expected"] in text and q["majority"] in text
            assert match[4][1]["data-value"] == str(row["reward"])  # the R_G column sorts on the exact value
        else:
            assert "not scored" in text
    # thumbnails are embedded PNGs of the real images, shrunk, not links to files
    src = image_rows[0][0][2][0]
    assert src.startswith("data:image/png;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert thumb.format == "PNG" and thumb.width <= 160
    # summary per category and overall, from the scored rows
    summary = {r[0][0]: r for r in rows if len(r) == 3 and r[0][1] == {}}
    scored = [r for r in written if r["status"] == "scored"]
    assert set(summary) >= {"single_object", "colors", "overall"}
    assert float(summary["overall"][2][0]) == pytest.approx(sum(r["reward"] for r in scored) / len(scored), abs=5e-4)
    assert "http" not in re.sub(r"data:image/png;base64,[^\"]+", "", html_path.read_text())  # nothing fetched


def test_difficulty_report_groups_images_by_bucket(tmp_path, judge):
    folder = tmp_path / "pool"
    folder.mkdir()
    for index in range(4):
        world.render(world.sample_scene(__import__("random").Random(index))).save(folder / f"{index:03d}.png")
    out = tmp_path / "difficulty.jsonl"
    run_score(judge, folder, out, ScoreOptions(samples=1, seed=0, difficulty=True))
    html_path = write_score_report(out, folder)
    assert html_path == out.with_suffix(".html")
    text = html_path.read_text()
    written = [json.loads(line) for line in out.read_text().splitlines() if '"image"' in line]
    for row in written:
        assert f"<h2>{row['bucket']}</h2>" in text and row["question"] in text
    assert text.count('<img class="thumb"') == 4


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no chromium on this machine (`apt-get install chromium`; .ci/run installs it)")


def browse(html_path, *flags, fragment=""):
    run = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
         "--virtual-time-budget=3000", *flags, html_path.resolve().as_uri() + fragment],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_report_renders_and_sorts_in_a_real_browser(generation_output, tmp_path):
    folder, out = generation_output
    html_path = write_score_report(out, folder, tmp_path / "report.html")
    dom = browse(html_path, "--dump-dom", fragment="#sort=R_G")
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert loaded and int(loaded.group(1)) == 5  # every thumbnail decoded
    order = [float(v) for v in re.findall(r'<td class="num" data-value="([0-9.eE+-]+)">', dom.split('id="rows"')[1])[::6]]
    assert order == sorted(order, reverse=True) and len(order) == 5
    shot = tmp_path / "report.png"
    browse(html_path, f"--screenshot={shot}", "--window-size=1200,900")
    image = Image.open(shot)
    assert image.size == (1200, 900) and len(image.convert("L").getcolors(1 << 16) or []) > 20  # not a blank page


def test_report_command(generation_output, tmp_path):
    from typer.testing import CliRunner

    from asg_kit.cli import app

    folder, out = generation_output
    result = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text().count('<img class="thumb"') == 5
    scored = CliRunner().invoke(app, ["score", str(folder), "--out", str(tmp_path / "again.jsonl"), "--samples", "1", "--report"])
    assert scored.exit_code == 0, scored.output
    assert (tmp_path / "again.html").read_text().count('<img class="thumb"') == 5
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "is not a file" in missing.output
