"""Write a tiny random-weight BAGEL checkpoint folder offline, in the released layout
(``llm_config.json``, ``vit_config.json``, ``ae.safetensors``, ``ema.safetensors``, Qwen2
tokenizer files) plus ``asgkit_bagel.json`` with the tiny sizes BAGEL's loader otherwise
hard-codes. The model is built from the real upstream classes and loads through
``BagelAdapter.from_pretrained`` like the released one. Used by the tests and
``asgkit check --tiny``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from asg_kit import prompts
from asg_kit.adapters.bagel import BagelSettings, build_network
from asg_kit.adapters.tiny_janus import DEFAULT_WORDS
from asg_kit.adapters.upstream import import_bagel

# Qwen2.5 declares these as additional special tokens; BAGEL's add_special_tokens then
# finds them and adds nothing.
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class TinyBagelSize:
    """Sizes of a tiny BAGEL: understanding images up to ``vit_patch * vit_side`` px,
    generated images ``image_size`` px (one latent token per 16 px)."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vit_hidden: int = 32
    vit_intermediate: int = 64
    vit_layers: int = 2
    vit_heads: int = 2
    vit_patch: int = 14
    vit_side: int = 4
    vae_channels: int = 32
    latent_channels: int = 16
    image_size: int = 32
    num_timesteps: int = 4
    bpe_merges: int = 400
    init_range: float = 0.2  # wider than 0.02 so that random logits are not all alike


def _corpus() -> str:
    texts = [*prompts.SOLVER_FRAMINGS, prompts.SOLVER_RULES, prompts.PROPOSER_QUESTION, prompts.PROPOSER_SPEC,
             prompts.PROPOSER_DECOMPOSE, prompts.CAPTION, prompts.EMBED_PROBE, " ".join(DEFAULT_WORDS),
             "<answer> red </answer> draw : a red circle | what color is the circle ? red"]  # fmt: skip
    return " ".join(texts)


def write_tiny_tokenizer(folder: Path, bagel, merges: int = 400) -> None:
    """A byte-level BPE in Qwen2's file format (vocab.json, merges.txt,
    tokenizer_config.json), trained for ``merges`` rounds on the prompts' words."""
    import regex

    tokenization_qwen2 = bagel.tokenization_qwen2
    byte_symbol = tokenization_qwen2.bytes_to_unicode()
    counts: dict[tuple[str, ...], int] = {}
    for piece in regex.findall(tokenization_qwen2.PRETOKENIZE_REGEX, _corpus()):
        word = tuple(byte_symbol[b] for b in piece.encode("utf-8"))
        counts[word] = counts.get(word, 0) + 1
    vocab = {byte_symbol[b]: b for b in range(256)}
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, count in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        learned.append(best)
        vocab["".join(best)] = len(vocab)
        merged: dict[tuple[str, ...], int] = {}
        for word, count in counts.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        counts = merged
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learned))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT, "additional_special_tokens": list(QWEN_SPECIAL_TOKENS), "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
    }))  # fmt: skip


def save_tiny_bagel(folder: str | Path, upstream: str | Path | None = None, size: TinyBagelSize = TinyBagelSize(), seed: int = 0) -> Path:
    """Write a tiny random BAGEL to ``folder`` (created) and return it."""
    import torch
    from safetensors.torch import save_file

    bagel = import_bagel(upstream)
    folder = Path(folder)
    write_tiny_tokenizer(folder, bagel, size.bpe_merges)
    tokenizer = bagel.Qwen2Tokenizer.from_pretrained(str(folder))
    tokenizer, _, _ = bagel.data_utils.add_special_tokens(tokenizer)

    settings = BagelSettings(
        vit_max_num_patch_per_side=size.vit_side, max_latent_size=max(1, size.image_size // 16),
        autoencoder=dict(resolution=64, in_channels=3, downsample=8, ch=size.vae_channels, out_ch=3, ch_mult=[1, 1, 1, 1],
                         num_res_blocks=1, z_channels=size.latent_channels, scale_factor=0.3611, shift_factor=0.1159),
        vae_image=(64, 32, 16), vit_image=(size.vit_patch * size.vit_side, size.vit_patch * size.vit_side // 2, size.vit_patch),
        image_size=size.image_size, num_timesteps=size.num_timesteps,
    )  # fmt: skip
    settings.write(folder)
    llm_config = bagel.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
        num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, max_position_embeddings=4096, rope_theta=1_000_000.0,
        initializer_range=size.init_range,
    )  # fmt: skip
    llm_config.to_json_file(str(folder / "llm_config.json"))
    vit_config = bagel.SiglipVisionConfig(
        hidden_size=size.vit_hidden, intermediate_size=size.vit_intermediate, num_hidden_layers=size.vit_layers + 1,
        num_attention_heads=size.vit_heads, patch_size=size.vit_patch, image_size=size.vit_patch * size.vit_side,
    )  # the released vit_config.json counts one layer more than the model keeps  # fmt: skip
    vit_config.to_json_file(str(folder / "vit_config.json"))

    torch.manual_seed(seed)
    network = build_network(bagel, folder, settings)
    with torch.no_grad():  # Bagel zeroes llm2vae at init (velocity 0 everywhere); give it weights
        torch.nn.init.normal_(network.llm2vae.weight, std=size.init_range)
        torch.nn.init.normal_(network.llm2vae.bias, std=size.init_range)
    save_file({k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).contiguous() for k, v in network.state_dict().items()}, str(folder / "ema.safetensors"), metadata={"format": "pt"})
    vae = bagel.AutoEncoder(bagel.AutoEncoderParams(**settings.autoencoder))
    save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(folder / "ae.safetensors"), metadata={"format": "pt"})
    return folder
