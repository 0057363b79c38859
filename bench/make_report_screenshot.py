"""The README's screenshot of a score report: `asgkit score examples/shapes_geneval --report`
with the shipped micro model into a temporary folder, the page opened in headless chromium
and saved as a PNG.

    python bench/make_report_screenshot.py                  # writes docs/score_report.png
    python bench/make_report_screenshot.py --out /tmp/r.png --width 1280 --height 1000
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("no chromium here: apt-get install chromium")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "score_report.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--colors", type=int, default=64, help="palette size of the saved PNG (keeps it small)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="asgkit-report-") as scratch:
        scratch = Path(scratch)
        images = scratch / "shapes_geneval"
        shutil.copytree(ROOT / "examples" / "shapes_geneval", images)  # score writes nothing into the repository
        scores = scratch / "scores.jsonl"
        command = [sys.executable, "-m", "asg_kit.cli", "score", str(images), "--out", str(scores), "--report", "--seed", "0"]
        subprocess.run(command, check=True, cwd=ROOT)
        page = scores.with_suffix(".html")
        shot = scratch / "shot.png"
        subprocess.run(
            [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--screenshot={shot}", f"--window-size={args.width},{args.height}", page.as_uri()],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(shot).convert("RGB").quantize(colors=args.colors).save(args.out, optimize=True)
    print(f"{args.out} ({args.out.stat().st_size // 1024} kB)")


if __name__ == "__main__":
    main()
