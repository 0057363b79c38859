"""Write the quickstart's example folder: the shipped micro model draws 3 images for one
shapes-GenEval prompt of each category, in GenEval's folder layout.

    python bench/make_examples.py examples/shapes_geneval

Images already in the folder are kept (the layout resumes, as `asgkit score` does): to redraw
them after new weights, delete `examples/shapes_geneval/*/samples` first.
"""

from __future__ import annotations

import argparse

from asg_kit import geneval
from asg_kit.adapters.registry import load_backbone
from asg_kit.micro.benchmarks import geneval_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    prompts = geneval_prompts(per_category=16, seed=args.seed)
    one_each = [next(m for m in prompts if m["tag"] == tag) for tag in geneval.CATEGORIES]
    geneval.write_layout(load_backbone("micro"), one_each, args.folder, args.images, args.guidance, seed=args.seed)
    print(f"wrote {len(one_each)} prompts x {args.images} images to {args.folder}")


if __name__ == "__main__":
    main()
