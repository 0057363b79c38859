"""BAGEL (ByteDance-Seed/Bagel, BAGEL-7B-MoT) driven through its upstream code.

BAGEL is a Qwen2 mixture-of-transformers: an understanding expert reads text and SigLIP
image patches, a generation expert denoises VAE latents by rectified flow. Its code is a
source tree, not a package: :func:`asg_kit.adapters.upstream.import_bagel` imports the
user's checkout (``upstream=DIR``), with the flash-attn fallback on machines without it.

Two paths, as upstream has them:
- inference (modules in eval mode): the KV-cache calls ``prepare_vit_images`` /
  ``prepare_prompts`` / ``forward_cache_update_*`` and ``forward_inference``. Our decode
  loop follows ``generate_text`` but keeps every step's logits (upstream returns ids), with
  per-request random streams; our flow loop calls ``_forward_flow`` per step with noise we
  seed, n images of a prompt packed in one query, CFG applied per image;
- training (modules in train mode): one packed sequence of samples, each a list of splits
  (causal text, full ViT image, noisy latent) with its attention mask, through the language
  model's packed forward. Teacher-forced log-probs and differentiable velocities come from
  here, never from the no-grad inference path.

Roles: LoRA on the understanding expert's projections for the Proposer and the Solver, on
the generation expert's (``*_moe_gen``) for the Generator.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image

from asg_kit.adapters.base import (
    CAPTION_PROMPT,
    EMBED_PROBE,
    ROLES,
    AnswerRequest,
    FlowRollout,
    GeneratedImages,
    ImageRollout,
    LoraSettings,
    NoisedLatents,
    NonFiniteLogits,
    TextSample,
    TokenScores,
)
from asg_kit.adapters.decoding import RowSampler, check_completions, sample_in_batches
from asg_kit.adapters.roles import LoraRoles
from asg_kit.adapters.upstream import bagel_autocast, import_bagel
from asg_kit.rewards.entropy import token_entropy
from asg_kit.train.losses import sde_step

SETTINGS_FILE = "asgkit_bagel.json"
CHECKPOINT_FILES = ("llm_config.json", "vit_config.json", "ae.safetensors", "ema.safetensors")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class BagelSettings:
    """What BAGEL's own loading code (app.py, inference.ipynb) hard-codes beside the
    checkpoint files, and the sampler's defaults (README: "About Inference
    Hyperparameters"). A checkpoint folder may override them in ``asgkit_bagel.json``
    (the tiny test model does); the released BAGEL-7B-MoT folder needs none."""

    vit_max_num_patch_per_side: int = 70
    max_latent_size: int = 64
    latent_patch_size: int = 2
    connector_act: str = "gelu_pytorch_tanh"
    autoencoder: dict = field(
        default_factory=lambda: dict(
            resolution=256, in_channels=3, downsample=8, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
            z_channels=16, scale_factor=0.3611, shift_factor=0.1159,
        )  # fmt: skip
    )
    vae_image: tuple[int, int, int] = (1024, 512, 16)  # longest side, shortest side, stride
    vit_image: tuple[int, int, int] = (980, 224, 14)
    image_size: int = 1024  # generated images are square
    num_timesteps: int = 50
    timestep_shift: float = 3.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"

    @classmethod
    def read(cls, folder: Path, **overrides) -> "BagelSettings":
        saved = json.loads((folder / SETTINGS_FILE).read_text()) if (folder / SETTINGS_FILE).is_file() else {}
        chosen = {**saved, **{k: v for k, v in overrides.items() if v is not None}}
        known = {k: v for k, v in chosen.items() if k in cls.__dataclass_fields__}
        for key in ("vae_image", "vit_image", "cfg_interval"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def write(self, folder: Path) -> None:
        (folder / SETTINGS_FILE).write_text(json.dumps(asdict(self), indent=1))


def resize_for(image: Image.Image, longest: int, shortest: int, stride: int, max_pixels: int = 14 * 14 * 9 * 1024) -> Image.Image:
    """BAGEL's ``ImageTransform`` resize: fit the long side under ``longest``, lift the
    short side to ``shortest``, sides multiples of ``stride``, bicubic (torchvision's PIL
    path), without torchvision."""

    def snapped(width: float, height: float) -> tuple[int, int]:
        return tuple(max(stride, int(round(side / stride) * stride)) for side in (width, height))  # type: ignore[return-value]

    width, height = image.size
    scale = max(min(longest / max(width, height), 1.0), shortest / min(width, height))
    new_w, new_h = snapped(round(width * scale), round(height * scale))
    if new_w * new_h > max_pixels:
        shrink = max_pixels / (new_w * new_h)
        new_w, new_h = snapped(round(new_w * shrink), round(new_h * shrink))
    if max(new_w, new_h) > longest:
        shrink = longest / max(new_w, new_h)
        new_w, new_h = snapped(round(new_w * shrink), round(new_h * shrink))
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.BICUBIC)


def to_model_pixels(image: Image.Image) -> torch.Tensor:
    """(3, H, W) in [-1, 1], as ``ToTensor`` + ``Normalize(0.5, 0.5)``."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(array.transpose(2, 0, 1).copy()) - 0.5) / 0.5


class PackedBatch:
    """Samples packed into one sequence for BAGEL's training forward, each a list of
    splits: causal text ``[bos] ids [eos]``, a full-attention ViT image ``[soi] patches
    [eoi]`` or a noisy latent ``[soi] tokens [eoi]`` (attended only by itself); an image
    takes one rotary position, as in upstream's ``pack_sequence``."""

    def __init__(self, adapter: "BagelAdapter") -> None:
        self.adapter = adapter
        self.length = 0
        self.text_ids: list[int] = []
        self.text_indexes: list[int] = []
        self.positions: list[int] = []
        self.vit_patches: list[torch.Tensor] = []
        self.vit_positions: list[torch.Tensor] = []
        self.vit_lengths: list[int] = []
        self.vit_indexes: list[int] = []
        self.latents: list[torch.Tensor] = []
        self.latent_times: list[torch.Tensor] = []
        self.latent_positions: list[torch.Tensor] = []
        self.latent_indexes: list[int] = []
        self.scored_indexes: list[int] = []
        self.labels: list[int] = []
        self.sample_lengths: list[int] = []
        self.sample_rows: list[tuple[int, int]] = []
        self.masks: list[torch.Tensor] = []
        self._splits: list[int] = []
        self._modes: list[str] = []
        self._rope = 0
        self._start = 0

    def _split(self, length: int, mode: str) -> None:
        self.length += length
        self._splits.append(length)
        self._modes.append(mode)

    def text(self, ids: Sequence[int], labels: Sequence[int] | None = None) -> None:
        """A causal text split of exactly ``ids``; ``labels`` are targets for its first
        ``len(labels)`` positions (teacher forcing)."""
        start = self.length
        self.text_ids += list(ids)
        self.text_indexes += range(start, start + len(ids))
        self.positions += range(self._rope, self._rope + len(ids))
        if labels is not None:
            self.scored_indexes += range(start, start + len(labels))
            self.labels += list(labels)
        self._rope += len(ids)
        self._split(len(ids), "causal")

    def vit_image(self, pixels: torch.Tensor) -> None:
        model, ids = self.adapter.model, self.adapter.token_ids
        patches = self.adapter.upstream.data_utils.patchify(pixels, model.vit_patch_size)
        n = patches.shape[0]
        start = self.length
        self.text_ids += [ids["start_of_image"], ids["end_of_image"]]
        self.text_indexes += [start, start + n + 1]
        self.vit_indexes += range(start + 1, start + 1 + n)
        self.vit_patches.append(patches)
        self.vit_positions.append(
            model.get_flattened_position_ids(pixels.shape[1], pixels.shape[2], model.vit_patch_size, max_num_patches_per_side=model.vit_max_num_patch_per_side)
        )
        self.vit_lengths.append(n)
        self.positions += [self._rope] * (n + 2)
        self._rope += 1
        self._split(n + 2, "full")

    def noisy_latent(self, latent: torch.Tensor, timestep: float | torch.Tensor, image_size: tuple[int, int]) -> None:
        """``latent``: (tokens, p*p*channels) rows at flow time ``timestep``. The latent
        keeps the rotary position after the text, as ``prepare_vae_latent`` gives it."""
        model, ids = self.adapter.model, self.adapter.token_ids
        n = latent.shape[0]
        start = self.length
        self.text_ids += [ids["start_of_image"], ids["end_of_image"]]
        self.text_indexes += [start, start + n + 1]
        self.latent_indexes += range(start + 1, start + 1 + n)
        self.latents.append(latent)
        self.latent_times.append(torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(n))
        height, width = image_size
        self.latent_positions.append(model.get_flattened_position_ids(height, width, model.latent_downsample, max_num_patches_per_side=model.max_latent_size))
        self.positions += [self._rope] * (n + 2)
        self._split(n + 2, "noise")

    def end_sample(self) -> None:
        self.sample_lengths.append(self.length - self._start)
        self.sample_rows.append((self._start, self.length))
        self.masks.append(self.adapter.upstream.data_utils.prepare_attention_mask_per_sample(self._splits, self._modes))
        self._splits, self._modes, self._rope, self._start = [], [], 0, self.length

    def hidden(self) -> torch.Tensor:
        """The language model's last hidden state over the packed sequence (train mode)."""
        adapter = self.adapter
        model, device = adapter.model, adapter.device
        long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        text_indexes = long(self.text_indexes)
        embeds = model.language_model.model.embed_tokens(long(self.text_ids))
        sequence = embeds.new_zeros((self.length, model.hidden_size))
        sequence[text_indexes] = embeds
        understanding = text_indexes
        if self.vit_patches:
            lengths = torch.tensor(self.vit_lengths, dtype=torch.int32, device=device)
            positions = torch.cat(self.vit_positions).to(device)
            features = model.vit_model(
                packed_pixel_values=torch.cat(self.vit_patches).to(device),
                packed_flattened_position_ids=positions,
                cu_seqlens=torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32),
                max_seqlen=int(lengths.max()),
            )
            features = model.connector(features) + model.vit_pos_embed(positions)
            vit_indexes = long(self.vit_indexes)
            sequence[vit_indexes] = features.to(sequence.dtype)
            understanding = torch.cat([understanding, vit_indexes])
        generation = None
        if self.latents:
            generation = long(self.latent_indexes)
            latent = (
                model.vae2llm(torch.cat(self.latents).to(device))
                + model.time_embedder(torch.cat(self.latent_times).to(device))
                + model.latent_pos_embed(torch.cat(self.latent_positions).to(device))
            )
            sequence[generation] = latent.to(sequence.dtype)
        return model.language_model(
            packed_sequence=sequence,
            sample_lens=self.sample_lengths,
            attention_mask=[mask.to(device) for mask in self.masks],
            packed_position_ids=long(self.positions),
            packed_und_token_indexes=understanding,
            packed_gen_token_indexes=generation,
        )


def build_network(bagel, folder: Path, settings: BagelSettings, meta: bool = False):
    """An uninitialised ``Bagel`` from the folder's ``llm_config.json`` and
    ``vit_config.json`` with app.py's overrides (weights are loaded separately)."""
    llm_config = bagel.Qwen2Config.from_json_file(str(folder / "llm_config.json"))
    if not hasattr(llm_config, "pad_token_id"):  # transformers 5 no longer defaults it; Qwen2Model reads it
        llm_config.pad_token_id = None
    llm_config.qk_norm = True
    llm_config.tie_word_embeddings = False
    llm_config.layer_module = "Qwen2MoTDecoderLayer"
    vit_config = bagel.SiglipVisionConfig.from_json_file(str(folder / "vit_config.json"))
    vit_config.rope = False
    vit_config.num_hidden_layers -= 1  # the checkpoint drops SigLIP's last layer
    config = bagel.BagelConfig(
        visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
        vae_config=bagel.AutoEncoderParams(**settings.autoencoder), vit_max_num_patch_per_side=settings.vit_max_num_patch_per_side,
        connector_act=settings.connector_act, latent_patch_size=settings.latent_patch_size, max_latent_size=settings.max_latent_size,
    )  # fmt: skip
    network = bagel.Bagel(bagel.Qwen2ForCausalLM(llm_config), bagel.SiglipVisionModel(vit_config), config)
    # The checkpoint holds the ViT patch embedding as a Linear over flattened patches.
    network.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=meta)
    return network


class BagelAdapter(LoraRoles):
    """BAGEL with one LoRA adapter per role: text roles on the understanding expert, the
    Generator on the generation expert."""

    name = "bagel"
    generation_paradigm = "rectified_flow"
    default_model: str | None = "ByteDance-Seed/BAGEL-7B-MoT"
    generator_on_text = False  # the Generator's LoRA is on the generation expert: text never reaches it

    def __init__(self, model, vae, tokenizer, token_ids: dict, settings: BagelSettings, upstream, lora: LoraSettings | None = LoraSettings(), roles: Sequence[str] = ROLES) -> None:
        self.model = model  # peft injects the roles into it in place: upstream's methods stay callable
        self.vae = vae
        self.tokenizer = tokenizer
        self.token_ids = dict(token_ids)
        self.settings = settings
        self.upstream = upstream
        self.bos_id, self.eos_id = token_ids["bos_token_id"], token_ids["eos_token_id"]
        self.roles: tuple[str, ...] = ()
        self.peft = None
        self._lora_parameters: list[torch.nn.Parameter] = []
        self._active: str | None = None
        if lora is not None:
            self._add_roles(lora, tuple(roles))
        self.model.eval()
        self._controls = sorted(
            {*tokenizer.all_special_tokens, *(t.content for t in tokenizer.added_tokens_decoder.values()), "<|endoftext|>"} - {""},
            key=len,
            reverse=True,
        )

    # Loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        upstream: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        image_size: int | None = None,
        num_timesteps: int | None = None,
        **options,
    ) -> "BagelAdapter":
        """Load a BAGEL checkpoint folder in the released layout (``llm_config.json``,
        ``vit_config.json``, ``ae.safetensors``, ``ema.safetensors``, Qwen2 tokenizer
        files) the way upstream's app.py does: configs with its three overrides, the model
        built empty and filled by accelerate in bfloat16 (its code paths cast activations to
        bfloat16 themselves, so ``dtype`` can be nothing else), the VAE in float32, every
        call under bfloat16 autocast as upstream runs it.
        ``image_size`` / ``num_timesteps`` override the sampler's defaults."""
        import accelerate
        from safetensors.torch import load_file

        folder = Path(model)
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not a BAGEL checkpoint folder (missing {', '.join(missing)}); download one with "
                f"`huggingface-cli download {cls.default_model} --local-dir DIR` and pass --model DIR"
            )
        bagel = import_bagel(upstream)
        settings = BagelSettings.read(folder, image_size=image_size, num_timesteps=num_timesteps)
        if device is None:  # under torchrun, each process on its own GPU
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.bfloat16)
        if dtype != torch.bfloat16:
            raise ValueError(f"BAGEL's upstream code mixes bfloat16 into its own computations: its weights must be bfloat16, not {dtype}")

        vae_params = bagel.AutoEncoderParams(**settings.autoencoder)
        vae = bagel.AutoEncoder(vae_params)
        vae.load_state_dict(load_file(str(folder / "ae.safetensors")), strict=True)
        vae = vae.to(device).eval()
        with accelerate.init_empty_weights():
            network = build_network(bagel, folder, settings, meta=True)
        network = accelerate.load_checkpoint_and_dispatch(
            network, checkpoint=str(folder / "ema.safetensors"), device_map={"": str(device)}, dtype=dtype
        ).eval()

        tokenizer = bagel.Qwen2Tokenizer.from_pretrained(str(folder))
        tokenizer, token_ids, _ = bagel.data_utils.add_special_tokens(tokenizer)
        return cls(network, vae, tokenizer, token_ids, settings, bagel, **options)

    def _add_roles(self, lora: LoraSettings, roles: tuple[str, ...]) -> None:
        from peft import LoraConfig

        self.install_roles(self.model, {role: LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=self.lora_targets(role, lora), bias="none") for role in roles})

    @staticmethod
    def lora_targets(role: str, lora: LoraSettings = LoraSettings()) -> str:
        """The regex of ``role``'s LoRA targets: ``lora.target_modules`` on the language
        model's understanding expert for the text roles, on its generation expert
        (``*_proj_moe_gen``, ``mlp_moe_gen.*``) for the Generator. The plain suffixes would
        hit both experts and the ViT."""
        attention = [m for m in lora.target_modules if m in ATTENTION]
        mlp = [m for m in lora.target_modules if m in MLP]
        if role == "generator":
            parts = [rf"self_attn\.({'|'.join(attention)})_moe_gen", rf"mlp_moe_gen\.({'|'.join(mlp)})"]
        else:
            parts = [rf"self_attn\.({'|'.join(attention)})", rf"mlp\.({'|'.join(mlp)})"]
        chosen = [p for p, names in zip(parts, (attention, mlp)) if names]
        return rf"language_model\.model\.layers\.\d+\.({'|'.join(chosen)})"

    # Roles -----------------------------------------------------------------------------

    # Shared pieces ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.llm2vae.weight.device

    def _autocast(self):
        return bagel_autocast(self.device)

    @contextmanager
    def _packed_mode(self) -> Iterator[None]:
        """BAGEL's modules pick their path from ``self.training``: the packed forward needs
        train mode. Dropout (LoRA's) stays as the caller set it: on while the training loop
        has the model in train mode, off otherwise."""
        was_training = self.model.training
        self.model.train()
        if not was_training:
            for module in self.model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.eval()
        try:
            with self._autocast():
                yield
        finally:
            self.model.train(was_training)

    def _plain(self, text: str) -> str:
        # Text from users or from the model itself must not smuggle in turns, image slots or
        # an end of sequence: special-token strings become spaces.
        for marker in self._controls:
            text = text.replace(marker, " ")
        return text

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(self._plain(text), add_special_tokens=False)

    def prompt_ids(self, text: str, with_image: bool = False) -> list[int]:
        """The prompt's text split as BAGEL's ``prepare_prompts`` builds it:
        ``<|im_start|> text <|im_end|>`` (an image, when given, is a split of its own before)."""
        return [self.bos_id, *self.text_ids(text), self.eos_id]

    def _prepared(self, image: Image.Image) -> Image.Image:
        """Upstream's understanding input: RGB, resized by the VAE-side transform first."""
        return resize_for(self.upstream.data_utils.pil_img2rgb(image), *self.settings.vae_image)

    def _vit_pixels(self, image: Image.Image) -> torch.Tensor:
        return to_model_pixels(resize_for(image, *self.settings.vit_image))

    def _new_context(self, rows: int) -> dict:
        return {"cache": self.upstream.NaiveCache(self.model.config.llm_config.num_hidden_layers), "kv_lens": [0] * rows, "ropes": [0] * rows}

    def _repeat_context(self, context: dict, rows: int) -> dict:
        """A one-row context copied to ``rows`` rows: each layer's cache holds the rows' K/V
        back to back, so the copy is a repeat along the packed dimension."""
        cache = self.upstream.NaiveCache(context["cache"].num_layers)
        for layer in range(cache.num_layers):
            if context["cache"].key_cache[layer] is not None:
                cache.key_cache[layer] = context["cache"].key_cache[layer].repeat(rows, 1, 1)
                cache.value_cache[layer] = context["cache"].value_cache[layer].repeat(rows, 1, 1)
        return {"cache": cache, "kv_lens": context["kv_lens"] * rows, "ropes": context["ropes"] * rows}

    def _prefill_images(self, context: dict, images: Sequence[Image.Image]) -> dict:
        core = self.model
        inputs, kv_lens, ropes = core.prepare_vit_images(context["kv_lens"], context["ropes"], list(images), self._vit_pixels, self.token_ids)
        cache = core.forward_cache_update_vit(context["cache"], **self._on_device(inputs))
        return {"cache": cache, "kv_lens": kv_lens, "ropes": ropes}

    def _prefill_prompts(self, context: dict, texts: Sequence[str]) -> dict:
        core = self.model
        inputs, kv_lens, ropes = core.prepare_prompts(context["kv_lens"], context["ropes"], [self._plain(t) for t in texts], self.tokenizer, self.token_ids)
        cache = core.forward_cache_update_text(context["cache"], **self._on_device(inputs))
        return {"cache": cache, "kv_lens": kv_lens, "ropes": ropes}

    def _on_device(self, inputs: dict) -> dict:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    # Understanding ---------------------------------------------------------------------

    @torch.no_grad()
    def sample_answers(self, requests: Sequence[AnswerRequest], max_new_tokens: int = 96, seed: int = 0) -> list[TextSample]:
        def sample_batch(batch, seeds):
            with self._autocast():
                return self._sample_group(batch, seeds, max_new_tokens)

        # Requests without an image decode apart: a batch mixes only rows of the same kind.
        return sample_in_batches(requests, seed, sample_batch, text_apart=True)

    def _sample_group(self, group: Sequence[AnswerRequest], seeds: Sequence[int], max_new_tokens: int) -> list[TextSample]:
        rows = len(group)
        images = [r.image for r in group]
        if images[0] is None:
            context = self._new_context(rows)
        elif all(image is images[0] for image in images):
            context = self._repeat_context(self._prefill_images(self._new_context(1), [self._prepared(images[0])]), rows)
        else:
            context = self._prefill_images(self._new_context(rows), [self._prepared(image) for image in images])
        context = self._prefill_prompts(context, [r.prompt for r in group])
        return self._decode(context, group, seeds, max_new_tokens)

    def _decode(self, context: dict, group: Sequence[AnswerRequest], seeds: Sequence[int], max_new_tokens: int) -> list[TextSample]:
        """``generate_text``'s loop (start from ``<|im_start|>``, one token per row per
        step, the cache growing in place), keeping each step's logits."""
        language_model = self.model.language_model
        rows = len(group)
        device = self.device
        cache = context["cache"]
        kv_lens = torch.tensor(context["kv_lens"], dtype=torch.int, device=device)
        positions = torch.tensor(context["ropes"], dtype=torch.long, device=device)
        current = torch.full((rows,), self.bos_id, dtype=torch.long, device=device)
        sampler = RowSampler(group, seeds, {self.eos_id}, self.eos_id, device)
        offsets = torch.arange(rows, dtype=kv_lens.dtype, device=device)
        for _ in range(max_new_tokens):
            # After the previous step row r's cache has kv_lens[r] entries; the new token of
            # each row goes right after them in the merged (cache + queries) packing.
            starts = torch.cumsum(kv_lens, 0) - kv_lens + offsets
            kv_indexes = torch.cat([torch.arange(int(s), int(s) + int(n), device=device) for s, n in zip(starts, kv_lens)])
            output = language_model.forward_inference(
                packed_query_sequence=language_model.model.embed_tokens(current),
                query_lens=torch.ones_like(kv_lens),
                packed_query_position_ids=positions,
                packed_query_indexes=(starts + kv_lens).long(),
                past_key_values=cache,
                key_values_lens=kv_lens,
                packed_key_value_indexes=kv_indexes,
                update_past_key_values=True,
                is_causal=True,
                mode="und",
            )
            cache = output.past_key_values
            logits = language_model.lm_head(output.packed_query_sequence).float()
            drawn = sampler.step(logits)
            if sampler.done:
                break
            current = torch.tensor(drawn, dtype=torch.long, device=device)
            kv_lens = kv_lens + 1
            positions = positions + 1
        return sampler.samples(self.decode)

    def decode(self, token_ids: Sequence[int]) -> str:
        kept = [t for t in token_ids if t not in (self.eos_id, self.bos_id)]
        return self.tokenizer.decode(kept, skip_special_tokens=False).strip()

    def encode_completion(self, text: str, finished: bool = True) -> list[int]:
        return self.text_ids(text) + ([self.eos_id] if finished else [])

    def score_completions(self, requests: Sequence[AnswerRequest], completions: Sequence[Sequence[int]], keep_logits: bool = False) -> TokenScores:
        """Teacher-forced through the packed training forward: per sample ``[image]``,
        the prompt split, then ``<|im_start|> completion[:-1]`` predicting ``completion``,
        exactly the positions and attention the decode loop had."""
        check_completions(requests, completions)
        pixels: dict[int, torch.Tensor] = {}
        batch = PackedBatch(self)
        for request, completion in zip(requests, completions):
            if request.image is not None:
                if id(request.image) not in pixels:
                    pixels[id(request.image)] = self._vit_pixels(self._prepared(request.image))
                batch.vit_image(pixels[id(request.image)])
            batch.text(self.prompt_ids(request.prompt))
            batch.text([self.bos_id, *completion[:-1]], labels=list(completion))
            batch.end_sample()
        with self._packed_mode():
            hidden = batch.hidden()
            logits = self.model.language_model.lm_head(hidden[torch.tensor(batch.scored_indexes, device=self.device)]).float()
        targets = torch.tensor(batch.labels, device=self.device)
        token_logprobs = torch.log_softmax(logits, -1).gather(-1, targets[:, None])[:, 0]
        with torch.no_grad():
            token_entropies = token_entropy(logits.detach())
        longest = max(len(c) for c in completions)
        shape = (len(completions), longest)
        mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        for row, completion in enumerate(completions):
            mask[row, : len(completion)] = True
        scored_logprobs = token_logprobs.new_zeros(shape).masked_scatter(mask, token_logprobs)
        scored_entropies = token_entropies.new_zeros(shape).masked_scatter(mask, token_entropies)
        full = None
        if keep_logits:
            full = logits.new_zeros((*shape, logits.shape[-1])).masked_scatter(mask[..., None], logits)
        return TokenScores(logprobs=scored_logprobs, entropies=scored_entropies, mask=mask, logits=full)

    def caption(self, images: Sequence[Image.Image], prompt: str = CAPTION_PROMPT, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> list[str]:
        requests = [AnswerRequest(image, prompt, temperature=temperature) for image in images]
        return [s.text for s in self.sample_answers(requests, max_new_tokens=max_new_tokens, seed=seed)]

    # Embeddings (base model) -----------------------------------------------------------

    @torch.no_grad()
    def _mean_embedding(self, images: Sequence[Image.Image | None], texts: Sequence[str]) -> torch.Tensor:
        batch = PackedBatch(self)
        for image, text in zip(images, texts):
            if image is not None:
                batch.vit_image(self._vit_pixels(self._prepared(image)))
            batch.text(self.prompt_ids(text))
            batch.end_sample()
        with self.role(None), self._packed_mode():
            hidden = batch.hidden().float()
        pooled = torch.stack([hidden[start:end].mean(0) for start, end in batch.sample_rows])
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self._mean_embedding([None] * len(texts), texts)

    def embed_image_text(self, images: Sequence[Image.Image], texts: Sequence[str] | None = None) -> torch.Tensor:
        return self._mean_embedding(images, list(texts) if texts is not None else [EMBED_PROBE] * len(images))

    # Generation ------------------------------------------------------------------------

    def _time_grid(self) -> torch.Tensor:
        """``generate_image``'s grid: ``linspace(1, 0, N)`` shifted by ``s t / (1 + (s - 1) t)``."""
        shift = self.settings.timestep_shift
        grid = torch.linspace(1, 0, self.settings.num_timesteps)
        return shift * grid / (1 + (shift - 1) * grid)

    def _guided(self, conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
        """``_forward_flow``'s text CFG with its renormalisation, for one image."""
        guided = unconditional + scale * (conditional - unconditional)
        if self.settings.cfg_renorm_type == "global":
            norm, guided_norm = torch.norm(conditional), torch.norm(guided)
        elif self.settings.cfg_renorm_type == "channel":
            norm, guided_norm = torch.norm(conditional, dim=-1, keepdim=True), torch.norm(guided, dim=-1, keepdim=True)
        else:
            raise ValueError(f"cfg_renorm_type {self.settings.cfg_renorm_type!r} is not supported (global, channel)")
        return guided * (norm / (guided_norm + 1e-8)).clamp(min=self.settings.cfg_renorm_min, max=1.0)

    @torch.no_grad()
    def generate_images(
        self, prompts: Sequence[str], n: int = 1, guidance_scale: float = 4.0, temperature: float = 1.0, seed: int = 0, noise_level: float = 0.0
    ) -> GeneratedImages:
        """``n`` images per prompt by the Euler ODE of ``generate_image``, the ``n`` rows of
        a prompt packed in one query per step (its prefill shared), text CFG per image inside
        ``cfg_interval``. Row ``j`` of prompt ``p`` draws its noise from a stream seeded
        ``seed + p n + j``. ``noise_level`` > 0 samples the SDE of Flow-GRPO instead (eta).
        ``temperature`` has no meaning for a flow sampler and is ignored."""
        size = (self.settings.image_size, self.settings.image_size)
        grid = self._time_grid()
        low, high = self.settings.cfg_interval
        guidance = torch.tensor([guidance_scale if low < float(t) <= high else 1.0 for t in grid[:-1]])
        images, trajectories, prompt_ids, prompt_index, seeds = [], [], [], [], []
        for p, prompt in enumerate(prompts):
            row_seeds = [seed + p * n + j for j in range(n)]
            with self._autocast():
                trajectory = self._flow(prompt, size, n, grid, guidance, row_seeds, noise_level)
                images.append(self._decode_latents(trajectory[:, -1], size))
            trajectories.append(trajectory)
            prompt_ids += [self.prompt_ids(prompt)] * n
            prompt_index += [p] * n
            seeds += row_seeds
        rollout = FlowRollout(
            prompts=list(prompts), prompt_ids=prompt_ids, prompt_index=prompt_index, latents=torch.cat(trajectories),
            timesteps=grid, guidance=guidance, guidance_scale=guidance_scale, image_size=size, seeds=seeds, noise_level=noise_level,
        )  # fmt: skip
        return GeneratedImages(images, rollout)

    def _flow(self, prompt: str, size: tuple[int, int], n: int, grid: torch.Tensor, guidance: torch.Tensor, seeds: Sequence[int], noise_level: float = 0.0) -> torch.Tensor:
        core = self.model
        core.language_model.model.enable_taylorseer = False  # generate_image sets it before calling _forward_flow
        conditional = self._repeat_context(self._prefill_prompts(self._new_context(1), [prompt]), n)
        unconditional = self._new_context(n)  # text CFG drops the prompt: an empty context
        latent = core.prepare_vae_latent(conditional["kv_lens"], conditional["ropes"], [size] * n, self.token_ids)
        latent_cfg = core.prepare_vae_latent_cfg(unconditional["kv_lens"], unconditional["ropes"], [size] * n)
        shared = {k: latent[k] for k in ("packed_text_ids", "packed_text_indexes", "packed_vae_token_indexes", "packed_vae_position_ids", "packed_seqlens")}
        branch = {
            "conditional": dict(shared, packed_indexes=latent["packed_indexes"], packed_position_ids=latent["packed_position_ids"],
                                key_values_lens=latent["key_values_lens"], packed_key_value_indexes=latent["packed_key_value_indexes"],
                                past_key_values=conditional["cache"]),
            "unconditional": dict(shared, packed_indexes=latent_cfg["cfg_packed_query_indexes"], packed_position_ids=latent_cfg["cfg_packed_position_ids"],
                                  key_values_lens=latent_cfg["cfg_key_values_lens"], packed_key_value_indexes=latent_cfg["cfg_packed_key_value_indexes"],
                                  past_key_values=unconditional["cache"]),
        }  # fmt: skip
        branch = {name: self._on_device(args) for name, args in branch.items()}
        tokens = latent["packed_init_noises"].shape[0] // n
        width = latent["packed_init_noises"].shape[1]
        streams = [torch.Generator().manual_seed(s) for s in seeds]
        x = torch.cat([torch.randn(tokens, width, generator=stream) for stream in streams]).to(self.device)
        states = [x]
        for i in range(len(grid) - 1):
            t = torch.full((x.shape[0],), float(grid[i]), device=self.device)
            velocity = core._forward_flow(x_t=x, timestep=t, cfg_text_scale=1.0, **branch["conditional"])
            if guidance[i] > 1.0:
                plain = core._forward_flow(x_t=x, timestep=t, cfg_text_scale=1.0, **branch["unconditional"])
                velocity = torch.cat([self._guided(c, u, float(guidance[i])) for c, u in zip(velocity.split(tokens), plain.split(tokens))])
            if not torch.isfinite(velocity).all():
                raise NonFiniteLogits("NaN or inf in the velocity while sampling")
            if noise_level > 0:
                mean, std = sde_step(x, float(grid[i]), float(grid[i] - grid[i + 1]), velocity, noise_level)
                x = mean + std.to(self.device) * torch.cat([torch.randn(tokens, width, generator=stream) for stream in streams]).to(self.device)
            else:
                x = x - velocity * (grid[i] - grid[i + 1]).to(self.device)  # velocity points from data to noise
            states.append(x)
        return torch.stack([state.float().reshape(n, tokens, -1) for state in states], 1).cpu()

    def _decode_latents(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Image.Image]:
        """(rows, tokens, p*p*channels) latents to PIL images through the VAE decoder."""
        core = self.model
        p, channels = core.latent_patch_size, core.latent_channel
        h, w = size[0] // core.latent_downsample, size[1] // core.latent_downsample
        grid = latents.reshape(-1, h, w, p, p, channels).to(self.device)
        grid = torch.einsum("nhwpqc->nchpwq", grid).reshape(-1, channels, h * p, w * p)
        pixels = self.vae.decode(grid)
        pixels = ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(image) for image in pixels]

    # The Generator's differentiable side ("rectified_flow") ----------------------------

    def noised_latents(self, rollout: FlowRollout, seed: int = 0) -> NoisedLatents:
        """Fresh training noise for each generated latent, BAGEL's way (``Bagel.forward``):
        ``t = shift(sigmoid(z))``, ``z ~ N(0, 1)`` (one per image), ``x_t = (1 - t) x_0 + t
        eps`` and target velocity ``eps - x_0``; row ``r`` is seeded ``seed + r``."""
        clean = rollout.latents[:, -1].float()
        shift = float(self.model.timestep_shift)
        noises, times = [], []
        for row in range(clean.shape[0]):
            generator = torch.Generator().manual_seed(seed + row)
            noises.append(torch.randn(clean.shape[1:], generator=generator))
            t = torch.sigmoid(torch.randn((), generator=generator))
            times.append(shift * t / (1 + (shift - 1) * t))
        noise, timesteps = torch.stack(noises), torch.stack(times)
        noisy = (1 - timesteps[:, None, None]) * clean + timesteps[:, None, None] * noise
        return NoisedLatents(noisy=noisy, timesteps=timesteps, target=noise - clean)

    def velocities(self, rollout: FlowRollout, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(rows, tokens, channels) velocities of ``noisy`` latents at ``timesteps`` under
        the active role, each conditioned on its row's prompt, through the packed training
        forward: differentiable when grad is enabled."""
        batch = PackedBatch(self)
        for ids, latent, t in zip(rollout.prompt_ids, noisy, timesteps):
            batch.text(ids)
            batch.noisy_latent(latent, t, rollout.image_size)
            batch.end_sample()
        with self._packed_mode():
            hidden = batch.hidden()
            velocity = self.model.llm2vae(hidden[torch.tensor(batch.latent_indexes, device=self.device)]).float()
        return velocity.reshape(noisy.shape)

    def guided_velocities(self, rollout: FlowRollout) -> torch.Tensor:
        """(rows, steps, tokens, channels): the velocity each rollout step applied, under
        the active role, through the packed training forward: per row and step a conditional
        sample ``[prompt][x_t]`` and, where the step was guided, an unconditional ``[x_t]``
        (text CFG drops the prompt), combined as the sampler did. Differentiable."""
        rows, steps = rollout.latents.shape[0], rollout.latents.shape[1] - 1
        guided = [float(g) > 1.0 for g in rollout.guidance]
        batch = PackedBatch(self)
        for row in range(rows):
            for i in range(steps):
                for conditional in (True, False) if guided[i] else (True,):
                    if conditional:
                        batch.text(rollout.prompt_ids[row])
                    batch.noisy_latent(rollout.latents[row, i], rollout.timesteps[i], rollout.image_size)
                    batch.end_sample()
        with self._packed_mode():
            hidden = batch.hidden()
            flat = self.model.llm2vae(hidden[torch.tensor(batch.latent_indexes, device=self.device)]).float()
        images = iter(flat.split(rollout.latents.shape[2]))
        velocities = []
        for row in range(rows):
            for i in range(steps):
                velocity = next(images)
                velocities.append(self._guided(velocity, next(images), float(rollout.guidance[i])) if guided[i] else velocity)
        return torch.stack(velocities).reshape(rows, steps, *rollout.latents.shape[2:])

    def generation_logprobs(self, rollout: ImageRollout) -> torch.Tensor:
        raise NotImplementedError(
            "BAGEL draws images by rectified flow (an ODE): there are no image-token log-probs; "
            "its Generator update uses noised_latents() and velocities()"
        )

    def generator_loss(self, rollout: FlowRollout) -> torch.Tensor:
        """The Generator objective with unit weights: the flow-matching error of every
        generated latent (the gradient path of the advantage-weighted update)."""
        noised = self.noised_latents(rollout)
        velocity = self.velocities(rollout, noised.noisy.to(self.device), noised.timesteps.to(self.device))
        return ((velocity - noised.target.to(velocity.device)) ** 2).mean()
