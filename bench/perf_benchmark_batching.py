"""Benchmark-style decoding: every request with its own image (lmms-eval, shapes-VQA).

The batched path hands ``sample_answers`` a batch of such requests, which decode together
(one prefill of the prompt prefix before the image, per-row image features, left padding);
the naive path decodes them one at a time, as the adapter did before cross-image batching.
Greedy, as benchmarks decode; the bench checks that both return the same tokens. The
shipped micro model on shapes-VQA items; wall time is the median of ``--reps`` runs.

    python bench/perf_benchmark_batching.py
"""

from __future__ import annotations

import argparse
import statistics
import time

from rich.console import Console
from rich.table import Table

from asg_kit import prompts
from asg_kit.adapters.base import AnswerRequest
from asg_kit.adapters.registry import load_backbone
from asg_kit.micro import benchmarks, world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=96, help="requests, each with its own image")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    micro = load_backbone("micro")
    items = benchmarks.vqa_items(per_kind=-(-args.items // len(benchmarks.QUESTION_KINDS)), seed=1)[: args.items]
    requests = [AnswerRequest(world.render(item.scene), prompts.solver_prompt(item.question), temperature=0.0) for item in items]

    def decode(batch: int):
        tokens = []
        with micro.role("solver"):
            for start in range(0, len(requests), batch):
                tokens += [s.token_ids for s in micro.sample_answers(requests[start : start + batch], max_new_tokens=args.max_new_tokens)]
        return tokens

    def timed(batch: int):
        times, tokens = [], None
        for _ in range(args.reps):
            start = time.perf_counter()
            tokens = decode(batch)
            times.append(time.perf_counter() - start)
        return statistics.median(times), tokens

    naive_time, naive_tokens = timed(1)
    table = Table(title=f"{len(requests)} requests, each with its own image, greedy, {args.max_new_tokens} new tokens at most")
    for column in ("path", "seconds", "requests/s", "speed-up vs one at a time", "same tokens"):
        table.add_column(column, justify="right")
    table.add_row("one at a time", f"{naive_time:.2f}", f"{len(requests) / naive_time:.1f}", "1.00x", "-")
    for batch in args.batch:
        seconds, tokens = timed(batch)
        table.add_row(f"batches of {batch}", f"{seconds:.2f}", f"{len(requests) / seconds:.1f}", f"{naive_time / seconds:.2f}x", str(tokens == naive_tokens))
    Console().print(table)


if __name__ == "__main__":
    main()
