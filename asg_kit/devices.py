"""Where a model runs and in what precision when nobody says: one rule for every command.

The GPU when there is one (under ``torchrun``, each process the GPU of its ``LOCAL_RANK``),
otherwise the backbone's own default (the CPU); the dtype is the backbone's own default
(float32; BAGEL bfloat16) unless asked. ``choose_device`` is the rule as a pure function of what the
machine has, so that the GPU choice is tested on machines without one.
"""

from __future__ import annotations

import os


def choose_device(requested: str | None, cuda_available: bool, local_rank: int | None = None) -> str | None:
    """The device to load on: ``requested`` when given (a bare ``cuda`` under torchrun
    becomes the rank's own ``cuda:LOCAL_RANK``); else ``cuda`` (``cuda:LOCAL_RANK``) when a
    GPU is visible; else None, the backbone's own default (CPU)."""
    if requested:
        return f"cuda:{local_rank}" if requested == "cuda" and local_rank is not None else requested
    if not cuda_available:
        return None
    return f"cuda:{local_rank}" if local_rank is not None else "cuda"


def local_rank() -> int | None:
    """This process's ``LOCAL_RANK`` under torchrun or accelerate; None when run alone."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def default_device(requested: str | None = None) -> str | None:
    """``choose_device`` on this machine."""
    import torch

    return choose_device(requested, torch.cuda.is_available(), local_rank())


def placement(device: str | None, dtype: str | None) -> dict[str, str]:
    """Checked ``device`` and ``dtype`` options for ``load_backbone`` (a ``UserError`` for a
    device this machine lacks or an unknown dtype), the device chosen by ``default_device``;
    options left at the backbone's default are omitted."""
    from asg_kit.checks import check_device, check_dtype

    check_device(device)
    check_dtype(dtype)
    chosen = default_device(device)
    return {key: value for key, value in {"device": chosen, "dtype": dtype}.items() if value}


def process_group_backend(device: str | None) -> str:
    """nccl between GPU processes, gloo between CPU processes."""
    return "nccl" if device and device.startswith("cuda") else "gloo"
