"""Shared-prefix sampling against one independent call per sample and question.

One image, 3 questions, 7 Solver samples each (21 completions, as one understanding step
asks for): the shared path encodes the image once and prefills the common prompt prefix
once per image; the naive path calls ``sample_answers`` once per completion. Both use the
same per-request seeds, and the bench checks that they return the same tokens. Two tiny
Janus sizes, built offline; wall time is the median of ``--reps`` runs.

    python bench/perf_prefix.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from asg_kit.adapters.base import AnswerRequest
from asg_kit.adapters.janus import JanusAdapter
from asg_kit.adapters.tiny_janus import TinyJanusSize, build_tiny_janus

SIZES = {
    "tiny (h32, 2 layers, 16 image tokens)": TinyJanusSize(),
    "small (h256, 4 layers, 64 image tokens)": TinyJanusSize(
        hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, image_size=64, vision_hidden=64
    ),
}
QUESTIONS = ("what color is the circle ?", "how many objects are there ?", "where is the square ?")
FRAMINGS = ("", "look closely .", "answer briefly .", "describe then answer .", "one word .", "be precise .", "count carefully .")


def requests(image: Image.Image) -> list[AnswerRequest]:
    return [
        AnswerRequest(image, f"{framing} {question}".strip(), temperature=0.5 + 0.3 * i, top_p=1.0 - 0.1 * i, seed=100 * q + i)
        for q, question in enumerate(QUESTIONS)
        for i, framing in enumerate(FRAMINGS)
    ]


def timed(fn, reps: int):
    times, result = [], None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    table = Table(title="21 Solver completions on one image: shared prefix vs one call each")
    for column in ("model", "params", "shared s", "one call each s", "speed-up", "same tokens"):
        table.add_column(column, justify="right")
    rows = []
    for label, size in SIZES.items():
        model, processor = build_tiny_janus(size=size, seed=0)
        adapter = JanusAdapter(model, processor)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size.image_size, size.image_size, 3), dtype=np.uint8))
        batch = requests(image)
        with adapter.role("solver"):
            shared_s, shared = timed(lambda: adapter.sample_answers(batch, args.max_new_tokens), args.reps)
            naive_s, naive = timed(lambda: [adapter.sample_answers([r], args.max_new_tokens)[0] for r in batch], args.reps)
        same = all(a.token_ids == b.token_ids for a, b in zip(shared, naive))
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": label, "params": params, "shared_s": shared_s, "naive_s": naive_s, "speedup": naive_s / shared_s, "same_tokens": same})
        table.add_row(label, f"{params / 1e6:.2f}M", f"{shared_s:.3f}", f"{naive_s:.3f}", f"{naive_s / shared_s:.1f}x", str(same))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
