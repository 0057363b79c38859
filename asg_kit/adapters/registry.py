"""Backbone registry: a plain dict from name to the adapter class, imported lazily so that
one backbone's optional dependencies never break another's."""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
from pathlib import Path

from asg_kit.adapters.base import UnifiedBackbone

# name -> where its adapter class is ("module:Class"), where its tiny builder is
# ("module:function", see save_tiny_checkpoint), what to install when the import fails, and
# (optional) the file that marks its checkpoint folder when it is not config.json.
BACKBONES: dict[str, dict[str, str]] = {
    "janus": {
        "adapter": "asg_kit.adapters.janus:JanusAdapter",
        "tiny": "asg_kit.adapters.tiny_janus:save_tiny_janus",
        "install": "pip install -U 'transformers>=4.52'",
    },
    "micro": {
        "adapter": "asg_kit.adapters.micro:MicroAdapter",
        "tiny": "asg_kit.micro.model:save_tiny_micro",
        "install": "pip install -U 'transformers>=4.52'",
    },
    "bagel": {
        "adapter": "asg_kit.adapters.bagel:BagelAdapter",
        "tiny": "asg_kit.adapters.tiny_bagel:save_tiny_bagel",
        "install": "pip install -e '.[bagel]' and a checkout of ByteDance-Seed/Bagel (--upstream DIR)",
        "checkpoint_file": "llm_config.json",  # the released folder has no config.json
    },
    "vargpt": {
        "adapter": "asg_kit.adapters.vargpt:VARGPTAdapter",
        "tiny": "asg_kit.adapters.tiny_vargpt:write_tiny_vargpt",
        "install": "pip install -e '.[vargpt]' in its own venv (transformers 4.46; README, VARGPT-v1.1)",
    },
    "blip3o": {
        "adapter": "asg_kit.adapters.blip3o:Blip3oAdapter",
        "tiny": "asg_kit.adapters.tiny_blip3o:save_tiny_blip3o",
        "install": "pip install 'asg-kit[blip3o]' (transformers 5 and diffusers >= 0.33; README, BLIP3o)",
    },
}


class BackboneUnavailable(ImportError):
    """A registered backbone whose dependencies are missing."""


def _entry(name: str) -> dict[str, str]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def _resolve(name: str, key: str):
    module_name, attribute = _entry(name)[key].split(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except ImportError as error:
        raise BackboneUnavailable(f"backbone {name!r} cannot be imported ({error}); to install it: {BACKBONES[name]['install']}") from error


def adapter_class(name: str) -> type:
    return _resolve(name, "adapter")


def save_tiny_checkpoint(name: str, folder: str | Path, upstream: str | None = None, seed: int = 0) -> Path:
    """Write a tiny random-weight instance of backbone ``name`` to ``folder`` as a checkpoint
    that ``load_backbone(name, model=folder)`` loads through the backbone's real loading
    path. A tiny builder is ``function(folder, upstream=None, seed=0)``; upstream backbones
    build it from the real upstream classes of the checkout in ``upstream``."""
    builder = _resolve(name, "tiny")
    if upstream is not None and "upstream" not in inspect.signature(builder).parameters:
        raise ValueError(f"backbone {name!r} runs no upstream checkout: drop --upstream")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} exists and is not empty: a tiny checkpoint goes into a new folder")
    # Built beside the target and renamed into place: a failed build leaves no half checkpoint.
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        builder(partial, seed=seed, **({"upstream": upstream} if upstream is not None else {}))
        if folder.exists():
            folder.rmdir()
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def load_backbone(name: str, model: str | None = None, **options) -> UnifiedBackbone:
    """Load backbone ``name`` from ``model`` (a local checkpoint directory or a hub id).

    ``options`` go to the adapter's ``from_pretrained`` (``dtype``, ``device``, ``lora``,
    ``upstream`` for the backbones that run an upstream checkout...).
    """
    cls = adapter_class(name)
    return cls.from_pretrained(model if model is not None else cls.default_model, **options)


def roles_folder(path) -> str:
    """Where trained role adapters are: ``path`` itself, or a training run's
    ``checkpoint/roles`` when ``path`` is the run folder."""
    from pathlib import Path

    run_roles = Path(path) / "checkpoint" / "roles"
    return str(run_roles if run_roles.is_dir() else Path(path))


def checkpoint_file(name: str) -> str:
    """The file every checkpoint folder of backbone ``name`` holds (config.json unless its
    registry entry says otherwise)."""
    return BACKBONES.get(name, {}).get("checkpoint_file", "config.json")
