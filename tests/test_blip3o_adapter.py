"""BLIP3o on a tiny random-weight checkpoint built from the real classes (transformers'
Qwen2.5-VL, upstream's NextDiTCrossAttn and EVA-CLIP from $ASGKIT_UPSTREAM/BLIP3o, diffusers'
decoder parts), loaded through the adapter's real loading path."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image


# Skipped with one line where $ASGKIT_UPSTREAM/BLIP3o or this environment's diffusers,
# einops or transformers 5 are missing (tests/conftest.py, marker blip3o).
pytestmark = pytest.mark.blip3o


def picture(seed: int, size=(40, 48)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from asg_kit.adapters.tiny_blip3o import write_tiny_blip3o

    return write_tiny_blip3o(tmp_path_factory.mktemp("blip3o") / "tiny", upstream=os.environ["ASGKIT_UPSTREAM"], seed=0)


@pytest.fixture(scope="module")
def blip3o(checkpoint):
    from asg_kit.adapters.registry import load_backbone

    adapter = load_backbone("blip3o", model=str(checkpoint), upstream=os.environ["ASGKIT_UPSTREAM"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # fresh LoRA is the identity: give every role its own weights
        for role in adapter.roles:
            for p in adapter.trainable_parameters(role):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter


def test_checkpoint_layout_is_blip3o_8b(checkpoint):
    from safetensors import safe_open

    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == "blip3o_qwen_inference" and "hidden_size" in config and "vision_config" in config
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    # transformers 4.51's layout, as BLIP3o's training wrote it
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.latent_queries"} <= keys
    assert any(k.startswith("visual.blocks.") for k in keys) and any(k.startswith("model.dit.model.layers.") for k in keys)
    assert not any(k.startswith("model.language_model.") for k in keys)
    for part in ("unet", "vae", "scheduler"):
        assert (checkpoint / "diffusion-decoder" / part).is_dir()


def test_conformance(blip3o):
    from asg_kit.adapters.conformance import check_backbone

    report = check_backbone(blip3o, seed=0)
    assert report.passed, [(c.name, c.detail) for c in report.failed]
    assert report.paradigm == "diffusion"


def test_understanding_uses_multimodal_rotary_positions(blip3o):
    """Teacher-forced scores equal transformers' own forward (which builds Qwen2.5-VL's
    positions itself) and differ from plain cumulative positions on the image rows."""
    from asg_kit.adapters.base import AnswerRequest

    image = picture(1)
    request = AnswerRequest(image, "what color is the circle ?")
    completion = blip3o.encode_completion("red circle")
    with torch.no_grad(), blip3o.role(None):
        ours = blip3o.score_completions([request], [completion]).logprobs[0]
        encoded = blip3o._image_features([image])[id(image)]
        ids = blip3o._expanded_prompt_ids(request.prompt, encoded[0].shape[0]) + completion
        pixels = blip3o.image_processor(images=[image], return_tensors="pt")
        tokens = torch.tensor([ids])
        common = dict(input_ids=tokens, attention_mask=torch.ones_like(tokens), pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        logits = blip3o.model.qwen(**common, mm_token_type_ids=(tokens == blip3o.image_token_id).int()).logits[0]
        reference = torch.log_softmax(logits[-len(completion) - 1 : -1].float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        embeds = blip3o._embed(ids, encoded[0])[None]
        plain = torch.arange(len(ids))[None, None].expand(3, 1, -1)
        hidden = blip3o._hidden(embeds, torch.ones_like(tokens), plain)
        cumulative = torch.log_softmax(blip3o.model.qwen.lm_head(hidden[0, -len(completion) - 1 : -1]).float(), -1)
        cumulative = cumulative.gather(-1, torch.tensor(completion)[:, None])[:, 0]
    assert torch.allclose(ours, reference, atol=1e-4), (ours - reference).abs().max()
    assert (ours - cumulative).abs().max() > 1e-3


def test_sampled_logprobs_equal_teacher_forced_and_batches_share_the_image(blip3o):
    from asg_kit.adapters.base import AnswerRequest

    image = picture(2)
    requests = [AnswerRequest(image, "what shape ?", seed=5), AnswerRequest(image, "how many objects are there ?", seed=6),
                AnswerRequest(None, "red or blue ?", temperature=0.0)]  # fmt: skip
    with blip3o.role("solver"):
        samples = blip3o.sample_answers(requests, max_new_tokens=5)
        alone = blip3o.sample_answers(requests[1:2], max_new_tokens=5)
        with torch.no_grad():
            scores = blip3o.score_completions(requests, [s.token_ids for s in samples])
    assert alone[0].token_ids == samples[1].token_ids
    for row, sample in enumerate(samples):
        n = len(sample.token_ids)
        assert torch.allclose(scores.logprobs[row, :n], sample.logprobs, atol=1e-4)
        assert torch.allclose(scores.entropies[row, :n], sample.entropies, atol=1e-4)


def test_generation_n_per_prompt_is_batched_and_seeded(blip3o):
    with torch.no_grad(), blip3o.role("generator"):
        both = blip3o.generate_images(["a red circle", "two blue squares"], n=2, seed=10)
        second = blip3o.generate_images(["two blue squares"], n=2, seed=12)  # rows 2, 3 of the batch above
        other = blip3o.generate_images(["a red circle"], n=1, seed=99)
    assert [len(row) for row in both.images] == [2, 2] and both.images[0][0].size == (16, 16)
    assert both.rollout.seeds == [10, 11, 12, 13] and both.rollout.prompt_index == [0, 0, 1, 1]
    assert both.rollout.latents.shape == (4, 16, 32) and both.rollout.tokens.shape == (4, 0)
    assert torch.allclose(both.rollout.latents[2:], second.rollout.latents, atol=1e-5)
    assert np.array_equal(np.asarray(both.images[1][1]), np.asarray(second.images[0][1]))
    assert not torch.allclose(both.rollout.latents[0], both.rollout.latents[1])  # n samples differ
    assert not torch.allclose(both.rollout.latents[0], other.rollout.latents[0])


def test_flow_equals_upstream_sample_images(blip3o, monkeypatch):
    """The adapter's flow against upstream's own ``blip3oQwenForInferenceLM.sample_images``
    (called on the same DiT; the module is imported without its encoder builder, which
    pulls every encoder upstream ever tried and is not used by ``sample_images``)."""
    import importlib
    import importlib.machinery
    import sys
    import types

    from diffusers import FlowMatchEulerDiscreteScheduler

    def stand_in(name, package=False):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        if package:
            module.__path__ = [str(blip3o.upstream / name.replace(".", "/"))]
        return module

    builder = stand_in("blip3o.model.multimodal_encoder.builder")
    builder.build_vision_tower = builder.build_gen_vision_tower = builder.build_dit = None
    monkeypatch.setitem(sys.modules, builder.__name__, builder)
    for package in ("blip3o.model.language_model", "blip3o.model.multimodal_projector"):
        if package not in sys.modules:
            monkeypatch.setitem(sys.modules, package, stand_in(package, package=True))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    upstream = importlib.import_module("blip3o.model.language_model.blip3o_qwen_inference").blip3oQwenForInferenceLM

    class WithDiT:  # what sample_images reads from its model: get_model().dit
        dit = blip3o.model.dit

        def get_model(self):
            return self

    with torch.no_grad(), blip3o.role("generator"):
        condition = blip3o._conditions([blip3o.generation_prompt_ids("a red circle")])
        ours = blip3o._flow(condition, [11], 3.0, 4)
        reference = upstream.sample_images(WithDiT(), condition, FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                                           guidance_scale=3.0, generator=torch.Generator().manual_seed(11), num_inference_steps=4)  # fmt: skip
    assert torch.equal(ours, reference)


def test_source_flow_loss_is_cached_seeded_and_reaches_the_generator(blip3o):
    from asg_kit.train.losses import reward_weighted_regression

    image = picture(3, size=(64, 80))
    blip3o._source_cache.clear()
    first = blip3o.source_features([image])
    again = blip3o.source_features([image.copy()])  # another object, the same pixels: cached
    assert len(blip3o._source_cache) == 1 and torch.equal(first, again)
    assert first.shape == (1, 32, 4, 4)
    params = blip3o.trainable_parameters("generator")
    for p in params:
        p.grad = None
    blip3o.model.train(True)
    with blip3o.role("generator"):
        mse = blip3o.source_flow_loss([image], ["a red circle"], seed=4)
        repeat = blip3o.source_flow_loss([image], ["a red circle"], seed=4)
    blip3o.model.train(False)
    assert torch.equal(mse, repeat)
    reward_weighted_regression(mse, 0.8).mean().backward()
    names = {id(p): n for n, p in blip3o.peft.named_parameters()}
    reached = {names[id(p)] for p in params if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".dit." in n for n in reached) and any("language_model" in n for n in reached)
    assert blip3o.model.query_offset.grad.abs().sum() > 0
    others = [p for role in ("proposer", "solver") for p in blip3o.trainable_parameters(role)]
    assert all(p.grad is None for p in others)
    for p in params:
        p.grad = None


def test_eva_clip_tower_converts_from_upstreams_bin(tmp_path, checkpoint):
    from safetensors.torch import load_file

    from asg_kit.adapters.blip3o import convert_eva_clip_tower

    weights = load_file(checkpoint / "gen_vision_tower" / "model.safetensors")
    torch.save({"module": {f"module.{k}": v for k, v in weights.items()}}, tmp_path / "pytorch_model.bin")
    converted = load_file(convert_eva_clip_tower(tmp_path / "pytorch_model.bin", tmp_path / "ckpt"))
    assert converted.keys() == weights.keys() and all(torch.equal(converted[k], weights[k]) for k in weights)


def pool_and_config(tmp_path, checkpoint, **overrides):
    from asg_kit.micro.pool import write_pool
    from asg_kit.train.loop import TrainConfig

    if not (tmp_path / "pool").is_dir():
        write_pool(4, tmp_path / "pool", seed=0)
    base = dict(backbone="blip3o", model=str(checkpoint), upstream=os.environ["ASGKIT_UPSTREAM"], images=str(tmp_path / "pool"),
                out=str(tmp_path / "run"), steps=5, lr=1e-3, seed=3, guidance_scale=3.0, solver_max_new_tokens=4,
                proposer_max_new_tokens=6, spec_max_new_tokens=8, generator_candidates=2, spec_samples=1, checkpoint_every=2,
                unsolvable_share=0.0, easy_share=1.01, spec_quality_min=0.0, alignment_min=0.0)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def rows_of(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_training_updates_the_generator_by_rwr_and_resumes_exactly(tmp_path, checkpoint):
    from safetensors.torch import load_file

    from asg_kit.train.loop import train

    train(pool_and_config(tmp_path, checkpoint, out=str(tmp_path / "whole")))
    train(pool_and_config(tmp_path, checkpoint, out=str(tmp_path / "parts")), stop_after=3)  # killed in step 2; checkpoint after step 1
    train(pool_and_config(tmp_path, checkpoint, out=str(tmp_path / "parts")), resume=True)
    whole, parts = rows_of(tmp_path / "whole"), rows_of(tmp_path / "parts")
    assert [r["kind"] for r in whole] == ["understanding"] * 3 + ["generation"] * 2
    assert parts == whole
    updates = [r for r in whole if r["kind"] == "generation" and r.get("generator_skip") is None]
    assert updates, whole
    for r in updates:  # (1 + 0.5 clip01(best R_G)) x the flow-matching MSE on the source image
        weight = 1 + 0.5 * min(1.0, max(0.0, max(r["generation_rewards"])))
        assert r["generator_loss"] == pytest.approx(weight * r["flow_mse"], rel=1e-6)
    roles = tmp_path / "whole" / "checkpoint" / "roles" / "generator"
    offset = load_file(roles / "latent_queries_offset.safetensors")["query_offset"]
    assert offset.abs().sum() > 0  # the queries moved
    dit_lora = {k: v for k, v in load_file(roles / "adapter_model.safetensors").items() if ".dit." in k and "lora_B" in k}
    assert dit_lora and any(v.abs().sum() > 0 for v in dit_lora.values())
    for name in ("adapter_model.safetensors", "latent_queries_offset.safetensors"):
        a, b = load_file(roles / name), load_file(tmp_path / "parts" / "checkpoint" / "roles" / "generator" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_asgkit_cli_train_check_and_score(tmp_path, checkpoint, monkeypatch):
    from typer.testing import CliRunner

    from asg_kit.cli import app

    upstream = os.environ["ASGKIT_UPSTREAM"]
    pool_and_config(tmp_path, checkpoint)
    runner = CliRunner()
    common = ["--backbone", "blip3o", "--model", str(checkpoint), "--upstream", upstream]
    train_options = ["--images", str(tmp_path / "pool"), "--out", str(tmp_path / "run"), "--solver-max-new-tokens", "3",
                     "--proposer-max-new-tokens", "5", "--checkpoint-every", "2", "--guidance", "3"]  # fmt: skip
    result = runner.invoke(app, ["train", *common, *train_options, "--steps", "4"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "run"), "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert [r["kind"] for r in rows_of(tmp_path / "run")] == ["understanding"] * 3 + ["generation"] * 2

    folder = tmp_path / "drawn"
    folder.mkdir()
    for i, prompt in enumerate(["a red circle", "two blue squares"]):
        picture(20 + i, size=(32, 32)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(prompt)
    result = runner.invoke(app, ["score", str(folder), *common, "--samples", "1"])
    assert result.exit_code == 0, result.output
    assert len((folder / "asg_scores.jsonl").read_text().splitlines()) == 2

    result = runner.invoke(app, ["check", *common])
    assert result.exit_code == 0, result.output
    monkeypatch.delenv("ASGKIT_UPSTREAM")
    result = runner.invoke(app, ["check", "--backbone", "blip3o", "--model", str(checkpoint), "--upstream", str(tmp_path)])
    assert result.exit_code == 2 and "JiuhaiChen/BLIP3o" in result.output
    result = runner.invoke(app, ["train", "--backbone", "blip3o", "--model", str(checkpoint), "--upstream", str(tmp_path), *train_options[:2], "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "JiuhaiChen/BLIP3o" in result.output and "Traceback" not in result.output
