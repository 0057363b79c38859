"""Training runs watched in TensorBoard or Weights & Biases (``--report-to``, as in TRL and
accelerate). ``metrics.jsonl`` stays the source of truth: a tracker gets, per step, the
scalars of that step's row (lists as their mean, the difficulty bucket and every skip
reason as running counts) and, every K steps, the Generator's candidate images labelled
with their R_G. Only rank 0 reports; a resumed run continues the same tracker run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw

REPORT_TO = ("none", "tensorboard", "wandb")
INSTALL = {"tensorboard": "pip install 'asg-kit[tensorboard]'", "wandb": "pip install 'asg-kit[wandb]'"}
# Row fields that say which step this is rather than what it measured.
NOT_MEASURED = ("step",)
SKIPS = ("solver_skip", "proposer_skip", "generator_skip", "skip")


def step_scalars(row: dict) -> dict[str, float]:
    """Every number of one metrics.jsonl row under its own name; a list of numbers (rewards
    per answer or per candidate) as ``name/mean``, ``name/min`` and ``name/max``."""
    scalars: dict[str, float] = {}
    for key, value in row.items():
        if key in NOT_MEASURED or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                scalars[key] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            finite = [float(v) for v in value if math.isfinite(v)]
            if finite:
                scalars.update({f"{key}/mean": sum(finite) / len(finite), f"{key}/min": min(finite), f"{key}/max": max(finite)})
    return scalars


class RunningCounts:
    """Buckets and skip reasons counted over the run so far, as scalars
    (``buckets/hard``, ``skips/solver/easy question``, ``skips/step/unreadable image``)."""

    def __init__(self, rows: Iterable[dict] = ()) -> None:
        self.counts: Counter[str] = Counter()
        for row in rows:
            self.add(row)

    def add(self, row: dict) -> dict[str, float]:
        if isinstance(row.get("bucket"), str):
            self.counts[f"buckets/{row['bucket']}"] += 1
        for key in SKIPS:
            reason = row.get(key)
            if isinstance(reason, str) and reason:
                role = "step" if key == "skip" else key.removesuffix("_skip")
                self.counts[f"skips/{role}/{reason.split(':')[0]}"] += 1
        self.counts[f"steps/{row.get('kind', 'unknown')}"] += 1
        return {name: float(n) for name, n in self.counts.items()}


def candidate_strip(images: Sequence[Image.Image], rewards: Sequence[float], side: int = 128) -> Image.Image:
    """The Generator's candidates side by side, each labelled with its R_G underneath."""
    label = 16
    strip = Image.new("RGB", (len(images) * (side + 4), side + label), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, (image, reward) in enumerate(zip(images, rewards)):
        strip.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (i * (side + 4), 0))
        draw.text((i * (side + 4) + 4, side + 2), f"R_G {reward:.3f}", fill=(0, 0, 0))
    return strip


class Tracker:
    """Reports each step's row; ``images_every`` K: the candidates of the first generation
    step at or after every multiple of K."""

    def __init__(self, images_every: int, start: int, history: Iterable[dict]) -> None:
        history = list(history)
        self.images_every = images_every
        self.counts = RunningCounts(history)
        # A resumed run shows images at the steps an uninterrupted one would have.
        since = start // images_every * images_every if images_every else start
        shown = any(since <= row.get("step", -1) < start and row.get("generation_rewards") for row in history)
        self.next_images = since + images_every if shown else since

    def report(self, row: dict, candidates: Sequence[Image.Image] | None = None, prompt: str | None = None) -> None:
        step = row["step"]
        self.write_scalars(step, {**step_scalars(row), **self.counts.add(row)})
        rewards = row.get("generation_rewards")
        if self.images_every and candidates and rewards and step >= self.next_images:
            self.write_images(step, candidates, rewards, prompt or "")
            self.next_images = (step // self.images_every + 1) * self.images_every

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def write_images(self, step: int, images: Sequence[Image.Image], rewards: Sequence[float], prompt: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NoTracker(Tracker):
    def report(self, row: dict, candidates=None, prompt=None) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in ``RUN/tensorboard``; a resumed run appends to the same folder and
    purges what a killed run logged after its last checkpoint (``purge_step``)."""

    def __init__(self, out: Path, config: dict, start: int, images_every: int, history: Iterable[dict]) -> None:
        super().__init__(images_every, start, history)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ImportError(f"--report-to tensorboard needs the tensorboard package ({error}); {INSTALL['tensorboard']}") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start if start > 0 else None)
        if start == 0:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def write_images(self, step: int, images, rewards, prompt: str) -> None:
        import numpy as np

        self.writer.add_image("generator/candidates", np.asarray(candidate_strip(images, rewards)), step, dataformats="HWC")
        lines = [f"prompt: {prompt}"] + [f"candidate {i}: R_G {r:.4f}" for i, r in enumerate(rewards)]
        self.writer.add_text("generator/candidates", "  \n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A wandb run in ``RUN/wandb``, offline unless an API key is configured (in the
    environment or by ``wandb login``; ``WANDB_MODE`` set by the user wins); its id is kept in ``RUN/wandb/run_id`` so a
    resumed run continues it."""

    def __init__(self, out: Path, config: dict, start: int, images_every: int, history: Iterable[dict]) -> None:
        super().__init__(images_every, start, history)
        try:
            import wandb
        except ImportError as error:
            raise ImportError(f"--report-to wandb needs the wandb package ({error}); {INSTALL['wandb']}") from None
        if "WANDB_MODE" not in os.environ and not _wandb_logged_in():
            os.environ["WANDB_MODE"] = "offline"  # never reach the network unasked
        folder = out / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if start > 0 and id_file.is_file() else secrets.token_hex(4)  # wandb ids: lowercase letters and digits
        id_file.write_text(run_id)
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "asgkit"), name=out.name, id=run_id, resume="allow", dir=str(out), config=config)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def write_images(self, step: int, images, rewards, prompt: str) -> None:
        pictures = [self.wandb.Image(image, caption=f"R_G {r:.3f}: {prompt}") for image, r in zip(images, rewards)]
        self.run.log({"generator/candidates": pictures}, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_logged_in() -> bool:
    """An API key in the environment or from ``wandb login`` (kept in ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_report_to(report_to: str) -> None:
    """A known tracker whose package is installed, checked before a model loads."""
    import importlib.util

    from asg_kit.checks import UserError

    if report_to not in REPORT_TO:
        raise UserError(f"--report-to {report_to!r}: use one of {', '.join(REPORT_TO)}")
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--report-to {report_to} needs the {package} package: {INSTALL[report_to]}")


def open_tracker(report_to: str, out: str | Path, config: dict, start: int = 0, images_every: int = 0, rank: int = 0) -> Tracker:
    """The tracker ``report_to`` names for the run in ``out`` starting at step ``start``;
    running counts resume from the rows already in ``out/metrics.jsonl``. Ranks other than
    0 get one that reports nothing."""
    check_report_to(report_to)
    if rank != 0 or report_to == "none":
        return NoTracker(0, start, ())
    out = Path(out)
    metrics = out / "metrics.jsonl"
    history = [row for row in _rows(metrics) if row.get("step", 0) < start]
    kind = TensorBoardTracker if report_to == "tensorboard" else WandbTracker
    return kind(out, config, start, images_every, history)


def _rows(metrics: Path) -> list[dict]:
    """The rows of a metrics.jsonl (a half-written last line, from a killed run, left out)."""
    rows = []
    for line in metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
