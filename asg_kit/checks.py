"""Checks of user input that run before any model loads or any file is written, and the
advisory lock that keeps two processes out of one output folder.

Every failure is a ``UserError`` whose message is one line a person can act on; the CLI
prints it and exits with code 2.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator


class UserError(ValueError):
    """Input a person got wrong: one line saying what and how to fix it."""


def check_backbone_name(name: str) -> None:
    from asg_kit.adapters.registry import BACKBONES

    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}; registered backbones: {', '.join(sorted(BACKBONES))}")


def looks_like_path(model: str) -> bool:
    """Hub ids are ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper) is
    meant as a local folder."""
    text = str(model)
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def check_model(backbone: str, model: str | None) -> None:
    """A local model must be a folder with a config.json; the micro backbone never reaches
    the hub, so its model is always local."""
    if model is None:
        return
    path = Path(model).expanduser()
    local = path.exists() or looks_like_path(model) or backbone == "micro"
    if not local:
        return  # a hub id: checked when it loads
    if not path.exists():
        raise UserError(f"model {model}: no such folder")
    if not path.is_dir():
        raise UserError(f"model {model}: is a file; pass the checkpoint folder (with config.json)")
    from asg_kit.adapters.registry import checkpoint_file

    marker = checkpoint_file(backbone)
    if not (path / marker).is_file():
        layout = "transformers' format" if marker == "config.json" else f"{backbone}'s released layout"
        raise UserError(f"model {model}: no {marker} in this folder; pass a checkpoint folder in {layout}")


def check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here; use --device cpu")


DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed {seed}: a seed is a whole number from 0 to 2**32-1")


def check_positive(flag: str, value: float, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise UserError(f"{flag} {value!r}: expected a {'whole ' if integer else ''}number")
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{flag} {value}: must be a {'whole ' if integer else ''}number above 0")


def check_output_folder(flag: str, folder: str | Path, inputs: tuple[str | Path | None, ...] = (), nested: bool = False) -> None:
    """``folder`` can be created or written to, is not a file, and is not an input folder
    (nor, unless ``nested``, lies inside one or holds one)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: is a file, not a folder")
    resolved = folder.resolve()
    for source in inputs:
        if source is None:
            continue
        source = Path(source).expanduser().resolve()
        if resolved == source:
            raise UserError(f"{flag} {folder}: is the input folder {source}; write outputs elsewhere")
        if nested:
            continue
        if source in resolved.parents:
            raise UserError(f"{flag} {folder}: is inside the input folder {source}; write outputs elsewhere")
        if resolved in source.parents:
            raise UserError(f"{flag} {folder}: holds the input folder {source}; write outputs elsewhere")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: {existing} is not writable")


def check_output_file(flag: str, path: str | Path) -> None:
    """``path`` can be written as a file: not a folder, in a folder that can be made."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; pass a file name")
    check_output_folder(flag, path.parent)


class FolderLocked(UserError):
    """Another process holds an output folder."""


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold an advisory ``flock`` on ``folder/.lock`` for the block; a second process gets
    ``FolderLocked`` at once instead of writing into the same files. The lock dies with
    its process, so a killed run never leaves a stale one behind."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read().strip() if handle.seek(0) == 0 else ""
            raise FolderLocked(f"{folder} is in use by another {what}" + (f" (pid {holder})" if holder else "") + "; wait for it to end, or pass another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()
