"""VARGPT-v1.1 (Qwen2-VL-7B understanding + an Infinity-2B next-scale bitwise image head),
driven through the user's checkout of its upstream code (VARGPT-family/VARGPT-v1.1).

Understanding decodes with ``lm_head`` over Qwen2-VL's multimodal rotary positions, in our own
batched loop (one prefill per image shared by its samples, one random stream per request,
behaviour log-probs and entropies of every token). Generation runs upstream's next-scale
sampler (``autoregressive_infer_cfg``) once per image after one shared prompt prefill, with our
seeds, and records every scale's sampled bits and their behaviour log-probs exactly as drawn.
The Generator update teacher-forces those bits through upstream's DPO training forward; an image
token's log-prob is the sum of its bits'.

Upstream quirks handled here: the model keeps every forward's hidden states in
``past_hidden_states`` (reset after each call), its image-generation forward seeds from the wall
clock and writes a file (we call the sampler directly), its training forward re-encodes pixels
with random bit flips (we feed the sampled bits) and drops the condition with p=0.1 and drop-path
0.1 (both off: the GRPO ratio needs a deterministic teacher-forced policy; LoRA dropout stays).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import types
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
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
from asg_kit.adapters.upstream import (
    UPSTREAMS,
    allow_torchvision_without_ops,
    install_flash_attn_fallback,
    locate_upstream,
    put_on_path,
    uncompile_module,
)

VARGPT_TRANSFORMERS = "4.46"  # upstream pins 4.46.1; its image processor and RoPE tables break on 5.x
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER_TURN = "<|im_start|>user\n{image}{text}<|im_end|>\n<|im_start|>assistant\n"
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
# Infinity keeps this many rows of unconditional context (cfg_uncond): with guidance, a prompt
# longer than that cannot be sampled.
INFINITY_TEXT_MAXLEN = 512
BANNED_LOGIT = -1e9  # logit of the tokens an answer may never contain
# Linear layers of the generation side that the released configuration trains. Infinity's
# sa.mat_qkv and ca.mat_kv are left out: upstream multiplies by their .weight directly, so a
# LoRA wrapped around them would receive no gradient.
GENERATION_TARGETS = (
    r"vargpt_gen\.block_chunks\.\d+\.module\.\d+\.(sa\.proj|ca\.mat_q|ca\.proj|ffn\.fc1|ffn\.fc2)",
    r"vargpt_gen\.head",
    r"image_gen_projector(_out)?\.mlp\.(0|2)",
)

_UPSTREAM: types.SimpleNamespace | None = None


def import_vargpt(upstream: str | Path | None = None) -> types.SimpleNamespace:
    """Import VARGPT-v1.1's modules from the user's checkout (once per process)."""
    global _UPSTREAM
    checkout = locate_upstream("vargpt", upstream)
    if _UPSTREAM is not None:
        if checkout != _UPSTREAM.checkout:
            raise ImportError(f"VARGPT-v1.1's code is already imported from {_UPSTREAM.checkout}; one process runs one checkout (asked for {checkout})")
        return _UPSTREAM
    allow_torchvision_without_ops()  # before transformers' model code imports torchvision
    import transformers

    if not transformers.__version__.startswith(VARGPT_TRANSFORMERS + "."):
        raise ImportError(
            f"the VARGPT backbone runs {UPSTREAMS['vargpt'].repository}'s code, which needs transformers "
            f"{VARGPT_TRANSFORMERS}.x (installed: {transformers.__version__}); use its environment: "
            "pip install -e '.[vargpt]' in a separate venv"
        )
    install_flash_attn_fallback()
    put_on_path(checkout)
    package = "vargpt_qwen_v1_1"
    with warnings.catch_warnings():  # upstream imports timm's deprecated paths: not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        modeling = importlib.import_module(f"{package}.modeling_vargpt_qwen2_vl")
    if not torch.cuda.is_available():  # Infinity's AdaLN is torch.compile'd: an inductor build per shape on CPU
        for name, module in list(sys.modules.items()):
            if name.startswith(package + ".") and module is not None:
                uncompile_module(module)
    _UPSTREAM = types.SimpleNamespace(
        checkout=checkout,
        modeling=modeling,
        config_class=importlib.import_module(f"{package}.configuration_vargpt_qwen2_vl").VARGPTQwen2VLConfig,
        model_class=modeling.VARGPTQwen2VLForConditionalGeneration,
        image_processor_class=importlib.import_module(f"{package}.image_processing_qwen2_vl").VARGPTQwen2VLImageProcessor,
        run_infinity=importlib.import_module(f"{package}.var_model.tools.run_infinity"),
        vae=importlib.import_module(f"{package}.var_model.infinity.models.bsq_vae.vae"),
        scale_table=importlib.import_module(f"{package}.var_model.infinity.utils.dynamic_resolution").dynamic_resolution_h_w,
    )
    return _UPSTREAM


@contextmanager
def generation_head_sizes(up: types.SimpleNamespace, sizes: dict | None) -> Iterator[None]:
    """Build the generation head at the sizes a checkpoint's config records.

    Upstream's constructor hard-codes Infinity-2B, a 2048-wide text condition, BSQ-VAE channels
    and the '0.25M' scale table. A checkpoint written by ``tiny_vargpt`` records smaller ones in
    ``config.asgkit_generation_head`` (``infinity``: Infinity's model kwargs, ``vae``: VAE
    overrides, ``text_channels``, ``pn`` and ``scales``: a scale table entry); they are applied
    for the constructor call only. A real checkpoint has no such entry and is built as upstream
    builds it."""
    if not sizes:
        yield
        return
    scales = [tuple(s) for s in sizes["scales"]]
    up.scale_table[1.0][sizes["pn"]] = {"pixel": (16 * scales[-1][1], 16 * scales[-1][2]), "scales": scales}
    modeling, run_infinity, vae = up.modeling, up.run_infinity, up.vae
    real = modeling.load_visual_tokenizer, run_infinity.load_infinity_train, vae.AutoEncoder

    def load_visual_tokenizer(args):
        args.pn, args.text_channels = sizes["pn"], sizes["text_channels"]  # the model keeps args for inference
        return real[0](args)

    def load_infinity_train(**kwargs):
        kwargs["model_kwargs"] = dict(sizes["infinity"])
        return real[1](**kwargs)

    def autoencoder(args):
        for key, value in sizes.get("vae", {}).items():
            setattr(args, key, value)
        return real[2](args)

    modeling.load_visual_tokenizer, run_infinity.load_infinity_train, vae.AutoEncoder = load_visual_tokenizer, load_infinity_train, autoencoder
    try:
        yield
    finally:
        modeling.load_visual_tokenizer, run_infinity.load_infinity_train, vae.AutoEncoder = real


@contextmanager
def quiet() -> Iterator[None]:
    """Upstream's constructors print their configuration to stdout; keep stdout for our output."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


class _BitRecorder:
    """Takes the place of upstream's sampler (a module global looked up at call time) for one
    call of the next-scale loop. It receives each scale's logits, already divided by tau and
    guided, for all rows; it draws every row with that row's own generator through upstream's
    sampler (which masks the logits in place by top-k/top-p), so a row samples the same bits
    alone or in a batch, and keeps the drawn bits with log_softmax of the masked logits at
    them: the exact behaviour log-probs."""

    def __init__(self, modeling, generators: Sequence[torch.Generator]) -> None:
        self.modeling = modeling
        self.generators = list(generators)
        self.real = modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> "_BitRecorder":
        def recording(logits_BlV, top_k=0, top_p=0.0, rng=None, num_samples=1):
            if torch.isnan(logits_BlV).any() or torch.isposinf(logits_BlV).any():
                raise NonFiniteLogits("NaN or inf in the bit logits while sampling an image")
            drawn = torch.cat([
                self.real(logits_BlV[r : r + 1], top_k=top_k, top_p=top_p, rng=generator, num_samples=num_samples)
                for r, generator in enumerate(self.generators)
            ])  # fmt: skip
            logprobs = torch.log_softmax(logits_BlV.float(), -1).gather(-1, drawn[..., :1]).squeeze(-1)
            self.calls.append((drawn[..., 0].detach(), logprobs.detach()))
            return drawn

        self.modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_ = recording
        return self

    def __exit__(self, *exc) -> None:
        self.modeling.sample_with_top_k_top_p_also_inplace_modifying_logits_ = self.real

    def bits_and_logprobs(self, bits_per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, tokens, bits) drawn bits and their behaviour log-probs, scales concatenated."""
        rows = len(self.generators)
        bits = torch.cat([b.reshape(rows, -1, bits_per_token) for b, _ in self.calls], 1)
        logprobs = torch.cat([lp.reshape(rows, -1, bits_per_token) for _, lp in self.calls], 1)
        return bits, logprobs


def _to_pil(images_bgr: torch.Tensor) -> list[Image.Image]:
    """Upstream's (n, H, W, 3) uint8 images, channels flipped for cv2.imwrite, as RGB PIL."""
    return [Image.fromarray(image) for image in images_bgr.flip(-1).cpu().numpy()]


class VARGPTAdapter(LoraRoles):
    """VARGPT-v1.1 with one LoRA adapter per role: Proposer and Solver on the language model's
    projections, the Generator on those plus Infinity's blocks and head and the generation
    projectors (the released configuration)."""

    name = "vargpt"
    generation_paradigm = "ar_tokens"
    default_model: str | None = "VARGPT-family/VARGPT-v1.1"
    # How a prompt is asked for as an image (the form of upstream's README examples,
    # "Can you depict a scene of ..."); a class attribute, to match another evaluation.
    generation_instruction = "Can you depict a scene of {prompt}"

    def __init__(
        self,
        model,
        tokenizer,
        image_processor,
        upstream: types.SimpleNamespace,
        lora: LoraSettings | None = LoraSettings(),
        roles: Sequence[str] = ROLES,
        top_k: int = 900,
        top_p: float = 0.97,
        scale_weighted_logprobs: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.up = upstream
        self.top_k, self.top_p = top_k, top_p  # upstream's image sampling settings
        self.scale_weighted_logprobs = scale_weighted_logprobs
        self.roles: tuple[str, ...] = ()
        self.peft = None
        self._lora_parameters: list[torch.nn.Parameter] = []
        self._active: str | None = None
        self._make_teacher_forcing_deterministic()
        if lora is not None:
            self._add_roles(lora, tuple(roles))
        self.model.eval()

        config = model.config
        token_id = tokenizer.convert_tokens_to_ids
        special = config.special_tokens
        self.gen_start_id = special["image_gen_start_token_id"]
        self.gen_end_id = special["image_gen_end_token_id"]
        self.gen_pad_id = special["image_gen_pad_token_id"]
        self.image_token_id = config.image_token_id
        self.eos_id = token_id("<|im_end|>")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else token_id("<|endoftext|>")
        self.merge = config.vision_config.spatial_merge_size
        # Never sampled while answering: image-generation and vision slot tokens.
        banned = [self.gen_start_id, self.gen_end_id, self.gen_pad_id, self.image_token_id, config.video_token_id,
                  config.vision_start_token_id, config.vision_end_token_id, config.vision_token_id]  # fmt: skip
        self.banned_ids = sorted({int(t) for t in banned if t is not None and 0 <= int(t) < config.vocab_size})
        self.bits_per_token = int(model.vargpt_gen_args.vae_type)

    # Loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        upstream: str | Path | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
        **options,
    ) -> "VARGPTAdapter":
        """Load a VARGPT-v1.1 checkpoint (``VARGPT-family/VARGPT-v1.1`` or a local folder in its
        layout; weights as safetensors only) with the model classes of the upstream checkout
        ``upstream`` (else $ASGKIT_UPSTREAM, else an importable ``vargpt_qwen_v1_1``)."""
        from transformers import AutoTokenizer

        up = import_vargpt(upstream)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if local_files_only is None:
            local_files_only = Path(model).is_dir()
        try:
            config = up.config_class.from_pretrained(model, local_files_only=local_files_only)
        except OSError as error:
            raise OSError(
                f"could not load a VARGPT-v1.1 checkpoint from {str(model)!r}: {error}\n"
                "Pass a local folder in VARGPT-v1.1's layout (config.json, *.safetensors, tokenizer and "
                "preprocessor files), or a hub id on a machine that reaches the hub."
            ) from error
        if not isinstance(getattr(config, "special_tokens", None), dict):
            raise ValueError(f"{model} is not a VARGPT-v1.1 checkpoint: its config has no image-generation special_tokens")
        with generation_head_sizes(up, getattr(config, "asgkit_generation_head", None)), quiet():
            network = up.model_class.from_pretrained(
                model, config=config, torch_dtype=dtype or torch.float32, use_safetensors=True, local_files_only=local_files_only
            )
        if device is not None:
            network.to(device)
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local_files_only)
        image_processor = up.image_processor_class.from_pretrained(model, local_files_only=local_files_only)
        return cls(network, tokenizer, image_processor, up, **options)

    def _make_teacher_forcing_deterministic(self) -> None:
        head = self.model.vargpt_gen
        head.cond_drop_rate = 0.0  # Infinity.forward drops the condition with p=0.1, training or not
        for module in head.modules():
            if hasattr(module, "drop_prob"):  # timm DropPath (drop_path_rate 0.1 in Infinity-2B)
                module.drop_prob = 0.0

    # Roles -----------------------------------------------------------------------------

    def _lora_config(self, lora: LoraSettings, role: str):
        from peft import LoraConfig

        language = rf"model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(lora.target_modules)})"
        targets = [language] + (list(GENERATION_TARGETS) if role == "generator" else [])
        return LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules="|".join(f"({t})" for t in targets),
            bias="none",
        )

    def _add_roles(self, lora: LoraSettings, roles: tuple[str, ...]) -> None:
        self.install_roles(self.model, {role: self._lora_config(lora, role) for role in roles})

    # Encoding --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def _plain(self, text: str) -> str:
        # Text from users or from the model itself must not smuggle in special tokens (image or
        # vision slots, turns, image generation, end of sequence).
        if not hasattr(self, "_controls"):
            tokenizer = self.tokenizer
            strings = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
            strings |= set(tokenizer.all_special_tokens)
            self._controls = sorted((s for s in strings if s), key=len, reverse=True)
        for marker in self._controls:
            text = text.replace(marker, " ")
        return text

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, text: str, with_image: bool = False, image_tokens: int | None = None) -> list[int]:
        """A user turn in Qwen2-VL's chat format; with an image, its slot holds ``image_tokens``
        pads (one per merged patch of that image; one when not given)."""
        image_tokens = (image_tokens or 1) if with_image else 0
        ids = self._ids(SYSTEM + USER_TURN.format(image=IMAGE_SLOT if image_tokens else "", text=self._plain(text)))
        if image_tokens:
            at = ids.index(self.image_token_id)
            ids = ids[:at] + [self.image_token_id] * image_tokens + ids[at + 1 :]
        return ids

    def generation_prompt_ids(self, prompt: str) -> list[int]:
        """The conditional prompt of image generation (without ``<|image_gen_start|>``). With
        guidance, upstream's unconditional context has 512 rows: longer prompts lose the tail
        of their text."""
        head, tail = self._ids(SYSTEM + "<|im_start|>user\n"), self._ids("<|im_end|>\n<|im_start|>assistant\n")
        text = self._ids(self.generation_instruction.format(prompt=self._plain(prompt)))
        budget = INFINITY_TEXT_MAXLEN - 1 - len(head) - len(tail)  # the start token is the last row
        return head + text[:budget] + tail

    def _vision_inputs(self, images: Sequence[Image.Image | None]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Pixel patches and (t, h, w) grid of each distinct image object, processed once."""
        out = {}
        for image in images:
            if image is not None and id(image) not in out:
                batch = self.image_processor(images=[image.convert("RGB")], return_tensors="pt")
                out[id(image)] = (batch["pixel_values"].to(self.device, self.dtype), batch["image_grid_thw"].to(self.device))
        return out

    def _image_tokens(self, vision, image) -> int:
        if image is None:
            return 0
        return int(vision[id(image)][1].prod()) // (self.merge**2)

    def _positions(self, ids: Sequence[int], grid: torch.Tensor | None) -> torch.Tensor:
        """(3, len) multimodal rotary positions of one unpadded row."""
        row = torch.tensor([list(ids)], device=self.device)
        positions, _ = self.model.get_rope_index(row, grid, None, torch.ones_like(row))
        return positions[:, 0]

    def _embed(self, ids: torch.Tensor, pixels: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Token embeddings with the image slots filled by the vision tower (images in row order)."""
        embeds = self.model.model.embed_tokens(ids)
        if pixels:
            features = self.model.visual(torch.cat([p for p, _ in pixels]), grid_thw=torch.cat([g for _, g in pixels]))
            slots = (ids == self.image_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
        return embeds

    def _hidden(self, ids, pixels, mask, positions, cache=None) -> torch.Tensor:
        output = self.model.model(
            inputs_embeds=self._embed(ids, pixels), attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=cache is not None, return_dict=True,
        )  # fmt: skip
        return output.last_hidden_state

    def _text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden).float()
        # Finite, so that full-vocabulary KL between roles stays finite; exp() of it is exactly 0.
        return logits.index_fill(-1, torch.tensor(self.banned_ids, device=logits.device), BANNED_LOGIT)

    def _left_pad(self, rows: Sequence[Sequence[int]], positions: Sequence[torch.Tensor]):
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=self.device)
        pos = torch.ones(3, len(rows), longest, dtype=torch.long, device=self.device)
        for i, (row, p) in enumerate(zip(rows, positions)):
            ids[i, longest - len(row) :] = torch.tensor(list(row), device=self.device)
            mask[i, longest - len(row) :] = 1
            pos[:, i, longest - len(row) :] = p
        return ids, mask, pos

    # Understanding ---------------------------------------------------------------------

    @torch.no_grad()
    def sample_answers(self, requests: Sequence[AnswerRequest], max_new_tokens: int = 96, seed: int = 0) -> list[TextSample]:
        return sample_in_batches(requests, seed, lambda batch, seeds: self._sample_group(batch, seeds, max_new_tokens))

    def _sample_group(self, group: Sequence[AnswerRequest], seeds: Sequence[int], max_new_tokens: int) -> list[TextSample]:
        from transformers import DynamicCache

        vision = self._vision_inputs([r.image for r in group])
        rows = [self.prompt_ids(r.prompt, r.image is not None, self._image_tokens(vision, r.image)) for r in group]
        grids = [vision[id(r.image)][1] if r.image is not None else None for r in group]
        positions = [self._positions(ids, grid) for ids, grid in zip(rows, grids)]
        shared = common_prefix(rows)
        prefix_has_image = self.image_token_id in rows[0][:shared]
        if prefix_has_image and (len({id(r.image) for r in group}) > 1 or self.image_token_id in rows[0][shared:]):
            shared = rows[0].index(self.image_token_id)  # image slots hold different features per row
            prefix_has_image = False
        count = len(group)

        # One prefill of the shared prefix (image included), copied to every row.
        cache = DynamicCache()
        if shared:
            ids = torch.tensor([rows[0][:shared]], device=self.device)
            pixels = [vision[id(group[0].image)]] if prefix_has_image else []
            self._hidden(ids, pixels, torch.ones_like(ids), positions[0][:, None, :shared], cache)
            cache.batch_repeat_interleave(count)
        suffix_ids, suffix_mask, suffix_pos = self._left_pad([r[shared:] for r in rows], [p[:, shared:] for p in positions])
        pixels = [] if prefix_has_image else [vision[id(r.image)] for r in group if r.image is not None]
        mask = torch.cat([torch.ones(count, shared, dtype=torch.long, device=self.device), suffix_mask], 1)
        hidden = self._hidden(suffix_ids, pixels, mask, suffix_pos, cache)[:, -1]
        next_position = torch.stack([p.max() + 1 for p in positions]).view(1, count, 1).expand(3, count, 1).clone()

        sampler = RowSampler(group, seeds, {self.eos_id}, self.pad_id, self.device)
        for step in range(max_new_tokens):
            logits = self._text_logits(hidden)
            drawn = sampler.step(logits)
            if sampler.done or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(count, 1, dtype=torch.long, device=self.device)], 1)
            hidden = self._hidden(torch.tensor(drawn, device=self.device)[:, None], [], mask, next_position, cache)[:, -1]
            next_position = next_position + 1

        return sampler.samples(self.decode)

    def decode(self, token_ids: Sequence[int]) -> str:
        kept = [t for t in token_ids if t not in (self.eos_id, self.pad_id)]
        return self.tokenizer.decode(kept, skip_special_tokens=False).strip()

    def encode_completion(self, text: str, finished: bool = True) -> list[int]:
        """Token ids of a completion text (as ``score_completions`` takes them)."""
        return self._ids(text) + ([self.eos_id] if finished else [])

    def score_completions(
        self, requests: Sequence[AnswerRequest], completions: Sequence[Sequence[int]], keep_logits: bool = False
    ) -> TokenScores:
        check_completions(requests, completions)
        vision = self._vision_inputs([r.image for r in requests])
        rows, positions, pixels = [], [], []
        for request, completion in zip(requests, completions):
            row = self.prompt_ids(request.prompt, request.image is not None, self._image_tokens(vision, request.image)) + list(completion)
            grid = vision[id(request.image)][1] if request.image is not None else None
            rows.append(row)
            positions.append(self._positions(row, grid))
            if request.image is not None:
                pixels.append(vision[id(request.image)])
        ids, mask, pos = self._left_pad(rows, positions)
        hidden = self._hidden(ids, pixels, mask, pos)
        return score_tail(hidden, completions, self._text_logits, keep_logits)

    def caption(
        self, images: Sequence[Image.Image], prompt: str = CAPTION_PROMPT, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        requests = [AnswerRequest(image, prompt, temperature=temperature) for image in images]
        return [s.text for s in self.sample_answers(requests, max_new_tokens=max_new_tokens, seed=seed)]

    # Embeddings (base model) -----------------------------------------------------------

    @torch.no_grad()
    def _mean_embedding(self, rows: list[list[int]], grids: list, pixels: list) -> torch.Tensor:
        with self.role(None):
            ids, mask, pos = self._left_pad(rows, [self._positions(r, g) for r, g in zip(rows, grids)])
            hidden = self._hidden(ids, pixels, mask, pos).float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(pooled, dim=-1)

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        rows = [self._ids(self._plain(text)) or [self.pad_id] for text in texts]
        return self._mean_embedding(rows, [None] * len(rows), [])

    def embed_image_text(self, images: Sequence[Image.Image], texts: Sequence[str] | None = None) -> torch.Tensor:
        texts = list(texts) if texts is not None else [EMBED_PROBE] * len(images)
        vision = self._vision_inputs(images)
        rows = [self.prompt_ids(text, True, self._image_tokens(vision, image)) for image, text in zip(images, texts)]
        return self._mean_embedding(rows, [vision[id(i)][1] for i in images], [vision[id(i)] for i in images])

    # Generation ------------------------------------------------------------------------

    def scale_schedule(self) -> list[tuple[int, int, int]]:
        """(1, h, w) token grid of each scale, coarse to fine (square images, as upstream)."""
        return [(1, h, w) for (_, h, w) in self.up.scale_table[1.0][self.model.vargpt_gen_args.pn]["scales"]]

    @torch.no_grad()
    def generate_images(
        self, prompts: Sequence[str], n: int = 1, guidance_scale: float = 3.0, temperature: float = 0.5, seed: int = 0
    ) -> GeneratedImages:
        """``guidance_scale`` is upstream's CFG on the bit logits (its default 3), ``temperature``
        its tau (default 0.5); top-k/top-p are the adapter's (upstream: 900, 0.97)."""
        if temperature <= 0:
            raise ValueError("image generation samples: temperature must be > 0")
        images, bits, logprobs, prompt_ids, prompt_index, seeds = [], [], [], [], [], []
        for p, prompt in enumerate(prompts):
            ids = self.generation_prompt_ids(prompt)
            row_seeds = [seed + p * n + j for j in range(n)]
            drawn, drawn_bits, drawn_logprobs = self._sample_images(ids, row_seeds, guidance_scale, temperature)
            images.append(drawn)
            bits.append(drawn_bits)
            logprobs.append(drawn_logprobs)
            prompt_ids += [ids] * n
            prompt_index += [p] * n
            seeds += row_seeds
        rollout = ImageRollout(
            prompts=list(prompts),
            prompt_ids=prompt_ids,
            prompt_index=prompt_index,
            tokens=torch.cat(bits),
            behaviour_logprobs=torch.cat(logprobs).sum(-1),  # a token's log-prob: the sum of its bits'
            guidance_scale=guidance_scale,
            temperature=temperature,
            seeds=seeds,
        )
        return GeneratedImages(images, rollout)

    def _prefill(self, ids: Sequence[int]):
        """One pass over prompt + <|image_gen_start|>: the KV cache the next-scale loop extends and
        the prompt states its cross-attention reads (upstream keeps those in past_hidden_states)."""
        from transformers import DynamicCache

        row = torch.tensor([list(ids) + [self.gen_start_id]], device=self.device)
        cache = DynamicCache()
        hidden = self._hidden(row, [], torch.ones_like(row), None, cache)
        return row, cache, hidden

    def _sample_images(self, ids, seeds, guidance_scale, temperature):
        """n images of one prompt in one batched call of upstream's next-scale sampler, after one
        prompt prefill whose KV cache is copied to every row; each row draws with its own seed
        (upstream: one image per call, seeded from the wall clock)."""
        row, cache, hidden = self._prefill(ids)
        n = len(seeds)
        cache.batch_repeat_interleave(n)
        rows = row.expand(n, -1)
        schedule = self.scale_schedule()
        steps = len(schedule)
        args = self.model.vargpt_gen_args
        prompt_states = hidden[0, :-1]  # what the image cross-attends to: the prompt, without the start token

        def cross_attention_context(negative_label_B_or_BLT=None, cfg=False):
            # upstream's version reads one prompt (past_hidden_states, batch 1); here n copies
            # of it, then, with guidance, n copies of the unconditional context
            context = self.model.image_gen_projector_out(prompt_states)
            length = context.shape[0]
            parts = [context] * n + ([self.model.vargpt_gen.cfg_uncond[:length].to(context.dtype)] * n if cfg else [])
            edges = torch.arange(len(parts) + 1, dtype=torch.int32, device=context.device) * length
            return torch.cat(parts), edges, length

        generators = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        self.model.get_ca_kv_cross = cross_attention_context
        try:
            with _BitRecorder(self.up.modeling, generators) as recorder:
                _, _, images, _ = self.model.autoregressive_infer_cfg(
                    scale_schedule=schedule, label_B_or_BLT=self.model.get_sos_word_embeddings(rows, rows), B=n,
                    g_seed=int(seeds[0]), cfg_list=[guidance_scale] * steps, tau_list=[temperature] * steps,
                    top_k=self.top_k, top_p=self.top_p, returns_vemb=1, cfg_insertion_layer=[0], vae_type=args.vae_type,
                    ret_img=True, inference_mode=True, sampling_per_bits=args.sampling_per_bits,
                    past_key_values=cache, use_cache=True, return_dict=True, inference_image_gen=True,
                )  # fmt: skip
        finally:
            del self.model.get_ca_kv_cross
            self.model.past_hidden_states = None
        bits, logprobs = recorder.bits_and_logprobs(self.bits_per_token)
        return _to_pil(images), bits.long().cpu(), logprobs.cpu()

    def _teacher_inputs(self, bits: torch.Tensor, schedule) -> torch.Tensor:
        """Sampled bits -> Infinity's next-scale inputs (rows, tokens - first scale, bits), built as
        the sampler builds them: codes of each scale upsampled to the last scale and summed, the
        running sum resized to the next scale."""
        quantizer = self.model.vae_local.quantizer
        rows, width = bits.shape[0], bits.shape[-1]
        summed, inputs, start = 0, [], 0
        for si, (_, h, w) in enumerate(schedule[:-1]):
            scale_bits = bits[:, start : start + h * w].reshape(rows, 1, h, w, width)
            start += h * w
            codes = quantizer.lfq.indices_to_codes(scale_bits, label_type="bit_label")
            summed = summed + F.interpolate(codes, size=schedule[-1], mode=quantizer.z_interplote_up)
            following = F.interpolate(summed, size=schedule[si + 1], mode=quantizer.z_interplote_up).squeeze(-3)
            inputs.append(following.reshape(rows, width, -1).transpose(1, 2))
        return torch.cat(inputs, 1)

    def generation_logprobs(self, rollout: ImageRollout) -> torch.Tensor:
        """(rows, image tokens) log-probs of the rollout's bits summed per token, teacher-forced on
        the conditional branch through upstream's training forward (rows right-padded: the
        cross-attention reads every state before <|image_gen_start|>)."""
        schedule = self.scale_schedule()
        bits = rollout.tokens.to(self.device)
        rows, length = bits.shape[0], bits.shape[1]
        multiple = self.model.vargpt_gen.pad_to_multiplier  # Infinity pads its sequence; the LLM holds every row
        slots = -(-length // multiple) * multiple
        tail = [self.gen_start_id] + [self.gen_pad_id] * slots + [self.gen_end_id]
        sequences = [list(ids) + tail for ids in rollout.prompt_ids]
        longest = max(len(s) for s in sequences)
        ids = torch.full((rows, longest), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(rows, longest, dtype=torch.long, device=self.device)
        for r, sequence in enumerate(sequences):
            ids[r, : len(sequence)] = torch.tensor(sequence, device=self.device)
            mask[r, : len(sequence)] = 1
        with torch.no_grad():
            inputs = self._teacher_inputs(bits, schedule).to(self.dtype)
        # upstream's training forward re-encodes pixels with random bit flips; it gets our bits
        self.model.get_vae_gt_xin_v1_1 = lambda pixels, args: (inputs, schedule, len(schedule), bits)
        try:
            out = self.model(
                input_ids=ids, attention_mask=mask, pixel_gen_values=torch.zeros(rows, 3, 1, 1, device=self.device, dtype=self.dtype),
                dpo_training=True, use_cache=False, return_dict=True,
            )  # fmt: skip
        finally:
            del self.model.get_vae_gt_xin_v1_1
            self.model.past_hidden_states = None
        logits = out.gen_logits.float().reshape(rows, length, -1, 2)  # channel 2*bit + class
        per_token = torch.log_softmax(logits, -1).gather(-1, out.image_gen_labels.unsqueeze(-1)).squeeze(-1).sum(-1)
        if self.scale_weighted_logprobs:
            per_token = per_token * self._scale_weights(schedule).to(per_token.device)
        return per_token

    def generator_loss(self, rollout: ImageRollout) -> torch.Tensor:
        """The Generator objective with every sample weighted 1: the mean negative token log-prob."""
        return -self.generation_logprobs(rollout).mean()

    def _scale_weights(self, schedule) -> torch.Tensor:
        """Per-token weights whose mean turns a mean over tokens into the released code's
        scale-reweighted mean: each scale weighs (last scale area / its area), normalised."""
        areas = torch.tensor([h * w for _, h, w in schedule], dtype=torch.float32)
        per_scale = areas[-1] / areas
        per_scale = per_scale / per_scale.sum()
        weights = torch.cat([torch.full((int(a),), float(w) / int(a)) for a, w in zip(areas, per_scale)])
        return weights * weights.numel()
