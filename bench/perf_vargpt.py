"""VARGPT-v1.1 on a tiny random-weight checkpoint (the real upstream classes): where a training
step's time goes, and n candidate images from one shared prefill against upstream's path.

1. One understanding and one generation step, split the way the training loop runs them:
   rollout (Proposer questions, screening and 7 Solver answers / the Generator's candidates),
   scoring (vote statistics / R_G of every candidate with the Solver) and update (teacher-forced
   policy and reference log-probs, loss, backward).
2. n images of one prompt: the adapter (one prompt prefill, upstream's next-scale sampler once
   for all n rows, per-row seeds, bits and behaviour log-probs recorded) against upstream's own
   path, one ``generate()`` call per image (prompt prefill, the image-start token, then
   ``forward(inference_image_gen=True)``, which writes a file).

Wall time is the median of ``--reps`` runs, on ``--threads`` CPU threads. Needs the VARGPT
environment and a VARGPT-v1.1 checkout (``--upstream`` or $ASGKIT_UPSTREAM).

    python bench/perf_vargpt.py --upstream ../shared/upstream/VARGPT-v1.1
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_seconds(function, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", default=None, help="VARGPT-v1.1 checkout (default: $ASGKIT_UPSTREAM)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--candidates", type=int, nargs="+", default=[3, 8])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from asg_kit import prompts
    from asg_kit.adapters.base import AnswerRequest
    from asg_kit.adapters.tiny_vargpt import write_tiny_vargpt
    from asg_kit.adapters.vargpt import VARGPTAdapter
    from asg_kit.micro import world
    from asg_kit.rewards import RollingPercentile, score_question
    from asg_kit.rewards.scorers import GenerationScorer, ask_screen_solve
    from asg_kit.train.losses import clipped_surrogate, group_advantages, masked_mean

    scratch = Path(tempfile.mkdtemp(prefix="asgkit-perf-vargpt-"))
    folder = write_tiny_vargpt(scratch / "tiny", upstream=args.upstream)
    adapter = VARGPTAdapter.from_pretrained(folder, upstream=args.upstream)
    import random

    image = world.render(world.sample_scene(random.Random(0)))
    spec = prompts.parse_spec("draw : a red circle and a blue square | what color is the circle ? red | how many squares are there ? one")
    results: dict = {"model": "tiny VARGPT-v1.1 (upstream classes, random weights)", "threads": args.threads, "reps": args.reps, "steps": {}}

    # ---- 1. a training step, phase by phase ----------------------------------------------
    def understanding() -> dict:
        phases = {}
        start = time.perf_counter()
        found = ask_screen_solve(adapter, image, RollingPercentile(), seed=1, proposer_max_new_tokens=32, solver_max_new_tokens=16)
        phases["rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        judged = score_question([r.text for r in found.replies], 0.5, 0.5)
        phases["scoring"] = time.perf_counter() - start
        start = time.perf_counter()
        canonical = [AnswerRequest(image, prompts.solver_prompt(found.question, 0))] * len(found.replies)
        completions = [r.token_ids for r in found.replies]
        adapter.model.train(True)
        with adapter.role("solver"):
            scored = adapter.score_completions(canonical, completions, keep_logits=True)
        adapter.model.train(False)
        with torch.no_grad(), adapter.role(None):
            adapter.score_completions(canonical, completions, keep_logits=True)
        weights = torch.tensor([r if r == r else 0.0 for r in judged.solver_rewards])
        (weights * -masked_mean(scored.logprobs, scored.mask)).mean().backward()
        phases["update"] = time.perf_counter() - start
        return phases

    def generation() -> dict:
        phases = {}
        start = time.perf_counter()
        with adapter.role("generator"):
            drawn = adapter.generate_images([spec.prompt], n=3, guidance_scale=3.0, seed=2)
        phases["rollout"] = time.perf_counter() - start
        start = time.perf_counter()
        rewards = [s.reward for s in GenerationScorer(adapter, samples=2, seed=0).score(spec, drawn.images[0])]
        phases["scoring"] = time.perf_counter() - start
        start = time.perf_counter()
        advantages = group_advantages(rewards) or [1.0, -1.0, 0.0]
        adapter.model.train(True)
        with adapter.role("generator"):
            logprobs = adapter.generation_logprobs(drawn.rollout)
        adapter.model.train(False)
        with torch.no_grad(), adapter.role(None):
            reference = adapter.generation_logprobs(drawn.rollout)
        clipped_surrogate(torch.tensor(advantages), logprobs.mean(-1), reference.mean(-1), 0.2).mean().backward()
        phases["update"] = time.perf_counter() - start
        return phases

    for name, step in (("understanding", understanding), ("generation", generation)):
        step()  # warm-up
        runs = [step() for _ in range(args.reps)]
        phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        total = sum(phases.values())
        results["steps"][name] = {"seconds": round(total, 4), **{k: {"seconds": round(v, 4), "share": round(v / total, 3)} for k, v in phases.items()}}

    # ---- 2. n candidates: one shared prefill vs one upstream generate() per image -----------
    from transformers import LogitsProcessor, LogitsProcessorList

    bare = VARGPTAdapter.from_pretrained(folder, upstream=args.upstream, lora=None)
    model = bare.model
    importlib.import_module("patching_utils.patching").patching(model)  # upstream's image-generating _sample
    model._IMAGE_GEN_PATH = str(scratch / "upstream.png")
    prompt_ids = torch.tensor([bare.generation_prompt_ids(spec.prompt)])

    class StartImage(LogitsProcessor):
        """Random weights never choose <|image_gen_start|>: force it as the first new token."""

        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt_ids.shape[1]:
                scores = torch.full_like(scores, -torch.inf)
                scores[:, bare.gen_start_id] = 0.0
            return scores

    def upstream_path(n: int) -> None:
        for _ in range(n):
            with torch.no_grad():
                model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=2, do_sample=False,
                               logits_processor=LogitsProcessorList([StartImage()]))  # fmt: skip
            model.past_hidden_states = None

    results["candidates"] = {}
    for n in args.candidates:
        ours = median_seconds(lambda: bare.generate_images([spec.prompt], n=n, guidance_scale=3.0, temperature=0.5, seed=0), args.reps)
        (scratch / "upstream.png").unlink(missing_ok=True)
        theirs = median_seconds(lambda: upstream_path(n), args.reps)
        assert (scratch / "upstream.png").is_file(), "upstream's path did not generate an image"
        results["candidates"][str(n)] = {"shared_prefill_s": round(ours, 4), "upstream_per_image_s": round(theirs, 4), "speedup": round(theirs / ours, 2)}

    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
