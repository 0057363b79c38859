"""Is the judge any good? ROC AUC of the micro model's own scores at telling images that
match their prompt from images with one controlled error.

For held-out shapes-GenEval prompts, a render of a scene that satisfies the prompt is the
positive; the negative is the same scene with one error: a wrong colour, a wrong count, the
two objects' positions swapped, or an object missing. Each image is scored alone (spec from
the prompt's GenEval metadata) with the combined generation reward R_G, with QA fidelity
alone (S_fid) and with cycle consistency alone (S_cyc). AUC 0.5 is chance, 1.0 perfect.
A second table says why: the Solver's greedy answers to the spec questions whose true
answer the error changes ("is the circle left of the square ?" on a swapped pair), right
on the correct image and right on the image with the error.

    python bench/judge_validity.py                    # the README's table
    python bench/judge_validity.py --pairs 10 --model runs/micro/model
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
from rich.console import Console
from rich.table import Table

from asg_kit.adapters.registry import load_backbone
from asg_kit.micro import benchmarks, world
from asg_kit.rewards.scorers import GenerationScorer
from asg_kit.specs import spec_from_geneval

def roc_auc(positives: list[float], negatives: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney)."""
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def error_pairs(rng: random.Random, per_error: int):
    """``per_error`` (error, prompt metadata, scene that matches the prompt, the same scene
    with the error) for each error type of ``world.ONE_ERRORS``."""
    for error, categories in world.ONE_ERRORS.items():
        made = 0
        while made < per_error:
            metadata = world.sample_prompt(rng, rng.choice(categories))
            scene = world.scene_for_prompt(metadata, rng)
            wrong = world.with_one_error(scene, metadata, error, rng)
            if wrong is not None:
                made += 1
                yield error, metadata, scene, wrong


def questions_the_error_changes(spec, scene: world.Scene, wrong: world.Scene) -> list[tuple[str, str, str]]:
    """(question, true answer on the correct scene, on the scene with the error) for each of
    the spec's questions that the world answers on both scenes and the error changes."""
    def truth(s: world.Scene) -> dict[str, str]:
        return {qa.question: qa.answer for qa in [*world.scene_questions(s), *world.presence_questions(s)]}

    good, bad = truth(scene), truth(wrong)
    return [(qa.question, good[qa.question], bad[qa.question]) for qa in spec.qa if qa.question in good and qa.question in bad and good[qa.question] != bad[qa.question]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40, help="correct/corrupted pairs per error type")
    parser.add_argument("--model", help="micro model folder (default: the shipped one)")
    parser.add_argument("--samples", type=int, default=2, help="Solver samples per question")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every score here")
    args = parser.parse_args()

    backbone = load_backbone("micro", model=args.model)
    scorer = GenerationScorer(backbone, samples=args.samples, seed=args.seed)
    rng = random.Random(f"judge-validity-{args.seed}")
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    asked: list[benchmarks.VQAItem] = []  # the questions each error changes, on both images
    for error, metadata, scene, wrong in error_pairs(rng, args.pairs):
        pairs = results.setdefault(error, {"R_G": [], "S_fid": [], "S_cyc": []})
        spec = spec_from_geneval(metadata)
        good, bad = (scorer.score(spec, [world.render(s)])[0] for s in (scene, wrong))
        pairs["R_G"].append((good.reward, bad.reward))
        pairs["S_fid"].append((good.fidelity.s_fid, bad.fidelity.s_fid))
        pairs["S_cyc"].append((good.cycle.s_cyc, bad.cycle.s_cyc))
        for question, on_good, on_bad in questions_the_error_changes(spec, scene, wrong):
            asked += [benchmarks.VQAItem(scene, question, on_good, f"{error}|correct"), benchmarks.VQAItem(wrong, question, on_bad, f"{error}|wrong")]

    table = Table(title=f"ROC AUC, correct vs one error ({args.pairs} pairs per error type, micro model judging)")
    for column in ("error", "R_G (combined)", "QA fidelity alone", "cycle consistency alone"):
        table.add_column(column, justify="right")
    report = {}
    for error in [*world.ONE_ERRORS, "overall"]:
        chosen = list(world.ONE_ERRORS) if error == "overall" else [error]
        row = {}
        for signal in ("R_G", "S_fid", "S_cyc"):
            pairs = [p for e in chosen for p in results[e][signal]]
            row[signal] = roc_auc([p[0] for p in pairs], [p[1] for p in pairs])
        report[error] = row
        table.add_row(error, *(f"{row[s]:.3f}" for s in ("R_G", "S_fid", "S_cyc")))
    Console().print(table)

    rows = benchmarks.run_vqa(backbone, asked).rows
    greedy = Table(title="The Solver's greedy answers to the spec questions each error changes: share right")
    for column in ("error", "questions", "on the correct image", "on the image with the error"):
        greedy.add_column(column, justify="right")
    answers = {}
    for error in world.ONE_ERRORS:
        right = {side: [r["correct"] for r in rows if r["kind"] == f"{error}|{side}"] for side in ("correct", "wrong")}
        answers[error] = {side: (sum(hits) / len(hits) if hits else None) for side, hits in right.items()}
        greedy.add_row(error, str(len(right["correct"])), *(f"{share:.0%}" if share is not None else "-" for share in answers[error].values()))
    Console().print(greedy)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"auc": report, "greedy_right": answers, "scores": results}, handle, indent=2)


if __name__ == "__main__":
    main()
