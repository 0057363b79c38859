"""The ``asgkit`` command line: a thin typer layer over the library."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
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
    """Understanding-step rewards for questions answered N times: vote statistics, bucket, d_STE, Solver rewards and Proposer reward, as the training loop computes them."""
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


@app.command()
def score(
    folder: Path = typer.Argument(..., help="Images to score: GenEval's layout (NNNNN/metadata.jsonl + samples/), a folder with metadata.jsonl or prompts.jsonl ({'file', 'prompt'} per line), or images with sidecar .txt prompts."),
    backbone: str = typer.Option("micro", help="Registered backbone that judges (its Solver answers, captions and embeds)."),
    model: Optional[str] = typer.Option(None, help="Checkpoint folder or hub id of the backbone [default: the backbone's own; for micro, the shipped model]."),
    samples: int = typer.Option(2, min=1, help="Solver samples per spec question."),
    seed: int = typer.Option(0, help="Seed of every sample."),
    questions: Optional[Path] = typer.Option(None, help="JSONL of your own checks: {'prompt': ..., 'questions': [{'question': ..., 'expected': ...}]} per line."),
    out: Optional[Path] = typer.Option(None, help="Output JSONL, one line per image [default: FOLDER/asg_scores.jsonl, or asg_difficulty.jsonl]."),
    difficulty: bool = typer.Option(False, "--difficulty", help="Rank unlabeled images by difficulty instead (Proposer questions, STE, self-consistency, bucket); needs no prompts."),
    device: Optional[str] = typer.Option(None, help="Torch device, e.g. cuda."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype, e.g. bfloat16."),
) -> None:
    """Judge generated images with the model's own Solver: per-question answers and matches, contradictions, a cycle caption, diversity, and the combined reward R_G. Re-running resumes: finished images are skipped."""
    from asg_kit.adapters.registry import load_backbone
    from asg_kit.folders import FolderError, discover
    from asg_kit.jsonl import JsonlError
    from asg_kit.score import ScoreOptions, default_output, run_score, summary_path

    try:
        discovery = discover(folder)
    except FolderError as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    out = out or default_output(folder, difficulty)
    options = {k: v for k, v in {"device": device, "dtype": dtype}.items() if v}
    _quiet_transformers()
    judge = load_backbone(backbone, model=model, **options)
    with _progress() as progress:
        task = progress.add_task(f"scoring {len(discovery.entries)} images ({discovery.layout} layout)", total=len(discovery.entries))
        try:
            summary = run_score(judge, folder, out, ScoreOptions(samples=samples, seed=seed, questions=questions, difficulty=difficulty),
                                progress=lambda n, total: progress.advance(task, n), discovery=discovery)  # fmt: skip
        except JsonlError as error:
            errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
            raise typer.Exit(2)
    _print_summary(summary, difficulty)
    console.print(f"rows: {out}\nsummary: {summary_path(out)}")
    if summary["scored"] == 0:
        errors.print("[red]error:[/red] no image could be scored; the reasons are listed above and in the summary", highlight=False)
        raise typer.Exit(1)


def _quiet_transformers() -> None:
    # Our own progress bar is on screen; transformers' loading bars would tear it.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def _print_summary(summary: dict, difficulty: bool) -> None:
    if summary["errors"]:
        table = Table(title=f"{summary['errors']} images not scored")
        table.add_column("image", overflow="fold")
        table.add_column("reason", overflow="fold")
        for key, reason in list(summary["error_reasons"].items())[:50]:
            table.add_row(escape(key), escape(reason))
        console.print(table)
    if difficulty:
        table = Table(title=f"difficulty of {summary['scored']} images")
        for column in ("easy", "medium", "hard", "unsolvable", "mean d_STE", "mean H_SC"):
            table.add_column(column, justify="right")
        buckets = summary.get("buckets", {})
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(*(str(buckets.get(b, 0)) for b in ("easy", "medium", "hard", "unsolvable")), fmt(summary["mean_d_ste"]), fmt(summary["mean_entropy"]))
        console.print(table)
        return
    table = Table(title=f"generation reward R_G: {summary['scored']} images scored, {summary['errors']} not")
    table.add_column("prompt", overflow="fold")
    table.add_column("images", justify="right")
    table.add_column("mean R_G", justify="right")
    for prompt, row in sorted(summary["per_prompt"].items(), key=lambda item: item[1]["mean_reward"]):
        table.add_row(escape(prompt), str(row["images"]), f"{row['mean_reward']:.3f}")
    for tag, value in summary["per_category"].items():
        table.add_row(f"[bold]category {tag}[/bold]", "", f"{value:.3f}")
    if summary["overall"] is not None:
        table.add_row("[bold]overall[/bold]", str(summary["scored"]), f"{summary['overall']:.3f}")
    console.print(table)


@app.command()
def train(
    backbone: str = typer.Option("micro", help="Registered backbone to improve."),
    model: Optional[str] = typer.Option(None, help="Checkpoint folder or hub id [default: the backbone's own]."),
    images: Optional[Path] = typer.Option(None, help="Folder of unlabeled images (any layout; labels are never read)."),
    steps: int = typer.Option(10_000, help="Total steps (3 understanding : 2 generation)."),
    out: Optional[Path] = typer.Option(None, help="Run folder: metrics.jsonl, checkpoint/, config.json."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder with its saved config (other options ignored but --steps)."),
    seed: int = typer.Option(42, help="Seed of every draw (per rank and step)."),
    lr: float = typer.Option(1e-6, help="AdamW learning rate of every role."),
    guidance: float = typer.Option(5.0, help="Classifier-free guidance of the Generator's rollouts."),
    solver_max_new_tokens: int = typer.Option(96, help="Longest Solver answer."),
    proposer_max_new_tokens: int = typer.Option(384, help="Longest Proposer question or spec."),
    checkpoint_every: int = typer.Option(50, help="Steps between checkpoints."),
) -> None:
    """Improve a unified model from unlabeled images: the Proposer asks, the Solver answers and judges, the Generator draws, every reward comes from the model's own consistency. Run under torchrun for several processes."""
    from asg_kit.train.loop import TrainConfig, config_from_run, train as run_training

    if resume:
        config = config_from_run(resume, steps=steps, out=str(resume))
    else:
        if images is None or out is None:
            errors.print("[red]error:[/red] --images and --out are needed to start a run (or --resume RUN)", highlight=False)
            raise typer.Exit(2)
        config = TrainConfig(backbone=backbone, model=model, images=str(images), out=str(out), steps=steps, seed=seed, lr=lr,
                             guidance_scale=guidance, solver_max_new_tokens=solver_max_new_tokens,
                             proposer_max_new_tokens=proposer_max_new_tokens, spec_max_new_tokens=proposer_max_new_tokens,
                             checkpoint_every=checkpoint_every)  # fmt: skip
    _quiet_transformers()
    with _progress() as progress:
        task = progress.add_task("training", total=config.steps)

        def log(row: dict) -> None:
            progress.update(task, completed=row["step"] + 1)
            skip = row.get("solver_skip") or row.get("generator_skip")
            progress.update(task, description=f"step {row['step']} {row['kind'][:3]} beta {row['beta']:.3g}" + (f" ({skip})" if skip else ""))

        try:
            folder = run_training(config, resume=resume is not None, log=log)
        except FileNotFoundError as error:
            errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
            raise typer.Exit(2)
    console.print(f"run: {folder} (metrics.jsonl, checkpoint/roles/)")


micro_app = typer.Typer(
    help="The shapes world and the micro model: train it, write unlabeled pools, run the ground-truth benchmarks.",
    no_args_is_help=True,
)
app.add_typer(micro_app, name="micro")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=console
    )


@micro_app.command("pool")
def micro_pool(
    count: int = typer.Argument(..., min=1, help="How many images to write."),
    folder: Path = typer.Argument(..., help="Where to write them (created if missing)."),
    seed: int = typer.Option(0, help="Pool seed: the same seed writes the same images."),
    image_size: int = typer.Option(64, help="Side of each image in pixels."),
) -> None:
    """Write COUNT fresh shapes-world renders to FOLDER as PNG files, with no labels anywhere: the unlabeled pool that `asgkit train` learns from."""
    from asg_kit.micro.pool import write_pool

    with _progress() as progress:
        task = progress.add_task("rendering", total=count)
        write_pool(count, folder, seed=seed, image_size=image_size, progress=lambda n: progress.advance(task, n))
    console.print(f"wrote {count} unlabeled images to {folder}")


@micro_app.command("train")
def micro_train(
    run: Path = typer.Argument(..., help="Run folder: checkpoints, metrics.jsonl and, at the end, model/."),
    seed: int = typer.Option(0, help="Seed of the weights and of every batch."),
    vq_steps: Optional[int] = typer.Option(None, help="Steps of the VQ tokenizer stage [default: 3000, MicroTrainConfig]."),
    lm_steps: Optional[int] = typer.Option(None, help="Steps of the language/vision/generation stage [default: 6000]."),
) -> None:
    """Train the micro model from scratch on the shapes world (about 35 minutes on 2 CPU cores with the defaults). Re-running the same command resumes from the last checkpoint."""
    from asg_kit.micro.train import MicroTrainConfig, train

    steps = {k: v for k, v in {"vq_steps": vq_steps, "lm_steps": lm_steps}.items() if v is not None}
    config = MicroTrainConfig(seed=seed, **steps)
    with _progress() as progress:
        bars = {"vq": progress.add_task("VQ tokenizer", total=config.vq_steps), "lm": progress.add_task("language + vision + generation", total=config.lm_steps)}

        def log(row: dict) -> None:
            progress.update(bars[row["stage"]], completed=row["step"] + 1)
            if row["stage"] == "lm":
                progress.update(bars["lm"], description=f"lm  text {row['text_loss']:.3f}  image {row['image_loss']:.3f}")
            else:
                progress.update(bars["vq"], description=f"vq  reconstruction {row['reconstruction']:.4f}")

        export = train(config, run, log=log)
    console.print(f"model written to {export}")


@micro_app.command("bench")
def micro_bench(
    model: Optional[Path] = typer.Option(None, help="A micro model folder (default: the one shipped in the package)."),
    per_kind: int = typer.Option(50, help="shapes-VQA questions per question kind."),
    per_category: int = typer.Option(16, help="shapes-GenEval prompts per category (at most the distinct prompts there are)."),
    images: int = typer.Option(4, help="shapes-GenEval images per prompt."),
    guidance: float = typer.Option(5.0, help="Classifier-free guidance scale for generation."),
    seed: int = typer.Option(0, help="Benchmark seed (questions, prompts and sampling)."),
    grid: Optional[Path] = typer.Option(None, help="Also save a PNG grid of generations next to their prompts."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write every answer and verdict as JSON."),
) -> None:
    """Run shapes-VQA and shapes-GenEval, judged against the world's ground truth."""
    from asg_kit.adapters.registry import load_backbone
    from asg_kit.jsonl import write_json_atomic
    from asg_kit.micro import benchmarks

    _quiet_transformers()
    backbone = load_backbone("micro", model=str(model) if model else None)
    items = benchmarks.vqa_items(per_kind, seed)
    metadata = benchmarks.geneval_prompts(per_category, seed)
    with _progress() as progress:
        task = progress.add_task("shapes-VQA", total=len(items))
        vqa = benchmarks.run_vqa(backbone, items, progress=lambda n: progress.advance(task, n))
        task = progress.add_task("shapes-GenEval", total=len(metadata))
        gen = benchmarks.run_geneval(backbone, metadata, images, guidance, seed=seed, progress=lambda n: progress.advance(task, n))

    table = Table(title=f"shapes-VQA ({len(items)} questions)")
    for column in ("overall", *vqa.per_kind):
        table.add_column(column, justify="right")
    table.add_row(f"{vqa.accuracy:.1%}", *(f"{v:.1%}" for v in vqa.per_kind.values()))
    console.print(table)
    table = Table(title=f"shapes-GenEval ({len(metadata)} prompts x {images} images, guidance {guidance})")
    for column in ("overall", *gen.categories):
        table.add_column(column, justify="right")
    table.add_row(f"{gen.overall:.1%}", *(f"{v:.1%}" if v is not None else "-" for v in gen.categories.values()))
    console.print(table)
    if grid:
        picks = [next(i for i, m in enumerate(metadata) if m["tag"] == tag) for tag in dict.fromkeys(m["tag"] for m in metadata)]
        benchmarks.prompt_grid([metadata[i]["prompt"] for i in picks], [gen.images[i] for i in picks]).save(grid)
        console.print(f"grid saved to {grid}")
    if json_out:
        write_json_atomic(json_out, {"vqa": {"accuracy": vqa.accuracy, "per_kind": vqa.per_kind, "rows": vqa.rows},
                                     "geneval": {"overall": gen.overall, "categories": gen.categories, "rows": gen.rows}})  # fmt: skip
        console.print(f"wrote {json_out}")


if __name__ == "__main__":
    app()
