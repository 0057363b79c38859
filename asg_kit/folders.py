"""Find the images of a folder and the prompt of each, in the layouts researchers use.

- GenEval: ``NNNNN/metadata.jsonl`` (one JSON object: tag, include, prompt) and
  ``NNNNN/samples/*.png``; each numbered folder is one prompt's group of candidates.
- A mapping file: ``metadata.jsonl`` or ``prompts.jsonl`` at the top, one line per image:
  ``{"file": "a.png", "prompt": "...", ...}`` (GenEval's ``tag`` / ``include`` and a
  ``questions`` list are optional).
- Sidecars: ``a.png`` with its prompt in ``a.txt`` beside it.

Images that share a prompt form a group (diversity is measured within it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from asg_kit.images import IMAGE_EXTENSIONS
from asg_kit.jsonl import JsonlError, read_jsonl

MAPPING_FILES = ("metadata.jsonl", "prompts.jsonl")


class FolderError(ValueError):
    """A folder that cannot be scored at all."""


@dataclass
class ImageEntry:
    path: Path
    key: str  # path relative to the root, with forward slashes
    group: str
    prompt: str | None
    metadata: dict | None = None
    questions: list | None = None
    problem: str | None = None  # why this image cannot be scored, if known before opening it


@dataclass
class Discovery:
    layout: str
    entries: list[ImageEntry] = field(default_factory=list)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _key(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def discover(root: str | Path) -> Discovery:
    root = Path(root)
    if not root.exists():
        raise FolderError(f"{root} does not exist")
    if not root.is_dir():
        raise FolderError(f"{root} is not a folder")
    numbered = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit() and (p / "metadata.jsonl").is_file())
    if numbered:
        discovery = _geneval(root, numbered)
    elif any((root / name).is_file() for name in MAPPING_FILES):
        discovery = _mapping(root, next(root / name for name in MAPPING_FILES if (root / name).is_file()))
    else:
        discovery = _sidecars(root)
    if not discovery.entries:
        raise FolderError(f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} in the {discovery.layout} layout)")
    return discovery


def _geneval(root: Path, folders: list[Path]) -> Discovery:
    entries = []
    for folder in folders:
        images = sorted(p for p in (folder / "samples").glob("*") if _is_image(p)) if (folder / "samples").is_dir() else []
        metadata, problem = None, None
        try:
            text = (folder / "metadata.jsonl").read_text(encoding="utf-8").strip().splitlines()
            metadata = json.loads(text[0]) if text else None
            if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt"), str):
                problem, metadata = f"{folder.name}/metadata.jsonl has no prompt", None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"{folder.name}/metadata.jsonl unreadable: {error}"
        for image in images:
            entries.append(ImageEntry(image, _key(root, image), folder.name, metadata["prompt"] if metadata else None, metadata, problem=problem))
    return Discovery("geneval", entries)


def _mapping(root: Path, mapping: Path) -> Discovery:
    listed: dict[str, dict] = {}
    problems: dict[str, str] = {}
    try:
        records = list(read_jsonl(mapping))
    except (JsonlError, UnicodeDecodeError) as error:
        raise FolderError(str(error)) from None
    for number, record in records:
        name = record.get("file")
        if not isinstance(name, str) or not name:
            raise FolderError(f"{mapping}:{number}: each line needs a 'file' naming an image")
        if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            problems[name] = f"{mapping.name}:{number} gives no prompt"
        listed[Path(name).as_posix()] = record
    entries = []
    seen = set()
    for image in sorted(p for p in root.rglob("*") if _is_image(p)):
        key = _key(root, image)
        seen.add(key)
        record = listed.get(key)
        if record is None:
            entries.append(ImageEntry(image, key, key, None, problem=f"missing prompt: not listed in {mapping.name}"))
            continue
        prompt = record.get("prompt") if isinstance(record.get("prompt"), str) else None
        metadata = record if "include" in record else None
        entries.append(ImageEntry(image, key, prompt or key, prompt, metadata, record.get("questions"), problems.get(key)))
    for key in sorted(set(listed) - seen):
        entries.append(ImageEntry(root / key, key, key, None, problem=f"listed in {mapping.name} but no such image"))
    return Discovery("mapping", entries)


def _sidecars(root: Path) -> Discovery:
    entries = []
    for image in sorted(p for p in root.rglob("*") if _is_image(p)):
        sidecar = image.with_suffix(".txt")
        key = _key(root, image)
        prompt, problem = None, None
        if sidecar.is_file():
            try:
                prompt = sidecar.read_text(encoding="utf-8").strip() or None
            except (OSError, UnicodeDecodeError) as error:
                problem = f"prompt file {sidecar.name} unreadable: {error}"
            if prompt is None and problem is None:
                problem = f"prompt file {sidecar.name} is empty"
        else:
            problem = f"missing prompt: no {sidecar.name} beside it"
        entries.append(ImageEntry(image, key, prompt or key, prompt, problem=problem))
    return Discovery("sidecar", entries)
