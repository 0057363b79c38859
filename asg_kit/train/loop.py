"""Ask, Solve, Generate: one unified model improves itself from unlabeled images.

One file, read top to bottom. Three LoRA roles sit on one frozen backbone; the reference
policy is the backbone with every adapter off. Steps cycle 3 understanding : 2 generation.

Understanding step (on one unlabeled image):
  1. Ask: the Proposer writes K=3 candidate questions.
  2. Screen: one greedy Solver decode per candidate; its Solver Token Entropy is ranked in
     the running window (d_STE); the candidate nearest the difficulty target, preferring
     those not easy, is kept.
  3. Solve: the Solver answers it under N=7 framings (the greedy decode is sample 0, the
     others climb the temperature / top-p ladder).
  4. Judge: vote statistics, difficulty bucket, Solver rewards, Proposer reward.
  5. Solver update (skipped for easy and unsolvable questions): KL-regularised REINFORCE,
     each answer scored under the canonical framing, EMA baseline (or group z-score).
  6. Proposer update: the 3 candidates as a group (the others judged by a 3-answer spot
     check), advantages (r - b) / max|r - b|, clipped surrogate against the reference.

Generation step:
  1. The Proposer writes a spec (prompt + question/answer pairs) from the real image.
  2. Gates: spec quality >= 0.35 and the Solver agrees with the spec on the source image
     (alignment >= 0.55).
  3. The Generator draws L=3 candidates; the Solver scores each (QA fidelity, cycle
     caption, diversity, contradiction) into R_G.
  4. Generator update by the backbone's paradigm: for "ar_tokens", clipped GRPO over the
     image tokens (advantages z-scored over the candidates; skipped when they tie); for
     "rectified_flow", advantage-weighted flow matching on each candidate's latent plus
     beta times the MSE between policy and reference velocities (the same advantages; or,
     as an option, Flow-GRPO over SDE rollouts); for "diffusion", reward-weighted
     regression: (1 + 0.5 clip01(best R_G)) times the flow-matching loss on the SOURCE
     image given the spec prompt.

After each step the KL coefficient adapts. A NaN or inf anywhere in an update skips it
with a logged reason before it reaches the weights. Checkpoints (role adapters as
safetensors, optimizers, trackers, baselines, beta) are written atomically; every random
draw is seeded by (seed, rank, step), so a resumed run repeats an uninterrupted one.
Under ``torchrun`` each rank draws its own images and the role gradients are averaged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable

import torch

from asg_kit import prompts
from asg_kit.adapters.base import AnswerRequest, NonFiniteLogits
from asg_kit.adapters.registry import load_backbone
from asg_kit.images import IMAGE_EXTENSIONS, BadImage, load_image
from asg_kit.checks import UserError, check_backbone_name, check_device, check_dtype, check_model, check_output_folder, check_positive, check_seed, folder_lock, looks_like_path
from asg_kit.devices import default_device, process_group_backend
from asg_kit.train.trackers import Tracker, check_report_to, open_tracker
from asg_kit.jsonl import append_jsonl, cut_torn_line, read_jsonl, recover_folder, swap_in_folder, write_json_atomic
from asg_kit.rewards import (
    EasyThreshold,
    RollingPercentile,
    difficulty_bucket,
    proposer_reward,
    score_question,
    spec_quality,
    split_answer,
    vote_stats,
)
from asg_kit.rewards.scorers import GenerationScorer, QAFidelityScorer, ask_screen_solve
from asg_kit.train.losses import (
    AdaptiveKL,
    EMABaseline,
    advantage_weighted_flow_loss,
    clipped_surrogate,
    flow_matching_error,
    full_kl,
    gaussian_mean_kl,
    group_advantages,
    masked_mean,
    max_normalized_advantages,
    reward_weighted_regression,
    sde_transitions,
    velocity_drift,
)


@dataclass
class TrainConfig:
    backbone: str = "micro"
    model: str | None = None
    upstream: str | None = None  # upstream checkout, for the backbones that run one
    device: str | None = None  # None: the GPU when there is one (the rank's LOCAL_RANK under torchrun), else CPU
    dtype: str | None = None  # None: the backbone's own (float32; BAGEL bfloat16)
    images: str = ""
    out: str = "runs/asg"
    steps: int = 10_000
    seed: int = 42
    understanding_per_cycle: int = 3
    generation_per_cycle: int = 2
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # understanding
    question_candidates: int = 3
    proposer_temperature: float = 1.0
    difficulty_target: float = 0.5
    easy_quantile: float = 0.30
    solver_max_new_tokens: int = 96
    proposer_max_new_tokens: int = 384
    solver_reward_form: str = "asg"  # or "evolmm"
    solver_advantage: str = "ema"  # or "grpo"
    baseline_momentum: float = 0.6
    spot_check_samples: int = 3
    easy_share: float = 0.85  # majority share from which a question is easy
    unsolvable_share: float = 0.20  # majority share up to which it is unsolvable
    use_ste: bool = True  # False: Proposer rewarded by sample entropy alone (ablation)
    # None: asg-kit's reward rules; "released": the released ASG code's where they differ
    # (docs/fidelity.md). None rather than "asg-kit" so that runs saved before this field
    # existed still resume.
    reward_form: str | None = None
    # generation
    generator_candidates: int = 3
    guidance_scale: float = 5.0
    spec_samples: int = 2
    spec_max_new_tokens: int = 384
    alignment_min: float = 0.55
    spec_quality_min: float = 0.35
    use_cycle: bool = True  # False: R_G without the cycle-consistency term (ablation)
    clip_ratio: float = 0.2
    flow_update: str = "flow_matching"  # "rectified_flow" Generator: or "flow_grpo" (SDE rollouts)
    flow_noise_level: float = 0.7  # Flow-GRPO's SDE eta
    rwr_weight: float = 0.5  # "diffusion": w in (1 + w * clip01(best R_G))
    # KL to the reference
    beta: float = 0.01
    kl_target: float = 0.02
    kl_rate: float = 0.10
    # bookkeeping
    checkpoint_every: int = 50
    report_to: str = "none"  # or "tensorboard", "wandb" (asg_kit/train/trackers.py)
    log_images_every: int = 50  # steps between the Generator's candidates sent to the tracker (0: never)


def step_kind(config: TrainConfig, step: int) -> str:
    """"understanding" or "generation": 3 then 2 in each cycle (either may be 0)."""
    cycle = config.understanding_per_cycle + config.generation_per_cycle
    if cycle == 0:
        raise ValueError("understanding_per_cycle + generation_per_cycle must be > 0")
    return "understanding" if step % cycle < config.understanding_per_cycle else "generation"


def seed_of(config: TrainConfig, rank: int, step: int, salt: int = 0) -> int:
    return (config.seed * 1_000_003 + rank * 10_007 + step * 101 + salt) % (2**31)


def list_pool(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image pool {folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return paths


# The total, the checkpoint cadence, where the upstream checkout lives and the device change
# no result (the device only its numerics); a resumed run may change them.
CHANGEABLE_ON_RESUME = ("steps", "checkpoint_every", "upstream", "device", "report_to", "log_images_every")
# Settings left out when a resumed run's settings are compared with the saved ones.
RESUMABLE_CHANGES = (*CHANGEABLE_ON_RESUME, "out")
# What a run writes into its folder; --overwrite removes these and nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "checkpoint.old", "checkpoint.tmp", "tensorboard", "wandb")


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def check_config(config: TrainConfig) -> TrainConfig:
    """Every mistake that can be seen before a model loads, as a ``UserError``; returns the
    config with its local paths made absolute (a run then resolves them from anywhere)."""
    check_backbone_name(config.backbone)
    check_model(config.backbone, config.model)
    for flag, value, integer in (("--steps", config.steps, True), ("--lr", config.lr, False), ("--checkpoint-every", config.checkpoint_every, True)):
        check_positive(flag, value, integer)
    check_seed(config.seed)
    check_device(config.device)
    check_dtype(config.dtype)
    check_report_to(config.report_to)
    if config.log_images_every < 0:
        raise UserError(f"--log-images-every {config.log_images_every}: a number of steps, 0 for never")
    if not config.images:
        raise UserError("no image pool: pass --images DIR (a folder of unlabeled images)")
    try:
        list_pool(config.images)
    except FileNotFoundError as error:
        raise UserError(str(error)) from None
    check_output_folder("--out", config.out, inputs=(config.images,))
    model = config.model
    if model is not None and (Path(model).exists() or looks_like_path(model)):
        model = str(Path(model).expanduser().resolve())
    return replace(config, images=str(Path(config.images).expanduser().resolve()), out=str(Path(config.out).expanduser().resolve()), model=model)


def _run_settings(config: TrainConfig | dict) -> dict:
    settings = asdict(config) if isinstance(config, TrainConfig) else dict(config)
    return {k: v for k, v in settings.items() if k not in RESUMABLE_CHANGES}


def _changed(saved: dict, asked: dict) -> list[str]:
    return [f"{k}={saved.get(k)!r} (asked {v!r})" for k, v in asked.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]


def describe_run(folder: str | Path) -> str | None:
    """What a run folder holds, in words; None when it holds no run."""
    folder = Path(folder)
    present = [name for name in RUN_FILES if (folder / name).exists()] + sorted(p.name for p in folder.glob("metrics.rank*.jsonl"))
    if not present:
        return None
    state = next((folder / c / "state.json" for c in ("checkpoint", "checkpoint.old") if (folder / c / "state.json").is_file()), None)
    step = f"checkpoint at step {json.loads(state.read_text())['step']}" if state else "no checkpoint"
    return f"a run ({', '.join(present)}; {step})"


def prepare_run_folder(config: TrainConfig, resume: bool, overwrite: bool = False, notice: Callable[[str], None] = _say) -> None:
    """Make ``config.out`` this run's own before any work: a new run refuses a folder that
    holds another run unless ``overwrite``; a resumed run refuses settings that differ from
    the saved ones, recovers a checkpoint swap that a kill interrupted, and refuses a total
    of steps below the checkpoint's."""
    out = Path(config.out)
    if not resume:
        held = describe_run(out)
        if held and not overwrite:
            raise UserError(f"{out} already holds {held}; continue it with --resume {out}, or pass --overwrite to replace it")
        for name in RUN_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for path in out.glob("metrics.rank*.jsonl"):
            path.unlink()
    else:
        saved_path = out / "config.json"
        if saved_path.is_file():
            changed = _changed(asdict(config_from_run(out)), _run_settings(config))
            if changed:
                raise UserError(f"{out} was started with {', '.join(changed)}; a resumed run keeps its settings (only steps, checkpoint_every, upstream and device may change): drop those options, or start a new run with another --out")
        if recover_folder(out / "checkpoint"):
            step = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
            notice(f"{out}/checkpoint: a run was killed while replacing its checkpoint; recovered the previous one (step {step}) from checkpoint.old")
        state_path = out / "checkpoint" / "state.json"
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if "config" in state and _changed(state["config"], _run_settings(config)):
                raise UserError(f"{out}/checkpoint was written with other settings than {saved_path} ({', '.join(_changed(state['config'], _run_settings(config)))}); start a new run with another --out")
            if state["step"] > config.steps:
                raise UserError(f"{out} is at step {state['step']} already; --steps is the run's total: pass more than {state['step']} to continue")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", asdict(config))


def train(
    config: TrainConfig,
    resume: bool = False,
    log: Callable[[dict], None] = lambda row: None,
    stop_after: int | None = None,
    overwrite: bool = False,
    notice: Callable[[str], None] = _say,
) -> Path:
    """Run ``config`` (``resume``: continue the run in ``config.out`` up to ``config.steps``
    steps in all). The run folder is checked and claimed first: see ``prepare_run_folder``;
    while it runs, an advisory lock keeps other processes out."""
    config = check_config(config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = default_device(config.device)  # under torchrun: this rank's LOCAL_RANK GPU
    if device and device.startswith("cuda") and torch.device(device).index is not None:
        torch.cuda.set_device(torch.device(device))  # nccl's collectives run on the current device
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(process_group_backend(device))
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(folder_lock(config.out, "asgkit train"))
            prepare_run_folder(config, resume, overwrite, notice)
        if world_size > 1:
            torch.distributed.barrier()
        start = checkpoint_step(config.out) if resume else 0
        tracker = stack.enter_context(contextlib.closing(open_tracker(config.report_to, config.out, asdict(config), start, config.log_images_every, rank)))
        return _train_loop(config, resume, log, stop_after, world_size, rank, device, tracker)


def checkpoint_step(folder: str | Path) -> int:
    """The step a run folder's checkpoint was written at (0 without one)."""
    state = Path(folder) / "checkpoint" / "state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def _train_loop(config: TrainConfig, resume: bool, log: Callable[[dict], None], stop_after: int | None, world_size: int, rank: int,
                device: str | None = None, tracker: Tracker | None = None) -> Path:
    # ---- setup: backbone, pool, optimizers, trackers ---------------------------------------
    out = Path(config.out)
    if config.flow_update not in ("flow_matching", "flow_grpo"):
        raise ValueError(f"flow_update {config.flow_update!r}: use 'flow_matching' or 'flow_grpo'")
    if config.reward_form not in (None, "asg-kit", "released"):
        raise UserError(f"reward_form {config.reward_form!r}: use 'released' or leave it unset (asg-kit's rules)")
    form = config.reward_form or "asg-kit"
    torch.manual_seed(config.seed)  # LoRA's A matrices are drawn when the roles are added
    placed = {key: value for key, value in {"device": device, "dtype": config.dtype, "upstream": config.upstream}.items() if value}
    backbone = load_backbone(config.backbone, model=config.model, **placed)
    if backbone.generation_paradigm not in ("ar_tokens", "rectified_flow", "diffusion") and config.generation_per_cycle:
        raise NotImplementedError(f"the {backbone.generation_paradigm!r} generator update arrives with its backbone")
    pool = list_pool(config.images)
    optimizers = {
        role: torch.optim.AdamW(backbone.trainable_parameters(role), lr=config.lr, weight_decay=config.weight_decay)
        for role in backbone.roles
    }
    percentile = RollingPercentile(form=form)
    easy = EasyThreshold(min_samples=32, cold_value=0.15) if form == "released" else EasyThreshold()
    solver_baseline, proposer_baseline = EMABaseline(config.baseline_momentum), EMABaseline(config.baseline_momentum)
    kl_control = AdaptiveKL(config.beta, config.kl_target, config.kl_rate)
    generation_scorer = GenerationScorer(backbone, samples=config.spec_samples, w_cyc=0.20 if config.use_cycle else 0.0, seed=config.seed, form=form)
    start = 0
    metrics = out / ("metrics.jsonl" if rank == 0 else f"metrics.rank{rank}.jsonl")
    if resume and (out / "checkpoint" / "state.json").is_file():
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        backbone.load_roles(out / "checkpoint" / "roles")
        for role, optimizer in optimizers.items():
            path = out / "checkpoint" / f"optimizer_{role}.pt"
            try:
                optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # onto the params' device, which may differ on resume
            except (OSError, RuntimeError, ValueError, KeyError) as error:
                raise UserError(f"{path}: cannot be read ({str(error).splitlines()[0]}); the checkpoint is damaged: start a new run with another --out") from None
        if len(state["ranks"]) != world_size:
            raise UserError(f"{out}/checkpoint was written by {len(state['ranks'])} process(es), not {world_size}: resume it with as many (torchrun --nproc_per_node {len(state['ranks'])})")
        mine = state["ranks"][str(rank)]
        percentile.load_state_dict(mine["percentile"])
        easy.load_state_dict(mine["easy"])
        solver_baseline.value, proposer_baseline.value = mine["solver_baseline"], mine["proposer_baseline"]
        kl_control.beta = state["beta"]
        start = state["step"]
        cut_torn_line(metrics)  # a run killed during an append left half a row
        if metrics.exists():  # rows a killed run wrote after its last checkpoint are replayed
            kept = [row for _, row in read_jsonl(metrics) if row["step"] < start]
            metrics.write_text("".join(json.dumps(row) + "\n" for row in kept))
    elif metrics.exists():
        metrics.unlink()

    applied: set[str] = set()
    shown: dict = {}  # what a tracker may show of the step beyond its row: the Generator's candidates

    def apply(role: str, loss: torch.Tensor | None, reason: str | None) -> str | None:
        """Backpropagate ``loss`` into ``role`` and step, unless anything is non-finite; with
        several ranks the gradients are averaged over the ranks that had an update."""
        applied.add(role)
        params = backbone.trainable_parameters(role)
        optimizer = optimizers[role]
        optimizer.zero_grad(set_to_none=True)
        if reason is None and (loss is None or not torch.isfinite(loss)):
            reason = "non-finite loss"
        if reason is None:
            loss.backward()
            if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
                reason = "non-finite gradient"
        contributed = torch.tensor([0.0 if reason else 1.0], device=params[0].device if params else None)
        if world_size > 1:
            torch.distributed.all_reduce(contributed)
            for p in params:
                grad = p.grad if (p.grad is not None and reason is None) else torch.zeros_like(p)
                torch.distributed.all_reduce(grad)
                p.grad = grad / max(1.0, contributed.item())
        elif reason is not None:
            optimizer.zero_grad(set_to_none=True)
        if contributed.item() > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return reason

    def training_mode(on: bool) -> None:
        backbone.model.train(on)

    def run_step(image, kind: str, seed: int, row: dict) -> float | None:
        """One understanding or generation step on ``image``; fills ``row``; returns the KL
        measured for the coefficient's controller (None when no update ran)."""
        kl_measured = None
        if kind == "understanding":
            # 1-3. Ask K questions, screen each by its greedy decode's STE, solve the kept one
            # under the 7 framings (greedy is sample 0, the rest climb the ladder).
            found = ask_screen_solve(backbone, image, percentile, seed, config.question_candidates, config.proposer_temperature,
                                     config.difficulty_target, config.easy_quantile, config.use_ste,
                                     config.proposer_max_new_tokens, config.solver_max_new_tokens)  # fmt: skip
            asked, questions, greedy, ste, ranks, chosen, replies = (
                found.asked, found.questions, found.greedy, found.ste, found.ranks, found.chosen, found.replies
            )
            question = found.question
            ladder = prompts.pps_ladder()
            # 4. Judge.
            d_ste = percentile.update(ste[chosen]) if config.use_ste else 0.0
            buckets = {"easy_share": config.easy_share, "unsolvable_share": config.unsolvable_share}
            judged = score_question([r.text for r in replies], d_ste, easy.value, form=config.solver_reward_form,
                                    informative_scale=0.20 if form == "released" else None, **buckets)  # fmt: skip
            easy.update(judged.stats.entropy)
            weights = {} if config.use_ste else {"ste_weight": 0.0, "sc_weight": 1.0}
            weights["form"] = form
            chosen_reward = proposer_reward(d_ste, judged.stats, judged.bucket, greedy_answer=split_answer(greedy[chosen].text)[0], **weights)
            row.update(question=question, answers=list(judged.answers), ste=ste[chosen], d_ste=d_ste, entropy=judged.stats.entropy,
                       majority_share=judged.stats.majority_share, margin=judged.stats.margin, bucket=judged.bucket,
                       solver_rewards=list(judged.solver_rewards), proposer_reward=chosen_reward)  # fmt: skip
            # 5. Solver update: REINFORCE with KL, every answer scored under the canonical framing.
            reason = judged.skip_reason
            loss = None
            if reason is None and not all(math.isfinite(r) for r in judged.solver_rewards):
                reason = "non-finite reward"
            if reason is None:
                canonical = [AnswerRequest(image, prompts.solver_prompt(question, 0))] * len(replies)
                completions = [r.token_ids for r in replies]
                training_mode(True)
                with backbone.role("solver"):
                    scored = backbone.score_completions(canonical, completions, keep_logits=True)
                training_mode(False)
                with torch.no_grad(), backbone.role(None):
                    reference = backbone.score_completions(canonical, completions, keep_logits=True)
                if not torch.isfinite(scored.logits).all():
                    reason = "non-finite logits"
                else:
                    nll = -masked_mean(scored.logprobs, scored.mask)
                    kl = full_kl(scored.logits, reference.logits, scored.mask)
                    if config.solver_advantage == "grpo":
                        advantages = group_advantages(judged.solver_rewards) or [0.0] * len(replies)
                    else:
                        advantages = []
                        for reward in judged.solver_rewards:
                            advantages.append(reward - solver_baseline.current)
                            solver_baseline.update(reward)
                    loss = (torch.tensor(advantages, device=nll.device) * nll).mean() + kl_control.beta * kl.mean()
                    kl_measured = kl.mean().item()
                    row.update(solver_loss=loss.item(), kl=kl_measured)
            row["solver_skip"] = apply("solver", loss, reason)
            # 6. Proposer update over the candidate group.
            rewards = []
            for i in range(len(questions)):
                if i == chosen:
                    rewards.append(chosen_reward)
                    continue
                with backbone.role("solver"):
                    spot = backbone.sample_answers(
                        [AnswerRequest(image, prompts.solver_prompt(questions[i], f), *ladder[f], seed=seed + 100 * i + f) for f in range(1, config.spot_check_samples)],
                        config.solver_max_new_tokens,
                    )
                stats = vote_stats([split_answer(greedy[i].text)[0]] + [split_answer(s.text)[0] for s in spot])
                rewards.append(proposer_reward(ranks[i] if config.use_ste else 0.0, stats, difficulty_bucket(stats, easy.value, **buckets),
                                               greedy_answer=split_answer(greedy[i].text)[0], **weights))  # fmt: skip
            advantages = max_normalized_advantages(rewards, proposer_baseline.current)
            proposer_baseline.update(sum(rewards) / len(rewards))
            reason, loss = None, None
            if not all(math.isfinite(r) for r in rewards):
                reason = "non-finite reward"
            elif not any(advantages):
                reason = "no preference in the group"
            else:
                requests = [AnswerRequest(image, prompts.PROPOSER_QUESTION)] * len(asked)
                training_mode(True)
                with backbone.role("proposer"):
                    scored = backbone.score_completions(requests, [a.token_ids for a in asked])
                training_mode(False)
                with torch.no_grad(), backbone.role(None):
                    reference = backbone.score_completions(requests, [a.token_ids for a in asked])
                mean_lp, mean_ref = masked_mean(scored.logprobs, scored.mask), masked_mean(reference.logprobs, reference.mask)
                surrogate = clipped_surrogate(torch.tensor(advantages, device=mean_lp.device), mean_lp, mean_ref, config.clip_ratio)
                loss = surrogate.mean() + kl_control.beta * torch.relu(mean_lp - mean_ref).mean()
                row.update(proposer_loss=loss.item())
            row.update(proposer_group_rewards=rewards, proposer_skip=apply("proposer", loss, reason))

        else:
            # 1. The Proposer writes a spec from the real image.
            with backbone.role("proposer"):
                reply = backbone.sample_answers([AnswerRequest(image, prompts.PROPOSER_SPEC, config.proposer_temperature, seed=seed)], config.spec_max_new_tokens)[0]
            spec = prompts.parse_spec(reply.text)
            quality = spec_quality(spec, form=form) if spec else 0.0
            row.update(spec=reply.text, spec_quality=quality)
            reason = None
            if spec is None:
                reason = "unparseable spec"
            elif quality < config.spec_quality_min:
                reason = "spec quality below minimum"
            else:
                # 2. The Solver must agree with the spec on the source image.
                alignment = QAFidelityScorer(backbone, config.spec_samples, seed=seed, form=form).score([image], [spec])[0].s_fid
                row["alignment"] = alignment
                if alignment < config.alignment_min:
                    reason = "spec not aligned with its image"
            loss = None
            if reason is None:
                # 3. Draw L candidates and score them.
                flow_grpo = backbone.generation_paradigm == "rectified_flow" and config.flow_update == "flow_grpo"
                sde = {"noise_level": config.flow_noise_level} if flow_grpo else {}
                with backbone.role("generator"):
                    drawn = backbone.generate_images([spec.prompt], n=config.generator_candidates, guidance_scale=config.guidance_scale, seed=seed, **sde)
                scores = generation_scorer.score(spec, drawn.images[0])
                shown.update(candidates=drawn.images[0], prompt=spec.prompt)
                rewards = [s.reward for s in scores]
                row.update(generation_rewards=rewards, s_fid=[s.fidelity.s_fid for s in scores], s_div=[s.diversity for s in scores],
                           s_cyc=[s.cycle.s_cyc for s in scores] if config.use_cycle else None)  # fmt: skip
                # The released AR-token Generator (VARGPT) z-scores with torch.std, i.e. over n - 1.
                unbiased = form == "released" and backbone.generation_paradigm == "ar_tokens"
                advantages = group_advantages(rewards, unbiased=unbiased) if all(math.isfinite(r) for r in rewards) else None
                if backbone.generation_paradigm == "diffusion" and all(math.isfinite(r) for r in rewards):
                    # 4. Reward-weighted regression: reconstruct the real image from the spec prompt.
                    training_mode(True)
                    with backbone.role("generator"):
                        flow_mse = backbone.source_flow_loss([image], [spec.prompt], seed=seed)
                    training_mode(False)
                    loss = reward_weighted_regression(flow_mse, max(rewards), config.rwr_weight).mean()
                    row.update(generator_loss=loss.item(), flow_mse=flow_mse.mean().item())
                elif advantages is None:
                    reason = "candidates tie (no preference)" if all(math.isfinite(r) for r in rewards) else "non-finite reward"
                elif flow_grpo:
                    # 4. Flow-GRPO: each SDE step a Gaussian whose mean the velocity sets; clipped
                    # ratio to the rollout policy (its log-probs taken on the training path, where
                    # the update runs, not from the sampler) and beta * KL to the reference's Gaussian.
                    rollout = drawn.rollout
                    training_mode(True)
                    with backbone.role("generator"):
                        logprob, mean, std = sde_transitions(rollout.latents, rollout.timesteps, backbone.guided_velocities(rollout), rollout.noise_level)
                    training_mode(False)
                    old_logprob = logprob.detach()  # one update per rollout: the policy is still the rollout's
                    with torch.no_grad(), backbone.role(None):
                        reference_mean = sde_transitions(rollout.latents, rollout.timesteps, backbone.guided_velocities(rollout), rollout.noise_level)[1]
                    kl = gaussian_mean_kl(mean, reference_mean, std)
                    surrogate = clipped_surrogate(torch.tensor(advantages, device=logprob.device)[:, None], logprob, old_logprob, config.clip_ratio)
                    kl_measured = kl.mean().item()
                    loss = surrogate.mean() + kl_control.beta * kl.mean()
                    row.update(generator_loss=loss.item(), kl=kl_measured)
                elif backbone.generation_paradigm == "rectified_flow":
                    # 4. Advantage-weighted flow matching on each candidate's latent (fresh noise,
                    # seeded after the rollout's) plus beta * MSE to the reference velocity.
                    noised = backbone.noised_latents(drawn.rollout, seed=seed + len(rewards))
                    training_mode(True)
                    with backbone.role("generator"):
                        velocity = backbone.velocities(drawn.rollout, noised.noisy, noised.timesteps)
                    training_mode(False)
                    with torch.no_grad(), backbone.role(None):
                        reference = backbone.velocities(drawn.rollout, noised.noisy, noised.timesteps)
                    error = flow_matching_error(velocity, noised.target.to(velocity.device))
                    drift = velocity_drift(velocity, reference)
                    kl_measured = drift.mean().item()
                    loss = advantage_weighted_flow_loss(torch.tensor(advantages), error, drift, kl_control.beta)
                    row.update(generator_loss=loss.item(), kl=kl_measured, flow_matching=error.tolist())
                else:
                    # 4. Clipped GRPO over the image tokens, ratio against the reference.
                    training_mode(True)
                    with backbone.role("generator"):
                        logprobs = backbone.generation_logprobs(drawn.rollout)
                    training_mode(False)
                    with torch.no_grad(), backbone.role(None):
                        reference = backbone.generation_logprobs(drawn.rollout)
                    mean_lp, mean_ref = logprobs.mean(-1), reference.mean(-1)
                    surrogate = clipped_surrogate(torch.tensor(advantages, device=mean_lp.device), mean_lp, mean_ref, config.clip_ratio)
                    kl_measured = torch.relu(mean_lp - mean_ref).mean().item()
                    loss = surrogate.mean() + kl_control.beta * torch.relu(mean_lp - mean_ref).mean()
                    row.update(generator_loss=loss.item(), kl=kl_measured)
            row["generator_skip"] = apply("generator", loss, reason)
        return kl_measured

    # ---- the loop --------------------------------------------------------------------------
    budget = stop_after if stop_after is not None else math.inf
    for step in range(start, config.steps):
        if budget <= 0:
            break
        budget -= 1
        rng = random.Random(seed_of(config, rank, step))
        torch.manual_seed(seed_of(config, rank, step, salt=1))  # LoRA dropout
        seed = seed_of(config, rank, step, salt=2)
        kind = step_kind(config, step)
        began = time.time()
        row: dict = {"step": step, "kind": kind, "beta": kl_control.beta}
        path = pool[rng.randrange(len(pool))]
        row["image"] = path.name
        try:
            image = load_image(path).image
        except BadImage as error:
            row.update(skip="unreadable image", detail=str(error))
            image = None
        kl_measured = None
        applied.clear()
        shown.clear()
        try:
            if image is not None:
                kl_measured = run_step(image, kind, seed, row)
        except NonFiniteLogits as error:
            row["skip"] = f"non-finite logits: {error}"
        # Every rank makes the same collective calls each step, whatever it skipped.
        for role in ("solver", "proposer") if kind == "understanding" else ("generator",):
            if role not in applied:
                apply(role, None, row.get("skip", "skipped"))


        # ---- after every step: KL coefficient, metrics, checkpoint --------------------------
        if kl_measured is not None:
            kl_control.update(kl_measured)
        row["seconds"] = time.time() - began
        append_jsonl(metrics, row)
        log(row)
        if tracker is not None:
            tracker.report(row, shown.get("candidates"), shown.get("prompt"))
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(out, backbone, optimizers, step + 1, kl_control.beta, rank, world_size,
                            {"percentile": percentile.state_dict(), "easy": easy.state_dict(),
                             "solver_baseline": solver_baseline.value, "proposer_baseline": proposer_baseline.value},
                            _run_settings(config))  # fmt: skip
    return out


def save_checkpoint(out: Path, backbone, optimizers: dict, step: int, beta: float, rank: int, world_size: int, trackers: dict, config: dict | None = None) -> None:
    """Every rank's trackers are gathered; rank 0 writes the checkpoint folder atomically."""
    everyone = [trackers]
    if world_size > 1:
        everyone = [None] * world_size
        torch.distributed.all_gather_object(everyone, trackers)
    if rank != 0:
        return
    staged = out / "checkpoint.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    backbone.save_roles(staged / "roles")
    for role, optimizer in optimizers.items():
        torch.save(optimizer.state_dict(), staged / f"optimizer_{role}.pt")
    state = {"step": step, "beta": beta, "ranks": {str(r): t for r, t in enumerate(everyone)}, "config": config}
    (staged / "state.json").write_text(json.dumps(state))
    swap_in_folder(staged, out / "checkpoint")


def config_from_run(folder: str | Path, **overrides) -> TrainConfig:
    """The config a run was started with (``RUN/config.json``), with overrides. Relative
    local paths in it resolve from the run folder, never from the current directory."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        described = describe_run(folder) if folder.is_dir() else None
        raise UserError(f"{folder} holds no run to resume (no config.json{'; it holds ' + described if described else ''}); start one with --images DIR --out {folder}")
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: expected a JSON object")
    known = {f.name for f in fields(TrainConfig)}
    settings = {k: v for k, v in saved.items() if k in known}
    for key in ("images", "model"):
        value = settings.get(key)
        if value and not Path(value).is_absolute() and (key == "images" or looks_like_path(value) or (folder / value).exists()):
            settings[key] = str((folder / value).resolve())
    settings["out"] = str(folder)
    return TrainConfig(**{**settings, **overrides})


def resume_config(folder: str | Path, **asked) -> TrainConfig:
    """The saved config of the run in ``folder`` for ``train(..., resume=True)``. ``asked``
    are the settings a person gave again: ``steps`` (the new total) and ``checkpoint_every``
    replace the saved ones; any other that differs from the saved value is refused."""
    config = config_from_run(folder)
    saved = asdict(config)
    unknown = [k for k in asked if k not in saved]
    if unknown:
        raise TypeError(f"unknown TrainConfig fields: {', '.join(unknown)}")
    changed = _changed(saved, {k: v for k, v in asked.items() if k not in ("out",) + CHANGEABLE_ON_RESUME})
    if changed:
        raise UserError(f"{folder} was started with {', '.join(changed)}; a resumed run keeps its settings (only --steps, --checkpoint-every, --upstream and --device may change): drop those options, or start a new run with another --out")
    return replace(config, **{k: v for k, v in asked.items() if k in CHANGEABLE_ON_RESUME})


if __name__ == "__main__":  # torchrun --nproc_per_node N -m asg_kit.train.loop RUN_CONFIG.json
    config = TrainConfig(**json.loads(Path(sys.argv[1]).read_text()))
    try:
        train(config, resume="--resume" in sys.argv, overwrite="--overwrite" in sys.argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
