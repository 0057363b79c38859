"""Folders of shapes-world images: an unlabeled pool for training, and example folders."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable


def write_pool(count: int, folder: str | Path, seed: int = 0, image_size: int = 64, progress: Callable[[int], None] = lambda n: None) -> list[Path]:
    """Write ``count`` fresh renders as PNG with nothing else: no prompt, caption or label
    anywhere, names carry only an index. Existing files of the same name are replaced."""
    from asg_kit.micro import world

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"pool-{seed}")
    paths = []
    for index in range(count):
        path = folder / f"{index:06d}.png"
        world.render(world.sample_scene(rng), image_size).save(path)
        paths.append(path)
        progress(1)
    return paths
