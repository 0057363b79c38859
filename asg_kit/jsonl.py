"""JSON Lines input with precise errors, and crash-safe output of files and folders."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


class JsonlError(ValueError):
    """A JSONL file that cannot be read, with the file and line it failed on."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; raise ``JsonlError`` naming the
    file and line on anything that is not a JSON object."""
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise JsonlError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise JsonlError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as a single line and flush it to disk before returning."""
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def _write_atomic(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    _write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write JSON Lines, one record a line, all at once (old file or new, never half).
    Values JSON cannot hold (numpy scalars, paths) are written as their ``str``."""
    _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def swap_in_folder(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Replace folder ``final`` by the fully written folder ``staged`` so that a crash at
    any point leaves either the old folder or the new one (or the old one under
    ``final.old``, which the next swap clears)."""
    staged, final = Path(staged), Path(final)
    old = final.with_name(final.name + ".old")
    recover_folder(final)  # a swap killed between its renames left the last good folder as .old
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(final: str | os.PathLike) -> bool:
    """Undo a ``swap_in_folder`` killed between its two renames: ``final`` is gone and the
    previous folder waits as ``final.old``; move it back. True when it did."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if final.exists() or not old.is_dir():
        return False
    os.replace(old, final)
    return True


def cut_torn_line(path: str | os.PathLike) -> bool:
    """Cut a last line without its newline (a writer killed during an append) off ``path``;
    True when something was cut."""
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return False
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return False
        data = (handle.seek(0), handle.read())[1]
        handle.truncate(data.rfind(b"\n") + 1)
    return True
