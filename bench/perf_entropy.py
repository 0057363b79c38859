"""Chunked ``token_entropy`` against the naive ``-(softmax * log_softmax).sum(-1)``.

Logits of shape (7, 96, 151936): seven Solver samples of 96 tokens over Qwen's vocabulary.
Each (path, dtype) runs in its own process, so that one path's allocations cannot hide or
inflate the other's peak. Peak extra memory is the rise of the process's peak RSS (CPU) or
of ``torch.cuda.max_memory_allocated`` (CUDA) during the first call; time is the median
of the following calls.

    python bench/perf_entropy.py                 # the README's table
    python bench/perf_entropy.py --reps 3 --shape 7,96,32000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

DTYPES = ("float32", "bfloat16")
PATHS = ("naive", "chunked")


def naive_entropy(logits):
    # The naive path upcasts first: entropy in bf16 is not accurate enough to compare.
    z = logits.float()
    return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


def worker(path: str, dtype_name: str, shape: tuple[int, ...], reps: int, device: str) -> dict:
    import torch

    from asg_kit.rewards import token_entropy

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    logits = torch.empty(shape, dtype=dtype, device=device)
    for row in logits.view(-1, shape[-1]).split(16):  # fill in slices: no full-size temporary
        row.copy_(torch.randn(row.shape, device=device) * 4)
    fn = naive_entropy if path == "naive" else token_entropy

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
        fn(logits)
        sync()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn(logits)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(logits)
        sync()
        times.append(time.perf_counter() - start)
    return {"path": path, "dtype": dtype_name, "peak_bytes": peak, "seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7,96,151936", help="logits shape, comma-separated")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per path (median reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.worker:
        print(json.dumps(worker(*args.worker, shape, args.reps, args.device)))
        return

    from rich.console import Console
    from rich.table import Table

    results = {}
    for dtype in DTYPES:
        for path in PATHS:
            cmd = [sys.executable, __file__, "--worker", path, dtype, "--shape", args.shape, "--reps", str(args.reps), "--device", args.device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[(path, dtype)] = json.loads(out.strip().splitlines()[-1])

    table = Table(title=f"token_entropy on logits {shape}, {args.device}")
    for column in ("dtype", "naive peak MiB", "chunked peak MiB", "memory ratio", "naive ms", "chunked ms", "time ratio"):
        table.add_column(column, justify="right")
    rows = []
    for dtype in DTYPES:
        naive, chunked = results[("naive", dtype)], results[("chunked", dtype)]
        row = {
            "dtype": dtype,
            "naive_peak_mib": naive["peak_bytes"] / 2**20,
            "chunked_peak_mib": chunked["peak_bytes"] / 2**20,
            "memory_ratio": chunked["peak_bytes"] / max(naive["peak_bytes"], 1),
            "naive_ms": naive["seconds"] * 1e3,
            "chunked_ms": chunked["seconds"] * 1e3,
            "time_ratio": chunked["seconds"] / naive["seconds"],
        }
        rows.append(row)
        table.add_row(
            dtype, f"{row['naive_peak_mib']:.0f}", f"{row['chunked_peak_mib']:.0f}", f"{row['memory_ratio']:.3f}",
            f"{row['naive_ms']:.0f}", f"{row['chunked_ms']:.0f}", f"{row['time_ratio']:.2f}",
        )  # fmt: skip
    Console().print(table)
    print("ratios are chunked / naive: below 1 means the chunked path uses less")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"shape": shape, "device": args.device, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
