"""Backbone registry: a plain dict from name to the adapter class, imported lazily so that
one backbone's optional dependencies never break another's."""

from __future__ import annotations

import importlib

from asg_kit.adapters.base import UnifiedBackbone

# name -> (module, class, what to install when the import fails)
BACKBONES: dict[str, tuple[str, str, str]] = {
    "janus": ("asg_kit.adapters.janus", "JanusAdapter", "pip install -U 'transformers>=4.52'"),
    "micro": ("asg_kit.adapters.micro", "MicroAdapter", "pip install -U 'transformers>=4.52'"),
    "vargpt": ("asg_kit.adapters.vargpt", "VARGPTAdapter", "pip install -e '.[vargpt]' in its own venv (transformers 4.46)"),
}


class BackboneUnavailable(ImportError):
    """A registered backbone whose dependencies are missing."""


def adapter_class(name: str) -> type:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {', '.join(sorted(BACKBONES))}")
    module_name, class_name, install = BACKBONES[name]
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except ImportError as error:
        raise BackboneUnavailable(f"backbone {name!r} cannot be imported ({error}); to install it: {install}") from error


def load_backbone(name: str, model: str | None = None, **options) -> UnifiedBackbone:
    """Load backbone ``name`` from ``model`` (a local checkpoint directory or a hub id).

    ``options`` go to the adapter's ``from_pretrained`` (``dtype``, ``device``, ``lora``...).
    """
    cls = adapter_class(name)
    return cls.from_pretrained(model if model is not None else cls.default_model, **options)


def roles_folder(path) -> str:
    """Where trained role adapters are: ``path`` itself, or a training run's
    ``checkpoint/roles`` when ``path`` is the run folder."""
    from pathlib import Path

    run_roles = Path(path) / "checkpoint" / "roles"
    return str(run_roles if run_roles.is_dir() else Path(path))
