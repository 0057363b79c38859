"""BLIP3o-8B (JiuhaiChen/BLIP3o, branch main): Qwen2.5-VL understands, 64 learnable queries
after the prompt condition a cross-attention DiT that flows over EVA-CLIP features, and a
diffusion decoder renders those features as pixels.

Design: understanding runs on transformers' own ``Qwen2_5_VLForConditionalGeneration``,
which loads the checkpoint's language and vision weights as they are (the 4.51 key layout
is renamed on load), so BLIP3o is not tied to transformers 4.51 and nothing is fetched from
a hub (upstream loads its processor and its flow scheduler from the hub at run time). Only
the DiT (``NextDiTCrossAttn``) and the EVA-CLIP vision transformer come from the user's
upstream checkout (``upstream=DIR``), imported by :func:`asg_kit.adapters.upstream.import_blip3o`;
the flow loop, the decoder loop and the Generator objective are ours, matched to upstream's
``sample_images`` and training forward.

Checkpoint folder (``--model PATH``), BLIP3o-8B's hub layout plus two optional parts:
  config.json, model*.safetensors[, model.safetensors.index.json], tokenizer files
  [preprocessor_config.json]   Qwen2.5-VL's image processor (defaults of Qwen2.5-VL-7B otherwise)
  diffusion-decoder/{unet,vae,scheduler}/   the EVA-CLIP -> pixels decoder (diffusers classes)
  [gen_vision_tower/{config.json,model.safetensors}]   EVA-CLIP-E-14-plus; needed only to
      train the Generator (its features of the source image are the regression target)
  [asgkit.json]   {"dit": {NextDiTCrossAttnConfig sizes}, "flow_steps", "decoder_steps",
      "decoder_guidance"}: only when they differ from the 8B model's (tiny test models)

Roles: proposer / solver / generator LoRA on the Qwen2.5-VL text layers; the solver also
has a small LoRA on the vision merger; the generator also has LoRA on the DiT's
cross-attention and caption projection and its own offset of the 64 latent queries (the
published BLIP3o update trains the queries).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from asg_kit.adapters.base import (
    CAPTION_PROMPT,
    EMBED_PROBE,
    ROLES,
    AnswerRequest,
    GeneratedImages,
    ImageRollout,
    LoraSettings,
    NonFiniteLogits,
    TextSample,
    TokenScores,
)
from asg_kit.adapters.decoding import RowSampler, check_completions, common_prefix, sample_in_batches, score_tail
from asg_kit.adapters.roles import LoraRoles

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER_TURN = "<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
# upstream inference.py's instruction inside the Qwen conversation template
GENERATE_INSTRUCTION = "Please generate image based on the following caption: {caption}"
MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "[IMG]", "[/IMG]", "<image>")
EVA_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics, as EVA-CLIP's processor
EVA_STD = (0.26862954, 0.26130258, 0.27577711)
DIT_TARGETS = r"dit\.model\.(layers\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)|caption_projection\.linear_[12])"
MERGER_TARGETS = r"qwen\.model\.visual\.merger\.mlp\.(0|2)"
QUERY_FILE = "latent_queries_offset.safetensors"


@dataclass(frozen=True)
class Blip3oSettings:
    """Generation and Generator-update settings (upstream's values by default)."""

    flow_steps: int = 30  # Euler steps of the DiT flow (sample_images)
    decoder_steps: int = 30
    decoder_guidance: float = 3.0
    condition_dropout: float = 0.1  # mask_drop in upstream's training forward
    source_cache_size: int = 10_000  # EVA-CLIP targets of pool images kept (on CPU)


def require_blip3o():
    """transformers' Qwen2.5-VL with M-RoPE position helpers (5.x) and diffusers, or one clear error."""
    try:
        import diffusers  # noqa: F401
    except ImportError as error:
        raise ImportError("the BLIP3o backbone needs diffusers >= 0.33; run: pip install 'asg-kit[blip3o]'") from error
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(
            f"the BLIP3o backbone runs on transformers 5's own Qwen2.5-VL (installed: {transformers.__version__}); "
            "run: pip install 'asg-kit[blip3o]'"
        )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration


def _read_weights(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` from a (possibly sharded) safetensors checkpoint."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({name for key, name in json.loads(index.read_text())["weight_map"].items() if key.startswith(prefix)})
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    weights = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    weights[key[len(prefix) :]] = handle.get_tensor(key)
    return weights


def _image_key(image: Image.Image) -> str:
    digest = hashlib.sha1(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class Blip3oNetworkConfig:
    """What builds a :class:`Blip3oNetwork`: the Qwen2.5-VL config, the DiT class and its
    config, the number of latent queries. ``to_dict`` is for peft's model bookkeeping. (No
    ``model_type`` attribute: peft would take the network for one transformers model and
    apply that library's checkpoint renamings to it.)"""

    def __init__(self, qwen, dit_class: type, dit, n_query: int) -> None:
        self.qwen, self.dit_class, self.dit, self.n_query = qwen, dit_class, dit, n_query

    def to_dict(self) -> dict:
        return {"model_type": "blip3o", "n_query": self.n_query, "qwen": self.qwen.to_dict(), "dit": self.dit.to_dict()}


class Blip3oNetwork(torch.nn.Module):
    """The trainable whole: Qwen2.5-VL, the DiT, the latent queries and the generator's
    offset to them. Built empty from its config (e.g. on the meta device), or around
    loaded parts."""

    def __init__(self, config: Blip3oNetworkConfig, qwen=None, dit=None, latent_queries: torch.Tensor | None = None) -> None:
        super().__init__()
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.config = config
        self.qwen = qwen if qwen is not None else Qwen2_5_VLForConditionalGeneration(config.qwen)
        self.dit = dit if dit is not None else config.dit_class(config.dit)
        if latent_queries is None:
            latent_queries = torch.zeros(1, config.n_query, config.qwen.text_config.hidden_size)
        self.latent_queries = torch.nn.Parameter(latent_queries, requires_grad=False)
        self.query_offset = torch.nn.Parameter(torch.zeros_like(latent_queries))


class Blip3oAdapter(LoraRoles):
    """BLIP3o with one LoRA adapter per role (see the module docstring)."""

    name = "blip3o"
    generation_paradigm = "diffusion"
    default_model: str | None = None

    def __init__(
        self,
        network: Blip3oNetwork,
        tokenizer,
        image_processor,
        checkpoint: Path,
        modules,
        upstream: Path,
        lora: LoraSettings | None = LoraSettings(),
        roles: Sequence[str] = ROLES,
        settings: Blip3oSettings = Blip3oSettings(),
    ) -> None:
        self.model = network
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.checkpoint = Path(checkpoint)
        self.upstream = Path(upstream)
        self.modules = modules
        self.settings = settings
        config = network.qwen.config
        self.qwen_config = config
        token_id = tokenizer.convert_tokens_to_ids
        self.image_token_id = config.image_token_id
        self.image_start_id = token_id("[IMG]")
        if self.image_start_id is None or self.image_start_id == tokenizer.unk_token_id:
            raise ValueError(f"{checkpoint}: the tokenizer has no [IMG] token; is this a BLIP3o checkpoint?")
        self.eos_ids = {i for i in (token_id("<|im_end|>"), token_id("<|endoftext|>")) if i is not None}
        self.eos_id = token_id("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else token_id("<|endoftext|>")
        self.n_query = network.latent_queries.shape[1]
        self.roles: tuple[str, ...] = ()
        self.peft = None
        self._lora_parameters: list[torch.nn.Parameter] = []
        self._active: str | None = None
        if lora is not None:
            self._add_roles(lora, tuple(roles))
        self.model.eval()
        language_model = self.model.qwen.model.language_model
        self._cache_keyword = "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"
        self._decoder_parts = None
        self._negative: torch.Tensor | None = None
        self._eva = None
        self._source_cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    # Loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        upstream: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        **options,
    ) -> "Blip3oAdapter":
        """Load a BLIP3o checkpoint folder (layout in the module docstring) with the DiT class
        from the upstream checkout ``upstream`` (or ``ASGKIT_UPSTREAM``). Nothing is downloaded."""
        from transformers import AutoTokenizer
        from transformers.utils import logging as transformers_logging

        from asg_kit.adapters.upstream import import_blip3o, locate_upstream

        config_class, qwen_class = require_blip3o()
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder} is not a BLIP3o checkpoint folder (no config.json); download BLIP3o/BLIP3o-Model-8B "
                "to a folder and pass that folder"
            )
        checkout = locate_upstream("blip3o", upstream)
        modules = import_blip3o(checkout)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or torch.float32
        raw = json.loads((folder / "config.json").read_text())
        extra = json.loads((folder / "asgkit.json").read_text()) if (folder / "asgkit.json").is_file() else {}
        # The checkpoint's model_type (blip3o_qwen_inference) would make from_pretrained build a
        # default-sized text config: the flat config goes through Qwen2_5_VLConfig explicitly.
        raw.update(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"])
        # transformers' notes on this load are all expected (4.51 rope_scaling keys, the DiT and
        # query weights it does not know, the checkpoint's own model type): ours to handle.
        verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        try:
            qwen_config = config_class(**raw)
            qwen, info = qwen_class.from_pretrained(
                folder, config=qwen_config, dtype=dtype, use_safetensors=True, local_files_only=True, output_loading_info=True
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        finally:
            transformers_logging.set_verbosity(verbosity)
            if bars:
                transformers_logging.enable_progress_bar()
        if info["missing_keys"] or info.get("mismatched_keys"):
            raise ValueError(f"{folder}: the Qwen2.5-VL weights do not match its config.json (missing: {sorted(info['missing_keys'])[:5]}, mismatched: {sorted(info.get('mismatched_keys') or [])[:5]})")
        dit_sizes = dict(extra.get("dit", {}))
        dit_sizes.setdefault("latent_embedding_size", qwen_config.text_config.hidden_size)
        dit = modules.NextDiTCrossAttn(modules.NextDiTCrossAttnConfig(**dit_sizes))
        dit_weights = _read_weights(folder, "model.dit.")
        queries = _read_weights(folder, "model.latent_queries").get("")
        if not dit_weights or queries is None:
            raise ValueError(f"{folder} holds no BLIP3o DiT (model.dit.*) or latent queries (model.latent_queries)")
        missing, unexpected = dit.load_state_dict(dit_weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder}: the DiT weights do not fit NextDiTCrossAttn (missing {missing[:3]}, unexpected {unexpected[:3]})")
        network_config = Blip3oNetworkConfig(qwen_config, modules.NextDiTCrossAttn, dit.config, queries.shape[1])
        network = Blip3oNetwork(network_config, qwen, dit.to(dtype), queries.to(dtype))
        if device is not None:
            network.to(device)
        image_processor = _qwen_image_processor(folder)
        settings_keys = {k: extra[k] for k in ("flow_steps", "decoder_steps", "decoder_guidance") if k in extra}
        settings = options.pop("settings", Blip3oSettings(**settings_keys))
        return cls(network, tokenizer, image_processor, folder, modules, checkout, settings=settings, **options)

    def _add_roles(self, lora: LoraSettings, roles: tuple[str, ...]) -> None:
        from peft import LoraConfig

        targets = "|".join(lora.target_modules)
        text_layers = rf"qwen\.model\.language_model\.layers\.\d+\.(self_attn|mlp)\.({targets})"
        text_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=text_layers, bias="none")
        # The published BLIP3o run gives the Solver a small extra LoRA on the vision merger MLP
        # (r=4, alpha=8), so that its answers can also adapt what it sees.
        solver_config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=f"({text_layers}|{MERGER_TARGETS})",
            rank_pattern={MERGER_TARGETS: 4}, alpha_pattern={MERGER_TARGETS: 8}, bias="none",
        )
        # The generator's LoRA spans the text layers and the DiT's cross-attention (dropout 0 on
        # the DiT, as the published run; one dropout per config, so the text part keeps 0 too).
        generator_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=f"({text_layers}|{DIT_TARGETS})", bias="none")
        self.install_roles(self.model, {role: {"generator": generator_config, "solver": solver_config}.get(role, text_config) for role in roles})

    # Roles -----------------------------------------------------------------------------

    def _activate(self, role: str | None) -> None:
        super()._activate(role)
        if self.peft is not None:
            self.model.query_offset.requires_grad_("generator" in self.roles)

    def trainable_parameters(self, role: str) -> list[torch.nn.Parameter]:
        return super().trainable_parameters(role) + ([self.model.query_offset] if role == "generator" else [])

    def save_roles(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        super().save_roles(path)
        if "generator" in self.roles:
            save_file({"query_offset": self.model.query_offset.detach().cpu().contiguous()}, str(Path(path) / "generator" / QUERY_FILE))

    def load_roles(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        super().load_roles(path)
        offset = Path(path) / "generator" / QUERY_FILE
        if "generator" in self.roles and offset.is_file():
            with torch.no_grad():
                self.model.query_offset.copy_(load_file(str(offset))["query_offset"])

    # Encoding --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.latent_queries.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.latent_queries.dtype

    @property
    def _language_model(self):
        return self.model.qwen.model.language_model

    def _plain(self, text: str) -> str:
        # Text from users or from the model itself must not smuggle in image slots, a turn of
        # its own or an end of sequence.
        if not hasattr(self, "_controls"):
            named = (self.tokenizer.eos_token, self.tokenizer.pad_token, self.tokenizer.bos_token, "<|endoftext|>")
            self._controls = sorted({m for m in (*MARKERS, *named) if m}, key=len, reverse=True)
        for marker in self._controls:
            text = text.replace(marker, " ")
        return text

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, text: str, with_image: bool) -> list[int]:
        """A user turn in Qwen2.5-VL's chat format (its image slot one pad token, before the
        image's grid expands it)."""
        return self._ids(SYSTEM + USER_TURN.format(image=IMAGE_SLOT if with_image else "", text=self._plain(text)))

    def _expanded_prompt_ids(self, text: str, image_tokens: int) -> list[int]:
        ids = self.prompt_ids(text, image_tokens > 0)
        if not image_tokens:
            return ids
        slot = ids.index(self.image_token_id)
        return ids[:slot] + [self.image_token_id] * image_tokens + ids[slot + 1 :]

    def generation_prompt_ids(self, prompt: str) -> list[int]:
        """upstream's text-to-image prompt: the instruction in the chat format, then [IMG]."""
        return self._ids(SYSTEM + USER_TURN.format(image="", text=GENERATE_INSTRUCTION.format(caption=self._plain(prompt)))) + [self.image_start_id]

    def _image_features(self, images: Sequence[Image.Image | None]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Merged vision features and the (t, h, w) grid of each distinct image, encoded once."""
        unique = {id(image): image for image in images if image is not None}
        if not unique:
            return {}
        encoded = self.image_processor(images=[image.convert("RGB") for image in unique.values()], return_tensors="pt")
        grids = encoded["image_grid_thw"].to(self.device)
        output = self.model.qwen.model.get_image_features(encoded["pixel_values"].to(self.device, self.dtype), image_grid_thw=grids)
        features = output.pooler_output if hasattr(output, "pooler_output") else output
        return {key: (feature, grid) for key, feature, grid in zip(unique, features, grids)}

    def _request_row(self, text: str, encoded: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
        if encoded is None:
            return self._expanded_prompt_ids(text, 0), None, None
        feature, grid = encoded
        return self._expanded_prompt_ids(text, feature.shape[0]), feature, grid

    def _positions(self, ids: Sequence[int], grid: torch.Tensor | None) -> torch.Tensor:
        """(3, length) multimodal rotary positions of one row: text advances all three axes
        together, image pads take their (t, h, w) grid coordinates."""
        tokens = torch.tensor([list(ids)], device=self.device)
        kinds = (tokens == self.image_token_id).int()
        if grid is None or not bool(kinds.any()):
            return torch.arange(len(ids), device=self.device).expand(3, -1)
        positions, _ = self.model.qwen.model.get_rope_index(tokens, kinds, image_grid_thw=grid[None])
        return positions[:, 0]

    def _embed(self, ids: Sequence[int], features: torch.Tensor | None = None) -> torch.Tensor:
        tokens = torch.tensor(list(ids), device=self.device)
        embeds = self._language_model.embed_tokens(tokens)
        slots = tokens == self.image_token_id
        if features is not None and bool(slots.any()):
            embeds = embeds.masked_scatter(slots[:, None], features.to(embeds.dtype))
        return embeds

    def _left_pad(self, embeds: Sequence[torch.Tensor], positions: Sequence[torch.Tensor]):
        """Stack rows left-padded: embeddings, attention mask, (3, batch, length) positions."""
        longest = max(row.shape[0] for row in embeds)
        batch = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=self.device)
        stacked = torch.ones(3, len(embeds), longest, dtype=torch.long, device=self.device)
        for i, (row, position) in enumerate(zip(embeds, positions)):
            batch[i, longest - row.shape[0] :] = row
            mask[i, longest - row.shape[0] :] = 1
            stacked[:, i, longest - row.shape[0] :] = position
        return batch, mask, stacked

    def _hidden(self, embeds, mask, positions, cache=None) -> torch.Tensor:
        output = self._language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=cache is not None, **{self._cache_keyword: cache}
        )
        return output.last_hidden_state

    # Understanding ---------------------------------------------------------------------

    @torch.no_grad()
    def sample_answers(self, requests: Sequence[AnswerRequest], max_new_tokens: int = 96, seed: int = 0) -> list[TextSample]:
        return sample_in_batches(requests, seed, lambda batch, seeds: self._sample_group(batch, seeds, max_new_tokens))

    def _sample_group(self, group: Sequence[AnswerRequest], seeds: Sequence[int], max_new_tokens: int) -> list[TextSample]:
        from transformers import DynamicCache

        encoded = self._image_features([r.image for r in group])
        rows, embeds, positions = [], [], []
        for request in group:
            ids, feature, grid = self._request_row(request.prompt, encoded.get(id(request.image)))
            rows.append(ids)
            embeds.append(self._embed(ids, feature))
            positions.append(self._positions(ids, grid))
        shared = common_prefix(rows)
        if len({id(r.image) for r in group}) > 1 and self.image_token_id in rows[0][:shared]:
            shared = rows[0].index(self.image_token_id)  # image slots hold different features per row
        count = len(group)

        # One prefill of the shared prefix (image included), copied to every row; its
        # positions are the same in every row because everything before them is.
        cache = DynamicCache()
        if shared:
            ones = torch.ones(1, shared, dtype=torch.long, device=self.device)
            self._hidden(embeds[0][:shared][None], ones, positions[0][:, None, :shared], cache)
            cache.batch_repeat_interleave(count)
        suffix, suffix_mask, suffix_positions = self._left_pad([e[shared:] for e in embeds], [p[:, shared:] for p in positions])
        mask = torch.cat([torch.ones(count, shared, dtype=torch.long, device=self.device), suffix_mask], dim=1)
        hidden = self._hidden(suffix, mask, suffix_positions, cache)[:, -1]
        next_position = torch.stack([p.max() + 1 for p in positions])  # text after an image resumes past its grid

        sampler = RowSampler(group, seeds, self.eos_ids, self.pad_id, self.device)
        head = self.model.qwen.lm_head
        for step in range(max_new_tokens):
            logits = head(hidden).float()
            drawn = sampler.step(logits)
            if sampler.done or step == max_new_tokens - 1:
                break
            step_embeds = self._language_model.embed_tokens(torch.tensor(drawn, device=self.device))[:, None]
            mask = torch.cat([mask, torch.ones(count, 1, dtype=torch.long, device=self.device)], dim=1)
            hidden = self._hidden(step_embeds, mask, next_position.view(1, count, 1).expand(3, -1, -1), cache)[:, -1]
            next_position = next_position + 1

        return sampler.samples(self.decode)

    def decode(self, token_ids: Sequence[int]) -> str:
        kept = [t for t in token_ids if t not in self.eos_ids and t != self.pad_id]
        return self.tokenizer.decode(kept, skip_special_tokens=False).strip()

    def encode_completion(self, text: str, finished: bool = True) -> list[int]:
        """Token ids of a completion text (as ``score_completions`` takes them)."""
        return self._ids(text) + ([self.eos_id] if finished else [])

    def score_completions(
        self, requests: Sequence[AnswerRequest], completions: Sequence[Sequence[int]], keep_logits: bool = False
    ) -> TokenScores:
        check_completions(requests, completions)
        encoded = self._image_features([r.image for r in requests])
        embeds, positions = [], []
        for request, completion in zip(requests, completions):
            ids, feature, grid = self._request_row(request.prompt, encoded.get(id(request.image)))
            full = ids + list(completion)
            embeds.append(self._embed(full, feature))
            positions.append(self._positions(full, grid))
        batch, mask, stacked = self._left_pad(embeds, positions)
        hidden = self._hidden(batch, mask, stacked)
        return score_tail(hidden, completions, self.model.qwen.lm_head, keep_logits)

    def caption(
        self, images: Sequence[Image.Image], prompt: str = CAPTION_PROMPT, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        requests = [AnswerRequest(image, prompt, temperature=temperature) for image in images]
        return [s.text for s in self.sample_answers(requests, max_new_tokens=max_new_tokens, seed=seed)]

    # Embeddings (base model) -----------------------------------------------------------

    @torch.no_grad()
    def _mean_embedding(self, embeds: list[torch.Tensor], positions: list[torch.Tensor]) -> torch.Tensor:
        with self.role(None):
            batch, mask, stacked = self._left_pad(embeds, positions)
            hidden = self._hidden(batch, mask, stacked).float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        rows = [self._ids(self._plain(text)) or [self.pad_id] for text in texts]
        return self._mean_embedding([self._embed(ids) for ids in rows], [self._positions(ids, None) for ids in rows])

    def embed_image_text(self, images: Sequence[Image.Image], texts: Sequence[str] | None = None) -> torch.Tensor:
        texts = list(texts) if texts is not None else [EMBED_PROBE] * len(images)
        with torch.no_grad(), self.role(None):  # the image encoding too: the solver has a vision LoRA
            encoded = self._image_features(images)
            embeds, positions = [], []
            for image, text in zip(images, texts):
                ids, feature, grid = self._request_row(text, encoded[id(image)])
                embeds.append(self._embed(ids, feature))
                positions.append(self._positions(ids, grid))
            return self._mean_embedding(embeds, positions)

    # Generation ------------------------------------------------------------------------

    def _queries(self) -> torch.Tensor:
        if self._active == "generator":
            return self.model.latent_queries + self.model.query_offset
        return self.model.latent_queries

    def _conditions(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """(rows, 64, hidden): the last hidden states of the latent queries after each prompt
        (left-padded batch; text-only rows, so all three rotary axes are the plain positions)."""
        queries = self._queries()[0]
        embeds = [torch.cat([self._embed(ids), queries]) for ids in rows]
        positions = [torch.arange(e.shape[0], device=self.device).expand(3, -1) for e in embeds]
        batch, mask, stacked = self._left_pad(embeds, positions)
        return self._hidden(batch, mask, stacked)[:, -self.n_query :]

    def _flow(self, condition: torch.Tensor, seeds: Sequence[int], guidance_scale: float, steps: int) -> torch.Tensor:
        """upstream ``sample_images``: Euler steps of the flow from noise (sigma 1 -> 1/steps)
        with classifier-free guidance against a zero condition; one noise stream per row."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = self.model.dit.config
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps))
        shape = (1, config.in_channels, config.input_size, config.input_size)
        latents = torch.cat([torch.randn(shape, generator=torch.Generator(device=self.device).manual_seed(s), device=self.device, dtype=self.dtype) for s in seeds])
        conditions = torch.cat([torch.zeros_like(condition), condition])
        for t in scheduler.timesteps:
            timestep = t.expand(2 * len(seeds)).to(self.device, torch.long)  # upstream truncates to long
            velocity = self.model.dit(x=torch.cat([latents, latents]), timestep=timestep, z_latents=conditions)
            unconditional, conditional = velocity.chunk(2)
            latents = scheduler.step(unconditional + guidance_scale * (conditional - unconditional), t, latents).prev_sample
        return latents

    def _decoder(self):
        if self._decoder_parts is None:
            import diffusers

            folder = self.checkpoint / "diffusion-decoder"
            if not (folder / "unet").is_dir() or not (folder / "vae").is_dir():
                raise FileNotFoundError(f"{self.checkpoint} has no diffusion decoder (expected {folder}/unet and {folder}/vae)")
            unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, torch_dtype=self.dtype).to(self.device).eval()
            vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, torch_dtype=torch.float32).to(self.device).eval()
            scheduler_name = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
            scheduler_class = getattr(diffusers, scheduler_name, None)
            if scheduler_class is None or not scheduler_name.endswith("Scheduler"):
                raise ValueError(f"{folder}/scheduler names an unknown diffusers scheduler {scheduler_name!r}")
            self._decoder_parts = (unet, vae, scheduler_class, folder / "scheduler")
        return self._decoder_parts

    def _negative_features(self) -> torch.Tensor:
        """The decoder's unconditional features: the DiT flow on the empty prompt (upstream's
        pipeline caches ``generate_image("")`` the same way), under the reference policy."""
        if self._negative is None:
            with self.role(None):
                condition = self._conditions([[self.image_start_id]])
                latents = self._flow(condition, [0], self.settings.decoder_guidance, self.settings.flow_steps)
            self._negative = latents.flatten(2).transpose(1, 2)
        return self._negative

    def _render(self, features: torch.Tensor, seeds: Sequence[int]) -> list[Image.Image]:
        """EVA-CLIP features (rows, tokens, width) -> pixels through the SDXL-style decoder:
        the prompt's features against the empty prompt's, SDXL's added text/time conditions."""
        unet, vae, scheduler_class, scheduler_folder = self._decoder()
        scheduler = scheduler_class.from_pretrained(scheduler_folder)
        rows = features.shape[0]
        embeds = torch.cat([features, self._negative_features().expand(rows, -1, -1)]).to(unet.dtype)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet.config.sample_size * scale
        time_ids = torch.tensor([[1024, 1024, 0, 0, size, size]], device=self.device, dtype=unet.dtype).expand(2 * rows, -1)
        added = {"text_embeds": embeds.mean(1), "time_ids": time_ids}
        scheduler.set_timesteps(self.settings.decoder_steps, device=self.device)
        shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        latents = torch.cat([torch.randn(shape, generator=torch.Generator(device=self.device).manual_seed(s + 7919), device=self.device, dtype=unet.dtype) for s in seeds])
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            noise = unet(scheduler.scale_model_input(torch.cat([latents, latents]), t), t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            conditional, unconditional = noise.chunk(2)  # the pipeline puts the prompt first
            latents = scheduler.step(unconditional + self.settings.decoder_guidance * (conditional - unconditional), t, latents).prev_sample
        pixels = vae.decode(latents.float() / vae.config.scaling_factor).sample
        pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(p) for p in pixels]

    @torch.no_grad()
    def generate_images(
        self, prompts: Sequence[str], n: int = 1, guidance_scale: float = 3.0, temperature: float = 1.0, seed: int = 0
    ) -> GeneratedImages:
        """``n`` images per prompt: one LLM pass over all prompts, every row's flow and decode
        batched, row ``p * n + j`` seeded ``seed + p * n + j`` (the same image in any batch).
        The flow is deterministic given its noise: ``temperature`` plays no part."""
        rows = [self.generation_prompt_ids(p) for p in prompts]
        condition = self._conditions(rows).repeat_interleave(n, dim=0)
        seeds = [seed + i for i in range(len(prompts) * n)]
        latents = self._flow(condition, seeds, guidance_scale, self.settings.flow_steps)
        if not torch.isfinite(latents).all():
            raise NonFiniteLogits("NaN or inf in the DiT flow")
        features = latents.flatten(2).transpose(1, 2)  # (rows, tokens, width): upstream's view + permute
        images = self._render(features, seeds)
        rollout = ImageRollout(
            prompts=list(prompts),
            prompt_ids=[ids for ids in rows for _ in range(n)],
            prompt_index=[p for p in range(len(prompts)) for _ in range(n)],
            tokens=torch.zeros(len(seeds), 0, dtype=torch.long),
            behaviour_logprobs=torch.zeros(len(seeds), 0),
            guidance_scale=guidance_scale,
            temperature=temperature,
            seeds=seeds,
            latents=features.cpu(),
        )
        return GeneratedImages([images[p * n : (p + 1) * n] for p in range(len(prompts))], rollout)

    def generation_logprobs(self, rollout: ImageRollout) -> torch.Tensor:
        raise NotImplementedError(
            "BLIP3o's generator is a deterministic flow with no token log-probs; its update is reward-weighted "
            "regression on the source image (source_flow_loss)"
        )

    # Generator objective ---------------------------------------------------------------

    def _eva_tower(self):
        if self._eva is None:
            from safetensors.torch import load_file

            folder = self.checkpoint / "gen_vision_tower"
            weights = folder / "model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(
                    f"the Generator update regresses onto EVA-CLIP features of the source image, and {weights} is missing; "
                    "convert BLIP3o's EVA-CLIP tower (jiuhai/eva_clip_vision_tower, pytorch_model.bin) as the README's BLIP3o section shows"
                )
            if self.modules.EVAVisionTransformer is None:
                raise ImportError("BLIP3o's EVA-CLIP tower needs einops; run: pip install 'asg-kit[blip3o]'")
            name = self.qwen_config.to_dict().get("gen_vision_tower", "eva-clip-E-14-plus")
            config_file = folder / "config.json"
            if not config_file.is_file():
                config_file = self.upstream / "blip3o/model/multimodal_encoder/eva_clip/model_configs" / f"{name}.json"
            vision = json.loads(config_file.read_text())["vision_cfg"]
            tower = self.modules.EVAVisionTransformer(
                img_size=vision["image_size"], patch_size=vision["patch_size"], embed_dim=vision["width"], depth=vision["layers"],
                num_heads=vision["width"] // vision["head_width"], mlp_ratio=vision["mlp_ratio"], qkv_bias=vision.get("qkv_bias", True),
                postnorm=vision.get("postnorm", False), init_values=vision.get("ls_init_value"), drop_path_rate=0.0,
                norm_layer=lambda width: torch.nn.LayerNorm(width, eps=1e-6),
                xattn=False,  # the same attention as xformers' kernel, in plain torch
            )  # fmt: skip
            missing, _ = tower.load_state_dict(load_file(str(weights)), strict=False)
            if missing:
                raise ValueError(f"{weights} does not hold an EVA-CLIP vision tower of {config_file.name} (missing {missing[:3]})")
            self._eva = (tower.to(self.device, self.dtype).eval().requires_grad_(False), vision["image_size"])
        return self._eva

    def _eva_pixels(self, images: Sequence[Image.Image], size: int) -> torch.Tensor:
        """EVA-CLIP's preprocessing: shorter side to ``size`` (bicubic), centre crop, CLIP normalisation."""
        batch = []
        for image in images:
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            resized = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            left, top = round((resized.width - size) / 2.0), round((resized.height - size) / 2.0)
            array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
            batch.append((torch.from_numpy(array) - torch.tensor(EVA_MEAN)) / torch.tensor(EVA_STD))
        return torch.stack(batch).permute(0, 3, 1, 2).to(self.device, self.dtype)

    @torch.no_grad()
    def source_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(batch, width, side, side): the pooled EVA-CLIP features the DiT learns to produce,
        computed once per distinct image and kept (up to ``source_cache_size`` images, on CPU)."""
        keys = [_image_key(image) for image in images]
        missing = {key: image for key, image in zip(keys, images) if key not in self._source_cache}
        if missing:
            tower, size = self._eva_tower()
            tokens = tower(self._eva_pixels(list(missing.values()), size))[:, 1:]  # drop CLS
            stride = int(str(self.qwen_config.to_dict().get("gen_pooling", "early_pool2d_4")).split("_")[-1])
            side = int(tokens.shape[1] ** 0.5)
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
            pooled = torch.nn.functional.avg_pool2d(grid, kernel_size=stride, stride=stride)
            for key, feature in zip(missing, pooled):
                self._source_cache[key] = feature.cpu()
                while len(self._source_cache) > self.settings.source_cache_size:
                    self._source_cache.popitem(last=False)
        for key in keys:
            self._source_cache.move_to_end(key)
        return torch.stack([self._source_cache[key] for key in keys]).to(self.device, self.dtype)

    def source_flow_loss(self, images: Sequence[Image.Image], prompts: Sequence[str], seed: int = 0) -> torch.Tensor:
        """(batch,) flow-matching MSE of the DiT on each source image's EVA-CLIP features given
        its prompt, as upstream's training forward (condition dropout 0.1). Differentiable
        into the generator's LoRA (DiT and text) and its query offset under the generator
        role; every draw comes from ``seed``. The "diffusion" Generator update weights it
        with :func:`asg_kit.train.losses.reward_weighted_regression`."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        rows = [self.generation_prompt_ids(p) for p in prompts]
        return self._flow_matching_mse(self.source_features(images), rows, seed, self.settings.condition_dropout)

    def generator_loss(self, rollout: ImageRollout) -> torch.Tensor:
        """The Generator objective's gradient path with unit weights (``ConformanceHooks``):
        the mean flow-matching MSE on the rollout's own generated features, no condition
        dropout (so that every row reaches the text LoRA and the queries)."""
        if rollout.latents is None:
            raise ValueError("this rollout holds no generated features (latents)")
        side = self.model.dit.config.input_size
        target = rollout.latents.to(self.device, self.dtype).transpose(1, 2).reshape(rollout.latents.shape[0], -1, side, side)
        seed = rollout.seeds[0] if rollout.seeds else 0
        return self._flow_matching_mse(target, rollout.prompt_ids, seed, 0.0).mean()

    def _flow_matching_mse(self, target: torch.Tensor, rows: Sequence[Sequence[int]], seed: int, dropout: float) -> torch.Tensor:
        """upstream's training objective per row: ``x_t = (1 - s) x0 + s e``, target velocity
        ``e - x0``, the timestep drawn uniformly from the 1000 training steps of the flow
        schedule, the condition zeroed with probability ``dropout``."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        condition = self._conditions(rows)
        schedule = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        draws = torch.Generator().manual_seed(seed)
        indices = (torch.rand(len(rows), generator=draws) * schedule.config.num_train_timesteps).long()
        keep = (torch.rand(len(rows), generator=draws) >= dropout).to(self.device, condition.dtype)
        noise = torch.randn(target.shape, generator=draws).to(self.device, target.dtype)
        timesteps = schedule.timesteps[indices].to(self.device)
        sigma = schedule.sigmas[indices].to(self.device, target.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigma) * target + sigma * noise
        velocity = self.model.dit(x=noisy, timestep=timesteps, z_latents=condition * keep.view(-1, 1, 1))
        return ((velocity.float() - (noise - target).float()) ** 2).mean(dim=(1, 2, 3))


def convert_eva_clip_tower(weights_file: str | Path, checkpoint: str | Path) -> Path:
    """Put BLIP3o's EVA-CLIP tower (``pytorch_model.bin`` of jiuhai/eva_clip_vision_tower,
    what upstream's eva_vit.py downloads) into ``checkpoint/gen_vision_tower/model.safetensors``.
    Read with ``weights_only=True`` (tensors only, no code); a state dict nested under
    model / module / state_dict or prefixed ``module.`` is unwrapped as upstream does."""
    from safetensors.torch import save_file

    state = torch.load(str(weights_file), map_location="cpu", weights_only=True)
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k.removeprefix("module."): v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{weights_file} holds no tensors")
    target = Path(checkpoint) / "gen_vision_tower" / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target))
    return target


def _qwen_image_processor(folder: Path):
    """Qwen2.5-VL's image processor without torchvision (the PIL one), from the folder's
    preprocessor_config.json or Qwen2.5-VL-7B-Instruct's defaults."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if (folder / "preprocessor_config.json").is_file():
        return Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)  # Qwen2.5-VL-7B-Instruct's bounds
