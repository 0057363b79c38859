"""Read shapes back from pixels: the ground-truth judge of the shapes world.

Each pixel far enough from the background takes the nearest palette colour (if it is close
to one); each colour's connected regions are objects. A region's shape comes from its
coverage (how much of each pixel, its anti-aliased rim included, the colour covers): the
fill ratio of its box tells square, circle and cross apart, a centroid below the centre
marks a triangle. Its size comes from its extent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from asg_kit.micro.world import BACKGROUND, COLORS, SIZES, Obj, Scene

# Area over box area of each symmetric shape (a triangle is told apart by its low centroid).
FILL = {"square": 1.0, "circle": 3.14159 / 4, "cross": 5 / 9}
TRIANGLE_CENTROID = 1 / 6  # apex up: the centroid sits 1/6 of the height below the box centre
_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 as shares of the image side
    area: int  # pixels

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


def _classify(alpha: np.ndarray) -> str:
    """Shape of a region from its coverage ``alpha`` (0..1 per pixel, sub-pixel exact on
    anti-aliased edges): fill ratio and how far its centroid sits below its centre."""
    area = float(alpha.sum())
    width = float(alpha.sum(axis=1).max())
    height = float(alpha.sum(axis=0).max())
    rows = np.nonzero(alpha.max(axis=1) > 0.5)[0]
    ys = np.arange(alpha.shape[0]) + 0.5
    centroid = float((alpha.sum(axis=1) * ys).sum() / area)
    middle = (rows[0] + rows[-1] + 1) / 2 if len(rows) else centroid
    if (centroid - middle) / max(height, 1.0) > TRIANGLE_CENTROID / 2:
        return "triangle"
    fill = area / max(width * height, 1.0)
    return min(FILL, key=lambda shape: abs(FILL[shape] - fill))


def _coverage(pixels: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """How much of each pixel ``color`` covers, assuming it is blended with the background."""
    background = np.array(BACKGROUND, dtype=np.float32)
    direction = np.array(color, dtype=np.float32) - background
    return np.clip((pixels - background) @ direction / float(direction @ direction), 0.0, 1.0)


def detect(image: Image.Image, background_distance: float = 60.0, color_distance: float = 70.0, min_area_share: float = 0.003) -> list[Detection]:
    """Objects found in ``image``, largest first."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    side_y, side_x = pixels.shape[:2]
    foreground = np.linalg.norm(pixels - np.array(BACKGROUND, dtype=np.float32), axis=-1) > background_distance
    distance = np.linalg.norm(pixels[..., None, :] - _PALETTE, axis=-1)
    nearest = distance.argmin(-1)
    close = distance.min(-1) < color_distance
    min_area = max(4, int(min_area_share * side_x * side_y))
    size_cut = (SIZES["small"] + SIZES["large"]) / 2
    found = []
    for index, color in enumerate(_NAMES):
        regions, count = ndimage.label(foreground & close & (nearest == index))
        for label, box in enumerate(ndimage.find_objects(regions), start=1):
            mask = regions[box] == label
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = box
            extent = max(ys.stop - ys.start, xs.stop - xs.start) / max(side_x, side_y)
            # One pixel of margin takes in the anti-aliased rim the colour test left out.
            grown = (slice(max(0, ys.start - 1), ys.stop + 1), slice(max(0, xs.start - 1), xs.stop + 1))
            alpha = _coverage(pixels[grown], COLORS[color])
            alpha[ndimage.binary_dilation(regions[grown] == label, iterations=1) == 0] = 0.0
            found.append(
                Detection(
                    shape=_classify(alpha),
                    color=color,
                    size="large" if extent > size_cut else "small",
                    box=(xs.start / side_x, ys.start / side_y, xs.stop / side_x, ys.stop / side_y),
                    area=area,
                )
            )
    return sorted(found, key=lambda d: -d.area)


def matches_scene(detections: list[Detection], scene: Scene, center_tolerance: float = 0.05) -> bool:
    """True when the detections are exactly the scene's objects: same count, and a one-to-one
    pairing with equal shape, colour and size and centres within ``center_tolerance``."""
    if len(detections) != len(scene.objects):
        return False
    remaining = list(scene.objects)
    for det in detections:
        match = next((o for o in remaining if _same(det, o, center_tolerance)), None)
        if match is None:
            return False
        remaining.remove(match)
    return True


def _same(det: Detection, obj: Obj, tolerance: float) -> bool:
    cx, cy = det.center
    return (det.shape, det.color, det.size) == (obj.shape, obj.color, obj.size) and abs(cx - obj.cx) <= tolerance and abs(cy - obj.cy) <= tolerance
