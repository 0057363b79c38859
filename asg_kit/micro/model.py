"""The micro model: a tiny Janus sized for the shapes world, and where its weights ship."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from asg_kit.adapters.tiny_janus import TinyJanusSize, build_tiny_janus

# 64 px images; 8 px patches and an 8x VQ give 64 tokens for understanding and generation.
MICRO_SIZE = TinyJanusSize(
    hidden=128,
    intermediate=344,
    layers=4,
    heads=4,
    kv_heads=2,
    image_size=64,
    patch_size=8,
    vision_hidden=128,
    vision_layers=4,
    vision_heads=4,
    codebook=512,
    vq_base_channels=32,
    vq_channel_multiplier=(1, 1, 1, 1),
    vq_res_blocks=0,
    vq_latent_channels=32,
    max_positions=256,
)


def build_micro_janus(seed: int = 0, image_size: int = 64):
    """The untrained micro model and its processor (vocabulary of the shapes world)."""
    from dataclasses import replace

    from asg_kit.micro.tasks import vocabulary

    return build_tiny_janus(words=vocabulary(), size=replace(MICRO_SIZE, image_size=image_size), seed=seed)


def micro_weights_dir() -> Path:
    """The trained micro model shipped inside the package (transformers' Janus format)."""
    return Path(str(resources.files("asg_kit") / "micro" / "weights"))


def save_tiny_micro(folder, seed: int = 0) -> None:
    """The registry's tiny builder for "micro": the micro architecture and vocabulary with
    random weights (untrained), written to ``folder`` like the shipped weights. The shipped
    model is itself tiny and is what ``asgkit check --backbone micro`` checks by default."""
    from asg_kit.adapters.tiny_janus import save_pretrained_pair

    save_pretrained_pair(*build_micro_janus(seed=seed), folder)
