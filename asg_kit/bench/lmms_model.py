"""Any registered backbone as an lmms-eval model.

In-process, ``asgkit bench`` builds :class:`AsgkitLMM` itself and hands the instance to
lmms-eval. From lmms-eval's own CLI the model is registered as ``asgkit`` through the
``lmms_eval.models`` entry point, with its options as ``--model_args``::

    lmms-eval --model asgkit --model_args backbone=janus,model=/ckpt/Janus-Pro-7B,roles=/runs/x/roles,device=cuda \\
        --tasks mmmu_val --batch_size 8

Several processes work too (``torchrun --nproc_per_node N -m lmms_eval --model asgkit ...``
or ``accelerate launch``): lmms-eval shards the documents by rank and gathers the results,
and each process takes the GPU of its ``LOCAL_RANK``.

Each request's generation arguments are honoured: ``max_new_tokens``, ``temperature``
(0, or ``do_sample=False``, is greedy), ``top_p`` and the ``until`` stop strings (the text
is cut at the first one). Backbones take one image per prompt, so a document with several
images is shown as one strip of them side by side, as lmms-eval's ``*_group_img`` tasks do.
"""

from __future__ import annotations

import atexit
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

from lmms_eval.api.model import lmms
from PIL import Image

from asg_kit.adapters.base import AnswerRequest, UnifiedBackbone

MODEL_NAME = "asgkit"


def manifest():
    """The ``lmms_eval.models`` entry point: registers :class:`AsgkitLMM` as ``asgkit``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.AsgkitLMM")


def _release_process_group() -> None:
    # lmms-eval never destroys the group it runs in; gloo's worker threads then outlive the
    # interpreter and now and then abort the process at exit ("terminate called without an
    # active exception", exit -6) after the evaluation has finished.
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@dataclass(frozen=True)
class GenerationSettings:
    """One request's decoding settings, read from lmms-eval's ``gen_kwargs``."""

    max_new_tokens: int
    temperature: float
    top_p: float
    until: tuple[str, ...]

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict, default_max_new_tokens: int = 128) -> "GenerationSettings":
        until = gen_kwargs.get("until") or ()
        if isinstance(until, str):
            until = (until,)
        if not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"`until` must be a string or a list of strings, got {until!r}")
        sampling = bool(gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
            warnings.warn("asgkit's lmms-eval model decodes without beam search; num_beams is ignored", stacklevel=3)
        return cls(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
            temperature=temperature if sampling and temperature > 0 else 0.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            until=tuple(stop for stop in until if stop),
        )


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest of the stop strings (all of it when none occurs)."""
    cut = len(text)
    for stop in until:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def one_image(visuals: Sequence) -> Image.Image | None:
    """The document's images as the single image a backbone takes: none, the image, or
    the images side by side on white, bottom-aligned at a common height."""
    images = []
    for visual in visuals or ():
        if not isinstance(visual, Image.Image):
            raise TypeError(
                f"asgkit's lmms-eval model takes image tasks only; this task passed a {type(visual).__name__} "
                "(video and audio tasks are not supported)"
            )
        images.append(visual.convert("RGB"))
    if len(images) <= 1:
        return images[0] if images else None
    height = max(image.height for image in images)
    scaled = [image.resize((max(1, round(image.width * height / image.height)), height)) for image in images]
    strip = Image.new("RGB", (sum(image.width for image in scaled), height), (255, 255, 255))
    x = 0
    for image in scaled:
        strip.paste(image, (x, 0))
        x += image.width
    return strip


class AsgkitLMM(lmms):
    """An asg-kit backbone answering lmms-eval's ``generate_until`` requests under one role.

    ``backbone``: a registered backbone name; ``model``: its checkpoint (local folder or
    hub id; the backbone's default when empty); ``roles``: trained role adapters (a
    training run's folder, or a ``save_roles`` folder); ``role``: which role answers
    ("solver" by default, "none" for the base model); ``batch_size``: requests decoded together; ``seed``:
    sampling seed for tasks that sample. An already loaded backbone can be passed as
    ``backbone`` instead of a name, and ``progress_bar(description, total)`` returning an
    ``advance(n)`` replaces the tqdm bar.
    """

    is_simple = True

    def __init__(
        self,
        backbone: str | UnifiedBackbone = "micro",
        model: str | None = None,
        roles: str | None = None,
        role: str = "solver",
        batch_size: int | str = 8,
        device: str | None = None,
        dtype: str | None = None,
        seed: int = 0,
        progress_bar=None,
        **unknown,
    ) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            atexit.register(_release_process_group)
        if unknown:
            raise TypeError(
                f"unknown asgkit model argument(s): {', '.join(sorted(unknown))}; "
                "known: backbone, model, roles, role, batch_size, device, dtype, seed"
            )
        if isinstance(backbone, str):
            from asg_kit.adapters.registry import load_backbone

            from asg_kit.devices import default_device

            device = default_device(device)  # the GPU when there is one; under torchrun / accelerate, the rank's own
            options = {key: value for key, value in {"device": device, "dtype": dtype}.items() if value}
            backbone = load_backbone(backbone, model=str(model) if model else None, **options)
        if roles:
            from asg_kit.adapters.registry import roles_folder

            backbone.load_roles(roles_folder(roles))
        self.backbone = backbone
        self.role = None if str(role).lower() in ("none", "base", "") else str(role)
        if self.role is not None and self.role not in backbone.roles:
            raise ValueError(f"backbone {backbone.name!r} has no role {self.role!r}; its roles: {', '.join(backbone.roles) or 'none'}")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" and the like: the default
        self.seed = int(seed)
        self.progress_bar = progress_bar  # (description, total) -> advance(n); tqdm when None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "AsgkitLMM":
        """lmms-eval's constructor from ``--model_args`` plus its own flags (``--batch_size``,
        ``--device``); a value given in ``--model_args`` wins."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        flags = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        return cls(**{**flags, **args})

    @property
    def device(self):
        """Where the backbone runs (lmms-eval's collectives put their tensors there)."""
        return getattr(self.backbone, "device", "cpu")

    def generate_until(self, requests) -> list[str]:
        from tqdm import tqdm

        prepared = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            image = one_image(doc_to_visual(self.task_dict[task][split][doc_id]))
            prepared.append((context, image, GenerationSettings.from_gen_kwargs(dict(gen_kwargs or {}))))

        # Requests with the same settings decode together; longest prompts first, so that
        # a batch's padding is small and an out-of-memory error shows up at once.
        order = sorted(range(len(prepared)), key=lambda i: (repr(prepared[i][2]), -len(prepared[i][0])))
        answers: list[str | None] = [None] * len(prepared)
        if self.progress_bar is not None:
            advance = self.progress_bar(f"lmms-eval: {len(prepared)} requests", len(prepared))
        else:
            bar = tqdm(total=len(prepared), desc="asgkit generate_until", disable=self.rank != 0)
            advance = bar.update
        start = 0
        while start < len(order):
            settings = prepared[order[start]][2]
            batch = [order[start]]
            while len(batch) < self.batch_size and start + len(batch) < len(order) and prepared[order[start + len(batch)]][2] == settings:
                batch.append(order[start + len(batch)])
            requests_ = [
                AnswerRequest(prepared[i][1], prepared[i][0], temperature=settings.temperature, top_p=settings.top_p, seed=self.seed + i)
                for i in batch
            ]
            with self.backbone.role(self.role):
                samples = self.backbone.sample_answers(requests_, max_new_tokens=settings.max_new_tokens)
            for i, sample in zip(batch, samples):
                answers[i] = cut_at_stops(sample.text, settings.until)
            advance(len(batch))
            start += len(batch)
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "asgkit's lmms-eval model answers generate_until tasks (all of the paper's suite); "
            "loglikelihood tasks such as seedbench_ppl are not supported"
        )

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("asgkit's lmms-eval model does not run multi-round tasks")
