"""Build a tiny Janus offline: a word-level tokenizer with Janus's image special tokens, a
small ``JanusConfig``, and the PIL image processor. Used by the tests and as the starting
point of the micro model; the result saves and loads like any Janus checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<bos>",
    "eos": "<eos>",
    "image": "<image_placeholder>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
}
# Chat and answer markers are single tokens so that prompts stay short.
MARKER_TOKENS = ("<|User|>", "<|Assistant|>", "<answer>", "</answer>")
PUNCTUATION = (":", ".", ",", "?", "!", "'", "(", ")", ";", "-")
DEFAULT_WORDS = tuple(
    """a an the is are of in on to and or with this that it its there what which how many
    where who color colour shape size image picture photo describe one concise sentence focusing
    key visual facts briefly answer question yes no left right above below top bottom
    red green blue yellow orange purple black white gray circle square triangle star cross
    object objects small large big count number zero one two three four five six seven eight
    nine ten""".split()
)


@dataclass(frozen=True)
class TinyJanusSize:
    """Sizes of a tiny Janus. The understanding image is ``image_size`` px in
    ``(image_size / patch_size)^2`` tokens; generated images are that grid times
    ``2^(len(vq_channel_multiplier) - 1)`` px."""

    hidden: int = 32
    intermediate: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    codebook: int = 64
    vq_base_channels: int = 32
    vq_channel_multiplier: tuple[int, ...] = (1, 1, 1, 1)
    vq_res_blocks: int = 1
    vq_latent_channels: int = 8
    vision_heads: int = 4
    max_positions: int = 512


def build_word_tokenizer(words: Iterable[str] = DEFAULT_WORDS):
    """A ``PreTrainedTokenizerFast`` over a closed word list (lowercased, split on
    whitespace and punctuation), with BOS prepended and Janus's image tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS.values(), *MARKER_TOKENS, *PUNCTUATION, *(w.lower() for w in words)):
        vocab.setdefault(token, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    bos = SPECIAL_TOKENS["bos"]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer.add_special_tokens([*SPECIAL_TOKENS.values(), *MARKER_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        extra_special_tokens={
            "image_token": SPECIAL_TOKENS["image"],
            "boi_token": SPECIAL_TOKENS["boi"],
            "eoi_token": SPECIAL_TOKENS["eoi"],
        },
    )


def build_tiny_janus(words: Iterable[str] = DEFAULT_WORDS, size: TinyJanusSize = TinyJanusSize(), seed: int = 0):
    """Return (model, processor): a randomly initialised ``JanusForConditionalGeneration``
    and its ``JanusProcessor``, built from configs with no download."""
    import torch
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor

    from asg_kit.adapters.janus import pil_image_processor_class

    tokenizer = build_word_tokenizer(words)
    grid = size.image_size // size.patch_size
    config = JanusConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": size.hidden,
            "intermediate_size": size.intermediate,
            "num_hidden_layers": size.layers,
            "num_attention_heads": size.heads,
            "num_key_value_heads": size.kv_heads,
            "max_position_embeddings": size.max_positions,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": size.vision_hidden,
            "num_hidden_layers": size.vision_layers,
            "num_attention_heads": size.vision_heads,
            "image_size": size.image_size,
            "patch_size": size.patch_size,
            "mlp_ratio": 2,
            "projection_dim": size.hidden,
            "num_image_tokens": grid * grid,
        },
        vq_config={
            "embed_dim": 8,
            "num_embeddings": size.codebook,
            "latent_channels": size.vq_latent_channels,
            "base_channels": size.vq_base_channels,
            "channel_multiplier": list(size.vq_channel_multiplier),
            "num_res_blocks": size.vq_res_blocks,
            "projection_dim": size.hidden,
            "image_token_embed_dim": size.hidden,
        },
        image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image"]),
    )
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    image_processor = pil_image_processor_class()(
        size={"height": size.image_size, "width": size.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=grid * grid)
    return model, processor


def save_pretrained_pair(model, processor, folder) -> None:
    """Write a Janus model and its processor as a checkpoint folder (safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)


def save_tiny_janus(folder, seed: int = 0) -> None:
    """The registry's tiny builder for "janus": a random-weight tiny Janus written to
    ``folder`` in transformers' Janus format (``JanusAdapter.from_pretrained`` loads it)."""
    save_pretrained_pair(*build_tiny_janus(seed=seed), folder)
