"""Does Ask-Solve-Generate improve the micro model with zero labels?

Trains the shipped micro model on an unlabeled pool (fresh renders, no labels anywhere)
with the full method and four ablations, then compares each with the base model on
shapes-VQA and shapes-GenEval (same questions, prompts and seeds). Writes a results table
(markdown and JSON) and a PNG of reward and benchmark curves over training.

Variants: full; no STE (Proposer rewarded and screened by sample entropy only); no cycle
(R_G without cycle consistency); understanding steps only; generation steps only.

    python bench/micro_asg.py --out runs/micro_asg            # the README's table
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from asg_kit.adapters.registry import load_backbone
from asg_kit.micro import benchmarks
from asg_kit.micro.pool import write_pool
from asg_kit.train.loop import TrainConfig, train

VARIANTS = {
    "full": {},
    "no STE": {"use_ste": False},
    "no cycle": {"use_cycle": False},
    "understanding only": {"generation_per_cycle": 0},
    "generation only": {"understanding_per_cycle": 0},
}


def evaluate(run: Path | None, args) -> dict:
    backbone = load_backbone("micro")
    if run is not None:
        backbone.load_roles(run / "checkpoint" / "roles")
    vqa = benchmarks.run_vqa(backbone, benchmarks.vqa_items(args.per_kind, seed=1))
    gen = benchmarks.run_geneval(backbone, benchmarks.geneval_prompts(args.per_category, seed=1), args.images, args.guidance, seed=1)
    return {"vqa": vqa.accuracy, "vqa_per_kind": vqa.per_kind, "geneval": gen.overall, "geneval_per_category": gen.categories}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/micro_asg")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--evals", type=int, default=3, help="evaluations during training (plus the base model)")
    parser.add_argument("--pool", type=int, default=500, help="unlabeled images to train on")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--per-kind", type=int, default=25)
    parser.add_argument("--per-category", type=int, default=6)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = out / "pool"
    if not pool.is_dir():
        write_pool(args.pool, pool, seed=7)

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if "base" not in results:
        results["base"] = {"curve": [{"step": 0, **evaluate(None, args)}]}
        results_path.write_text(json.dumps(results, indent=2))
    marks = [round(args.steps * (i + 1) / args.evals) for i in range(args.evals)]
    for name in args.variants.split(","):
        if name in results and results[name]["curve"][-1]["step"] == args.steps:
            continue
        config = TrainConfig(backbone="micro", images=str(pool), out=str(out / name.replace(" ", "_")), steps=args.steps, lr=args.lr,
                             guidance_scale=args.guidance, solver_max_new_tokens=12, proposer_max_new_tokens=24, spec_max_new_tokens=48,
                             checkpoint_every=max(1, args.steps // args.evals), **VARIANTS[name])  # fmt: skip
        curve = [{"step": 0, **results["base"]["curve"][0]}]
        done = 0
        for mark in marks:
            train(config, resume=done > 0, stop_after=mark - done)
            done = mark
            curve.append({"step": mark, **evaluate(Path(config.out), args)})
            print(name, curve[-1]["step"], f"VQA {curve[-1]['vqa']:.3f}", f"GenEval {curve[-1]['geneval']:.3f}", flush=True)
        rows = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"curve": curve, "metrics": rows}
        results_path.write_text(json.dumps(results, indent=2))

    lines = ["| variant | shapes-VQA | Δ | shapes-GenEval | Δ |", "|---|---|---|---|---|"]
    base = results["base"]["curve"][0]
    lines.append(f"| base micro model | {base['vqa']:.3f} | | {base['geneval']:.3f} | |")
    for name in VARIANTS:
        if name in results:
            end = results[name]["curve"][-1]
            lines.append(f"| {name} ({end['step']} steps) | {end['vqa']:.3f} | {end['vqa'] - base['vqa']:+.3f} | {end['geneval']:.3f} | {end['geneval'] - base['geneval']:+.3f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / "curves.png")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, result in results.items():
        if name == "base":
            continue
        curve = result["curve"]
        axes[0].plot([c["step"] for c in curve], [c["vqa"] for c in curve], marker="o", label=name)
        axes[1].plot([c["step"] for c in curve], [c["geneval"] for c in curve], marker="o", label=name)
        rewards = [(r["step"], sum(r["generation_rewards"]) / len(r["generation_rewards"])) for r in result["metrics"] if r.get("generation_rewards")]
        if rewards:
            axes[2].plot(*zip(*rewards), ".", alpha=0.6, label=name)
    for axis, title in zip(axes, ("shapes-VQA accuracy", "shapes-GenEval overall", "mean R_G of the Generator's candidates")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
