"""What the micro model is taught: one supervised example per role's job, drawn from the
shapes world with the exact prompts the training loop and the scorers use."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image

from asg_kit import prompts, specs
from asg_kit.micro import world

# Share of each understanding task in a batch.
TASK_WEIGHTS = {"answer": 0.6, "caption": 0.1, "ask": 0.1, "spec": 0.1, "decompose": 0.1}


@dataclass(frozen=True)
class TextExample:
    task: str
    image: Image.Image | None  # None: a text-only task
    prompt: str
    target: str


@dataclass(frozen=True)
class ImageExample:
    prompt: str
    image: Image.Image
    metadata: dict | None  # GenEval metadata when the prompt is one of its templates


def text_example(rng: random.Random, task: str | None = None, image_size: int = 64) -> TextExample:
    task = task or rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()))[0]
    if task == "decompose":
        metadata = world.sample_prompt(rng)
        spec = specs.spec_from_geneval(metadata)
        return TextExample(task, None, specs.decompose_prompt(metadata["prompt"]), prompts.format_spec(spec))
    scene = world.sample_scene(rng)
    image = world.render(scene, image_size)
    if task == "answer":
        qa = world.sample_question(scene, rng)
        framing = rng.randrange(len(prompts.SOLVER_FRAMINGS))
        return TextExample(task, image, prompts.solver_prompt(qa.question, framing), prompts.format_answer(qa.answer))
    if task == "caption":
        return TextExample(task, image, prompts.CAPTION, world.caption(scene, rng))
    if task == "ask":
        return TextExample(task, image, prompts.PROPOSER_QUESTION, world.sample_question(scene, rng).question)
    if task == "spec":
        return TextExample(task, image, prompts.PROPOSER_SPEC, prompts.format_spec(world.spec_for_scene(scene, rng)))
    raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASK_WEIGHTS)}")


def image_example(rng: random.Random, image_size: int = 64, caption_share: float = 0.3) -> ImageExample:
    """A prompt and an image that satisfies it: a GenEval-style prompt, or a caption."""
    if rng.random() < caption_share:
        scene = world.sample_scene(rng)
        return ImageExample(world.caption(scene, rng), world.render(scene, image_size), None)
    metadata = world.sample_prompt(rng)
    return ImageExample(metadata["prompt"], world.render(world.scene_for_prompt(metadata, rng), image_size), metadata)


def patch_labels(scene: world.Scene, grid: int) -> tuple[list[int], list[int]]:
    """Dense ground truth for the vision encoder: for each patch of a ``grid`` x ``grid``
    split of the canvas (row-major, as the encoder orders its tokens), the colour and the
    shape of the object whose box holds the patch centre, as class ids (0: background,
    then ``world.COLORS`` / ``world.SHAPES`` order). Boxes never overlap (objects keep a gap)."""
    colors, shapes = [0] * (grid * grid), [0] * (grid * grid)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        for row in range(grid):
            for column in range(grid):
                if x0 <= (column + 0.5) / grid <= x1 and y0 <= (row + 0.5) / grid <= y1:
                    colors[row * grid + column] = list(world.COLORS).index(obj.color) + 1
                    shapes[row * grid + column] = world.SHAPES.index(obj.shape) + 1
    return colors, shapes


def vocabulary(samples: int = 800, seed: int = 0) -> list[str]:
    """Every word the micro model can read or write: all fixed prompts plus the words of
    many sampled examples (lowercased, split like the tokenizer splits)."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace().pre_tokenize_str
    texts = [*prompts.SOLVER_FRAMINGS, prompts.SOLVER_RULES, prompts.PROPOSER_QUESTION, prompts.PROPOSER_SPEC, prompts.PROPOSER_DECOMPOSE]
    texts += [prompts.CAPTION, prompts.EMBED_PROBE, "Question : Prompt :", "draw : |"]
    texts += [*world.COLORS, *world.SHAPES, *world.PLURALS.values(), *world.SIZES, *world.NUMBER_WORDS.values()]
    texts += [str(n) for n in range(10)] + ["yes", "no", "left", "right", "above", "below", "a photo of"]
    rng = random.Random(seed)
    for _ in range(samples):  # tiny renders: only the texts matter here
        example = text_example(rng, image_size=4)
        texts += [example.prompt, example.target.replace("<answer>", " ").replace("</answer>", " ")]
        texts.append(image_example(rng, image_size=4).prompt)
    words = {word.lower() for text in texts for word, _ in split(text)}
    return sorted(words - {"<", ">", "/", "</"})
