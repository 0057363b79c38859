"""Write a tiny, random-weight VARGPT-v1.1 checkpoint built from the real upstream classes.

The folder has the layout of a real VARGPT-v1.1 checkpoint (config.json with the special
tokens, model.safetensors, a Qwen2 tokenizer, the image processor's preprocessor_config.json)
and loads through ``VARGPTAdapter.from_pretrained`` like one. Upstream's constructor hard-codes
the Infinity-2B head; the config records the tiny head's sizes in ``asgkit_generation_head``,
which the loader applies (``vargpt.generation_head_sizes``). Used by the tests, the conformance
checker (``asgkit check --backbone vargpt --tiny``) and bench/perf_vargpt.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

# Qwen2-VL's special tokens, then VARGPT's three image-generation tokens.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<|image_gen_start|>", "<|image_gen_end|>", "<|image_gen_pad|>",
)  # fmt: skip


@dataclass(frozen=True)
class TinyVARGPTSize:
    """Sizes of a tiny VARGPT. Constraints from upstream: mrope sections sum to head_dim / 2;
    Infinity's width is a multiple of 128 (its text pooling uses 128-wide heads) and equals its
    text channels; block_chunks > 1 (the sampler iterates block chunks); the VAE's channels are
    multiples of 32 (GroupNorm). Generated images are 16 px per token of the last scale."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    mrope_section: tuple[int, ...] = (2, 3, 3)
    vision: dict = field(default_factory=lambda: dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2, in_channels=3,
                                                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2))  # fmt: skip
    infinity: dict = field(default_factory=lambda: dict(depth=2, embed_dim=128, num_heads=2, drop_path_rate=0.1, mlp_ratio=4, block_chunks=2))
    vae: dict = field(default_factory=lambda: dict(base_ch=32, num_res_blocks=1))
    scales: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 2, 2), (1, 4, 4))
    vocab: int = 1200
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112


def _corpus() -> list[str]:
    """Text the tokenizer merges are learned from: asg-kit's own prompts and the shapes world's words,
    so that the training loop's prompts stay short."""
    from asg_kit import prompts
    from asg_kit.adapters.tiny_janus import DEFAULT_WORDS

    texts = [value for value in vars(prompts).values() if isinstance(value, str)]
    texts += [" ".join(DEFAULT_WORDS), "You are a helpful assistant.", "Can you depict a scene of a red circle"]
    for framing in range(7):
        try:
            texts.append(prompts.solver_prompt("what color is the circle?", framing))
        except Exception:  # noqa: BLE001 - fewer framings: the corpus is only a hint
            break
    return texts


def build_tokenizer(vocab: int = TinyVARGPTSize.vocab):
    """A byte-level BPE with Qwen2-VL's and VARGPT's special tokens, as a Qwen2TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    bpe.train_from_iterator(_corpus(), trainer)
    return Qwen2TokenizerFast(tokenizer_object=bpe, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", additional_special_tokens=list(SPECIAL_TOKENS[1:]))  # fmt: skip


def write_tiny_vargpt(folder: str | Path, upstream: str | Path | None = None, size: TinyVARGPTSize = TinyVARGPTSize(), seed: int = 0) -> Path:
    """Build a random-weight VARGPT-v1.1 of ``size`` from the upstream classes of the checkout
    ``upstream`` and write it to ``folder`` as a checkpoint; returns the folder."""
    import torch

    from asg_kit.adapters.vargpt import generation_head_sizes, import_vargpt, quiet

    up = import_vargpt(upstream)
    folder = Path(folder)
    tokenizer = build_tokenizer(size.vocab)
    token_id = tokenizer.convert_tokens_to_ids
    config = up.config_class(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_theta=1e6, max_window_layers=size.layers, tie_word_embeddings=False, use_cache=True, vision_config=dict(size.vision),
        rope_scaling={"type": "mrope", "mrope_section": list(size.mrope_section)},
        bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"), pad_token_id=token_id("<|endoftext|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        vision_token_id=token_id("<|vision_pad|>"), image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
    )  # fmt: skip
    # What a real checkpoint's config carries (the model reads config.special_tokens everywhere).
    config.special_tokens = {}
    for name in ("image_gen_start", "image_gen_end", "image_gen_pad"):
        config.special_tokens[name] = f"<|{name}|>"
        config.special_tokens[f"{name}_token_id"] = token_id(f"<|{name}|>")
    config.asgkit_generation_head = {
        "infinity": dict(size.infinity), "vae": dict(size.vae), "text_channels": size.infinity["embed_dim"],
        "pn": "asgkit-tiny-" + "-".join(str(h) for _, h, _ in size.scales), "scales": [list(s) for s in size.scales],
    }  # fmt: skip
    torch.manual_seed(seed)
    with generation_head_sizes(up, config.asgkit_generation_head), quiet():
        model = up.model_class(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    up.image_processor_class(min_pixels=size.min_pixels, max_pixels=size.max_pixels).save_pretrained(folder)
    (folder / "asgkit_tiny.json").write_text(__import__("json").dumps(asdict(size), indent=1))
    return folder
