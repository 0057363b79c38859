"""Ground-truth benchmarks of the shapes world, for any backbone.

- shapes-VQA: a fixed held-out set of scenes and questions (the same number of each kind);
  the Solver answers greedily under the canonical framing; an answer is right when it
  equals the truth after ``normalize_answer``. Accuracy overall and per question kind.
- shapes-GenEval: a fixed set of prompts in GenEval's six categories, several images per
  prompt, each judged by the detector with GenEval's rules; category means and overall as
  their mean.

Both are deterministic for a given seed, and draw from RNG streams the micro model's
training never uses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

from PIL import Image

from asg_kit import geneval, prompts
from asg_kit.adapters.base import AnswerRequest, UnifiedBackbone
from asg_kit.micro import world
from asg_kit.micro.detector import detect
from asg_kit.rewards import normalize_answer, split_answer

QUESTION_KINDS = ("color", "shape", "count", "exist", "position", "yesno")


@dataclass(frozen=True)
class VQAItem:
    scene: world.Scene
    question: str
    answer: str
    kind: str


def vqa_items(per_kind: int = 50, seed: int = 0) -> list[VQAItem]:
    """``per_kind`` held-out questions of each kind, each on its own scene."""
    rng = random.Random(f"shapes-vqa-{seed}")
    items: list[VQAItem] = []
    for kind in QUESTION_KINDS:
        while sum(item.kind == kind for item in items) < per_kind:
            scene = world.sample_scene(rng)
            options = [qa for qa in world.scene_questions(scene) if qa.kind == kind]
            if kind == "exist" and options:  # as many yes as no
                want = "yes" if sum(i.kind == kind and i.answer == "yes" for i in items) * 2 < per_kind else "no"
                options = [qa for qa in options if qa.answer == want]
            if options:
                qa = rng.choice(options)
                items.append(VQAItem(scene, qa.question, qa.answer, kind))
    return items


@dataclass
class VQAResult:
    accuracy: float
    per_kind: dict[str, float]
    rows: list[dict] = field(default_factory=list)


def run_vqa(
    backbone: UnifiedBackbone,
    items: Sequence[VQAItem],
    image_size: int = 64,
    batch_size: int = 32,
    max_new_tokens: int = 12,
    progress: Callable[[int], None] = lambda n: None,
    role: str | None = "solver",
) -> VQAResult:
    """The ``role`` answers (for a model whose roles are untrained, the base model)."""
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        requests = [AnswerRequest(world.render(item.scene, image_size), prompts.solver_prompt(item.question), temperature=0.0) for item in chunk]
        with backbone.role(role):
            samples = backbone.sample_answers(requests, max_new_tokens=max_new_tokens)
        for item, sample in zip(chunk, samples):
            answer = split_answer(sample.text)[0]
            rows.append({"kind": item.kind, "question": item.question, "truth": item.answer, "answer": answer, "correct": normalize_answer(answer) == normalize_answer(item.answer)})
        progress(len(chunk))
    per_kind = {kind: _mean(r["correct"] for r in rows if r["kind"] == kind) for kind in QUESTION_KINDS}
    return VQAResult(_mean(r["correct"] for r in rows), per_kind, rows)


def geneval_prompts(per_category: int = 16, seed: int = 0) -> list[dict]:
    """``per_category`` distinct prompts of each GenEval category, with metadata."""
    rng = random.Random(f"shapes-geneval-{seed}")
    chosen: list[dict] = []
    for category in geneval.CATEGORIES:
        seen: set[str] = set()
        for _ in range(1000):
            metadata = world.sample_prompt(rng, category)
            if metadata["prompt"] not in seen:
                seen.add(metadata["prompt"])
                chosen.append(metadata)
            if len(seen) == per_category:
                break
    return chosen


def judge_image(metadata: dict, image: Image.Image) -> tuple[bool, str]:
    """GenEval's verdict on one image, with the detector's objects."""
    found = [geneval.FoundObject(d.shape, d.box, d.color, score=float(d.area)) for d in detect(image)]
    return geneval.judge(metadata, found)


@dataclass
class GenEvalResult:
    overall: float
    categories: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    images: list[list[Image.Image]] = field(default_factory=list)


def run_geneval(
    backbone: UnifiedBackbone,
    metadata: Sequence[dict],
    images_per_prompt: int = 4,
    guidance_scale: float = 5.0,
    temperature: float = 1.0,
    seed: int = 0,
    progress: Callable[[int], None] = lambda n: None,
    role: str | None = "generator",
) -> GenEvalResult:
    rows, images = [], []
    for index, meta in enumerate(metadata):
        with backbone.role(role):
            out = backbone.generate_images([meta["prompt"]], n=images_per_prompt, guidance_scale=guidance_scale, temperature=temperature, seed=seed + index * images_per_prompt)
        images.append(out.images[0])
        for sample, image in enumerate(out.images[0]):
            correct, reason = judge_image(meta, image)
            rows.append({"index": index, "sample": sample, "tag": meta["tag"], "prompt": meta["prompt"], "correct": correct, "reason": reason})
        progress(1)
    summary = geneval.summarize(rows)
    return GenEvalResult(summary["overall"], summary["categories"], rows, images)


def ground_truth_geneval(metadata: Sequence[dict], images_per_prompt: int = 4, seed: int = 0) -> GenEvalResult:
    """The benchmark on renders of scenes that satisfy each prompt: the judge's ceiling."""
    rng = random.Random(seed)
    rows = []
    for index, meta in enumerate(metadata):
        for sample in range(images_per_prompt):
            correct, reason = judge_image(meta, world.render(world.scene_for_prompt(meta, rng)))
            rows.append({"index": index, "sample": sample, "tag": meta["tag"], "prompt": meta["prompt"], "correct": correct, "reason": reason})
    summary = geneval.summarize(rows)
    return GenEvalResult(summary["overall"], summary["categories"], rows)


def prompt_grid(prompt_texts: Sequence[str], images: Sequence[Sequence[Image.Image]], scale: int = 2) -> Image.Image:
    """A PNG-ready grid: one row per prompt, its text on the left, its images to the right."""
    from PIL import ImageDraw

    side = images[0][0].width * scale
    label_width = 260
    columns = max(len(row) for row in images)
    grid = Image.new("RGB", (label_width + columns * (side + 4), len(images) * (side + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (text, row) in enumerate(zip(prompt_texts, images)):
        y = r * (side + 4)
        draw.text((4, y + side // 2 - 6), text[:40], fill=(0, 0, 0))
        for c, image in enumerate(row):
            grid.paste(image.resize((side, side), Image.NEAREST), (label_width + c * (side + 4), y))
    return grid


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0

