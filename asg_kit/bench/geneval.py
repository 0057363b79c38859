"""GenEval for any backbone: its prompts, its folder layout, and two ways to score.

- ``official``: GenEval's own ``evaluation/evaluate_images.py`` (mmdetection's
  Mask2Former + open_clip), run as a subprocess with the interpreter of the user's GenEval
  environment; only this mode reproduces published numbers.
- ``portable``: no mmcv. A transformers Mask2Former (COCO instance segmentation) and a
  transformers CLIP for zero-shot colour, with GenEval's decision rules
  (``asg_kit.geneval``): thresholds, exact counting, position margins, colour of the
  masked crop. Other weights and pre-processing than the official ones, so its numbers are
  GenEval-compatible, never official, and are labelled so.

Both write GenEval's ``results.jsonl`` (one line per image) and are summarised the same way:
per-category means over images, overall = their mean.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from asg_kit import geneval
from asg_kit.jsonl import read_jsonl, write_jsonl_atomic

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")
# COCO's label names (detectron2, transformers) where GenEval's object_names.txt differs.
COCO_TO_GENEVAL = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "hair dryer": "hair drier"}
METADATA_FILE = "evaluation_metadata.jsonl"
DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def metadata_path(source: str | Path) -> Path:
    """GenEval's prompt file from a GenEval checkout, a folder holding the file, or the file."""
    source = Path(source)
    for candidate in (source / "prompts" / METADATA_FILE, source / METADATA_FILE, source):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no GenEval prompts at {source}: pass a GenEval checkout (it has prompts/{METADATA_FILE}), "
        f"a folder with {METADATA_FILE}, or the file itself"
    )


def load_metadata(source: str | Path) -> list[dict]:
    """GenEval's prompt lines (``tag``, ``include``, optional ``exclude``, ``prompt``)."""
    path = metadata_path(source)
    rows = []
    for number, row in read_jsonl(path):
        missing = [key for key in ("tag", "include", "prompt") if key not in row]
        if missing:
            raise ValueError(f"{path}:{number}: a GenEval prompt line needs {', '.join(missing)}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def layout_images(folder: str | Path) -> list[tuple[Path, dict]]:
    """Every sample image of a GenEval folder with its prompt's metadata, as GenEval's
    evaluator finds them (all-digit prompt folders, ``samples/<digits>.png``); none is an error."""
    import re

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no GenEval image folder at {folder}")
    found = []
    for prompt_dir in sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        meta_file = prompt_dir / "metadata.jsonl"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} is missing: not a GenEval image folder")
        metadata = json.loads(meta_file.read_text(encoding="utf-8"))
        samples = prompt_dir / "samples"
        for image in sorted(samples.iterdir() if samples.is_dir() else ()):
            if image.is_file() and re.fullmatch(r"\d+\.png", image.name):
                found.append((image, metadata))
    if not found:
        raise FileNotFoundError(f"no GenEval images under {folder} (expected NNNNN/samples/NNNN.png)")
    return found


def read_results(path: str | Path) -> list[dict]:
    """GenEval's results file: one JSON line per image with at least ``tag`` and ``correct``."""
    rows = []
    for number, row in read_jsonl(path):
        if "tag" not in row or "correct" not in row:
            raise ValueError(f"{path}:{number}: not a GenEval result line (needs tag and correct)")
        rows.append(row)
    return rows


# Official mode -----------------------------------------------------------------------


def run_official(
    images: str | Path,
    geneval_dir: str | Path,
    detector_dir: str | Path,
    outfile: str | Path,
    python: str = sys.executable,
    model_config: str | Path | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict]:
    """Run GenEval's ``evaluate_images.py`` on ``images`` in GenEval's own environment
    (``python``) and read its results. ``detector_dir`` holds the Mask2Former checkpoint
    (GenEval's ``--model-path``); ``model_config`` is the mmdetection config when mmdet is
    installed from a wheel rather than a source checkout."""
    script = Path(geneval_dir) / "evaluation" / "evaluate_images.py"
    if not script.is_file():
        raise FileNotFoundError(f"no GenEval evaluator at {script}: pass the root of a GenEval checkout")
    command = [python, str(script), str(images), "--outfile", str(outfile), "--model-path", str(detector_dir)]
    if model_config is not None:
        command += ["--model-config", str(model_config)]
    log("running " + " ".join(command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(Path(geneval_dir)))
    tail: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        log(line.rstrip())
        tail = (tail + [line.rstrip()])[-20:]
    if process.wait() != 0:
        raise RuntimeError(
            f"GenEval's evaluator failed (exit {process.returncode}); is {python} the python of GenEval's environment "
            "(mmdet, mmcv-full, open_clip, clip_benchmark, a CUDA GPU)? Its last lines:\n" + "\n".join(tail)
        )
    return read_results(outfile)


# Portable mode -----------------------------------------------------------------------


class Mask2FormerDetector:
    """COCO instance segmentation with a transformers Mask2Former checkpoint (local folder
    or hub id), post-processed as mmdetection's Mask2Former: top-k (query, class) pairs,
    masks at sigmoid > 0.5, score = class probability x mean mask probability inside the
    mask, box = the mask's extent (right and bottom edges exclusive)."""

    def __init__(self, path: str = DEFAULT_DETECTOR, device: str = "cpu", max_per_image: int = 100) -> None:
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        local = Path(path).is_dir()
        self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=local)
        self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path, use_safetensors=True, local_files_only=local).to(device).eval()
        self.device = device
        self.max_per_image = max_per_image
        names = self.model.config.id2label
        self.class_names = [COCO_TO_GENEVAL.get(names[i], names[i]) for i in range(len(names))]

    @torch.no_grad()
    def detect(self, image: Image.Image) -> list[tuple[geneval.FoundObject, np.ndarray]]:
        image = image.convert("RGB")
        inputs = self.processor(images=[image], return_tensors="pt")
        output = self.model(pixel_values=inputs["pixel_values"].to(self.device))
        classes = output.class_queries_logits[0].softmax(-1)[:, :-1]  # drop "no object"
        queries, labels = classes.shape
        scores, flat = classes.flatten().topk(min(self.max_per_image, queries * labels))
        query, label = flat // labels, flat % labels
        # Mask logits are at a quarter of the padded input; undo the padding, then resize.
        masks = output.masks_queries_logits[0, query][None]
        padded = inputs["pixel_values"].shape[-2:]
        masks = torch.nn.functional.interpolate(masks, size=padded, mode="bilinear", align_corners=False)[0]
        if "pixel_mask" in inputs:
            valid = inputs["pixel_mask"][0]
            masks = masks[:, : int(valid.any(1).sum()), : int(valid.any(0).sum())]
        masks = torch.nn.functional.interpolate(masks[None], size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
        probabilities = masks.sigmoid()
        binary = probabilities > 0.5
        mask_scores = (probabilities * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp_min(1e-6)
        found = []
        for score, cls, mask in zip((scores * mask_scores).tolist(), label.tolist(), binary):
            if not bool(mask.any()):
                continue
            rows, cols = torch.where(mask)
            box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))  # mmdet's mask2bbox
            found.append((geneval.FoundObject(self.class_names[cls], box, score=score), mask.cpu().numpy()))
        return found


class ClipColorClassifier:
    """GenEval's zero-shot colour step with a transformers CLIP (local folder or hub id):
    each object's mask pasted on a #999 background, cropped to its box, and classified
    among ten colours by the mean of three prompt templates."""

    def __init__(self, path: str = DEFAULT_CLIP, device: str = "cpu", background: str = "#999") -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        local = Path(path).is_dir()
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True, local_files_only=local).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=local)
        self.device = device
        self.background = background
        self._classifiers: dict[str, torch.Tensor] = {}

    @staticmethod
    def _features(output) -> torch.Tensor:
        return getattr(output, "pooler_output", output)  # a model output in transformers 5, a tensor before

    @torch.no_grad()
    def _classifier(self, cls: str) -> torch.Tensor:
        if cls not in self._classifiers:
            weights = []
            for color in COLORS:
                texts = [template.format(color=color, cls=cls) for template in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
                features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
                embedded = torch.nn.functional.normalize(self._features(features), dim=-1)
                weights.append(torch.nn.functional.normalize(embedded.mean(0), dim=-1))
            self._classifiers[cls] = torch.stack(weights, dim=1)
        return self._classifiers[cls]

    @torch.no_grad()
    def classify(self, image: Image.Image, objects: Sequence[tuple[geneval.FoundObject, np.ndarray | None]], cls: str) -> list[str]:
        image = image.convert("RGB")
        blank = Image.new("RGB", image.size, self.background)
        crops = []
        for obj, mask in objects:
            shown = image if mask is None else Image.composite(image, blank, Image.fromarray(mask.astype(np.uint8) * 255))
            crops.append(shown.crop(tuple(int(round(v)) for v in obj.box)))
        pixels = self.image_processor(images=crops, return_tensors="pt")["pixel_values"].to(self.device)
        embedded = torch.nn.functional.normalize(self._features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        return [COLORS[i] for i in (embedded @ self._classifier(cls)).argmax(1).tolist()]


def judge_portable(
    image: Image.Image,
    metadata: dict,
    detections: Iterable[tuple[geneval.FoundObject, np.ndarray | None]],
    colors: ClipColorClassifier,
    thresholds: geneval.Thresholds = geneval.Thresholds(),
) -> tuple[bool, str, list[geneval.FoundObject]]:
    """GenEval's verdict on one image from its detections: (correct, reason, kept objects)."""
    masks = {id(obj): mask for obj, mask in detections}
    objects = {id(obj): obj for obj, _ in detections}
    kept = geneval.keep_detections(objects.values(), metadata["tag"], thresholds)

    def classify(cls: str, found: list[geneval.FoundObject]) -> list[str]:
        return colors.classify(image, [(obj, masks.get(id(obj))) for obj in found], cls)

    correct, reason = geneval.judge(metadata, kept, thresholds.position, classify_colors=classify)
    return correct, reason, kept


def check_classes(metadata: Sequence[dict], class_names: Sequence[str]) -> None:
    """Every class the prompts name must be one the detector knows."""
    wanted = {clause["class"] for row in metadata for clause in (*row["include"], *row.get("exclude", []))}
    unknown = sorted(wanted - set(class_names))
    if unknown:
        raise ValueError(f"the detector does not know the class(es) {', '.join(unknown)}; it knows: {', '.join(class_names)}")


def run_portable(
    found: Sequence[tuple[Path, dict]],
    outfile: str | Path,
    detector: Mask2FormerDetector,
    colors: ClipColorClassifier,
    thresholds: geneval.Thresholds = geneval.Thresholds(),
    progress: Callable[[int], None] = lambda n: None,
) -> list[dict]:
    """Judge the images of a GenEval folder (``layout_images``); write and return
    GenEval-format result rows (each marked ``"mode": "portable"``)."""
    check_classes([metadata for _, metadata in found], detector.class_names)
    rows = []
    for path, metadata in found:
        image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        correct, reason, kept = judge_portable(image, metadata, detector.detect(image), colors, thresholds)
        details: dict[str, list] = {}
        for obj in kept:
            details.setdefault(obj.cls, []).append([*obj.box, obj.score])
        rows.append({
            "filename": str(path), "tag": metadata["tag"], "prompt": metadata["prompt"], "correct": correct,
            "reason": "" if correct else reason, "metadata": json.dumps(metadata), "details": json.dumps(details),
            "mode": "portable",
        })  # fmt: skip
        progress(1)
    write_jsonl_atomic(outfile, rows)
    return rows
