"""GenEval's decision rules and summary, independent of any detector.

A prompt's metadata (``tag``, ``include``, optional ``exclude``, ``prompt``) is judged
against the objects found in one image. The rules follow GenEval's evaluator: each include
clause takes the ``count`` most confident objects of its class (fewer is wrong); a colour
needs each of them to have that colour; a position needs every one of them to stand in the
relation to every object kept for the target clause; an exclude clause fails the image when
its class is found ``count`` times or more. The summary averages images per category and
the overall score is the mean of the category means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class FoundObject:
    cls: str
    box: tuple[float, float, float, float]  # x0, y0, x1, y1; y grows downward
    color: str | None = None
    score: float = 1.0


def relations(box_a: Sequence[float], box_b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Relations of box a to box b by GenEval's rule.

    offset = centre_a - centre_b; each axis of |offset| shrinks by threshold * (size_a +
    size_b) on that axis (floored at 0); with nothing left there is no relation; else the
    shrunk offset over the unshrunk norm gives "left of" / "right of" below -0.5 / above
    0.5 on x, "above" / "below" likewise on y (several can hold). "Nothing left" is GenEval's
    tolerance: both shrunk components below 1e-3.
    """
    offset = ((box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2, (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2)
    sizes = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    shrunk = [math.copysign(max(0.0, abs(o) - threshold * s), o) for o, s in zip(offset, sizes)]
    norm = math.hypot(*offset)
    if norm == 0 or (abs(shrunk[0]) < 1e-3 and abs(shrunk[1]) < 1e-3):
        return set()
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


@dataclass(frozen=True)
class Thresholds:
    """GenEval's detection filter (its ``--options`` defaults): a detection counts above
    ``score`` (``counting`` for every class in a counting prompt, so that counts are
    exact at high confidence), at most ``max_objects`` per class, and a per-class greedy
    suppression of boxes overlapping a kept one by ``max_overlap`` IoU or more (1.0: off)."""

    score: float = 0.3
    counting: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position: float = 0.1


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU with GenEval's inclusive-pixel areas: (x1 - x0 + 1) * (y1 - y0 + 1)."""

    def area(box):
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inner = area((max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])))
    union = area(box_a) + area(box_b) - inner
    return inner / union if union else 0.0


def keep_detections(detections: Iterable[FoundObject], tag: str, thresholds: Thresholds = Thresholds()) -> list[FoundObject]:
    """The detections GenEval judges: per class, those scoring strictly above the
    threshold, most confident first, the top ``max_objects``, then greedy suppression."""
    cutoff = thresholds.counting if tag == "counting" else thresholds.score
    by_class: dict[str, list[FoundObject]] = {}
    for obj in sorted(detections, key=lambda o: -o.score):
        if obj.score > cutoff:
            by_class.setdefault(obj.cls, []).append(obj)
    kept: list[FoundObject] = []
    for objects in by_class.values():
        queue = objects[: thresholds.max_objects]
        while queue:
            best = queue.pop(0)
            kept.append(best)
            if thresholds.max_overlap < 1:
                queue = [o for o in queue if box_iou(best.box, o.box) < thresholds.max_overlap]
    return kept


def judge(
    metadata: dict,
    objects: Iterable[FoundObject],
    position_threshold: float = 0.1,
    classify_colors: Callable[[str, list[FoundObject]], list[str]] | None = None,
) -> tuple[bool, str]:
    """(correct, reason) for one image of the prompt described by ``metadata``.

    Colours come from each object's ``color``, or, when ``classify_colors(cls, objects)``
    is given, from it, called only for the objects a colour clause examines (GenEval
    classifies those crops alone).
    """
    by_class: dict[str, list[FoundObject]] = {}
    for obj in sorted(objects, key=lambda o: -o.score):
        by_class.setdefault(obj.cls, []).append(obj)
    kept: list[list[FoundObject]] = []
    for clause in metadata["include"]:
        cls, count = clause["class"], clause["count"]
        found = by_class.get(cls, [])[:count]
        if len(found) < count:
            return False, f"expected {cls}>={count}, found {len(by_class.get(cls, []))}"
        color = clause.get("color")
        if color is not None:
            colors = classify_colors(cls, found) if classify_colors is not None else [o.color for o in found]
            wrong = [c for c in colors if c != color]
            if wrong:
                return False, f"expected {color} {cls}, found {' '.join(str(c) for c in wrong)} {cls}"
        if "position" in clause:
            relation, target = clause["position"]
            if target >= len(kept):
                raise ValueError(f"position clause of {cls!r} points at clause {target}, which is not before it")
            for subject in found:
                for anchor in kept[target]:
                    if relation not in relations(subject.box, anchor.box, position_threshold):
                        return False, f"expected {cls} {relation} target, found {' and '.join(sorted(relations(subject.box, anchor.box, position_threshold))) or 'no relation'}"
        kept.append(found)
    for clause in metadata.get("exclude", []):
        cls, count = clause["class"], clause["count"]
        if len(by_class.get(cls, [])) >= count:
            return False, f"expected {cls}<{count}, found {len(by_class[cls])}"
    return True, "correct"


def summarize(results: Iterable[dict]) -> dict:
    """Per-category means of ``correct`` over images, and overall = mean of those means.

    ``results`` are rows with ``tag`` and ``correct``; categories with no image are left
    out of the overall mean (and reported as None).
    """
    totals: dict[str, list[int]] = {}
    for row in results:
        totals.setdefault(row["tag"], []).append(bool(row["correct"]))
    categories = {tag: (sum(v) / len(v) if v else None) for tag, v in ((t, totals.get(t, [])) for t in CATEGORIES)}
    for tag, values in totals.items():
        if tag not in categories:
            categories[tag] = sum(values) / len(values)
    present = [v for v in categories.values() if v is not None]
    return {
        "categories": categories,
        "overall": sum(present) / len(present) if present else None,
        "images": sum(len(v) for v in totals.values()),
    }


def write_layout(
    backbone,
    metadata: Sequence[dict],
    folder,
    images_per_prompt: int = 4,
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    seed: int = 0,
    progress=lambda n: None,
    role: str | None = "generator",
) -> list:
    """Generate images for each prompt into GenEval's layout: ``folder/NNNNN/metadata.jsonl``
    (the prompt's line) and ``folder/NNNNN/samples/NNNN.png``. Prompts whose samples are all
    there already are skipped, so an interrupted run resumes; a folder written for other
    prompts is an error rather than a silent mix. Returns the prompt folders."""
    import json
    from pathlib import Path

    folder = Path(folder)
    written = []
    with backbone.role(role):
        for index, meta in enumerate(metadata):
            target = folder / f"{index:05d}"
            samples = target / "samples"
            paths = [samples / f"{n:04d}.png" for n in range(images_per_prompt)]
            written.append(target)
            existing = target / "metadata.jsonl"
            if existing.is_file() and json.loads(existing.read_text(encoding="utf-8")) != meta:
                raise ValueError(f"{existing} holds another prompt than line {index} of the metadata; write to a new folder")
            if all(p.is_file() for p in paths):
                progress(1)
                continue
            samples.mkdir(parents=True, exist_ok=True)
            (target / "metadata.jsonl").write_text(json.dumps(meta) + "\n", encoding="utf-8")
            out = backbone.generate_images([meta["prompt"]], n=images_per_prompt, guidance_scale=guidance_scale, temperature=temperature, seed=seed + index * images_per_prompt)
            for image, path in zip(out.images[0], paths):
                tmp = path.with_suffix(".tmp.png")
                image.save(tmp)
                tmp.replace(path)
            progress(1)
    return written
