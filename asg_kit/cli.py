"""The ``asgkit`` command line: a thin typer layer over the library."""

from __future__ import annotations

from collections import Counter
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import asg_kit

app = typer.Typer(
    name="asgkit",
    help="Ask, Solve, Generate: label-free self-evolution of unified multimodal models.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _fold_long_words_in_help() -> None:
    # rich cuts a word wider than the help column with an ellipsis, so at 80 columns a
    # default path or hub id lost its end; folded, it stays whole over two lines.
    try:
        from rich.text import Text
        from typer import rich_utils
    except ImportError:
        return
    helper = getattr(rich_utils, "_get_parameter_help", None)
    if helper is None or getattr(helper, "folds", False):
        return

    def folded(*args, **kwargs):
        columns = helper(*args, **kwargs)
        for item in getattr(columns, "renderables", ()):
            if isinstance(item, Text):
                item.overflow = "fold"
        return columns

    folded.folds = True
    rich_utils._get_parameter_help = folded


_fold_long_words_in_help()
# Errors go to stderr unwrapped, so that paths and line numbers stay on one line.
errors = Console(stderr=True, soft_wrap=True)


REWARD_FORM = typer.Option(None, "--reward-form", help="released: the released ASG code's reward rules where asg-kit's differ (docs/fidelity.md); default: asg-kit's.")
UPSTREAM = typer.Option(None, help="Checkout of the backbone's upstream repository, or a folder holding it (backbones that run upstream code: vargpt, bagel, blip3o; default: $ASGKIT_UPSTREAM).")


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

    from asg_kit.checks import UserError, check_output_file

    path = votes or example_votes_path()
    try:
        if json_out is not None:
            check_output_file("--json", json_out)
        records = load_vote_records(path)
    except (OSError, JsonlError, UserError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    scores = score_vote_records(records)

    # Fits 80 columns: the question and answers wrap, numbers never do, one Solver reward a line.
    table = Table(title=f"Self-consistency rewards: {path}", title_justify="left", box=box.SIMPLE_HEAD, padding=0, show_edge=False, row_styles=["", "dim"])
    table.add_column("question", min_width=14, ratio=1, overflow="fold")
    table.add_column("majority", max_width=10, overflow="fold")
    for column in ("f", "H_SC", "margin", "bucket", "d_STE", "R_P"):
        table.add_column(column, no_wrap=True, justify="left" if column == "bucket" else "right")
    table.add_column("Solver\nx count", no_wrap=True)
    for record, score in zip(records, scores):
        s = score.stats
        solver = f"skip:\n{score.skip_reason}".replace(" question", "") if score.skip_reason else _counted(score.solver_rewards)
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
    return "\n".join(f"{v} x{n}" for v, n in counts.items())


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
    model: Optional[str] = typer.Option(None, help="Checkpoint folder or hub id of the backbone (default: the backbone's own; for micro, the shipped model)."),
    samples: int = typer.Option(2, min=1, help="Solver samples per spec question."),
    seed: int = typer.Option(0, help="Seed of every sample."),
    questions: Optional[Path] = typer.Option(None, help="JSONL of your own checks: {'prompt': ..., 'questions': [{'question': ..., 'expected': ...}]} per line."),
    out: Optional[Path] = typer.Option(None, help="Output JSONL, one line per image (default: FOLDER/asg_scores.jsonl, or asg_difficulty.jsonl)."),
    difficulty: bool = typer.Option(False, "--difficulty", help="Rank unlabeled images by difficulty instead (Proposer questions, STE, self-consistency, bucket); needs no prompts."),
    device: Optional[str] = typer.Option(None, help="Torch device, e.g. cuda:1 (default: cuda when there is a GPU, else cpu)."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype: float32, bfloat16, float16 (default: the backbone's own: float32, BAGEL bfloat16; README, Backbones)."),
    fresh: bool = typer.Option(False, "--fresh", help="Replace what is at --out (another job's rows, or any file that is not an input) instead of resuming."),
    max_prompt_chars: int = typer.Option(2000, help="Longer prompts and questions get a row with the reason instead of a model call."),
    max_pixels: Optional[int] = typer.Option(None, help="Larger images get a row with the reason (default: Pillow's decompression-bomb limit, about 89 megapixels); large images below it are downscaled."),
    report: bool = typer.Option(False, "--report", help="Also write OUT with .html: one self-contained page to look at the images beside their scores (see `asgkit report`)."),
    reward_form: Optional[str] = REWARD_FORM,
    upstream: Optional[Path] = UPSTREAM,
) -> None:
    """Judge generated images with the model's own Solver: per-question answers and matches, contradictions, a cycle caption, diversity, and the combined reward R_G. Re-running the same job resumes: finished images are skipped, errors retried."""
    from asg_kit.adapters.registry import load_backbone
    from asg_kit.devices import default_device
    from asg_kit.folders import FolderError, discover
    from asg_kit.jsonl import JsonlError
    from asg_kit.score import Judge, ScoreOptions, ScoreOutput, ScoreSetupError, check_judge, default_output, run_score, summary_path

    out = out or default_output(folder, difficulty)
    settings = ScoreOptions(samples=samples, seed=seed, questions=questions, difficulty=difficulty, fresh=fresh, max_prompt_chars=max_prompt_chars, reward_form=reward_form)
    if max_pixels is not None:
        settings.max_pixels = max_pixels
    try:
        discovery = discover(folder)
        device = default_device(device)  # the GPU when there is one
        identity = Judge(backbone, model, dtype, device)
        check_judge(identity, device)
        output = ScoreOutput(folder, out, discovery, settings, identity)
        with output:
            options = {k: v for k, v in {"device": device, "dtype": dtype, "upstream": str(upstream) if upstream else None}.items() if v}
            _quiet_transformers()
            try:
                judge = load_backbone(backbone, model=model, **options)
            except (OSError, ValueError, ImportError) as error:  # a model that cannot be loaded, an option it refuses
                raise ScoreSetupError(" ".join(str(error).split())) from None
            with _progress(spinner=True) as progress:  # the spinner turns while a model call has no row to show yet
                scoring = f"scoring {len(discovery.entries)} images ({discovery.layout} layout)"
                task = progress.add_task(scoring, total=len(discovery.entries))
                summary = run_score(judge, folder, out, settings, progress=lambda n, total: progress.advance(task, n), discovery=discovery, output=output,
                                    status=lambda text: progress.update(task, description=text or scoring))  # fmt: skip
    except (FolderError, ScoreSetupError, JsonlError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        _interrupted(f"the scored images are kept in {out}; run the same command again to resume")
    _print_summary(summary, difficulty)
    console.print(f"rows: {out}\nsummary: {summary_path(out)}")
    if report:
        from asg_kit.report import write_score_report

        console.print(f"report: {write_score_report(out, folder)}")
    if summary["scored"] == 0:
        errors.print("[red]error:[/red] no image could be scored; the reasons are listed above and in the summary", highlight=False)
        raise typer.Exit(1)


def _interrupted(how_to_resume: str) -> None:
    errors.print(f"interrupted: {escape(how_to_resume)}", highlight=False)
    raise typer.Exit(130)  # 128 + SIGINT, as a shell reports it


def _quiet_transformers() -> None:
    # Our own progress bar is on screen; transformers' loading bars would tear it.
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    # peft asks transformers 5 a deprecated question on every adapter load; not the user's concern.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


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
    ctx: typer.Context,
    backbone: str = typer.Option("micro", help="Registered backbone to improve."),
    model: Optional[str] = typer.Option(None, help="Checkpoint folder or hub id (default: the backbone's own)."),
    images: Optional[Path] = typer.Option(None, help="Folder of unlabeled images (any layout; labels are never read)."),
    steps: int = typer.Option(10_000, help="Total steps of the run (3 understanding : 2 generation). With --resume: the new total, counted from step 0 (default: the saved total)."),
    out: Optional[Path] = typer.Option(None, help="Run folder: metrics.jsonl, checkpoint/, config.json. A folder that holds a run is refused unless --resume or --overwrite."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder with its saved settings; only --steps, --checkpoint-every, --upstream, --device, --report-to and --log-images-every may change, other options that differ are refused."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an --out that holds a run: its config.json, metrics and checkpoints are deleted."),
    seed: int = typer.Option(42, help="Seed of every draw (per rank and step)."),
    lr: float = typer.Option(1e-6, help="AdamW learning rate of every role."),
    guidance: float = typer.Option(5.0, help="Classifier-free guidance of the Generator's rollouts."),
    solver_max_new_tokens: int = typer.Option(96, help="Longest Solver answer."),
    proposer_max_new_tokens: int = typer.Option(384, help="Longest Proposer question or spec."),
    checkpoint_every: int = typer.Option(50, help="Steps between checkpoints."),
    upstream: Optional[Path] = UPSTREAM,
    device: Optional[str] = typer.Option(None, help="Torch device, e.g. cuda:1 (default: cuda when there is a GPU, else cpu; under torchrun each process takes the GPU of its LOCAL_RANK). May change on --resume."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype: float32, bfloat16, float16 (default: the backbone's own: float32, BAGEL bfloat16; README, Backbones)."),
    report_to: str = typer.Option("none", help="Also log every step's metrics to tensorboard (RUN/tensorboard) or wandb (RUN/wandb, offline without an API key); none: metrics.jsonl only."),
    log_images_every: int = typer.Option(50, help="With --report-to: steps between the Generator's candidate images (with their R_G) sent to the tracker; 0: never."),
    reward_form: Optional[str] = REWARD_FORM,
) -> None:
    """Improve a unified model from unlabeled images: the Proposer asks, the Solver answers and judges, the Generator draws, every reward comes from the model's own consistency. Run under torchrun for several processes."""
    from asg_kit.checks import UserError
    from asg_kit.jsonl import JsonlError
    from asg_kit.train.loop import TrainConfig, resume_config, train as run_training

    settings = dict(backbone=backbone, model=model, images=str(images) if images else "", steps=steps, seed=seed, lr=lr,
                    guidance_scale=guidance, solver_max_new_tokens=solver_max_new_tokens,
                    proposer_max_new_tokens=proposer_max_new_tokens, spec_max_new_tokens=proposer_max_new_tokens,
                    checkpoint_every=checkpoint_every, upstream=str(upstream.resolve()) if upstream else None,
                    device=device, dtype=dtype, report_to=report_to, log_images_every=log_images_every, reward_form=reward_form)  # fmt: skip
    try:
        if resume:
            if out is not None and out.resolve() != resume.resolve():
                raise UserError(f"--out {out} and --resume {resume} name different folders; pass only --resume RUN")
            if overwrite:
                raise UserError("--overwrite starts over and --resume continues: pass one of them")
            given = {p.name for p in ctx.command.params if ctx.get_parameter_source(p.name).name != "DEFAULT"}
            cli_to_config = {"guidance": ("guidance_scale",), "proposer_max_new_tokens": ("proposer_max_new_tokens", "spec_max_new_tokens")}
            asked = {field: settings[field] for name in given - {"resume", "out", "overwrite"} for field in cli_to_config.get(name, (name,)) if field in settings}
            if "images" in asked:
                asked["images"] = str(Path(asked["images"]).resolve())
            if "model" in asked and Path(asked["model"]).exists():
                asked["model"] = str(Path(asked["model"]).resolve())
            config = resume_config(resume, **asked)
        else:
            if images is None or out is None:
                raise UserError("--images and --out are needed to start a run (or --resume RUN)")
            config = TrainConfig(out=str(out), **settings)
        _quiet_transformers()
        progress = _progress()  # shown from the first step: a refused run prints its error line only
        task = progress.add_task("training", total=config.steps)

        def log(row: dict) -> None:
            progress.start()
            progress.update(task, completed=row["step"] + 1)
            skip = row.get("solver_skip") or row.get("generator_skip")
            progress.update(task, description=f"step {row['step']} {row['kind'][:3]} beta {row['beta']:.3g}" + (f" ({skip})" if skip else ""))

        notice = lambda line: errors.print(f"[yellow]note:[/yellow] {escape(line)}", highlight=False)  # noqa: E731
        try:
            folder = run_training(config, resume=resume is not None, log=log, overwrite=overwrite, notice=notice)
        finally:
            if progress.live.is_started:
                progress.stop()
    except (UserError, OSError, JsonlError, ImportError) as error:  # OSError: a missing pool or checkpoint; ImportError: a backbone, its dependencies or its upstream checkout
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        run = resume or out
        from asg_kit.train.loop import checkpoint_step

        step = checkpoint_step(run) if run is not None else 0
        _interrupted(f"continue with: asgkit train --resume {run} (from its last checkpoint, step {step})")
    console.print(f"run: {folder} (metrics.jsonl, checkpoint/roles/)")


@app.command()
def check(
    backbone: str = typer.Option("micro", help="Registered backbone to check."),
    model: Optional[str] = typer.Option(None, help="Checkpoint folder or hub id (default: the backbone's own; for micro, the shipped model)."),
    upstream: Optional[Path] = UPSTREAM,
    tiny: bool = typer.Option(False, "--tiny", help="Check a tiny random-weight instance built here (upstream backbones: from the real upstream classes), saved and loaded through the backbone's real loading path; no download."),
    save_tiny: Optional[Path] = typer.Option(None, help="Also keep that tiny instance as a checkpoint folder (a new folder), which --model DIR loads (implies --tiny)."),
    device: Optional[str] = typer.Option(None, help="Torch device, e.g. cuda:1 (default: cuda when there is a GPU, else cpu)."),
    dtype: Optional[str] = typer.Option(None, help="Weights dtype: float32, bfloat16, float16 (default: the backbone's own: float32, BAGEL bfloat16; tolerances follow the dtype)."),
    seed: int = typer.Option(0, help="Seed of the tiny weights, the role weights and every sample."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
) -> None:
    """Check that a backbone's adapter keeps the contract of the training loop: behaviour vs teacher-forced log-probs, batch and seed invariance, role isolation of gradients, save/load of roles, embeddings, image generation and its Generator objective, NaN and prompt-injection guards. Exit 0 only when every check passes."""
    import tempfile

    from asg_kit.adapters.conformance import check_backbone
    from asg_kit.adapters.registry import load_backbone, save_tiny_checkpoint
    from asg_kit.jsonl import write_json_atomic

    tiny = tiny or save_tiny is not None
    if tiny and model is not None:
        errors.print("[red]error:[/red] --tiny builds its own checkpoint: drop --model (or check the saved one with --model DIR)", highlight=False)
        raise typer.Exit(2)
    if save_tiny is not None and save_tiny.exists() and any(save_tiny.iterdir()):
        errors.print(f"[red]error:[/red] {escape(str(save_tiny))} exists and is not empty: choose a new folder for --save-tiny", highlight=False)
        raise typer.Exit(2)
    _quiet_transformers()
    from asg_kit.checks import UserError
    from asg_kit.devices import placement

    try:
        options = {**placement(device, dtype), **({"upstream": str(upstream)} if upstream else {})}
    except UserError as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    with tempfile.TemporaryDirectory(prefix="asgkit-tiny-") as scratch:
        try:
            if tiny:
                model = str(save_tiny_checkpoint(backbone, save_tiny or Path(scratch) / backbone, upstream=options.get("upstream"), seed=seed))
            with console.status(f"loading {backbone}"):
                subject = load_backbone(backbone, model=model, **options)
        except (ValueError, OSError, ImportError, TypeError) as error:
            errors.print(f"[red]error:[/red] {escape(' '.join(str(error).split()))}", highlight=False)
            raise typer.Exit(2)
        with console.status("checking") as status:
            report = check_backbone(subject, seed=seed, progress=lambda group: status.update(f"checking: {group}"))
    # Fits 80 columns: the detail wraps in what the check names and numbers leave.
    table = Table(title=f"Conformance of {report.backbone} ({report.paradigm}, {report.dtype}, {report.device}, {report.seconds:.1f} s)",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=0, show_edge=False)  # fmt: skip
    table.add_column("check", overflow="fold", width=CHECK_NAME_WIDTH)
    for column in ("result", "gap", "tolerance"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail", overflow="fold", min_width=24, ratio=1)
    for c in report.checks:
        table.add_row(escape(c.name), "pass" if c.passed else "[red]FAIL[/red]", _maybe_number(c.gap), _maybe_number(c.tolerance), escape(c.detail))
    console.print(table)
    if json_out:
        write_json_atomic(json_out, report.to_json())
    if save_tiny is not None:
        console.print(f"tiny checkpoint: {save_tiny} (load it with --model {save_tiny})")
    failed = report.failed
    console.print("all checks passed" if not failed else f"[red]{len(failed)} of {len(report.checks)} checks failed:[/red] {', '.join(c.name for c in failed)}")
    raise typer.Exit(0 if not failed else 1)


CHECK_NAME_WIDTH = 29  # the longest names fold onto a second line


def _maybe_number(value) -> str:
    return "" if value is None else f"{value:.3g}"


micro_app = typer.Typer(
    help="The shapes world and the micro model: train it and write unlabeled pools (its benchmarks: `asgkit bench --backbone micro`).",
    no_args_is_help=True,
)
app.add_typer(micro_app, name="micro")


def _progress(on: Console = console, spinner: bool = False) -> Progress:
    return Progress(
        *([SpinnerColumn()] if spinner else []), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), console=on
    )


@micro_app.command("pool")
def micro_pool(
    count: int = typer.Argument(..., min=1, help="How many images to write."),
    folder: Path = typer.Argument(..., help="Where to write them (created if missing)."),
    seed: int = typer.Option(0, help="Pool seed: the same seed writes the same images."),
    image_size: int = typer.Option(64, help="Side of each image in pixels."),
) -> None:
    """Write COUNT fresh shapes-world renders to FOLDER as PNG files, with no labels anywhere: the unlabeled pool that `asgkit train` learns from. Files already there are never replaced: images this command would write anyway are kept (so a larger COUNT grows a pool), anything else is refused."""
    from asg_kit.checks import UserError
    from asg_kit.micro.pool import write_pool

    progress = _progress()  # shown from the first image: a refused pool prints its error line only
    task = progress.add_task("rendering", total=count)

    def advance(n: int) -> None:
        progress.start()
        progress.advance(task, n)

    try:
        write_pool(count, folder, seed=seed, image_size=image_size, progress=advance)
    except UserError as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    finally:
        if progress.live.is_started:
            progress.stop()
    console.print(f"{count} unlabeled images in {folder}")


@micro_app.command("train")
def micro_train(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Run folder: checkpoints, metrics.jsonl, stages/STAGE/ (the model as each stage left it, for --model) and, at the end, model/."),
    seed: int = typer.Option(0, help="Seed of the weights and of every batch."),
    vq_steps: Optional[int] = typer.Option(None, help="Steps of the VQ tokenizer stage (default: 2500, MicroTrainConfig)."),
    lm_steps: Optional[int] = typer.Option(None, help="Steps of the language/vision/generation stage (default: 10000)."),
    position_steps: Optional[int] = typer.Option(None, help="Steps of the relative-position curriculum (default: 2400; 0 skips it); each phase but the last goes on until 75 % of its held-out questions are answered, up to 3 times its share."),
    refine_steps: Optional[int] = typer.Option(None, help="Steps of the Solver's refinement (default: 3000; 0 skips it)."),
    judge_steps: Optional[int] = typer.Option(None, help="Steps of the judge stage, yes/no questions in contrasting pairs (default: 2400; 0 skips it)."),
    binding: Optional[bool] = typer.Option(None, "--binding/--no-binding", help="Open the position curriculum with the binding drill, the colour and side of a named object (default: off; a curriculum that gives up on a phase starts over with it, see --retry)."),
    retry: Optional[bool] = typer.Option(None, "--retry/--no-retry", help="When a curriculum phase reaches its cap below 75 % of its held-out questions, start the curriculum over from RUN/stages/lm with the binding drill (default: on)."),
    start_stage: Optional[str] = typer.Option(None, help="Begin a new run at this stage (lm, position, refine or judge) from --from-model instead of from scratch, to try a later stage without repeating the earlier ones; with the same seed and settings it ends as the from-scratch run does."),
    from_model: Optional[Path] = typer.Option(None, help="With --start-stage: the exported model to begin from, e.g. another run's RUN/stages/lm for --start-stage position."),
    device: Optional[str] = typer.Option(None, help="Torch device, e.g. cuda:1 (default: cuda when there is a GPU, else cpu); may change when resuming. A GPU run is another draw of the recipe: its kernels round differently from the CPU's."),
) -> None:
    """Train the micro model from scratch on the shapes world in five stages: VQ tokenizer, every role's job, a relative-position curriculum, the Solver's refinement, the judge's yes/no (about 2 hours on 2 CPU cores with the defaults: 1 h 48 min measured for seed 1, up to about 2 h 45 min on a slower CPU, the curriculum's gate adding up to about 17 min where its phases are slow to pass, and a curriculum that gives up and starts over with the binding drill 12-25 min more; README). Re-running on the same RUN resumes from the last checkpoint with the run's saved settings; options that would change them are refused."""
    from asg_kit.checks import UserError
    from asg_kit.jsonl import JsonlError
    from asg_kit.micro.train import micro_config_for, train

    given = {k: v for k, v in {"vq_steps": vq_steps, "lm_steps": lm_steps, "position_steps": position_steps, "refine_steps": refine_steps, "judge_steps": judge_steps}.items() if v is not None}
    if ctx.get_parameter_source("seed").name != "DEFAULT":
        given["seed"] = seed
    if device is not None:
        given["device"] = device
    if binding is not None:
        given["position_binding"] = binding
    if retry is not None:
        given["position_retry"] = retry
    if (start_stage is None) != (from_model is None):
        errors.print("[red]error:[/red] --start-stage and --from-model go together: the stage to begin at and the model to begin from", highlight=False)
        raise typer.Exit(2)
    try:
        config = micro_config_for(run, **given)
    except UserError as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    progress = _progress()  # shown from the first step: a refused run prints its error line only
    totals = {"vq": config.vq_steps, "lm": config.lm_steps, "position": config.position_steps, "refine": config.refine_steps, "judge": config.judge_steps}
    bars = {
        "vq": progress.add_task("VQ tokenizer", total=totals["vq"]),
        "lm": progress.add_task("language + vision + generation", total=totals["lm"]),
        "position": progress.add_task("relative-position curriculum", total=totals["position"]),
        "refine": progress.add_task("Solver refinement", total=totals["refine"]),
        "judge": progress.add_task("judge's yes/no", total=totals["judge"]),
    }

    checked = {}  # the curriculum's last held-out check

    def log(row: dict) -> None:
        progress.start()
        stage = row["stage"]
        totals[stage] = max(totals[stage], row["step"] + 1)  # a curriculum phase goes on until its check passes
        progress.update(bars[stage], completed=row["step"] + 1, total=totals[stage])
        for earlier in list(bars)[: list(bars).index(stage)]:  # done, also when resumed past them
            progress.update(bars[earlier], completed=totals[earlier])
        if stage == "vq":
            progress.update(bars["vq"], description=f"vq  reconstruction {row['reconstruction']:.4f}")
        elif stage == "lm":
            progress.update(bars["lm"], description=f"lm  text {row['text_loss']:.3f}  image {row['image_loss']:.3f}")
        else:
            if "check_accuracy" in row:
                checked.update(row)
            check = f"  phase {checked['phase'] + 1} held-out {checked['check_accuracy']:.0%}" if checked and stage == "position" else ""
            progress.update(bars[stage], description=f"{stage}  text {row['text_loss']:.3f}{check}")

    try:
        start = (start_stage, from_model) if start_stage else None
        export = train(config, run, log=log, notice=lambda line: errors.print(f"[yellow]note:[/yellow] {escape(line)}", highlight=False), start=start)
    except (UserError, JsonlError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    finally:
        if progress.live.is_started:
            progress.stop()
    console.print(f"model written to {export}")


bench_app = typer.Typer()

# Options that `asgkit bench` and `asgkit bench geneval-score` share.
GENEVAL_SOURCE = typer.Option(None, "--geneval", help="GenEval checkout, or a folder or file with its evaluation_metadata.jsonl (the geneval task's prompts; official mode's evaluator).")  # fmt: skip
GENEVAL_MODE = typer.Option("portable", help="portable: transformers Mask2Former + CLIP with GenEval's rules (unofficial); official: GenEval's own evaluator (needs --geneval CHECKOUT, --detector-dir); images (bench only): only draw.")  # fmt: skip
EVALUATOR_PYTHON = typer.Option(sys.executable, help="Official mode: the python of GenEval's environment (mmdet, open_clip).")
DETECTOR_DIR = typer.Option(None, help="Official mode: folder with GenEval's Mask2Former .pth checkpoint (its --model-path).")
MODEL_CONFIG = typer.Option(None, help="Official mode: mmdetection config file, when mmdet was installed from a wheel.")
DETECTOR = typer.Option(None, help="Portable mode: transformers Mask2Former, folder or hub id (default: facebook/mask2former-swin-small-coco-instance).")  # fmt: skip
CLIP = typer.Option(None, help="Portable mode: transformers CLIP, folder or hub id (default: openai/clip-vit-large-patch14).")
REFERENCE = typer.Option(None, help="Published row to compare with (blip3o-8b, bagel, vargpt-v1.1, janus-pro-7b, janus-pro-1b, micro) (default: by backbone).")  # fmt: skip
DEVICE = typer.Option(None, help="Device for the models, e.g. cuda:1 (default: cuda when there is a GPU, else cpu).")
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    tasks: list[str] = typer.Option(
        [], "--tasks", "-t",
        help="Tasks or presets, repeatable or comma-separated. Presets: paper (the 7 lmms-eval tasks of the paper's 8 "
        "understanding metrics + geneval), understanding, shapes (shapes_vqa + shapes_geneval). Tasks: shapes_vqa, "
        "shapes_geneval, geneval, or any lmms-eval task (mmmu_val, ...). Default: shapes for micro, paper otherwise.",
    ),
    backbone: str = typer.Option("micro", help="Registered backbone (asgkit's registry: blip3o, janus, micro, vargpt)."),
    model: Optional[str] = typer.Option(None, help="Checkpoint folder or hub id (default: the backbone's own)."),
    roles: Optional[Path] = typer.Option(None, help="Trained role adapters to evaluate: a training run's folder (its checkpoint/roles) or a roles folder."),
    base: bool = typer.Option(False, "--base", help="Evaluate the base model, every adapter off."),
    out: Path = typer.Option(Path("runs/bench"), help="Output folder: results.json, samples/, geneval/."),
    seed: int = typer.Option(0, help="Seed of prompts, questions and sampling."),
    device: Optional[str] = DEVICE,
    dtype: Optional[str] = typer.Option(None, help="Model dtype, e.g. bfloat16."),
    reference: Optional[str] = REFERENCE,
    fresh: bool = typer.Option(False, "--fresh", help="Re-run tasks already in OUT/results.json with the same settings."),
    data_dir: Optional[Path] = typer.Option(None, help="Local lmms-eval datasets, one save_to_disk folder per task (see `asgkit bench save-data`): runs offline."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the first N documents of each lmms-eval task and the first N GenEval prompts (smoke runs)."),
    batch_size: int = typer.Option(8, min=1, help="Requests decoded together in lmms-eval tasks."),
    gen_kwargs: Optional[str] = typer.Option(None, help="Override lmms-eval generation arguments, e.g. 'max_new_tokens=64'."),
    geneval: Optional[Path] = GENEVAL_SOURCE,
    geneval_mode: str = GENEVAL_MODE,
    images_per_prompt: int = typer.Option(4, min=1, help="GenEval images per prompt (GenEval: 4)."),
    guidance: float = typer.Option(5.0, help="Classifier-free guidance scale for GenEval and shapes-GenEval."),
    image_temperature: float = typer.Option(1.0, help="Sampling temperature of GenEval and shapes-GenEval images (VARGPT's own: 0.5)."),
    evaluator_python: str = EVALUATOR_PYTHON,
    detector_dir: Optional[Path] = DETECTOR_DIR,
    model_config: Optional[Path] = MODEL_CONFIG,
    detector: Optional[str] = DETECTOR,
    clip: Optional[str] = CLIP,
    per_kind: int = typer.Option(50, min=1, help="shapes-VQA questions per question kind."),
    per_category: int = typer.Option(16, min=1, help="shapes-GenEval prompts per category (at most the distinct prompts there are)."),
    shapes_images: int = typer.Option(4, min=1, help="shapes-GenEval images per prompt."),
    upstream: Optional[Path] = UPSTREAM,
) -> None:
    """Benchmark a backbone and set the numbers beside the published ones. `asgkit bench` alone runs the shapes benchmarks of the shipped micro model (about 30 seconds on 2 CPU cores); `asgkit bench --backbone janus --model PATH --tasks paper --geneval GENEVAL` the paper's table. Results: OUT/results.json; a re-run keeps the tasks already done."""
    if ctx.invoked_subcommand is not None:
        return
    from asg_kit.bench.run import BenchConfig, run_bench

    _quiet_transformers()
    names = tuple(name.strip() for value in tasks for name in value.split(",") if name.strip())
    paths = {key: str(value) if value is not None else None for key, value in {"upstream": upstream, "roles": roles, "data_dir": data_dir, "geneval": geneval, "detector_dir": detector_dir, "model_config": model_config}.items()}  # fmt: skip
    config = BenchConfig(
        backbone=backbone, model=model, base=base, tasks=names, out=str(out), seed=seed, device=device, dtype=dtype,
        reference=reference, fresh=fresh, limit=limit, batch_size=batch_size, gen_kwargs=gen_kwargs,
        geneval_mode=geneval_mode, images_per_prompt=images_per_prompt, guidance=guidance, image_temperature=image_temperature, evaluator_python=evaluator_python,
        detector=detector, clip=clip, per_kind=per_kind, per_category=per_category, shapes_images=shapes_images, **paths,
    )  # fmt: skip
    try:
        # Bound to this stdout: lmms-eval's own prints are redirected to OUT/lmms_eval.log meanwhile.
        with _progress(Console(file=sys.stdout)) as progress:
            results = run_bench(config, progress_bar=_bar(progress), log=lambda line: progress.console.print(escape(line), highlight=False))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        _interrupted(f"finished tasks are kept in {Path(config.out) / 'results.json'}; run the same command again to resume")
    _print_bench(results)
    console.print(f"results: {Path(config.out) / 'results.json'}")


def _print_bench(results: dict) -> None:
    from asg_kit.bench.published import REFERENCES
    from asg_kit.bench.run import beside_published

    reference = REFERENCES.get(results.get("reference") or "")
    table = Table(title="measured beside published" + (f": {reference.label}" if reference else " (no published row for this model)"), box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("metric", "measured", "published\nbase", "published\nASG", "measured\n- base"):
        table.add_column(column, justify="left" if column == "metric" else "right", overflow="fold")
    for row in beside_published(results):
        shown, base = round(row["measured"], 1), row["published_base"]
        table.add_row(row["metric"], f"{shown:.1f}", _maybe(base), _maybe(row["published_asg"]), f"{shown - base:+.1f}" if base is not None else "-")
    console.print(table)
    for task, entry in results["tasks"].items():
        if task == "geneval" and entry.get("official") is False:
            console.print("[yellow]GenEval portable mode: transformers detector and CLIP with GenEval's rules; GenEval-compatible, not official numbers.[/yellow]")
        shown = ", ".join(f"{k} {v:.3f}" for k, v in entry.get("metrics", {}).items() if isinstance(v, (int, float)))
        if shown:
            console.print(f"{task}: {shown}", highlight=False)
    if reference:
        console.print(f"published: {reference.source}", highlight=False)


def _maybe(value) -> str:
    return f"{value:.1f}" if value is not None else "-"


@bench_app.command("geneval-score")
def bench_geneval_score(
    images: Path = typer.Argument(..., help="A GenEval image folder (NNNNN/metadata.jsonl + NNNNN/samples/NNNN.png), drawn by any model or toolkit."),
    out: Path = typer.Option(Path("runs/geneval-score"), help="Output folder: results.jsonl (one line per image) and results.json."),
    geneval_mode: str = GENEVAL_MODE,
    geneval: Optional[Path] = GENEVAL_SOURCE,
    evaluator_python: str = EVALUATOR_PYTHON,
    detector_dir: Optional[Path] = DETECTOR_DIR,
    model_config: Optional[Path] = MODEL_CONFIG,
    detector: Optional[str] = DETECTOR,
    clip: Optional[str] = CLIP,
    device: Optional[str] = DEVICE,
    reference: Optional[str] = REFERENCE,
) -> None:
    """Score a GenEval image folder drawn elsewhere (for example by BAGEL's or BLIP3o's own scripts) in portable or official mode, beside a published row."""
    from asg_kit.bench.run import BenchConfig, score_geneval_folder

    _quiet_transformers()
    paths = {key: str(value) if value is not None else None for key, value in {"geneval": geneval, "detector_dir": detector_dir, "model_config": model_config}.items()}  # fmt: skip
    config = BenchConfig(backbone="none", tasks=("geneval",), out=str(out), device=device, reference=reference, geneval_mode=geneval_mode,
                         evaluator_python=evaluator_python, detector=detector, clip=clip, **paths)  # fmt: skip
    try:
        with _progress(Console(file=sys.stdout)) as progress:
            results = score_geneval_folder(images, config, progress_bar=_bar(progress), log=lambda line: progress.console.print(escape(line), highlight=False))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    _print_bench(results)
    console.print(f"results: {out / 'results.json'}")


def _bar(progress: Progress):
    """A progress-bar factory for the library: (description, total) -> advance(n)."""

    def bar(description: str, total: int):
        task = progress.add_task(description, total=total)
        return lambda n: progress.advance(task, n)

    return bar


@bench_app.command("compare")
def bench_compare(
    before: Path = typer.Argument(..., help="results.json of the first run (or its folder), e.g. the base model."),
    after: Path = typer.Argument(..., help="results.json of the second run (or its folder), e.g. after `asgkit train`."),
    allow_different: bool = typer.Option(False, "--allow-different", help="Show the comparison even when the runs measured with different settings (question counts, images per prompt, seeds, ...), under a warning."),
) -> None:
    """Two benchmark runs side by side with their change, beside the published base -> ASG change. Runs measured with different settings are refused (see --allow-different)."""
    import json

    from asg_kit.bench.run import compare, comparison_problems

    loaded = []
    for path in (before, after):
        path = path / "results.json" if path.is_dir() else path
        try:
            loaded.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError) as error:
            errors.print(f"[red]error:[/red] cannot read {escape(str(path))}: {escape(str(error))}", highlight=False)
            raise typer.Exit(2)
    differences, unknowns = comparison_problems(*loaded)
    if differences and not allow_different:
        errors.print(f"[red]error:[/red] the two runs did not measure the same thing ({escape('; '.join(differences))}); run both with the same settings, or pass --allow-different", highlight=False)
        raise typer.Exit(2)
    if differences:
        errors.print(f"[bold yellow]WARNING: not like with like, the changes below mix in setting changes:[/bold yellow] {escape('; '.join(differences))}", highlight=False)
    if unknowns:
        errors.print(f"[yellow]warning: cannot check that these tasks were measured alike:[/yellow] {escape(', '.join(unknowns))}", highlight=False)
    table = Table(title=f"{before} -> {after}", box=box.SIMPLE_HEAD, show_edge=False)  # fits 80 columns
    for column in ("metric", "before", "after", "change", "published\nbase", "published\nASG", "published\nchange"):
        table.add_column(column, justify="left" if column == "metric" else "right", overflow="fold")
    for row in compare(*loaded):
        change, published_change = row["change"], row["published_change"]
        table.add_row(row["metric"], _maybe(row["before"]), _maybe(row["after"]), f"{change:+.1f}" if change is not None else "-",
                      _maybe(row["published_base"]), _maybe(row["published_asg"]), f"{published_change:+.1f}" if published_change is not None else "-")  # fmt: skip
    console.print(table)


@bench_app.command("save-data")
def bench_save_data(
    tasks: list[str] = typer.Argument(..., help="lmms-eval tasks or presets (paper, understanding) to copy."),
    data_dir: Path = typer.Option(..., help="Where to save them, one folder per task."),
) -> None:
    """Copy lmms-eval tasks' datasets from the hub to DATA_DIR (run where the hub is reachable), for offline `asgkit bench --data-dir DATA_DIR`."""
    from asg_kit.bench.run import PRESETS
    from asg_kit.bench.understanding import save_task_data

    names = [t for name in tasks for t in PRESETS.get(name, (name,)) if t not in ("geneval", "shapes_vqa", "shapes_geneval")]
    for task in names:
        try:
            target = save_task_data(task, data_dir)
        except (ValueError, ImportError, OSError) as error:
            errors.print(f"[red]error:[/red] {task}: {escape(str(error))}", highlight=False)
            raise typer.Exit(2)
        console.print(f"{task} -> {target}")


@app.command("report")
def report(
    rows: Path = typer.Argument(..., help="A score output (JSONL) written by `asgkit score` or `asgkit score --difficulty`."),
    folder: Optional[Path] = typer.Option(None, help="The scored image folder (default: the one the output's job record names)."),
    out: Optional[Path] = typer.Option(None, help="The HTML file to write (default: ROWS with .html)."),
) -> None:
    """Write one self-contained HTML page of a score output: thumbnails, prompts, questions, Solver answers, captions, R_G and its parts, sortable by any column; opens from disk in a browser, no server, no network."""
    from asg_kit.jsonl import JsonlError
    from asg_kit.report import write_score_report

    if not rows.is_file():
        errors.print(f"[red]error:[/red] {escape(str(rows))} is not a file; pass the JSONL written by `asgkit score`", highlight=False)
        raise typer.Exit(2)
    try:
        written = write_score_report(rows, folder, out)
    except (JsonlError, OSError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}", highlight=False)
        raise typer.Exit(2)
    console.print(f"report: {written}")

if __name__ == "__main__":
    app()
