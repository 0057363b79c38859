"""Does Ask-Solve-Generate improve the micro model with zero labels? A multi-seed study.

Trains the shipped micro model on an unlabeled pool (fresh renders, no labels anywhere;
the same pool for every run) with the full method (``--seeds`` runs, seeds 0, 1, 2 by
default) and four ablations (``--ablation-seeds`` runs each), and measures the base model
and each run at ``--evals`` marks on the standard ``asgkit bench`` shapes benchmarks
(shapes-VQA and shapes-GenEval with ``asgkit bench --backbone micro``'s defaults:
questions, prompts, images per prompt, guidance, seed), keeping every item's outcome.

Variants (``--variants``, comma-separated): full; no_ste (Proposer rewarded and screened by
sample entropy only); no_cycle (R_G without cycle consistency); understanding_only;
generation_only.

Writes under ``--out``:
  pool/                 the unlabeled training images
  base.json             the base model's evaluation and judge check (cached)
  <variant>-s<seed>/    one training run each (config, metrics.jsonl, checkpoint) and its
                        study.json: the evaluation at each mark, the judge check at the end
  results.json          per variant: seeds, end scores and deltas vs base with 95% CIs
                        (t over seeds; with one seed the per-item standard error), the
                        diagnosis, every run's curve
  results.md            the same as tables
  diagnosis.md          why (or whether) the goal is met: Solver majority correctness over
                        training, judge vs detector ranking, what the gates skipped
  curves.png            VQA and GenEval vs step (mean over seeds with CI band), mean R_G

Resumable: each run's study.json is rewritten atomically after each mark; running the same
command again skips finished runs, resumes a killed run from its checkpoint and never
repeats a mark (an evaluation killed half-way is redone whole). Settings that change
results (steps, lr, evaluation sizes, ...) are recorded: a folder made with other settings
is refused (use another --out). Finished runs of variants not named in --variants but made
in the same folder with the same settings join the report, so variants can be run in
separate calls. Training and evaluation use the GPU when there is one.

Diagnosis: the Solver's majority answers are checked against the pool's ground truth
(``pool.pool_scenes``; the trainer never sees it) where the Proposer's question is one of
the world's templates, per --bin steps, per difficulty bucket and where the Solver updated;
the base model answers the questions each variant's Proposer asked in its first --bin
steps and random questions of the same kinds about the same images (does the screening
pick questions the Solver gets wrong?); the judge's ranking of the Generator's candidates
is compared with the detector's on --judge-prompts prompts; the gates' skip reasons are
counted from metrics.jsonl (functions in ``asg_kit.micro.diagnostics``).

Statistics: a share's per-item standard error is sqrt(p(1-p)/n); GenEval's overall (mean
of 6 category means) has sqrt(sum_c var_c/n_c)/6; a delta against the base model uses the
same items, so its per-item standard error is the paired one. Across seeds the 95% interval
is mean +- t(n-1) s/sqrt(n).

Time: the full study (defaults: 7 runs x 600 steps, 2 marks each, base) took 19 minutes
on 2 CPU cores as two one-thread processes side by side (``--variants full`` and the four
ablations; OMP_NUM_THREADS=1 each), about 5 minutes per run.

    python bench/micro_asg.py --out runs/micro_asg
    python bench/micro_asg.py --out runs/micro_asg --variants full --seeds 5
    # one process per seed (after one call has written the pool and the base, e.g. --only-seeds 0):
    OMP_NUM_THREADS=1 python bench/micro_asg.py --out runs/micro_asg --variants no_ste --ablation-seeds 3 --only-seeds 1 &
    OMP_NUM_THREADS=1 python bench/micro_asg.py --out runs/micro_asg --variants no_ste --ablation-seeds 3 --only-seeds 2 &
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from asg_kit.checks import UserError
from asg_kit.jsonl import read_jsonl, write_json_atomic
from asg_kit.micro import diagnostics as diag
from asg_kit.micro.benchmarks import QUESTION_KINDS

VARIANTS = {
    "full": ("full method", {}),
    "no_ste": ("without STE (sample entropy only)", {"use_ste": False}),
    "no_cycle": ("without the cycle term", {"use_cycle": False}),
    "understanding_only": ("understanding steps only", {"generation_per_cycle": 0}),
    "generation_only": ("generation steps only", {"understanding_per_cycle": 0}),
}
POOL_SEED = 7
GOAL = {"vqa": 0.03, "geneval": 0.08}  # issue 15: +3 points VQA, +8 points GenEval, CIs excluding zero
BENCHES = (("vqa", "accuracy", "shapes-VQA"), ("geneval", "overall", "shapes-GenEval"))


def say(line: str) -> None:
    print(line, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/micro_asg", help="study folder (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--seeds", type=int, default=3, help="runs of the full method, seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--ablation-seeds", type=int, default=1, help="runs of each ablation, seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--only-seeds", default=None, help="comma-separated seeds this call trains (default: all); the variants' other seeds join the report once finished in --out, so one process per seed can share a study")
    parser.add_argument("--evals", type=int, default=2, help="evaluations per run, evenly spaced, the last at the end (default: %(default)s; the base is step 0)")
    train = parser.add_argument_group("training (the same for every run; a run's seed is its TrainConfig seed)")
    train.add_argument("--steps", type=int, default=600, help="training steps per run (default: %(default)s)")
    train.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: %(default)s)")
    train.add_argument("--guidance", type=float, default=5.0, help="the Generator's guidance during training and in the judge check (default: %(default)s)")
    train.add_argument("--pool", type=int, default=500, help="unlabeled images to train on (default: %(default)s)")
    train.add_argument("--solver-tokens", type=int, default=12, help="Solver answer token limit (default: %(default)s)")
    train.add_argument("--proposer-tokens", type=int, default=24, help="Proposer question token limit (default: %(default)s)")
    train.add_argument("--spec-tokens", type=int, default=48, help="Proposer spec token limit (default: %(default)s)")
    evaluation = parser.add_argument_group("evaluation (default: asgkit bench's own defaults; smaller only for quick checks)")
    evaluation.add_argument("--per-kind", type=int, default=None, help="shapes-VQA questions per kind")
    evaluation.add_argument("--per-category", type=int, default=None, help="shapes-GenEval prompts per category")
    evaluation.add_argument("--images", type=int, default=None, help="shapes-GenEval images per prompt")
    evaluation.add_argument("--judge-prompts", type=int, default=48, help="shapes-GenEval prompts for the judge-vs-detector check at the end of each run and for the base (0: skip; default: %(default)s)")
    evaluation.add_argument("--bin", type=int, default=100, help="steps per bin of the Solver-majority diagnosis (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("seeds", "ablation_seeds", "evals", "steps", "pool", "bin", "solver_tokens", "proposer_tokens", "spec_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("per_kind", "per_category", "images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.judge_prompts < 0:
        parser.error("--judge-prompts must be 0 or more")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; pass a folder")
    if args.evals > args.steps:
        parser.error(f"--evals {args.evals} is more than --steps {args.steps}")
    variants = [v.strip().lower().replace(" ", "_").replace("-", "_") for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    args.variants = list(dict.fromkeys(variants))
    if args.only_seeds is not None:
        try:
            args.only_seeds = sorted({int(seed) for seed in args.only_seeds.split(",") if seed.strip()})
        except ValueError:
            parser.error(f"--only-seeds {args.only_seeds!r}: give whole numbers separated by commas, e.g. 1,2")
        if not args.only_seeds or args.only_seeds[0] < 0:
            parser.error("--only-seeds: give one or more seeds >= 0")
        most = max(args.seeds if variant == "full" else args.ablation_seeds for variant in args.variants)
        if args.only_seeds[-1] >= most:
            parser.error(f"--only-seeds {args.only_seeds[-1]}: these variants run seeds 0..{most - 1} (--seeds, --ablation-seeds)")
    return args


def bench_config(args):
    from asg_kit.bench.run import BenchConfig

    bench = BenchConfig(backbone="micro")
    sizes = {"per_kind": args.per_kind, "per_category": args.per_category, "shapes_images": args.images}
    return replace(bench, **{k: v for k, v in sizes.items() if v is not None})


def marks_of(steps: int, evals: int) -> list[int]:
    return sorted({round(steps * (i + 1) / evals) for i in range(evals)})


def train_config(args, variant: str, seed: int, folder: Path, pool: Path, marks: list[int]):
    from asg_kit.train.loop import TrainConfig

    return TrainConfig(backbone="micro", images=str(pool), out=str(folder), steps=args.steps, lr=args.lr, seed=seed,
                       guidance_scale=args.guidance, solver_max_new_tokens=args.solver_tokens, proposer_max_new_tokens=args.proposer_tokens,
                       spec_max_new_tokens=args.spec_tokens, checkpoint_every=math.gcd(*marks), **VARIANTS[variant][1])  # fmt: skip


def load_backbone(roles: Path | None):
    from asg_kit.adapters.registry import load_backbone as load
    from asg_kit.devices import default_device

    device = default_device()
    backbone = load("micro", **({"device": device} if device else {}))
    if roles is not None:
        backbone.load_roles(roles)
    return backbone


def judge_sample(bench, count: int) -> list[dict]:
    from asg_kit.micro import benchmarks

    metadata = benchmarks.geneval_prompts(bench.per_category, bench.seed)
    count = min(count, len(metadata))
    return [metadata[i * len(metadata) // count] for i in range(count)]


def judge_check(backbone, args, bench, use_cycle: bool, role: str | None) -> dict:
    return diag.judge_detector_agreement(backbone, judge_sample(bench, args.judge_prompts), guidance_scale=args.guidance,
                                         seed=bench.seed, use_cycle=use_cycle, generator_role=role)  # fmt: skip


def read_cached(path: Path, settings: dict) -> dict | None:
    import json

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error}); remove it to measure again") from None
    if not isinstance(data, dict) or data.get("settings") != settings:
        raise UserError(f"{path} was made with other settings ({_differences((data.get('settings') or {}) if isinstance(data, dict) else {}, settings)}); pass another --out, or the same settings again")
    return data


def _differences(saved: dict, asked: dict) -> str:
    return ", ".join(f"{k}={saved.get(k)!r} (asked {asked.get(k)!r})" for k in sorted(set(saved) | set(asked)) if saved.get(k) != asked.get(k))


def base_evaluation(args, bench, out: Path) -> dict:
    path = out / "base.json"
    settings = {"eval": diag.bench_settings(bench), "judge_prompts": args.judge_prompts, "guidance": args.guidance}
    base = read_cached(path, settings) or {"settings": settings}
    if "point" not in base:
        base["point"] = {"step": 0, **diag.evaluate_shapes(load_backbone(None), bench, None, None)}
        write_json_atomic(path, base)
    say(f"base  step 0  {progress(base['point'])}")
    if args.judge_prompts and "judge" not in base:
        base["judge"] = judge_check(load_backbone(None), args, bench, True, None)
        write_json_atomic(path, base)
    return base


def progress(point: dict) -> str:
    return f"shapes-VQA {100 * point['vqa']['accuracy']:.1f} (±{100 * point['vqa']['se']:.1f})  shapes-GenEval {100 * point['geneval']['overall']:.1f} (±{100 * point['geneval']['se']:.1f})"


def run_settings(args, bench, variant: str, seed: int, config) -> dict:
    """What decides a run's results (recorded in its study.json, compared on every call)."""
    return {"variant": variant, "seed": seed, "marks": marks_of(args.steps, args.evals), "eval": diag.bench_settings(bench), "judge_prompts": args.judge_prompts,
            **{k: getattr(config, k) for k in ("steps", "lr", "guidance_scale", "solver_max_new_tokens", "proposer_max_new_tokens", "spec_max_new_tokens")},
            "pool": args.pool, "pool_seed": POOL_SEED}  # fmt: skip


def run_one(args, bench, out: Path, pool: Path, variant: str, seed: int) -> dict:
    """Train and measure one (variant, seed) run up to where it is finished; return its study."""
    from asg_kit.train.loop import checkpoint_step, train

    marks = marks_of(args.steps, args.evals)
    folder = out / f"{variant}-s{seed}"
    config = train_config(args, variant, seed, folder, pool, marks)
    settings = run_settings(args, bench, variant, seed, config)
    path = folder / "study.json"
    study = read_cached(path, settings) or {"settings": settings, "points": [], "missed": []}
    name = folder.name
    if all(any(p["step"] == m for p in study["points"]) or m in study["missed"] for m in marks) and ("judge" in study or not args.judge_prompts):
        say(f"{name}  finished, kept from {path}")
        return study
    for mark in marks:
        if any(p["step"] == mark for p in study["points"]) or mark in study["missed"]:
            continue
        at = checkpoint_step(folder)
        if at > mark:  # a kill lost this mark's results after training went past it: it cannot be measured any more
            say(f"{name}  step {mark}  not measured (its checkpoint is at step {at} already)")
            study["missed"].append(mark)
            write_json_atomic(path, study)
            continue
        began = time.time()
        if at < mark:
            say(f"{name}  training steps {at}..{mark - 1}" + (" (resumed from its checkpoint)" if at else ""))
            train(config, resume=(folder / "config.json").is_file(), stop_after=mark - at)
            if checkpoint_step(folder) != mark:
                raise RuntimeError(f"{folder}: training to step {mark} left its checkpoint at step {checkpoint_step(folder)}")
        trained = time.time()
        point = {"step": mark, **diag.evaluate_shapes(load_backbone(folder / "checkpoint" / "roles"), bench)}
        point["seconds"] = {"training": trained - began, "evaluation": time.time() - trained}  # training: this call's steps only
        study["points"] = sorted([*study["points"], point], key=lambda p: p["step"])
        write_json_atomic(path, study)
        say(f"{name}  step {mark}  {progress(point)}  ({trained - began:.0f} s training, {time.time() - trained:.0f} s evaluation)")
    if args.judge_prompts and "judge" not in study:
        if checkpoint_step(folder) != marks[-1]:
            raise RuntimeError(f"{folder}: the judge check needs the checkpoint at step {marks[-1]}, it is at step {checkpoint_step(folder)}")
        backbone = load_backbone(folder / "checkpoint" / "roles")
        study["judge"] = judge_check(backbone, args, bench, VARIANTS[variant][1].get("use_cycle", True), "generator")
        write_json_atomic(path, study)
        say(f"{name}  judge vs detector: pairwise agreement {_fmt(study['judge']['pairwise_agreement'])}")
    return study


# ---- report ------------------------------------------------------------------------------------


def end_point(study: dict) -> dict | None:
    end = study["settings"]["marks"][-1]
    return next((p for p in study["points"] if p["step"] == end), None)


def summarize_variant(studies: list[dict], base_point: dict) -> dict:
    """End scores and deltas vs the base with 95% intervals: t over seeds, or with one seed
    the per-item (paired, for the delta) standard error."""
    ends = [(s["settings"]["seed"], end_point(s)) for s in studies]
    ends = [(seed, p) for seed, p in ends if p is not None]
    row: dict = {"seeds": [seed for seed, _ in ends], "n": len(ends)}
    for key, metric, _ in BENCHES:
        values = [p[key][metric] for _, p in ends]
        deltas = [v - base_point[key][metric] for v in values]
        if len(ends) >= 2:
            end, delta = diag.mean_ci(values), diag.mean_ci(deltas)
        elif len(ends) == 1:
            point = ends[0][1]
            if key == "vqa":
                paired = diag.paired_se(point[key]["correct"], base_point[key]["correct"])
            else:
                paired = diag.paired_category_means_se(point[key]["correct"], base_point[key]["correct"], point[key]["tags"])
            end = diag.normal_interval(values[0], point[key]["se"])
            delta = diag.normal_interval(deltas[0], paired, "paired per-item SE")
        else:
            continue
        row[key] = {"end": vars(end), "delta": vars(delta), "per_seed": values,
                    "goal_met": delta.mean >= GOAL[key] and delta.excludes_zero(), "goal": GOAL[key]}  # fmt: skip
    return row


def diagnose(args, out: Path, base: dict, studies: dict[str, list[dict]]) -> dict:
    from asg_kit.micro.pool import pool_scenes

    scenes = pool_scenes(args.pool, POOL_SEED)
    result: dict = {"base_judge": base.get("judge"), "bin": args.bin, "variants": {}}
    first_questions: dict[str, tuple[list, list]] = {}
    for variant, runs in studies.items():
        entries, chosen, same_kind = [], [], []
        for study in runs:
            seed = study["settings"]["seed"]
            folder = out / f"{variant}-s{seed}"
            rows = [row for _, row in read_jsonl(folder / "metrics.jsonl")] if (folder / "metrics.jsonl").is_file() else []
            judge = study.get("judge")
            entries.append({"seed": seed, "steps": len(rows), "solver_majority": diag.solver_majority_truth(rows, scenes, args.bin),
                            "skips": diag.skip_counts(rows), "judge": {k: v for k, v in judge.items() if k != "per_prompt"} if judge else None})  # fmt: skip
            picked, beside = diag.proposer_question_items(rows, scenes, args.bin, seed=seed)
            chosen += picked
            same_kind += beside
        result["variants"][variant] = entries
        first_questions[variant] = chosen, same_kind
    result["selection"] = selection_effect(args, first_questions)
    return result


def selection_effect(args, first_questions: dict[str, tuple[list, list]]) -> dict:
    """The base model answering, greedily, the questions each variant's Proposer asked in
    its first bin of steps and, beside each, a random question of the same kind about the
    same image (``diag.proposer_question_items``, pooled over the variant's seeds)."""
    from asg_kit.micro import benchmarks

    found, backbone = {}, None
    for variant, (chosen, same_kind) in first_questions.items():
        if chosen:
            backbone = backbone or load_backbone(None)
            asked, drawn = benchmarks.run_vqa(backbone, chosen), benchmarks.run_vqa(backbone, same_kind)
            found[variant] = {"steps": [0, args.bin - 1], "n": len(chosen), "chosen": asked.accuracy, "same_kind": drawn.accuracy,
                              "chosen_per_kind": asked.per_kind, "same_kind_per_kind": drawn.per_kind,
                              "kinds": dict(Counter(item.kind for item in chosen))}  # fmt: skip
    return found


def _fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    return "n/a" if value is None else f"{scale * value:.{digits}f}"


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _interval(entry: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{100 * entry['mean']:{sign}.1f}"
    if entry["low"] is None:
        return text + " (n=1, no interval)"
    return text + f" [{100 * entry['low']:{sign}.1f}, {100 * entry['high']:{sign}.1f}]" + (" (n=1, per-item SE)" if entry["n"] == 1 else "")


def write_report(args, out: Path, base: dict, studies: dict[str, list[dict]]) -> dict:
    rows = {variant: summarize_variant(runs, base["point"]) for variant, runs in studies.items()}
    diagnosis = diagnose(args, out, base, studies)
    bp = base["point"]
    results = {
        "settings": {"steps": args.steps, "lr": args.lr, "guidance": args.guidance, "pool": args.pool, "marks": marks_of(args.steps, args.evals),
                     "eval": base["settings"]["eval"]},
        "goal": {"vqa_delta": GOAL["vqa"], "geneval_delta": GOAL["geneval"], "rule": "mean delta at least the goal and its 95% CI excluding zero"},
        "base": {"vqa": bp["vqa"]["accuracy"], "vqa_se": bp["vqa"]["se"], "vqa_per_kind": bp["vqa"]["per_kind"],
                 "geneval": bp["geneval"]["overall"], "geneval_se": bp["geneval"]["se"], "geneval_per_category": bp["geneval"]["categories"]},
        "variants": rows,
        "diagnosis": diagnosis,
        "curves": {variant: [{"seed": s["settings"]["seed"], "points": [{"step": 0, "vqa": bp["vqa"]["accuracy"], "geneval": bp["geneval"]["overall"]}]
                              + [{"step": p["step"], "vqa": p["vqa"]["accuracy"], "vqa_per_kind": p["vqa"]["per_kind"], "vqa_se": p["vqa"]["se"],
                                  "geneval": p["geneval"]["overall"], "geneval_per_category": p["geneval"]["categories"], "geneval_se": p["geneval"]["se"]}
                                 for p in s["points"]]} for s in runs] for variant, runs in studies.items()},
    }  # fmt: skip
    write_json_atomic(out / "results.json", results)
    lines = [
        f"Evaluation: `asgkit bench` shapes defaults ({base['settings']['eval']}); {args.steps} steps, lr {args.lr}, pool {args.pool}.",
        "Points; 95% CI: t over seeds, or with n=1 the per-item standard error (paired for the delta). Over seeds, the delta's interval"
        " holds the base fixed (one measurement on the same items), so it shows training variance, not item sampling.",
        "",
        "| variant | n | shapes-VQA end | Δ VQA | shapes-GenEval end | Δ GenEval | goal met (VQA / GenEval) |",
        "|---|---|---|---|---|---|---|",
        f"| base micro model | | {100 * bp['vqa']['accuracy']:.1f} ± {100 * bp['vqa']['se']:.1f} (SE, {bp['vqa']['n']} questions) | | "
        f"{100 * bp['geneval']['overall']:.1f} ± {100 * bp['geneval']['se']:.1f} (SE, {bp['geneval']['n']} images) | | |",
    ]  # fmt: skip
    for variant, row in rows.items():
        if "vqa" not in row:
            lines.append(f"| {VARIANTS[variant][0]} | 0 | not finished | | | | |")
            continue
        v, g = row["vqa"], row["geneval"]
        lines.append(f"| {VARIANTS[variant][0]} | {row['n']} | {_interval(v['end'])} | {_interval(v['delta'], True)} | {_interval(g['end'])} | "
                     f"{_interval(g['delta'], True)} | {'yes' if v['goal_met'] else 'no'} / {'yes' if g['goal_met'] else 'no'} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "diagnosis.md").write_text(diagnosis_markdown(rows, diagnosis), encoding="utf-8")
    plot(results, studies, out, out / "curves.png")
    say("\n".join(lines))
    return results


def diagnosis_markdown(rows: dict, diagnosis: dict) -> str:
    met = [VARIANTS[v][0] for v, r in rows.items() if r.get("vqa", {}).get("goal_met") and r.get("geneval", {}).get("goal_met")]
    lines = ["# Diagnosis", "", f"Goal (+{100 * GOAL['vqa']:.0f} points shapes-VQA, +{100 * GOAL['geneval']:.0f} points shapes-GenEval, 95% CIs excluding zero): "
             + (f"met by {', '.join(met)}." if met else "met by no variant."), ""]  # fmt: skip
    lines += ["## In numbers", ""] + diagnosis_summary(diagnosis) + [""]
    lines += ["## Is the Solver's majority answer right? (what the Solver reward pays)", "",
              "Questions the Proposer asked that parse as one of the world's question templates, answered from the pool's ground truth.", "",
              "| variant | seed | steps | questions | parsable | majority right | greedy right | majority right per bin |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant, entries in diagnosis["variants"].items():
        for e in entries:
            o = e["solver_majority"]["overall"]
            per_bin = " ".join(f"{b['steps'][0]}:{_fmt(b['majority_right_rate'], 100, 0)}" for b in e["solver_majority"]["bins"])
            lines.append(f"| {VARIANTS[variant][0]} | {e['seed']} | {e['steps']} | {o['questions']} | {_percent(o['parsable_share'])} | "
                         f"{_percent(o['majority_right_rate'])} | {_percent(o['greedy_right_rate'])} | {per_bin} |")  # fmt: skip
    lines += ["", "Per difficulty bucket and where the Solver updated (its reward paid), majorities right / parsable questions, pooled over seeds:", "",
              "| variant | easy | medium | hard | where the Solver updated |", "|---|---|---|---|---|"]  # fmt: skip
    for variant, entries in diagnosis["variants"].items():
        pooled = Counter()
        for e in entries:
            o = e["solver_majority"]["overall"]
            for bucket, n in o.get("buckets", {}).items():
                pooled.update({f"{bucket}:right": n["majority_right"], f"{bucket}:n": n["parsable"]})
            pooled.update({"updated:right": o.get("updated", {}).get("majority_right", 0), "updated:n": o.get("updated", {}).get("parsable", 0)})
        cells = [_rate([pooled[f"{key}:right"], pooled[f"{key}:n"]]) for key in ("easy", "medium", "hard", "updated")]
        lines.append(f"| {VARIANTS[variant][0]} | " + " | ".join(cells) + " |")
    selection = diagnosis.get("selection") or {}
    if selection:
        lines += ["", "## Does the Proposer pick questions the Solver gets wrong? (selection)", "",
                  "The base model's greedy answers (canonical framing) to the questions each variant's Proposer asked in its first bin of steps,"
                  " and to a random question of the same kind about the same image (the world's templates), pooled over seeds.", "",
                  "| variant | steps | questions | right: the Proposer's | right: random, same kind | per kind (Proposer's / random) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for variant, sel in selection.items():
            per_kind = ", ".join(f"{kind} {sel['kinds'][kind]}: {_percent(sel['chosen_per_kind'].get(kind))} / {_percent(sel['same_kind_per_kind'].get(kind))}"
                                 for kind in QUESTION_KINDS if sel["kinds"].get(kind))  # fmt: skip
            lines.append(f"| {VARIANTS[variant][0]} | {sel['steps'][0]}-{sel['steps'][1]} | {sel['n']} | {_percent(sel['chosen'])} | {_percent(sel['same_kind'])} | {per_kind} |")
    lines += ["", "## Which questions did the Proposer ask? (parsable ones, pooled over seeds)", "",
              "Per bin of steps: questions of each kind asked, and in brackets how many of their majorities were right.", "",
              "| variant | steps | " + " | ".join(QUESTION_KINDS) + " |", "|---|---|" + "---|" * len(QUESTION_KINDS)]  # fmt: skip
    for variant, entries in diagnosis["variants"].items():
        pooled: dict[int, Counter] = {}
        for e in entries:
            for b in e["solver_majority"]["bins"]:
                for kind, n in b.get("kinds", {}).items():
                    pooled.setdefault(b["steps"][0], Counter()).update({f"asked:{kind}": n["asked"], f"right:{kind}": n["majority_right"]})
        for start in sorted(pooled):
            cells = [f"{pooled[start][f'asked:{k}']} ({pooled[start][f'right:{k}']})" for k in QUESTION_KINDS]
            lines.append(f"| {VARIANTS[variant][0]} | {start}-{start + diagnosis['bin'] - 1} | " + " | ".join(cells) + " |")
    lines += ["", "## Does the judge rank candidates as the detector does? (what the Generator reward pays)", "",
              "Over candidate pairs of a prompt that the detector separates (one right, one wrong): the share the judge orders the same way (ties half).", "",
              "| model | prompts | separated pairs | agreement | judge ties | judge's top right | mean candidate right |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    judged = [("base micro model", diagnosis.get("base_judge"))] + [(f"{VARIANTS[v][0]} s{e['seed']}", e["judge"]) for v, es in diagnosis["variants"].items() for e in es]
    for label, j in judged:
        if j:
            lines.append(f"| {label} | {j['prompts']} | {j['separated_pairs']} | {_percent(j['pairwise_agreement'])} | {j['judge_ties']} | "
                         f"{_percent(j['top_candidate_right'])} | {_percent(j['mean_candidate_right'])} |")  # fmt: skip
    lines += ["", "## What the gates skipped", "", "| variant | seed | solver | proposer | generator | buckets |", "|---|---|---|---|---|---|"]
    for variant, entries in diagnosis["variants"].items():
        for e in entries:
            s = e["skips"]
            cell = lambda counts: ", ".join(f"{k}: {n}" for k, n in counts.items()) or "-"  # noqa: E731
            lines.append(f"| {VARIANTS[variant][0]} | {e['seed']} | {cell(s['solver'])} | {cell(s['proposer'])} | {cell(s['generator'])} | {cell(s['bucket'])} |")
    return "\n".join(lines) + "\n"


def diagnosis_summary(diagnosis: dict) -> list[str]:
    """One line per measurement and variant, pooled over its seeds: numbers, no verdicts."""
    lines = []
    for variant, entries in diagnosis["variants"].items():
        label = VARIANTS[variant][0]
        bins: dict[int, list[int]] = {}
        for e in entries:
            for b in e["solver_majority"]["bins"]:
                pooled = bins.setdefault(b["steps"][0], [0, 0])
                pooled[0] += b["majority_right"]
                pooled[1] += b["parsable"]
        asked = sum(e["solver_majority"]["overall"]["questions"] for e in entries)
        parsable = sum(pooled[1] for pooled in bins.values())
        right = sum(pooled[0] for pooled in bins.values())
        if parsable:
            first, last = bins[min(bins)], bins[max(bins)]
            lines.append(f"- {label}: the Solver's majority answer was right on {100 * right / parsable:.0f}% of {parsable} parsable questions "
                         f"({100 * parsable / asked:.0f}% of {asked} asked); {_rate(first)} in the first bin, {_rate(last)} in the last.")  # fmt: skip
        updated = [sum(e["solver_majority"]["overall"].get("updated", {}).get(k, 0) for e in entries) for k in ("majority_right", "parsable")]
        if updated[1]:
            lines.append(f"- {label}: where the Solver updated, its majority was right on {_rate(updated)} parsable questions.")
        selection = (diagnosis.get("selection") or {}).get(variant)
        if selection:
            lines.append(f"- {label}: the base model answers {100 * selection['chosen']:.0f}% of the {selection['n']} questions the Proposer asked in steps "
                         f"{selection['steps'][0]}-{selection['steps'][1]} right, and {100 * selection['same_kind']:.0f}% of random questions of the same kinds about the same images.")  # fmt: skip
        generator = Counter()
        for e in entries:
            generator.update(e["skips"]["generator"])
        if generator:
            total = sum(generator.values())
            skipped = [(reason, n) for reason, n in generator.most_common() if reason != "updated"]
            lines.append(f"- {label}: the Generator updated on {generator.get('updated', 0)} of {total} generation steps"
                         + (f"; most skipped: {skipped[0][0]} ({skipped[0][1]})." if skipped else "."))  # fmt: skip
        judged = [e["judge"] for e in entries if e.get("judge")]
        pairs = sum(j["separated_pairs"] for j in judged)
        if pairs:
            agreement = sum(j["judge_agrees"] + 0.5 * j["judge_ties"] for j in judged) / pairs
            top = sum(j["top_candidate_right"] * j["prompts"] for j in judged) / sum(j["prompts"] for j in judged)
            mean = sum(j["mean_candidate_right"] * j["prompts"] for j in judged) / sum(j["prompts"] for j in judged)
            lines.append(f"- {label} (end): the judge ordered {100 * agreement:.0f}% (SE {100 * math.sqrt(agreement * (1 - agreement) / pairs):.0f}) of {pairs} detector-separated candidate pairs as the detector does "
                         f"(50% is chance); its top candidate was right {100 * top:.0f}% of the time, the mean candidate {100 * mean:.0f}%.")  # fmt: skip
    base = diagnosis.get("base_judge")
    if base and base["separated_pairs"]:
        lines.append(f"- base micro model: judge-detector agreement {_percent(base['pairwise_agreement'])} of {base['separated_pairs']} pairs; "
                     f"top candidate right {_percent(base['top_candidate_right'])}, mean candidate {_percent(base['mean_candidate_right'])}.")  # fmt: skip
    return lines or ["- no finished run to measure"]


def _rate(pooled: list[int]) -> str:
    return f"{100 * pooled[0] / pooled[1]:.0f}% of {pooled[1]}" if pooled[1] else "none parsable"


def plot(results: dict, studies: dict[str, list[dict]], out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    base = results["base"]
    for index, (variant, curves) in enumerate(results["curves"].items()):
        color = f"C{index}"
        label = VARIANTS[variant][0]
        for axis, key in zip(axes, ("vqa", "geneval")):
            steps = sorted({p["step"] for c in curves for p in c["points"]})
            by_step = [[p[key] for c in curves for p in c["points"] if p["step"] == step] for step in steps]
            if len(curves) >= 2:
                intervals = [diag.mean_ci(v) for v in by_step]
                axis.plot(steps, [100 * i.mean for i in intervals], marker="o", color=color, label=f"{label} (mean of {len(curves)} seeds, 95% CI)")
                band = [(s, i) for s, i in zip(steps, intervals) if i.low is not None]
                if band:
                    axis.fill_between([s for s, _ in band], [100 * i.low for _, i in band], [100 * i.high for _, i in band], color=color, alpha=0.2)
            else:
                axis.plot(steps, [100 * sum(v) / len(v) for v in by_step], marker="o", color=color, label=label)
        pooled: list[tuple[int, float]] = []
        for study in studies[variant]:
            folder = out / f"{variant}-s{study['settings']['seed']}"
            if (folder / "metrics.jsonl").is_file():
                pooled += diag.mean_generation_rewards([row for _, row in read_jsonl(folder / "metrics.jsonl")])
        if pooled:
            axes[2].plot(*zip(*pooled), ".", color=color, alpha=0.25, markersize=3)
            width = max(1, results["settings"]["steps"] // 12)
            bins: dict[int, list[float]] = {}
            for step, reward in pooled:
                bins.setdefault(step // width, []).append(reward)
            axes[2].plot([(b + 0.5) * width for b in sorted(bins)], [sum(bins[b]) / len(bins[b]) for b in sorted(bins)], color=color,
                         label=f"{label} (per {width} steps, all seeds)")  # fmt: skip
    axes[0].axhline(100 * base["vqa"], color="gray", linestyle="--", label="base")
    axes[1].axhline(100 * base["geneval"], color="gray", linestyle="--", label="base")
    for axis, title in zip(axes, ("shapes-VQA accuracy (points)", "shapes-GenEval overall (points)", "mean R_G of the Generator's candidates")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict:
    from asg_kit.micro.pool import write_pool

    args = parse_args(argv)
    bench = bench_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = out / "pool"
    write_pool(args.pool, pool, seed=POOL_SEED)  # keeps the files already there when they are this pool's
    base = base_evaluation(args, bench, out)
    began = time.time()
    studies: dict[str, list[dict]] = {}
    for variant in args.variants:
        seeds = range(args.seeds if variant == "full" else args.ablation_seeds)
        runs = {seed: run_one(args, bench, out, pool, variant, seed) for seed in seeds if args.only_seeds is None or seed in args.only_seeds}
        # seeds left to other calls (--only-seeds) count once they have finished
        others = {seed: study for seed, study in finished_runs(args, bench, out, variant).items() if seed in seeds and seed not in runs}
        if others:
            say(f"{variant}: finished run(s) of seed(s) {', '.join(map(str, others))} found in {out}, added to the report")
        runs.update(others)
        if runs:
            studies[variant] = [runs[seed] for seed in sorted(runs)]
    for variant in VARIANTS:  # runs of other variants made earlier in this folder with these settings join the report
        if variant not in studies:
            found = finished_runs(args, bench, out, variant)
            if found:
                say(f"{variant}: {len(found)} finished run(s) found in {out}, added to the report")
                studies[variant] = [found[seed] for seed in sorted(found)]
    studies = {variant: studies[variant] for variant in VARIANTS if variant in studies}
    results = write_report(args, out, base, studies)
    say(f"study took {time.time() - began:.0f} s in this call")
    return results


def finished_runs(args, bench, out: Path, variant: str) -> dict[int, dict]:
    """The finished runs of ``variant`` in ``out`` made with this call's settings, by seed."""
    marks = marks_of(args.steps, args.evals)
    found = {}
    for path in sorted(out.glob(f"{variant}-s*/study.json")):
        try:
            seed = int(path.parent.name.rsplit("-s", 1)[1])
            study = read_cached(path, run_settings(args, bench, variant, seed, train_config(args, variant, seed, path.parent, out / "pool", marks)))
        except (ValueError, UserError):
            continue
        if study is not None and end_point(study) is not None:
            found[seed] = study
    return found


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
