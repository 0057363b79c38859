"""Folders of shapes-world images: an unlabeled pool for training, and example folders."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from asg_kit.checks import UserError, check_output_folder, check_positive, check_seed

IMAGE_SIZES = (8, 1024)


def pool_scenes(count: int, seed: int = 0) -> list:
    """The scenes ``write_pool`` renders for ``count`` and ``seed``: image ``i`` (file
    ``{i:06d}.png``) shows ``pool_scenes(...)[i]``. For measuring a run against the ground
    truth afterwards; a trainer never sees them (the pool is unlabeled)."""
    from asg_kit.micro import world

    rng = random.Random(f"pool-{seed}")
    return [world.sample_scene(rng) for _ in range(count)]


def write_pool(count: int, folder: str | Path, seed: int = 0, image_size: int = 64, progress: Callable[[int], None] = lambda n: None) -> list[Path]:
    """Write ``count`` fresh renders as PNG with nothing else: no prompt, caption or label
    anywhere, names carry only an index.

    Image ``i`` of a seed is always the same render, so a folder grows by writing again:
    files that already hold exactly the image this call would write are kept (a pool of
    500 becomes the pool of 1000 with ``count=1000``; the same call twice changes
    nothing). A file that holds anything else is refused with ``UserError`` before
    anything is written: a pool never overwrites what it did not write."""
    from PIL import Image, UnidentifiedImageError

    from asg_kit.micro import world

    check_positive("COUNT", count, integer=True)
    check_seed(seed)
    check_positive("--image-size", image_size, integer=True)
    if not IMAGE_SIZES[0] <= image_size <= IMAGE_SIZES[1]:
        raise UserError(f"--image-size {image_size}: use {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} pixels")
    folder = Path(folder)
    check_output_folder("FOLDER", folder)
    scenes = pool_scenes(count, seed)
    paths = [folder / f"{index:06d}.png" for index in range(count)]
    kept = set()
    for path, scene in zip(paths, scenes):
        if not path.exists() and not path.is_symlink():
            continue
        image = world.render(scene, image_size)
        try:
            with Image.open(path) as existing:
                same = existing.size == image.size and existing.convert("RGB").tobytes() == image.tobytes()
        except (OSError, UnidentifiedImageError, ValueError):
            same = False
        if not same:
            raise UserError(f"{path} exists and is not the image seed {seed} at size {image_size} writes there; a pool never replaces files: pass an empty or new folder")
        kept.add(path)
    folder.mkdir(parents=True, exist_ok=True)
    for path, scene in zip(paths, scenes):
        if path not in kept:
            world.render(scene, image_size).save(path)
        progress(1)
    return paths
