"""Loading images from disk into plain 8-bit RGB, with a precise reason when that fails.

Generated-image folders hold everything: truncated and zero-byte files, text with an image
extension, CMYK, 16-bit, alpha, palettes, animations, images too large to decode safely.
``load_image`` turns each into RGB or raises ``BadImage`` saying why; ``notes`` on the
result say what was converted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 40_000_000


class BadImage(ValueError):
    """An image file that cannot be scored, with the reason."""


@dataclass
class LoadedImage:
    image: Image.Image
    notes: list[str] = field(default_factory=list)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, background: tuple[int, int, int] = (255, 255, 255)) -> LoadedImage:
    """Open ``path`` as 8-bit RGB: alpha composited on ``background``, palettes expanded,
    CMYK and 16-bit converted, an animation's first frame. Raises ``BadImage``."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise BadImage(f"cannot read file: {error.strerror or error}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    notes: list[str] = []
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise BadImage(f"image too large: {width}x{height} pixels (limit {max_pixels})")
                if getattr(opened, "n_frames", 1) > 1:
                    notes.append(f"animated ({opened.n_frames} frames): first frame scored")
                    opened.seek(0)
                opened.load()
                image = _to_rgb(opened, background, notes)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"image too large to decode safely: {error}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"corrupt or truncated image: {error}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    if image.width < 2 or image.height < 2:
        raise BadImage(f"image too small: {image.width}x{image.height} pixels")
    return LoadedImage(image, notes)


def _to_rgb(image: Image.Image, background: tuple[int, int, int], notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        notes.append(f"{mode} pixels scaled to 8 bits")
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.size and array.max() > 0 else 1.0
        return Image.fromarray((array / top * 255.0).round().astype(np.uint8)).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        notes.append(f"{mode} alpha composited on white")
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode != "L":
        notes.append(f"{mode} converted to RGB")
    return image.convert("RGB")
