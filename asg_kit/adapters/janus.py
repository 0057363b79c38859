"""Janus / Janus-Pro through transformers' native ``JanusForConditionalGeneration``.

Understanding decodes with ``lm_head``; image generation samples VQ tokens from the
separate ``generation_head`` with classifier-free guidance. Both decode loops live here
rather than in ``generate()``: that gives every sampled token its behaviour log-prob and
entropy (Janus's image ``generate`` returns only the last step's scores), per-request
random streams, and one prefill per image or prompt shared by all its samples.
"""

from __future__ import annotations

import inspect

from pathlib import Path
from typing import Sequence

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
    TextSample,
    TokenScores,
)
from asg_kit.adapters.decoding import RowSampler, check_completions, common_prefix, draw_token, left_pad, sample_in_batches, score_tail
from asg_kit.adapters.roles import LoraRoles

JANUS_MIN_TRANSFORMERS = "4.52"
CHAT_TEMPLATE = "<|User|>: {image}{text}\n\n<|Assistant|>:"


def require_janus():
    """Import transformers' Janus classes, or fail saying which transformers has them."""
    try:
        from transformers import JanusForConditionalGeneration, JanusProcessor
    except ImportError as error:
        import transformers

        raise ImportError(
            f"the Janus backbone needs transformers >= {JANUS_MIN_TRANSFORMERS} with Janus support "
            f"(installed: {transformers.__version__}); run: pip install -U 'transformers>={JANUS_MIN_TRANSFORMERS}'"
        ) from error
    return JanusForConditionalGeneration, JanusProcessor


def pil_image_processor_class():
    """Janus's image processor without torchvision: ``JanusImageProcessorPil`` in
    transformers 5, the numpy/PIL ``JanusImageProcessor`` before."""
    try:
        from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

        return JanusImageProcessorPil
    except ImportError:
        from transformers.models.janus.image_processing_janus import JanusImageProcessor

        return JanusImageProcessor


def _to_pil(decoded: torch.Tensor) -> list[Image.Image]:
    """(batch, H, W, 3) in [-1, 1] to PIL images."""
    pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


class JanusAdapter(LoraRoles):
    """A Janus model with one LoRA adapter per role on its language model."""

    name = "janus"
    generation_paradigm = "ar_tokens"
    default_model: str | None = "deepseek-community/Janus-Pro-1B"

    def __init__(
        self,
        model,
        processor,
        lora: LoraSettings | None = LoraSettings(),
        roles: Sequence[str] = ROLES,
        chat_template: str = CHAT_TEMPLATE,
        system_prompt: str = "",
    ) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.model = model
        self.roles: tuple[str, ...] = ()
        self.peft = None
        self._lora_parameters: list[torch.nn.Parameter] = []
        self._active: str | None = None
        if lora is not None:  # lora=None: the bare model, e.g. for pretraining its own weights
            self._add_roles(lora, tuple(roles))
        self.model.eval()  # after LoRA injection, so that its dropout layers are off too
        # transformers 5.2x renamed the KV-cache argument and warns on every call under the old name
        forward_parameters = inspect.signature(model.model.language_model.forward).parameters
        self._cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"

        token_id = self.tokenizer.convert_tokens_to_ids
        self.image_token_id = model.config.image_token_id
        self.boi_id = token_id(processor.image_start_token)
        self.eoi_id = token_id(processor.image_end_token)
        self.image_placeholder = processor.image_token
        self.num_image_tokens = model.config.vision_config.num_image_tokens
        self.eos_id = self.tokenizer.eos_token_id
        self.bos_id = self.tokenizer.bos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def _add_roles(self, lora: LoraSettings, roles: tuple[str, ...]) -> None:
        from peft import LoraConfig

        targets = "|".join(lora.target_modules)
        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=rf".*language_model\..*\.({targets})",
            bias="none",
        )
        self.install_roles(self.model, {role: config for role in roles})

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        local_files_only: bool | None = None,
        upstream: str | Path | None = None,
        **options,
    ) -> "JanusAdapter":
        """Load a Janus checkpoint in transformers' format from a local directory or a hub
        id (weights as safetensors only). ``dtype`` e.g. "bfloat16"; ``device`` e.g. "cuda"."""
        import transformers
        from transformers import AutoTokenizer

        if upstream is not None:
            raise ValueError(f"backbone {cls.name!r} is native in transformers and runs no upstream checkout: drop --upstream")
        janus_class, processor_class = require_janus()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if local_files_only is None:
            local_files_only = Path(model).is_dir()
        major = int(transformers.__version__.split(".")[0])
        dtype_key = "dtype" if major >= 5 else "torch_dtype"
        try:
            network = janus_class.from_pretrained(
                model, use_safetensors=True, local_files_only=local_files_only, **{dtype_key: dtype or torch.float32}
            )
        except OSError as error:
            raise OSError(
                f"could not load a Janus checkpoint from {str(model)!r}: {error}\n"
                "Pass a local directory in transformers' Janus format (config.json, *.safetensors, tokenizer and "
                "preprocessor files), or a hub id on a machine that reaches the hub."
            ) from error
        if device is not None:
            network.to(device)
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local_files_only)
        image_processor = pil_image_processor_class().from_pretrained(model, local_files_only=local_files_only)
        processor = processor_class(
            image_processor=image_processor,
            tokenizer=tokenizer,
            num_image_tokens=network.config.vision_config.num_image_tokens,
        )
        return cls(network, processor, **options)

    # Roles -----------------------------------------------------------------------------

    # Encoding --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm_head.weight.dtype

    def _token_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        expanded: list[int] = []
        for token in ids:
            if token == self.image_token_id:
                expanded += [self.boi_id, *[self.image_token_id] * self.num_image_tokens, self.eoi_id]
            else:
                expanded.append(token)
        return expanded

    def _control_strings(self) -> list[str]:
        """The special tokens that structure a sequence: image slots, begin/end of sequence,
        padding, and the special tokens of the chat template itself (longest first)."""
        tokenizer = self.tokenizer
        strings = {self.image_placeholder, self.processor.image_start_token, self.processor.image_end_token}
        strings |= {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token}
        special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
        template = self.system_prompt + self.chat_template.format(image="", text="")
        template_ids = tokenizer(template, add_special_tokens=False)["input_ids"]
        strings |= {tokenizer.convert_ids_to_tokens(index) for index in template_ids if index in special}
        return sorted((s for s in strings if s), key=len, reverse=True)

    def _plain(self, text: str) -> str:
        # Text from users or from the model itself must not smuggle in image slots, a turn
        # of its own or an end of sequence.
        if not hasattr(self, "_controls"):
            self._controls = self._control_strings()
        for marker in self._controls:
            text = text.replace(marker, " ")
        return text

    def prompt_ids(self, text: str, with_image: bool) -> list[int]:
        """Token ids of a user turn in the chat format, the image expanded to its tokens."""
        image = f"{self.image_placeholder}\n" if with_image else ""
        return self._token_ids(self.system_prompt + self.chat_template.format(image=image, text=self._plain(text)))

    def generation_prompt_ids(self, prompt: str) -> list[int]:
        return self._token_ids(self.system_prompt + self.chat_template.format(image="", text=self._plain(prompt))) + [self.boi_id]

    def unconditional_ids(self, ids: Sequence[int]) -> list[int]:
        """Janus's unconditional branch for guidance: only BOS and BOI kept, the rest padded."""
        return [t if t in (self.bos_id, self.boi_id) else self.pad_id for t in ids]

    def _image_features(self, images: Sequence[Image.Image | None]) -> dict[int, torch.Tensor]:
        """Aligned vision features of each distinct image object, encoded once."""
        unique = {id(image): image for image in images if image is not None}
        if not unique:
            return {}
        pixels = self.processor.image_processor(
            images=[image.convert("RGB") for image in unique.values()], return_tensors="pt"
        )["pixel_values"].to(self.device, self.dtype)
        output = self.model.model.get_image_features(pixels)
        features = getattr(output, "pooler_output", output)  # a model output in transformers 5, a tensor before
        return dict(zip(unique, features))

    def _embed(self, ids: Sequence[int], features: torch.Tensor | None = None) -> torch.Tensor:
        tokens = torch.tensor(list(ids), device=self.device)
        embeds = self.model.get_input_embeddings()(tokens)
        slots = tokens == self.image_token_id
        if features is not None and bool(slots.any()):
            embeds = embeds.masked_scatter(slots[:, None], features.to(embeds.dtype))
        return embeds

    def _hidden(self, embeds, mask, positions, cache=None) -> torch.Tensor:
        output = self.model.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            use_cache=cache is not None,
            **{self._cache_argument: cache},
        )
        return output.last_hidden_state

    @staticmethod
    def _new_cache():
        from transformers import DynamicCache

        return DynamicCache()

    # Understanding ---------------------------------------------------------------------

    @torch.no_grad()
    def sample_answers(self, requests: Sequence[AnswerRequest], max_new_tokens: int = 96, seed: int = 0) -> list[TextSample]:
        return sample_in_batches(requests, seed, lambda batch, seeds: self._sample_group(batch, seeds, max_new_tokens))

    def _sample_group(self, group: Sequence[AnswerRequest], seeds: Sequence[int], max_new_tokens: int) -> list[TextSample]:
        features = self._image_features([r.image for r in group])
        rows = [self.prompt_ids(r.prompt, r.image is not None) for r in group]
        embeds = [self._embed(ids, features.get(id(r.image))) for ids, r in zip(rows, group)]
        shared = common_prefix(rows)
        if len({id(r.image) for r in group}) > 1 and self.image_token_id in rows[0][:shared]:
            shared = rows[0].index(self.image_token_id)  # image slots hold different features per row
        count = len(group)

        # One prefill of the shared prefix (image included), copied to every row.
        cache = self._new_cache()
        if shared:
            prefix = embeds[0][:shared][None]
            ones = torch.ones(1, shared, dtype=torch.long, device=self.device)
            self._hidden(prefix, ones, (ones.cumsum(-1) - 1), cache)
            cache.batch_repeat_interleave(count)
        suffix, suffix_mask, _ = left_pad([e[shared:] for e in embeds])
        mask = torch.cat([torch.ones(count, shared, dtype=torch.long, device=self.device), suffix_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self._hidden(suffix, mask, positions[:, shared:], cache)[:, -1]
        next_position = positions[:, -1:] + 1

        sampler = RowSampler(group, seeds, {self.eos_id}, self.pad_id, self.device)
        for step in range(max_new_tokens):
            logits = self.model.lm_head(hidden).float()
            drawn = sampler.step(logits)
            if sampler.done or step == max_new_tokens - 1:
                break
            step_embeds = self.model.get_input_embeddings()(torch.tensor(drawn, device=self.device))[:, None]
            mask = torch.cat([mask, torch.ones(count, 1, dtype=torch.long, device=self.device)], dim=1)
            hidden = self._hidden(step_embeds, mask, next_position, cache)[:, -1]
            next_position = next_position + 1

        return sampler.samples(self.decode)

    def decode(self, token_ids: Sequence[int]) -> str:
        # Special tokens stay (answer tags may be special); only end and padding go.
        kept = [t for t in token_ids if t not in (self.eos_id, self.pad_id, self.bos_id)]
        return self.tokenizer.decode(kept, skip_special_tokens=False).strip()

    def encode_completion(self, text: str, finished: bool = True) -> list[int]:
        """Token ids of a completion text (as ``score_completions`` takes them)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids + ([self.eos_id] if finished else [])

    def score_completions(
        self, requests: Sequence[AnswerRequest], completions: Sequence[Sequence[int]], keep_logits: bool = False
    ) -> TokenScores:
        check_completions(requests, completions)
        features = self._image_features([r.image for r in requests])
        rows = []
        for request, completion in zip(requests, completions):
            prompt = self._embed(self.prompt_ids(request.prompt, request.image is not None), features.get(id(request.image)))
            rows.append(torch.cat([prompt, self._embed(completion)]))
        embeds, mask, positions = left_pad(rows)
        hidden = self._hidden(embeds, mask, positions)
        return score_tail(hidden, completions, self.model.lm_head, keep_logits)

    def caption(
        self,
        images: Sequence[Image.Image],
        prompt: str = CAPTION_PROMPT,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[str]:
        requests = [AnswerRequest(image, prompt, temperature=temperature) for image in images]
        return [s.text for s in self.sample_answers(requests, max_new_tokens=max_new_tokens, seed=seed)]

    # Embeddings (base model) -----------------------------------------------------------

    @torch.no_grad()
    def _mean_embedding(self, rows: list[torch.Tensor]) -> torch.Tensor:
        with self.role(None):
            embeds, mask, positions = left_pad(rows)
            hidden = self._hidden(embeds, mask, positions).float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self._mean_embedding([self._embed(self._token_ids(self._plain(text))) for text in texts])

    def embed_image_text(self, images: Sequence[Image.Image], texts: Sequence[str] | None = None) -> torch.Tensor:
        texts = list(texts) if texts is not None else [EMBED_PROBE] * len(images)
        features = self._image_features(images)
        rows = [self._embed(self.prompt_ids(text, True), features[id(image)]) for image, text in zip(images, texts)]
        return self._mean_embedding(rows)

    # Generation ------------------------------------------------------------------------

    @torch.no_grad()
    def generate_images(
        self, prompts: Sequence[str], n: int = 1, guidance_scale: float = 5.0, temperature: float = 1.0, seed: int = 0
    ) -> GeneratedImages:
        if temperature <= 0:
            raise ValueError("image generation samples: temperature must be > 0")
        images, all_tokens, all_logprobs, prompt_ids, prompt_index, seeds = [], [], [], [], [], []
        for p, prompt in enumerate(prompts):
            conditional = self.generation_prompt_ids(prompt)
            unconditional = self.unconditional_ids(conditional)
            row_seeds = [seed + p * n + j for j in range(n)]
            tokens, logprobs = self._sample_image_tokens(conditional, unconditional, n, guidance_scale, temperature, row_seeds)
            images.append(_to_pil(self.model.decode_image_tokens(tokens)))
            all_tokens.append(tokens)
            all_logprobs.append(logprobs)
            prompt_ids += [conditional] * n
            prompt_index += [p] * n
            seeds += row_seeds
        rollout = ImageRollout(
            prompts=list(prompts),
            prompt_ids=prompt_ids,
            prompt_index=prompt_index,
            tokens=torch.cat(all_tokens),
            behaviour_logprobs=torch.cat(all_logprobs),
            guidance_scale=guidance_scale,
            temperature=temperature,
            seeds=seeds,
        )
        return GeneratedImages(images, rollout)

    def _sample_image_tokens(self, conditional, unconditional, n, guidance_scale, temperature, seeds):
        # One prefill per prompt (both branches), copied to its n samples.
        length = len(conditional)
        embeds = torch.stack([self._embed(conditional), self._embed(unconditional)])
        mask = torch.ones(2, length, dtype=torch.long, device=self.device)
        cache = self._new_cache()
        hidden = self._hidden(embeds, mask, mask.cumsum(-1) - 1, cache)[:, -1]
        cache.batch_repeat_interleave(n)
        hidden = hidden.repeat_interleave(n, dim=0)  # rows: n conditional, then n unconditional
        mask = mask.repeat_interleave(n, dim=0)
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        tokens = torch.zeros(n, self.num_image_tokens, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(n, self.num_image_tokens)
        for step in range(self.num_image_tokens):
            logits = self.model.model.generation_head(hidden).float()
            conditional_logits, unconditional_logits = logits[:n], logits[n:]
            guided = unconditional_logits + guidance_scale * (conditional_logits - unconditional_logits)
            for row in range(n):
                token, logprob = draw_token(guided[row], temperature, 1.0, generators[row])
                tokens[row, step] = token
                logprobs[row, step] = logprob
            if step == self.num_image_tokens - 1:
                break
            step_embeds = self.model.prepare_embeddings_for_image_generation(tokens[:, step].repeat(2))[:, None]
            mask = torch.cat([mask, torch.ones(2 * n, 1, dtype=torch.long, device=self.device)], dim=1)
            position = torch.full((2 * n, 1), length + step, device=self.device)
            hidden = self._hidden(step_embeds, mask, position, cache)[:, -1]
        return tokens, logprobs

    def generation_logprobs(self, rollout: ImageRollout) -> torch.Tensor:
        rows = []
        for ids, tokens in zip(rollout.prompt_ids, rollout.tokens):
            image_embeds = self.model.prepare_embeddings_for_image_generation(tokens.to(self.device))
            rows.append(torch.cat([self._embed(ids), image_embeds.to(self.dtype)]))
        embeds, mask, positions = left_pad(rows)
        hidden = self._hidden(embeds, mask, positions)
        targets = [t.tolist() for t in rollout.tokens]
        return score_tail(hidden, targets, self.model.model.generation_head).logprobs

    def generator_loss(self, rollout: ImageRollout) -> torch.Tensor:
        """The "ar_tokens" Generator objective with unit weights: mean negative log-prob of
        the rollout's image tokens (the gradient path of the clipped GRPO update)."""
        return -self.generation_logprobs(rollout).mean()
