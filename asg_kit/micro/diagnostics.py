"""Measuring a training study of the micro model: statistics over seeds and items, the
shapes benchmarks with per-item outcomes, and diagnoses from a run's own metrics.

- Statistics (pure): ``t_critical``, ``mean_ci`` (over seeds, t-distribution),
  ``binomial_se`` (a share over items), ``category_means_se`` (GenEval's overall: the mean
  of category means), ``paired_se`` / ``paired_category_means_se`` (a difference of two
  models measured on the same items). Variances are the plug-in ones (p(1-p)/n for a
  share), items are taken as independent.
- ``evaluate_shapes``: shapes-VQA and shapes-GenEval as ``asgkit bench`` runs them (its
  ``BenchConfig`` gives questions, prompts, images, guidance and seed), keeping each item's
  outcome so that a standard error can be computed.
- Diagnoses: ``solver_majority_truth`` (is the Solver's majority answer, the signal its
  reward pays, right? answered from the pool's ground truth, which the trainer never
  sees; also per bucket and where the Solver updated), ``proposer_question_items`` (the
  Proposer's questions beside random ones of the same kinds about the same images: does
  its screening pick questions the Solver gets wrong?), ``judge_detector_agreement`` (does the judge rank a prompt's candidates as the
  detector does?) and ``skip_counts`` (what the gates skip).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# Two-sided 95% critical values of Student's t, df 1..30.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
Z_975 = 1.959964


def t_critical(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom
    (a table to 30; beyond, the normal value with its first Cornish-Fisher correction)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    return Z_975 + (Z_975**3 + Z_975) / (4 * df)


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None: no interval (one value and no standard error)
    high: float | None
    n: int
    method: str  # how the interval was made, in words

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def mean_ci(values: Sequence[float]) -> Interval:
    """Mean and 95% confidence interval over independent values (e.g. one per seed):
    mean +- t(n-1) * s / sqrt(n), s the sample standard deviation. One value: no interval."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, None, 1, "one value: no interval over seeds")
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n - 1) * s / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, f"t over {n} seeds")


def normal_interval(value: float, se: float, what: str = "per-item SE") -> Interval:
    """value +- 1.96 se (one measurement with a standard error over its items)."""
    return Interval(value, value - Z_975 * se, value + Z_975 * se, 1, f"{what}, n=1")


def _plugin_variance(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / len(values)


def binomial_se(outcomes: Sequence[bool | int]) -> float:
    """Standard error of a share over items: sqrt(p (1 - p) / n)."""
    if not outcomes:
        raise ValueError("binomial_se needs at least one outcome")
    p = sum(map(float, outcomes)) / len(outcomes)
    return math.sqrt(p * (1 - p) / len(outcomes))


def paired_se(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of mean(a) - mean(b) for two models measured on the same items:
    sqrt(var(a_i - b_i) / n)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_se needs two equally long, non-empty lists (got {len(a)} and {len(b)})")
    return math.sqrt(_plugin_variance([float(x) - float(y) for x, y in zip(a, b)]) / len(a))


def category_means_se(outcomes: Sequence[float], categories: Sequence[str]) -> float:
    """Standard error of the mean of per-category means (GenEval's overall):
    sqrt(sum_c var_c / n_c) / C, var_c the variance of the outcomes within category c."""
    if len(outcomes) != len(categories) or not outcomes:
        raise ValueError("category_means_se needs one category per outcome, and at least one")
    by: dict[str, list[float]] = {}
    for value, category in zip(outcomes, categories):
        by.setdefault(category, []).append(float(value))
    return math.sqrt(sum(_plugin_variance(v) / len(v) for v in by.values())) / len(by)


def paired_category_means_se(a: Sequence[float], b: Sequence[float], categories: Sequence[str]) -> float:
    """Standard error of the difference of two means of category means on the same items."""
    if len(a) != len(b):
        raise ValueError(f"paired_category_means_se needs equally long lists (got {len(a)} and {len(b)})")
    return category_means_se([float(x) - float(y) for x, y in zip(a, b)], categories)


# ---- the shapes benchmarks with per-item outcomes -------------------------------------------


def evaluate_shapes(backbone, bench=None, solver_role: str | None = "solver", generator_role: str | None = "generator") -> dict:
    """shapes-VQA and shapes-GenEval as ``asgkit bench`` runs them with ``bench`` (a
    ``BenchConfig``; default: its defaults), with per-kind / per-category scores, each
    item's outcome and the standard errors. Roles None: the base model."""
    from asg_kit.bench.run import BenchConfig
    from asg_kit.micro import benchmarks

    bench = bench or BenchConfig()
    vqa = benchmarks.run_vqa(backbone, benchmarks.vqa_items(bench.per_kind, bench.seed), role=solver_role)
    metadata = benchmarks.geneval_prompts(bench.per_category, bench.seed)
    gen = benchmarks.run_geneval(backbone, metadata, bench.shapes_images, bench.guidance, temperature=bench.image_temperature, seed=bench.seed, role=generator_role)  # fmt: skip
    vqa_correct = [int(r["correct"]) for r in vqa.rows]
    gen_correct = [int(r["correct"]) for r in gen.rows]
    return {
        "vqa": {"accuracy": vqa.accuracy, "per_kind": vqa.per_kind, "n": len(vqa_correct), "se": binomial_se(vqa_correct),
                "correct": vqa_correct, "kinds": [r["kind"] for r in vqa.rows]},
        "geneval": {"overall": gen.overall, "categories": gen.categories, "n": len(gen_correct),
                    "se": category_means_se(gen_correct, [r["tag"] for r in gen.rows]), "correct": gen_correct, "tags": [r["tag"] for r in gen.rows]},
    }  # fmt: skip


def bench_settings(bench) -> dict:
    """The settings of ``evaluate_shapes`` that decide its items (for caching results)."""
    return {"per_kind": bench.per_kind, "per_category": bench.per_category, "images": bench.shapes_images,
            "guidance": bench.guidance, "temperature": bench.image_temperature, "seed": bench.seed}  # fmt: skip


# ---- diagnoses ---------------------------------------------------------------------------------


def question_key(text: str) -> str:
    """A question's text for matching templates: lowercase words, punctuation and spacing dropped."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def solver_majority_truth(rows: Sequence[dict], scenes: Sequence, bin_size: int = 100) -> dict:
    """How often the Solver's majority answer was right, from a run's metrics rows and the
    scenes of its pool (``pool.pool_scenes``; image ``i`` is ``{i:06d}.png``). A question
    counts where its text is one of the world's question templates for that scene
    (``world.scene_questions``). Per bin of ``bin_size`` steps and overall: understanding
    steps, parsable questions, majority right, and per question kind of the world (colour,
    shape, count, exist, position, yesno) how many were asked and how many majorities were
    right; per difficulty bucket, and over the steps where the Solver updated (no
    ``solver_skip``), how many were parsable and how many majorities right."""
    from asg_kit.rewards import normalize_answer, vote_stats

    bins: dict[int, Counter] = {}
    for row in rows:
        if row.get("kind") != "understanding" or not row.get("question") or not row.get("answers"):
            continue
        counts = bins.setdefault(row["step"] // bin_size, Counter())
        counts["questions"] += 1
        found = _template_question(row, scenes)
        if found is None:
            continue
        qa = found[1]
        right = normalize_answer(vote_stats(row["answers"]).majority) == normalize_answer(qa.answer)
        counts["parsable"] += 1
        counts["majority_right"] += right
        counts["greedy_right"] += normalize_answer(row["answers"][0]) == normalize_answer(qa.answer)
        counts[f"asked:{qa.kind}"] += 1
        counts[f"right:{qa.kind}"] += right
        if row.get("bucket"):
            counts[f"bucket:{row['bucket']}"] += 1
            counts[f"bucket_right:{row['bucket']}"] += right
        if "solver_skip" in row and row["solver_skip"] is None:
            counts["updated"] += 1
            counts["updated_right"] += right

    def summary(counts: Counter) -> dict:
        return {"questions": counts["questions"], "parsable": counts["parsable"], "majority_right": counts["majority_right"],
                "parsable_share": counts["parsable"] / counts["questions"] if counts["questions"] else None,
                "majority_right_rate": counts["majority_right"] / counts["parsable"] if counts["parsable"] else None,
                "greedy_right_rate": counts["greedy_right"] / counts["parsable"] if counts["parsable"] else None,
                "kinds": {key.split(":", 1)[1]: {"asked": n, "majority_right": counts[f"right:{key.split(':', 1)[1]}"]}
                          for key, n in sorted(counts.items()) if key.startswith("asked:")},
                "buckets": {key.split(":", 1)[1]: {"parsable": n, "majority_right": counts[f"bucket_right:{key.split(':', 1)[1]}"]}
                            for key, n in sorted(counts.items()) if key.startswith("bucket:")},
                "updated": {"parsable": counts["updated"], "majority_right": counts["updated_right"]}}  # fmt: skip

    total = sum(bins.values(), Counter())
    return {"bin_size": bin_size, "bins": [{"steps": [b * bin_size, (b + 1) * bin_size - 1], **summary(bins[b])} for b in sorted(bins)], "overall": summary(total)}


def _template_question(row: dict, scenes: Sequence):
    """The pool scene a metrics row asked about and the world's question (with its true
    answer) that it asked, or None where the image is not a pool index or the text is no
    template."""
    from asg_kit.micro import world

    try:
        scene = scenes[int(Path(row["image"]).stem)]
    except (ValueError, IndexError, KeyError, TypeError):
        return None
    qa = {question_key(qa.question): qa for qa in world.scene_questions(scene)}.get(question_key(row["question"]))
    return None if qa is None else (scene, qa)


def proposer_question_items(rows: Sequence[dict], scenes: Sequence, before_step: int, seed: int = 0) -> tuple[list, list]:
    """The Proposer's parsable questions of a run's understanding steps before
    ``before_step`` as shapes-VQA items, and beside each one a question of the same kind
    about the same image drawn at random from the world's templates. A model answering both
    lists (``benchmarks.run_vqa``) shows whether the Proposer's screening picks the
    questions the Solver gets wrong: the majority vote the Solver reward pays is then a
    weaker label there than the benchmark's accuracy suggests."""
    import random

    from asg_kit.micro import world
    from asg_kit.micro.benchmarks import VQAItem

    rng = random.Random(f"same-kind-{seed}")
    chosen, same_kind = [], []
    for row in rows:
        if row.get("kind") != "understanding" or not row.get("question") or row.get("step", 0) >= before_step:
            continue
        found = _template_question(row, scenes)
        if found is None:
            continue
        scene, qa = found
        other = rng.choice([q for q in world.scene_questions(scene) if q.kind == qa.kind])
        chosen.append(VQAItem(scene, qa.question, qa.answer, qa.kind))
        same_kind.append(VQAItem(scene, other.question, other.answer, other.kind))
    return chosen, same_kind


def skip_counts(rows: Sequence[dict]) -> dict:
    """What the gates did, from a run's metrics rows: per role, how many steps updated
    (``"updated"``) or were skipped and why; the understanding steps' difficulty buckets."""
    out: dict[str, Counter] = {"solver": Counter(), "proposer": Counter(), "generator": Counter(), "bucket": Counter()}
    for row in rows:
        for role in ("solver", "proposer", "generator"):
            if f"{role}_skip" in row:
                out[role][row[f"{role}_skip"] or "updated"] += 1
        if row.get("bucket"):
            out["bucket"][row["bucket"]] += 1
    return {key: dict(counter.most_common()) for key, counter in out.items()}


def mean_generation_rewards(rows: Sequence[dict]) -> list[tuple[int, float]]:
    """(step, mean R_G of the Generator's candidates) for each step that drew candidates."""
    return [(r["step"], sum(r["generation_rewards"]) / len(r["generation_rewards"])) for r in rows if r.get("generation_rewards")]


def judge_detector_agreement(
    backbone,
    metadata: Sequence[dict],
    candidates: int = 3,
    guidance_scale: float = 5.0,
    seed: int = 0,
    spec_samples: int = 2,
    use_cycle: bool = True,
    generator_role: str | None = "generator",
) -> dict:
    """Does the judge rank a prompt's candidates as the detector does? For each shapes-GenEval
    prompt in ``metadata`` the Generator draws ``candidates`` images as the training loop
    does; the judge (``GenerationScorer`` with the loop's weights, spec from the prompt's
    metadata) gives each its R_G, the detector with GenEval's rules says right or wrong.
    Reports, over candidate pairs the detector separates (one right, one wrong), the share
    the judge orders the same way (ties count half, and are counted), and how often the
    judge's top candidate is right against the mean candidate."""
    from asg_kit.micro.benchmarks import judge_image
    from asg_kit.rewards.scorers import GenerationScorer
    from asg_kit.specs import spec_from_geneval

    scorer = GenerationScorer(backbone, samples=spec_samples, w_cyc=0.20 if use_cycle else 0.0, seed=seed)
    pairs = agree = ties = top_right = 0
    right_total = 0
    prompts = []
    for index, meta in enumerate(metadata):
        with backbone.role(generator_role):
            drawn = backbone.generate_images([meta["prompt"]], n=candidates, guidance_scale=guidance_scale, seed=seed + index * candidates)
        images = drawn.images[0]
        rewards = [s.reward for s in scorer.score(spec_from_geneval(meta), images)]
        right = [judge_image(meta, image)[0] for image in images]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                if right[i] == right[j]:
                    continue
                pairs += 1
                good, bad = (i, j) if right[i] else (j, i)
                if rewards[good] > rewards[bad]:
                    agree += 1
                elif rewards[good] == rewards[bad]:
                    ties += 1
        top = max(range(len(images)), key=lambda k: rewards[k])
        top_right += right[top]
        right_total += sum(right)
        prompts.append({"prompt": meta["prompt"], "tag": meta["tag"], "rewards": rewards, "detector_right": right})
    n = len(prompts)
    return {
        "prompts": n,
        "candidates": candidates,
        "separated_pairs": pairs,
        "judge_agrees": agree,
        "judge_ties": ties,
        "pairwise_agreement": (agree + 0.5 * ties) / pairs if pairs else None,
        "top_candidate_right": top_right / n if n else None,
        "mean_candidate_right": right_total / (n * candidates) if n else None,
        "per_prompt": prompts,
    }
