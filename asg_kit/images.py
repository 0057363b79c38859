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
# Pillow's own decompression-bomb limit: anything a plain ``Image.open`` accepts is scored.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Larger images are downscaled to this many pixels at most before they are held in memory:
# every backbone resizes to a few hundred pixels a side anyway.
WORKING_PIXELS = 4096 * 4096


class BadImage(ValueError):
    """An image file that cannot be scored, with the reason."""


@dataclass
class LoadedImage:
    image: Image.Image
    notes: list[str] = field(default_factory=list)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, background: tuple[int, int, int] = (255, 255, 255)) -> LoadedImage:
    """Open ``path`` as 8-bit RGB: alpha composited on ``background``, palettes expanded,
    CMYK and 16-bit converted, an animation's first frame, non-finite float pixels set to 0,
    images over ``WORKING_PIXELS`` downscaled. Images over ``max_pixels`` (default: Pillow's
    decompression-bomb limit) are refused. Raises ``BadImage``."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise BadImage(f"cannot read file: {error.strerror or error}") from None
    if size == 0:
        raise BadImage("empty file (0 bytes)")
    notes: list[str] = []
    previous = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    # Our own limit replaces Pillow's, which would otherwise refuse (or warn) on its own terms.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise BadImage(f"image too large: {width}x{height} pixels (limit {max_pixels}; --max-pixels)")
                if getattr(opened, "n_frames", 1) > 1:
                    notes.append(f"animated ({opened.n_frames} frames): first frame scored")
                    opened.seek(0)
                if width * height > WORKING_PIXELS:
                    scale = (WORKING_PIXELS / (width * height)) ** 0.5
                    opened.draft(opened.mode, (max(1, int(width * scale)), max(1, int(height * scale))))  # JPEG decodes smaller
                opened.load()
                image = _to_rgb(opened, background, notes)
                if image.width * image.height > WORKING_PIXELS:
                    scale = (WORKING_PIXELS / (image.width * image.height)) ** 0.5
                    image = image.resize((max(2, int(image.width * scale)), max(2, int(image.height * scale))), Image.Resampling.BOX)
                if image.size != (width, height):
                    notes.append(f"downscaled from {width}x{height} to {image.width}x{image.height}")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImage(f"image too large to decode safely: {error}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"corrupt or truncated image: {error}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = previous
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
        finite = np.isfinite(array)
        if not finite.all():
            notes.append(f"{int((~finite).sum())} non-finite pixels (NaN or infinity) set to 0")
            array = np.where(finite, array, 0.0)
        top = array.max() if array.size and array.max() > 0 else 1.0
        return Image.fromarray((np.clip(array, 0.0, None) / top * 255.0).round().astype(np.uint8)).convert("RGB")
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
