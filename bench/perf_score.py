"""Images per second of `asgkit score`'s judging, shared-prefix path against one backbone
call per question and sample.

The micro model judges shapes-world images against GenEval-style specs (3 questions, 2
Solver samples each, plus the cycle caption); the shared path sends all of an image's
questions and samples in one call (one image encoding, one prefix prefill), the naive path
one call per question and sample. Same seeds; the bench checks the rewards agree.

    python bench/perf_score.py
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from rich.console import Console
from rich.table import Table

from asg_kit.adapters.registry import load_backbone
from asg_kit.micro import world
from asg_kit.rewards.scorers import GenerationScorer
from asg_kit.specs import spec_from_geneval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", help="micro model folder (default: the shipped one)")
    args = parser.parse_args()

    backbone = load_backbone("micro", model=args.model)
    rng = random.Random("perf-score")
    work = []
    for _ in range(args.images):
        metadata = world.sample_prompt(rng, rng.choice(("color_attr", "position")))
        work.append((spec_from_geneval(metadata), world.render(world.scene_for_prompt(metadata, rng))))

    def run(shared: bool) -> tuple[float, list[float]]:
        scorer = GenerationScorer(backbone, samples=2, shared=shared)
        times, rewards = [], []
        for _ in range(args.reps):
            start = time.perf_counter()
            rewards = [scorer.score(spec, [image])[0].reward for spec, image in work]
            times.append(time.perf_counter() - start)
        return args.images / statistics.median(times), rewards

    shared_rate, shared_rewards = run(True)
    naive_rate, naive_rewards = run(False)
    same = all(abs(a - b) < 1e-4 for a, b in zip(shared_rewards, naive_rewards))
    table = Table(title=f"judging {args.images} images (3 questions x 2 samples + caption each), median of {args.reps}")
    for column in ("path", "images / s", "speed-up", "same rewards"):
        table.add_column(column, justify="right")
    table.add_row("one call per question and sample", f"{naive_rate:.2f}", "1.0x", "")
    table.add_row("shared prefix (asgkit score)", f"{shared_rate:.2f}", f"{shared_rate / naive_rate:.2f}x", str(same))
    Console().print(table)


if __name__ == "__main__":
    main()
