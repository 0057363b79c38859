"""Train the micro model from scratch on the shapes world, on a CPU.

A tiny Janus (``asg_kit.micro.model``) learns in five stages:

1. ``vq``: its VQ image tokenizer learns to encode and decode renders (cosine-distance
   codebook with straight-through gradients, dead codes restarted from encoder outputs);
2. ``lm``: with the tokenizer frozen, its vision encoder, language model and generation
   head learn every role's job at once: answering questions under the 7 Solver framings,
   captioning, asking questions, writing generation specs (text, through ``lm_head``), and
   drawing a prompt's image token by token (through ``generation_head``; 10 % of prompts
   blanked, so that classifier-free guidance has an unconditional branch to work with).
   Two things make the Solver competent on a CPU budget: each text example's loss is its
   mean token log-prob, so one-word answers weigh as much as long specs, and the vision
   encoder's patch tokens are supervised densely (``PatchHeads``: the colour and shape
   under each patch and the patch's row and column), so it sees shapes and where they are
   long before one answer token per example could teach it;
3. ``position``: a curriculum for relative position, text only (``tasks.POSITION_CURRICULUM``),
   in larger batches at a higher rate: "where is A relative to B ?" with its converse
   ("where is B relative to A ?", same image) on two-object scenes, then on three, then
   both position kinds on scenes of any size; with ``position_binding``, first the binding
   of a name to an object alone ("what color is the circle ?", "where is the circle ?" on
   two and three objects). Mixed among the other questions the answer stays at chance
   however often it is asked (the model learns the axis that separates the objects, never
   which object is which); alone and with its converse, each phase broke through within a
   few hundred steps on one draw (seed 1) and never on another (seed 0), which broke
   through after the binding drill, where seed 1 then did not (README). Each phase but the
   last goes on until a held-out check says it has passed or a cap (``Phases``); a phase
   that reaches its cap without passing starts the curriculum over from the weights it
   began with, this time with the drill (``position_retry``). The next stage rehearses the
   last phase;
4. ``refine``: with a fresh optimizer at a constant, lower rate, the text examples turn to
   the Solver's two jobs (``tasks.REFINE``): answering, with position, yes/no and count
   questions drawn more often (the kinds stage 2 leaves weakest), and judging: half its
   answers are about a GenEval-style prompt's scene (counting and position prompts
   weighted up), half of those with one error against the prompt (``world.prompt_scene``),
   asked in the forms a prompt's spec asks. Drawing is trained as in stage 2, so that
   generation is kept (without it the shared trunk drifts: shapes-GenEval fell 7 points);
5. ``judge``: a short stage for the question a position prompt's spec asks, "is the circle
   left of the square ?" (``tasks.JUDGE``): asked as scenes ask it, three times in four the
   answer is "no", and the refined model answers by that prior whatever the image shows.
   Here it comes in contrasting pairs of one image, the relation seen ("yes") and one that
   does not hold ("no"), for half of each batch: for two thirds of the stage that "no" is
   always the opposite relation (a swapped pair; the direction is learned only then), for
   the last third also the others; the other half rehearses the refinement, where a
   counting prompt's spec question also comes about the same scene with one object more or
   fewer (``judge_count_pairs``: the count judge's answers were right but not sharp);
   drawing and patch supervision go on as there, and the last quarter anneals the rate.

Every batch is drawn from an RNG seeded by (seed, stage, step), so a run resumed from its
last checkpoint sees the same data as one never stopped. Checkpoints are written
atomically; ``export`` writes the finished model in transformers' Janus format.

    asgkit micro train runs/micro            # resumes if runs/micro has a checkpoint
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from asg_kit.adapters.base import AnswerRequest, ImageRollout
from asg_kit.adapters.janus import JanusAdapter
from asg_kit.checks import UserError, check_device, check_output_folder, check_positive, check_seed, folder_lock
from asg_kit.jsonl import cut_torn_line, read_jsonl, recover_folder, swap_in_folder, write_json_atomic, write_jsonl_atomic
from asg_kit.micro import tasks
from asg_kit.micro.benchmarks import run_vqa


@dataclass
class MicroTrainConfig:
    seed: int = 0
    image_size: int = 64
    vq_steps: int = 2500
    vq_batch: int = 16
    vq_lr: float = 1e-3
    vq_restart_every: int = 25
    lm_steps: int = 10000
    text_batch: int = 16
    image_batch: int = 12
    lm_lr: float = 2e-3
    lm_min_lr_share: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    uncond_share: float = 0.1
    # Dense supervision of the vision encoder: each patch token predicts the colour and shape
    # under it through two linear heads used only in training (0 turns it off). Without it
    # the encoder learns from one answer token per example and stays near chance on shapes.
    patch_loss_weight: float = 1.0
    patch_batch: int = 16
    # "example": each text example's mean token log-prob counts equally, so one-word answers
    # weigh as much as long specs; "token": every target token counts equally.
    text_loss: str = "example"
    # Stage 3, the position curriculum: text only (``tasks.POSITION_CURRICULUM``), larger
    # batches, a fresh optimizer at a constant rate after warmup; 0 skips it.
    position_steps: int = 2400
    position_batch: int = 32
    position_lr: float = 1e-3
    # Each phase of the curriculum but the last runs at least its share of position_steps,
    # then goes on until the model answers position_pass of that phase's held-out questions
    # greedily (position_check_questions of them, asked every position_check_every steps), at
    # most position_phase_cap times its share. With equal fixed phases one draw of the
    # recipe (seed 1) never broke through (32 % of position questions); 0 fixes the phases.
    position_pass: float = 0.75
    position_check_every: int = 100
    position_check_questions: int = 64
    position_phase_cap: int = 3
    # Open the curriculum with the binding drill (``tasks.BINDING``: the colour and the side
    # of a named object). Each way one of two draws broke through (README): seed 1 without
    # it, seed 0 only with it. Off by default, the recipe whose whole run is measured.
    position_binding: bool = False
    # Without the drill, a phase that reaches its cap below position_pass starts the
    # curriculum over from the weights it began with (``RUN/stages/lm``), this time with
    # the drill: what ``--binding --start-stage position --from-model RUN/stages/lm`` does.
    # The first try's rows stay in metrics.jsonl; the second try's carry "attempt": 2.
    position_retry: bool = True
    # Stage 4, the Solver's refinement: a fresh optimizer at a constant rate (after warmup),
    # the text mix ``tasks.REFINE``, drawing and patch supervision as in stage 2; 0 skips it.
    refine_steps: int = 3000
    refine_lr: float = 5e-4
    # Stage 5, the judge's yes/no: contrasting pairs and the refinement rehearsed
    # (``tasks.JUDGE``, two phases), drawing and patch supervision kept; 0 skips it.
    judge_steps: int = 2400
    judge_batch: int = 32
    judge_lr: float = 5e-4
    # A counting prompt's spec questions also about its scene with one object more or fewer
    # (``TaskMix.count_contrast``): the count judge's AUC went from 0.69 to 0.92 (seed 0), 0.83 to 0.95 (seed 1).
    judge_count_pairs: bool = True
    checkpoint_every: int = 250
    threads: int = 0  # 0: torch's default
    # None: the GPU when there is one, else the CPU (``asg_kit.devices``). The data is drawn on
    # the CPU either way; a GPU's kernels round differently, so its run is another draw.
    device: str | None = None


def pixels_to_tensor(images, device=None) -> torch.Tensor:
    """PIL images to (batch, 3, H, W) in [-1, 1], the VQ model's input range."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).to(device)


def quantize(vq, pixels: torch.Tensor):
    """Encode to the unit-norm codebook by cosine similarity: (unit latents, quantized, ids).

    Janus decodes from L2-normalised codebook entries, so quantizing by cosine keeps
    encoding and decoding consistent; once the codebook is normalised in place
    (``export``), Janus's own Euclidean ``encode`` picks the same ids.
    """
    latents = F.normalize(vq.quant_conv(vq.encoder(pixels)), dim=1)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=1)
    ids = torch.einsum("bchw,nc->bnhw", latents, codebook).argmax(1)
    return latents, codebook[ids].permute(0, 3, 1, 2), ids


def _rng(config: MicroTrainConfig, stage: str, step: int) -> random.Random:
    return random.Random(f"{config.seed}-{stage}-{step}")


def stage_lr(config: MicroTrainConfig, stage: str, step: int, steps: int, peak: float) -> float:
    """The rate at ``step`` of a stage's ``steps``: a linear warmup to ``peak``, then stage 2
    decays along a cosine to ``lm_min_lr_share`` of it, the judge stage anneals its last
    quarter to 0 along a cosine (at a constant rate its answers swung by up to 10 points of
    a kind between checkpoints), and the others stay constant."""
    if step < config.warmup:
        return peak * (step + 1) / config.warmup
    if stage == "lm":
        progress = (step - config.warmup) / max(1, steps - config.warmup)
        floor = config.lm_min_lr_share
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    if stage == "judge" and step >= 0.75 * steps:
        return peak * 0.5 * (1 + math.cos(math.pi * (step - 0.75 * steps) / (0.25 * steps)))
    return peak


class Phases:
    """Which mix of a stage's curriculum each step draws from, and the step the stage ends at.

    Phase ``p`` of ``n`` has a share of the stage's ``steps``: ``steps * (p + 1) // n - steps
    * p // n``. Ungated, the share is its length. Gated (``passing`` > 0), each phase but the
    last runs its share, then goes on until the held-out check that ``after`` is given
    reaches ``passing`` (checked when the share is done and every ``every`` steps after) or
    the phase has run ``cap`` times its share; a phase with no share is skipped.
    """

    def __init__(self, mixes, steps: int, phase: int = 0, start: int = 0, passing: float = 0.0, every: int = 100, cap: int = 1):
        self.mixes = mixes if isinstance(mixes, tuple) else (mixes,)
        self.steps, self.phase, self.start = steps, phase, start
        self.gated = passing > 0 and len(self.mixes) > 1
        self.passing, self.every, self.cap = passing, every, cap
        self.gave_up = False  # a phase ran to its cap without passing its check
        self._skip_empty()

    def share(self, phase: int) -> int:
        n = len(self.mixes)
        return self.steps * (phase + 1) // n - self.steps * phase // n

    def _skip_empty(self) -> None:
        while self.gated and self.phase < len(self.mixes) - 1 and self.share(self.phase) == 0:
            self.phase += 1

    def mix(self, step: int):
        n = len(self.mixes)
        return self.mixes[self.phase] if self.gated else self.mixes[min(n - 1, step * n // max(1, self.steps))]

    def done(self, step: int) -> bool:
        if not self.gated:
            return step >= self.steps
        last = len(self.mixes) - 1
        return self.phase == last and step - self.start >= self.share(last)

    def after(self, step: int, check: Callable[[int], float]) -> dict:
        """After ``step``: when a check is due, run ``check(phase)`` (the held-out accuracy)
        and move to the next phase if it passed or the phase is at its cap; returns the
        check's figures to log (empty when none was due)."""
        if not self.gated or self.phase == len(self.mixes) - 1:
            return {}
        length, share = step + 1 - self.start, self.share(self.phase)
        capped = length >= self.cap * share
        if length < share or ((length - share) % self.every and not capped):
            return {}
        figures = {"phase": self.phase, "phase_steps": length, "check_accuracy": check(self.phase)}
        if figures["check_accuracy"] >= self.passing or capped:
            self.gave_up = self.gave_up or figures["check_accuracy"] < self.passing
            self.phase, self.start = self.phase + 1, step + 1
            self._skip_empty()
        return figures

    def state(self) -> dict:
        """What a checkpoint keeps to resume mid-curriculum (nothing when ungated)."""
        return {"phase": self.phase, "phase_start": self.start} if self.gated else {}


class PatchHeads(torch.nn.Module):
    """Training-only linear probes from the vision encoder's patch tokens to the colour and
    shape under each patch (``tasks.patch_labels``) and to the patch's own row and column;
    not part of the exported model. The coordinates keep where each patch is linearly
    readable, which position questions ("where is the circle relative to the square?") need."""

    def __init__(self, width: int, grid: int):
        super().__init__()
        self.color = torch.nn.Linear(width, len(tasks.world.COLORS) + 1)
        self.shape = torch.nn.Linear(width, len(tasks.world.SHAPES) + 1)
        self.row = torch.nn.Linear(width, grid)
        self.column = torch.nn.Linear(width, grid)
        self.grid = grid

    def loss(self, patches: torch.Tensor, colors: torch.Tensor, shapes: torch.Tensor) -> torch.Tensor:
        index = torch.arange(self.grid * self.grid, device=patches.device).expand(len(patches), -1)
        return sum(
            F.cross_entropy(head(patches).flatten(0, 1), labels.flatten())
            for head, labels in ((self.color, colors), (self.shape, shapes), (self.row, index // self.grid), (self.column, index % self.grid))
        )


def _save_checkpoint(out: Path, model, processor, optimizer, progress: dict, heads: PatchHeads | None = None) -> None:
    from safetensors.torch import save_file

    tmp = _write_model(model, processor, out / "checkpoint.tmp")
    if heads is not None:
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp / "patch_heads.safetensors"))
    torch.save(optimizer.state_dict() if optimizer is not None else {}, tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps(progress))
    swap_in_folder(tmp, out / "checkpoint")


STAGES = ("vq", "lm", "position", "refine", "judge")

# Settings that change nothing a run computes: a re-run may give other values.
FREE_SETTINGS = ("threads", "checkpoint_every", "device")
# What a run saved before a setting existed ran with: it resumes as it started.
BEFORE_SETTING = {"position_pass": 0.0, "position_binding": False, "position_retry": False, "judge_count_pairs": False}


def micro_config_for(out: str | Path, **given) -> MicroTrainConfig:
    """The config for (re-)running ``out``: the saved one when the folder holds a run, else
    the defaults, with ``given`` settings on top (``train`` refuses ones that change it)."""
    path = Path(out) / "config.json"
    saved = {}
    if path.is_file():
        try:
            saved = {**BEFORE_SETTING, **json.loads(path.read_text())}
            saved.pop("device", None)  # where a run goes on is the resuming machine's choice
        except ValueError as error:
            raise UserError(f"{path}: not valid JSON ({error})") from None
    known = {f for f in MicroTrainConfig.__dataclass_fields__}
    return MicroTrainConfig(**{**{k: v for k, v in saved.items() if k in known}, **given})


def _claim(config: MicroTrainConfig, out: Path, notice: Callable[[str], None]) -> None:
    """Check the settings, and that a run already in ``out`` was made with them."""
    check_seed(config.seed)
    check_device(config.device)
    if config.text_loss not in ("example", "token"):
        raise UserError(f"text_loss={config.text_loss!r}: use 'example' or 'token'")
    if isinstance(config.refine_steps, bool) or not isinstance(config.refine_steps, int) or config.refine_steps < 0:
        raise UserError(f"--refine-steps {config.refine_steps!r}: use a whole number >= 0 (0 skips the Solver's refinement)")
    if isinstance(config.position_steps, bool) or not isinstance(config.position_steps, int) or config.position_steps < 0:
        raise UserError(f"--position-steps {config.position_steps!r}: use a whole number >= 0 (0 skips the position curriculum)")
    if isinstance(config.judge_steps, bool) or not isinstance(config.judge_steps, int) or config.judge_steps < 0:
        raise UserError(f"--judge-steps {config.judge_steps!r}: use a whole number >= 0 (0 skips the judge stage)")
    for name in ("refine_lr", "position_lr", "judge_lr"):
        if not getattr(config, name) > 0:
            raise UserError(f"{name}={getattr(config, name)!r}: use a number > 0")
    if not 0 <= config.position_pass <= 1:
        raise UserError(f"position_pass={config.position_pass!r}: use a share from 0 (equal fixed phases) to 1")
    if not config.patch_loss_weight >= 0:
        raise UserError(f"patch_loss_weight={config.patch_loss_weight!r}: use a number >= 0")
    for name in ("vq_steps", "lm_steps", "checkpoint_every", "image_size", "vq_batch", "text_batch", "image_batch", "patch_batch", "position_batch", "judge_batch", "position_check_every", "position_check_questions", "position_phase_cap"):
        check_positive(f"--{name.replace('_', '-')}", getattr(config, name), integer=True)
    check_output_folder("RUN", out)
    if recover_folder(out / "checkpoint"):
        notice(f"{out}/checkpoint: a run was killed while replacing its checkpoint; recovered the previous one from checkpoint.old")
    saved_path = out / "config.json"
    if saved_path.is_file() and (out / "checkpoint").exists():
        saved = {**BEFORE_SETTING, **json.loads(saved_path.read_text())}
        changed = [f"{k}={saved.get(k)!r} (asked {v!r})" for k, v in asdict(config).items() if k not in FREE_SETTINGS and saved.get(k) != v]
        if changed:
            raise UserError(f"{out} holds a micro run started with {', '.join(changed)}; re-running resumes it with its own settings: drop those options, or pass another RUN folder")


def _load_checkpoint(out: Path):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    folder = out / "checkpoint"
    if not (folder / "progress.json").is_file():
        return None
    model = JanusForConditionalGeneration.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    processor = JanusProcessor.from_pretrained(folder, local_files_only=True)
    progress = json.loads((folder / "progress.json").read_text())
    optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")  # moved to the parameters' device on loading
    return model, processor, progress, optimizer_state


def train(
    config: MicroTrainConfig,
    out: str | Path,
    log: Callable[[dict], None] = lambda row: None,
    stop_after: int | None = None,
    notice: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    start: tuple[str, str | Path] | None = None,
) -> Path:
    """Run (or resume) the five stages in ``out`` and export the model to ``out/model``; the
    model as each of stages 2-5 left it goes to ``out/stages/<stage>`` (to benchmark a
    stage with ``--model``).

    ``log`` receives one dict per logged step; ``stop_after`` ends the run after that many
    optimizer steps in this call (for tests of resuming). Returns the export folder, or the
    checkpoint folder when stopped early. A run already in ``out`` is resumed only with the
    settings it was started with (``UserError`` otherwise); an advisory lock keeps a second
    process out of ``out`` meanwhile. ``start=(stage, model folder)`` begins a new run at
    ``stage`` (lm, position, refine or judge) from an exported model, such as another run's
    ``stages/<the stage before>``, with a fresh optimizer and patch heads as a from-scratch
    run has them there: with the same seed and settings it ends as that run does, so later
    stages can be tried without repeating the earlier ones.
    """
    out = Path(out)
    _claim(config, out, notice)
    with folder_lock(out, "asgkit micro train"):
        if start is not None:
            _start_at(out, *start)
        return _train(config, out, log, stop_after, notice)


def _start_at(out: Path, stage: str, model_folder: str | Path) -> None:
    if stage not in STAGES[1:]:
        raise UserError(f"--start-stage {stage!r}: use one of {', '.join(STAGES[1:])} (a stage after the tokenizer's)")
    if (out / "checkpoint").exists():
        raise UserError(f"{out} already holds a run: starting at a stage needs a new RUN folder (re-running without --start-stage resumes this one)")
    folder = Path(model_folder)
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"{folder}: no model.safetensors; pass an exported micro model (RUN/stages/<stage> or RUN/model)")
    model, processor = _load_export(folder)
    if stage != "lm":  # the model as the stage before left it, as a from-scratch run has it
        _export(model, processor, out / "stages" / STAGES[STAGES.index(stage) - 1])
    _save_checkpoint(out, model, processor, None, {"stage": stage, "step": 0})


def _load_export(folder: Path):
    from transformers import JanusForConditionalGeneration, JanusProcessor

    return JanusForConditionalGeneration.from_pretrained(folder, use_safetensors=True, local_files_only=True), JanusProcessor.from_pretrained(folder, local_files_only=True)


def _train(config: MicroTrainConfig, out: Path, log: Callable[[dict], None], stop_after: int | None, notice: Callable[[str], None]) -> Path:
    from asg_kit.devices import default_device
    from asg_kit.micro.model import build_micro_janus

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    if config.threads:
        torch.set_num_threads(config.threads)
    write_json_atomic(out / "config.json", asdict(config))
    loaded = _load_checkpoint(out)
    metrics = out / "metrics.jsonl"
    if loaded is None:
        torch.manual_seed(config.seed)
        model, processor = build_micro_janus(seed=config.seed, image_size=config.image_size)
        progress, optimizer_state = {"stage": "vq", "step": 0}, None
        metrics.unlink(missing_ok=True)
    else:
        model, processor, progress, optimizer_state = loaded
        if progress["step"] == 0:  # saved at the end of a stage: its optimizer is that stage's
            optimizer_state = None
        cut_torn_line(metrics)  # a run killed during an append left half a row
        if metrics.exists():  # rows written after the checkpoint are written again
            order = {stage: index for index, stage in enumerate((*STAGES, "done"))}
            at = (order[progress["stage"]], progress.get("attempt", 1), progress["step"])
            write_jsonl_atomic(metrics, [row for _, row in read_jsonl(metrics) if (order[row["stage"]], row.get("attempt", 1), row["step"]) < at])
    device = torch.device(default_device(config.device) or "cpu")
    model.to(device)
    budget = stop_after if stop_after is not None else math.inf

    # Stage 1: the VQ image tokenizer --------------------------------------------------
    vq = model.model.vqmodel
    if progress["stage"] == "vq":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in vq.parameters():
            parameter.requires_grad_(True)
        vq.train()
        optimizer = torch.optim.Adam(vq.parameters(), lr=config.vq_lr)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        started = time.time()
        for step in range(progress["step"], config.vq_steps):
            if budget <= 0:
                _save_checkpoint(out, model, processor, optimizer, {"stage": "vq", "step": step})
                return out / "checkpoint"
            rng = _rng(config, "vq", step)
            pixels = pixels_to_tensor([tasks.world.render(tasks.world.sample_scene(rng), config.image_size) for _ in range(config.vq_batch)], device)
            latents, quantized, ids = quantize(vq, pixels)
            decoded = vq.decoder(vq.post_quant_conv(latents + (quantized - latents).detach()))
            reconstruction = F.mse_loss(decoded, pixels)
            loss = reconstruction + F.mse_loss(quantized, latents.detach()) + 0.25 * F.mse_loss(latents, quantized.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            budget -= 1
            if step % config.vq_restart_every == 0:
                with torch.no_grad():  # restart unused codes at random encoder outputs
                    used = torch.zeros(vq.quantize.num_embeddings, dtype=torch.bool, device=device)
                    used[ids.unique()] = True
                    dead = (~used).nonzero().squeeze(1)
                    pool = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
                    pick = torch.randint(len(pool), (len(dead),), generator=torch.Generator().manual_seed(config.seed * 7919 + step))
                    vq.quantize.embedding.weight[dead] = pool[pick.to(device)]
            row = {"stage": "vq", "step": step, "loss": loss.item(), "reconstruction": reconstruction.item(), "codes_used": int(ids.unique().numel()), "seconds": time.time() - started}
            if step % 50 == 0 or step == config.vq_steps - 1:
                log(row)
                with metrics.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            if (step + 1) % config.checkpoint_every == 0:
                _save_checkpoint(out, model, processor, optimizer, {"stage": "vq", "step": step + 1})
        with torch.no_grad():  # Janus decodes from unit-norm entries: make its encode agree
            vq.quantize.embedding.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
        progress, optimizer_state = {"stage": "lm", "step": 0}, None
        _save_checkpoint(out, model, processor, optimizer, progress)

    # Stages 2-5: vision encoder, language model and generation head; positions; the Solver;
    # the judge ----------------------------------------------------------------------------
    attempt = progress.get("attempt", 1)  # 2: the curriculum's second try, with the drill
    binding = config.position_binding or attempt > 1
    tried = {"attempt": attempt} if attempt > 1 else {}  # on the curriculum's rows and checkpoints
    # (name, steps, text mix, text batch, peak rate, draws and supervises patches)
    stages = [
        ("lm", config.lm_steps, tasks.PRETRAIN, config.text_batch, config.lm_lr, True),
        ("position", config.position_steps, tasks.POSITION_CURRICULUM[0 if binding else 1 :], config.position_batch, config.position_lr, False),
        ("refine", config.refine_steps, tasks.REFINE, config.text_batch, config.refine_lr, True),
        ("judge", config.judge_steps, tuple(replace(mix, count_contrast=config.judge_count_pairs) for mix in tasks.JUDGE), config.judge_batch, config.judge_lr, True),
    ]
    for index, (stage, steps, mix, text_batch, peak_lr, draws) in enumerate(stages):
        if progress["stage"] != stage:
            continue
        backbone = JanusAdapter(model, processor, lora=None)
        trainable = [p for name, p in model.named_parameters() if not name.startswith("model.vqmodel.")]
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        with torch.random.fork_rng():  # the same heads whether or not the run was resumed
            torch.manual_seed(config.seed)
            heads = PatchHeads(model.config.vision_config.hidden_size, config.image_size // model.config.vision_config.patch_size).to(device)
        heads_file = out / "checkpoint" / "patch_heads.safetensors"
        if optimizer_state is not None and heads_file.is_file():
            from safetensors.torch import load_file

            heads.load_state_dict(load_file(str(heads_file), device=str(device)))
        trainable += list(heads.parameters())
        model.train()
        vq.eval()
        optimizer = torch.optim.AdamW(trainable, lr=config.lm_lr, weight_decay=config.weight_decay)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        grid = config.image_size // model.config.vision_config.patch_size
        gate = dict(passing=config.position_pass, every=config.position_check_every, cap=config.position_phase_cap) if stage == "position" else {}
        phases = Phases(mix, steps, progress.get("phase", 0), progress.get("phase_start", 0), **gate)

        def held_out_accuracy(phase: int) -> float:
            items = tasks.held_out_questions(phases.mixes[phase], config.position_check_questions, f"{config.seed}-{stage}-check-{phase}")
            model.eval()
            try:
                return run_vqa(backbone, items, config.image_size, role=None).accuracy
            finally:
                model.train()
                vq.eval()

        def where(step: int) -> dict:
            """The checkpoint's progress at ``step``."""
            return {"stage": stage, "step": step, **phases.state(), **(tried if stage == "position" else {})}

        retry_from = out / "stages" / "lm" if stage == "position" and config.position_retry and not binding else None
        if retry_from and not (retry_from / "model.safetensors").is_file():
            retry_from = None  # stage 2 ran no steps here: nothing to start over from

        started = time.time()
        step = progress["step"]
        while not phases.done(step):
            if budget <= 0:
                _save_checkpoint(out, model, processor, optimizer, where(step), heads)
                return out / "checkpoint"
            lr = stage_lr(config, stage, step, steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rng = _rng(config, stage, step)

            texts = tasks.text_batch(rng, text_batch, config.image_size, phases.mix(step))
            requests = [AnswerRequest(example.image, example.prompt) for example in texts]
            completions = [backbone.encode_completion(example.target) for example in texts]
            scores = backbone.score_completions(requests, completions)
            if config.text_loss == "example":
                text_loss = -((scores.logprobs * scores.mask).sum(1) / scores.mask.sum(1)).mean()
            else:
                text_loss = -(scores.logprobs.sum() / scores.mask.sum())

            image_loss = patch_loss = torch.zeros((), device=device)
            if draws:
                drawings = [tasks.image_example(rng, config.image_size) for _ in range(config.image_batch)]
                with torch.no_grad():
                    _, _, ids = quantize(vq, pixels_to_tensor([d.image for d in drawings], device))
                prompt_ids = [backbone.generation_prompt_ids(d.prompt) for d in drawings]
                prompt_ids = [backbone.unconditional_ids(p) if rng.random() < config.uncond_share else p for p in prompt_ids]
                rollout = ImageRollout(
                    prompts=[d.prompt for d in drawings],
                    prompt_ids=prompt_ids,
                    prompt_index=list(range(len(drawings))),
                    tokens=ids.reshape(len(drawings), -1),
                    behaviour_logprobs=torch.zeros(ids.shape[0], ids[0].numel()),
                    guidance_scale=1.0,
                    temperature=1.0,
                )
                image_loss = -backbone.generation_logprobs(rollout).mean()

                if config.patch_loss_weight > 0:
                    scenes = [tasks.world.sample_scene(rng) for _ in range(config.patch_batch)]
                    pixels = processor.image_processor([tasks.world.render(s, config.image_size) for s in scenes], return_tensors="pt")["pixel_values"].to(device)
                    patches = model.model.vision_model(pixel_values=pixels).last_hidden_state
                    labels = [tasks.patch_labels(s, grid) for s in scenes]
                    patch_loss = heads.loss(patches, torch.tensor([c for c, _ in labels], device=device), torch.tensor([s for _, s in labels], device=device))

            loss = text_loss + image_loss + config.patch_loss_weight * patch_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            budget -= 1
            row = {"stage": stage, "step": step, "loss": loss.item(), "text_loss": text_loss.item(), "image_loss": image_loss.item(), "patch_loss": patch_loss.item(), "lr": lr}
            row |= phases.after(step, held_out_accuracy)
            row |= tried if stage == "position" else {}
            row["seconds"] = time.time() - started
            if step % 25 == 0 or phases.done(step + 1) or "check_accuracy" in row:
                log(row)
                with metrics.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
            step += 1
            if retry_from and phases.gave_up:
                notice(f"{stage}: phase {row['phase']} reached its cap at {row['check_accuracy']:.0%} of its held-out questions; starting the curriculum over from {retry_from} with the binding drill")
                # a fresh optimizer and patch heads, as the stage had at its start
                _save_checkpoint(out, *_load_export(retry_from), None, {"stage": stage, "step": 0, "attempt": 2})
                return _train(config, out, log, None if stop_after is None else budget, notice)
            if step % config.checkpoint_every == 0:
                _save_checkpoint(out, model, processor, optimizer, where(step), heads)
        following = stages[index + 1][0] if index + 1 < len(stages) else "done"
        progress, optimizer_state = {"stage": following, "step": 0}, None
        if following == "done":
            model.eval()
        if steps:  # written before the checkpoint moves past it, so a resumed run rewrites it
            _export(model, processor, out / "stages" / stage)
        _save_checkpoint(out, model, processor, optimizer, progress)

    return _export(model, processor, out / "model")


def _export(model, processor, folder: Path) -> Path:
    """Save a loadable model (``--model FOLDER``) beside ``folder`` and swap it in when
    complete: a run killed while saving never leaves a half-written export there."""
    swap_in_folder(_write_model(model, processor, folder.with_name(f".{folder.name}.partial")), folder)
    return folder


def _write_model(model, processor, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
