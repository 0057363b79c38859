"""The ``asgkit`` command line: a thin typer layer over the library."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import asg_kit

app = typer.Typer(
    name="asgkit",
    help="Ask, Solve, Generate: label-free self-evolution of unified multimodal models.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
# Errors go to stderr unwrapped, so that paths and line numbers stay on one line.
errors = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"asg-kit {asg_kit.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Score, train and benchmark unified multimodal models with self-consistency rewards."""


@app.command()
def rewards(
    votes: Optional[Path] = typer.Argument(
        None,
        help="JSONL of questions, one per line: {'question', 'replies': [N raw Solver replies], 'ste': raw STE}. "
        "Default: the example shipped with the package.",
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write every score as JSON to this file."),
) -> None:
    """Understanding-step rewards for questions answered N times: vote statistics, bucket,
    d_STE, Solver rewards and Proposer reward, as the training loop computes them."""
    from asg_kit.jsonl import JsonlError, write_json_atomic
    from asg_kit.votefile import example_votes_path, load_vote_records, score_vote_records

    path = votes or example_votes_path()
    try:
        records = load_vote_records(path)
    except (OSError, JsonlError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    scores = score_vote_records(records)

    table = Table(title=f"Self-consistency rewards: {path}")
    table.add_column("question", max_width=32, overflow="ellipsis", no_wrap=True)
    for column in ("majority", "f", "H_SC", "margin", "bucket", "d_STE", "R_P", "Solver rewards (x count)"):
        table.add_column(column)
    for record, score in zip(records, scores):
        s = score.stats
        solver = f"skip ({score.skip_reason})" if score.skip_reason else _counted(score.solver_rewards)
        table.add_row(
            record.question, s.majority, f"{s.majority_share:.2f}", f"{s.entropy:.3f}", f"{s.margin:.2f}",
            score.bucket, f"{score.d_ste:.3f}", f"{score.proposer_reward:+.3f}", solver,
        )  # fmt: skip
    console.print(table)
    if json_out:
        write_json_atomic(json_out, [_score_json(r, s) for r, s in zip(records, scores)])
        console.print(f"wrote {json_out}")


def _counted(values) -> str:
    counts = Counter(f"{v:+.3f}" for v in values)
    return " ".join(f"{v}x{n}" for v, n in counts.items())


def _score_json(record, score) -> dict:
    return {
        "question": record.question,
        "answers": list(score.answers),
        "shares": score.stats.shares,
        "entropy": score.stats.entropy,
        "majority": score.stats.majority,
        "majority_share": score.stats.majority_share,
        "margin": score.stats.margin,
        "bucket": score.bucket,
        "informativeness": score.informativeness,
        "d_ste": score.d_ste,
        "solver_rewards": list(score.solver_rewards),
        "proposer_reward": score.proposer_reward,
        "skip_reason": score.skip_reason,
    }


if __name__ == "__main__":
    app()
