"""BAGEL's Generator step on a tiny random BAGEL (real upstream classes), CPU, 1 thread:

1. rollout: L candidates of one prompt drawn batched (one prompt prefill, the L rows packed in
   one flow query per step) against L separate one-image calls (the same seeded noises; the
   bench checks both give the same latents to bf16 precision);
2. the update's recompute against the rollout: fresh flow-matching noise, policy velocities
   with gradient + backward, reference velocities (adapters off), all in the packed training
   forward, against drawing the L candidates.

    ASGKIT_UPSTREAM=../shared/upstream .venv-bagel/bin/python bench/perf_bagel.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", default=os.environ.get("ASGKIT_UPSTREAM"), help="Bagel checkout or a folder holding Bagel/")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=10, help="flow grid points (steps + 1)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from asg_kit.adapters.registry import load_backbone
    from asg_kit.adapters.tiny_bagel import TinyBagelSize, save_tiny_bagel
    from asg_kit.train.losses import advantage_weighted_flow_loss, flow_matching_error, velocity_drift

    with tempfile.TemporaryDirectory(prefix="asgkit-bagel-perf-") as scratch:
        size = TinyBagelSize(image_size=args.image_size, num_timesteps=args.timesteps)
        folder = save_tiny_bagel(os.path.join(scratch, "tiny"), upstream=args.upstream, size=size)
        bagel = load_backbone("bagel", model=str(folder), upstream=args.upstream)
    prompt, n = "a red circle on a white background", args.candidates

    def median_seconds(call):
        times, result = [], None
        for _ in range(args.reps):
            start = time.perf_counter()
            result = call()
            times.append(time.perf_counter() - start)
        return statistics.median(times), result

    with bagel.role("generator"):
        batched_s, batched = median_seconds(lambda: bagel.generate_images([prompt], n=n, guidance_scale=4.0, seed=0))
        alone_s, alone = median_seconds(lambda: [bagel.generate_images([prompt], n=1, guidance_scale=4.0, seed=j) for j in range(n)])
    gap = max(float((batched.rollout.latents[j] - one.rollout.latents[0]).abs().max()) for j, one in enumerate(alone))

    advantages = torch.linspace(-1, 1, n)

    def update():
        noised = bagel.noised_latents(batched.rollout, seed=n)
        bagel.model.train(True)
        with bagel.role("generator"):
            velocity = bagel.velocities(batched.rollout, noised.noisy, noised.timesteps)
        bagel.model.train(False)
        with torch.no_grad(), bagel.role(None):
            reference = bagel.velocities(batched.rollout, noised.noisy, noised.timesteps)
        loss = advantage_weighted_flow_loss(advantages, flow_matching_error(velocity, noised.target), velocity_drift(velocity, reference), 0.01)
        loss.backward()
        bagel.model.zero_grad(set_to_none=True)
        return loss

    update_s, _ = median_seconds(update)
    tokens = batched.rollout.latents.shape[2]
    steps = batched.rollout.latents.shape[1] - 1
    print(f"tiny BAGEL, {n} candidates of {args.image_size}x{args.image_size} px ({tokens} latent tokens), {steps} flow steps, text CFG, 1 CPU thread, median of {args.reps}")
    print(f"  rollout, {n} candidates batched:        {batched_s:.3f} s")
    print(f"  rollout, one candidate at a time:     {alone_s:.3f} s  -> batched is {alone_s / batched_s:.2f}x faster (latents equal to {gap:.1e})")
    print(f"  update (noise, policy fwd+bwd, reference fwd): {update_s:.3f} s  -> {update_s / batched_s:.2f}x the batched rollout")


if __name__ == "__main__":
    main()
