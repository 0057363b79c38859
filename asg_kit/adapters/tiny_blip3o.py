"""Write a tiny random-weight BLIP3o as a checkpoint folder in the BLIP3o-8B layout, built
from the real classes (transformers' Qwen2.5-VL, upstream's NextDiTCrossAttn and EVA-CLIP
vision transformer, diffusers' UNet / VAE / scheduler), so that ``Blip3oAdapter.from_pretrained``
loads it through the same path as the real checkpoint. Offline; used by the tests.

Widths upstream hard-codes for the 8B model (1792 feature width, 152064 vocabulary) are not
needed by asg-kit's own loops, so the tiny model shrinks them too; the 64 queries stay.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from asg_kit.adapters.tiny_janus import DEFAULT_WORDS, PUNCTUATION

QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "[IMG]", "[/IMG]", "<image>", "<answer>", "</answer>", "<unk>",
)  # fmt: skip
EXTRA_WORDS = tuple(
    """system you helpful assistant user please generate based following caption scene picture
    drawn showing shows has have at be by for from as""".split()
)


@dataclass(frozen=True)
class TinyBlip3oSize:
    """Sizes of the tiny model. An understanding image is resized to ``image_pixels`` (4x4
    patches of 14 px -> 4 merged tokens); EVA-CLIP sees ``eva_image`` px -> (eva_image/14)^2
    tokens, pooled by ``pool`` into the DiT's ``dit_input``^2 latent."""

    hidden: int = 32
    intermediate: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    image_pixels: int = 56 * 56
    feature: int = 32  # EVA-CLIP / DiT channel width (1792 in the 8B model)
    eva_image: int = 56
    pool: int = 1
    dit_dim: int = 32
    dit_layers: int = 2
    dit_heads: int = 2
    n_query: int = 64
    decoder_sample: int = 8  # UNet latent side; the VAE doubles it -> 16 px images
    flow_steps: int = 3
    decoder_steps: int = 2


def build_qwen_tokenizer(words=DEFAULT_WORDS + EXTRA_WORDS):
    """A word-level tokenizer with Qwen2.5-VL's and BLIP3o's special tokens (no BOS, as Qwen)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*QWEN_SPECIALS, *PUNCTUATION, *(w.lower() for w in words)):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(list(QWEN_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")


def _to_blip3o_key(key: str) -> str:
    """transformers 5's Qwen2.5-VL names -> the 4.51 names BLIP3o's checkpoint uses."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return "visual." + key[len("model.visual.") :]
    return key


def write_tiny_blip3o(folder: str | Path, upstream: str | Path | None = None, size: TinyBlip3oSize = TinyBlip3oSize(), seed: int = 0) -> Path:
    """Write the tiny checkpoint folder (about 5 MB) and return it."""
    from asg_kit.adapters.blip3o import require_blip3o

    require_blip3o()  # one clear line when this environment cannot build it
    import diffusers
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from asg_kit.adapters.upstream import import_blip3o, locate_upstream

    modules = import_blip3o(locate_upstream("blip3o", upstream))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_qwen_tokenizer()
    token = tokenizer.convert_tokens_to_ids
    head_dim = size.hidden // size.heads
    text = dict(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=4096, rope_theta=1e6,
        rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 2 - head_dim // 4 - head_dim // 8]},
        bos_token_id=token("<|endoftext|>"), eos_token_id=token("<|im_end|>"), pad_token_id=token("<|endoftext|>"),
    )  # fmt: skip
    vision = dict(
        depth=size.vision_layers, hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden, num_heads=2,
        out_hidden_size=size.hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
        fullatt_block_indexes=[size.vision_layers - 1], tokens_per_second=2, in_chans=3,
    )  # fmt: skip
    ids = dict(image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
               vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"))  # fmt: skip
    torch.manual_seed(seed)
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text, vision_config=vision, **ids))
    with torch.no_grad():
        qwen.lm_head.weight.mul_(30.0)  # sharper random logits than the 0.02-std init: answers vary by prompt

    dit_sizes = dict(
        input_size=size.eva_image // 14 // size.pool, patch_size=1, in_channels=size.feature, dim=size.dit_dim,
        n_layers=size.dit_layers, n_heads=size.dit_heads, n_kv_heads=size.dit_heads, multiple_of=32, norm_eps=1e-5,
        qk_norm=True, _gradient_checkpointing=False,
    )  # fmt: skip
    dit = modules.NextDiTCrossAttn(modules.NextDiTCrossAttnConfig(latent_embedding_size=size.hidden, **dit_sizes))
    with torch.no_grad():
        # A fresh LuminaNextDiTBlock gates its cross-attention with tanh(0) = 0, i.e. off; trained
        # weights are not 0, and the prompt must reach the DiT for the tests to mean anything.
        for layer in dit.model.layers:
            layer.gate.normal_(0.0, 1.0)
    queries = torch.randn(1, size.n_query, size.hidden)
    weights = {_to_blip3o_key(k): v.contiguous() for k, v in qwen.state_dict().items()}
    weights.update({f"model.dit.{k}": v.contiguous() for k, v in dit.state_dict().items()})
    weights["model.latent_queries"] = queries
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = dict(
        text, vision_config=vision, **ids, model_type="blip3o_qwen_inference", architectures=["blip3oQwenForInferenceLM"],
        gen_vision_tower="eva-clip-tiny", n_query=size.n_query, gen_pooling=f"early_pool2d_{size.pool}", torch_dtype="float32",
    )  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=size.image_pixels, max_pixels=size.image_pixels).save_pretrained(folder)
    (folder / "asgkit.json").write_text(json.dumps({"dit": dit_sizes, "flow_steps": size.flow_steps, "decoder_steps": size.decoder_steps}, indent=2))

    # EVA-CLIP tower (the Generator update's target encoder), as gen_vision_tower/.
    eva_config = {"embed_dim": size.feature, "vision_cfg": {
        "eva_model_name": "eva-clip-tiny", "image_size": size.eva_image, "patch_size": 14, "width": size.feature,
        "head_width": size.feature // 2, "layers": 1, "mlp_ratio": 2.0, "postnorm": True, "qkv_bias": True, "xattn": True,
        "drop_path_rate": 0}}  # fmt: skip
    vision_cfg = eva_config["vision_cfg"]
    eva = modules.EVAVisionTransformer(
        img_size=size.eva_image, patch_size=14, embed_dim=size.feature, depth=1, num_heads=2, mlp_ratio=2.0, qkv_bias=True,
        postnorm=True, norm_layer=lambda width: torch.nn.LayerNorm(width, eps=1e-6),
    )
    with torch.no_grad():
        eva.pos_embed.normal_(0.0, 0.5)  # zero-initialised upstream: images would differ only through patches
    (folder / "gen_vision_tower").mkdir(exist_ok=True)
    (folder / "gen_vision_tower" / "config.json").write_text(json.dumps(eva_config, indent=2))
    save_file({k: v.contiguous() for k, v in eva.state_dict().items()}, str(folder / "gen_vision_tower" / "model.safetensors"))
    assert vision_cfg["width"] == dit_sizes["in_channels"]

    # Diffusion decoder: EVA-CLIP features -> pixels, SDXL-style conditioning (diffusers classes).
    decoder = folder / "diffusion-decoder"
    diffusers.UNet2DConditionModel(
        sample_size=size.decoder_sample, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=size.feature, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=size.feature + 6 * 8,
    ).save_pretrained(decoder / "unet")  # fmt: skip
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=2 * size.decoder_sample,
    ).save_pretrained(decoder / "vae")  # fmt: skip
    diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    ).save_pretrained(decoder / "scheduler")  # fmt: skip
    (folder / "tiny_size.json").write_text(json.dumps(asdict(size), indent=2))
    return folder


def save_tiny_blip3o(folder: str | Path, upstream: str | Path | None = None, seed: int = 0) -> Path:
    """The registry's tiny builder (``asgkit check --tiny``, ``--save-tiny``)."""
    return write_tiny_blip3o(folder, upstream=upstream, seed=seed)


def measure_tiny_blip3o(folder: str | Path, upstream: str | Path | None = None, prompts: int = 4, n: int = 3, images: int = 8, repeats: int = 3) -> dict:
    """Seconds on the tiny model (best of ``repeats``): ``prompts`` x ``n`` images in one
    batched ``generate_images`` call against one call per image (same seeds, so the same
    images), and the Generator update's source features recomputed against cached."""
    import time

    import numpy as np
    import torch
    from PIL import Image

    from asg_kit.adapters.registry import load_backbone

    backbone = load_backbone("blip3o", model=str(folder), **({"upstream": str(upstream)} if upstream else {}))
    captions = [f"a {color} circle" for color in ("red", "green", "blue", "yellow", "black", "white")][:prompts]
    pictures = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)) for i in range(images)]

    def best(run) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad(), backbone.role("generator"):
        backbone.generate_images(captions[:1], n=1)  # decoder and negative features loaded outside the timing
        batched = backbone.generate_images(captions, n=n, seed=0)
        single = [backbone.generate_images([c], n=1, seed=p * n + j).rollout.latents for p, c in enumerate(captions) for j in range(n)]
        same = bool(torch.allclose(batched.rollout.latents, torch.cat(single), atol=1e-5))
        batched_s = best(lambda: backbone.generate_images(captions, n=n, seed=0))
        single_s = best(lambda: [backbone.generate_images([c], n=1, seed=p * n + j) for p, c in enumerate(captions) for j in range(n)])

    def recompute():
        backbone._source_cache.clear()
        backbone.source_features(pictures)

    recompute_s = best(recompute)
    cached_s = best(lambda: backbone.source_features(pictures))
    return {
        "images": prompts * n, "batched_s": batched_s, "one_at_a_time_s": single_s, "batched_speedup": single_s / batched_s,
        "same_images": same, "source_images": images, "recompute_s": recompute_s, "cached_s": cached_s,
        "cache_speedup": recompute_s / cached_s, "threads": torch.get_num_threads(),
    }  # fmt: skip


if __name__ == "__main__":  # python -m asg_kit.adapters.tiny_blip3o --upstream DIR [--folder DIR]
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description="Write the tiny BLIP3o and time batched generation and cached source features on it.")
    parser.add_argument("--upstream", default=None, help="BLIP3o checkout or a folder holding it (default: $ASGKIT_UPSTREAM)")
    parser.add_argument("--folder", default=None, help="where to write the tiny checkpoint (default: a temporary folder)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tiny-blip3o-") as scratch:
        target = write_tiny_blip3o(arguments.folder or Path(scratch) / "tiny", upstream=arguments.upstream)
        print(json.dumps(measure_tiny_blip3o(target, upstream=arguments.upstream), indent=2))
