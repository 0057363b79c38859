"""The shapes world: flat shapes on a plain canvas with exact ground truth.

Scenes of 1 to 4 objects (shape, colour, size, position), an anti-aliased renderer,
captions, questions with answers, and generation prompts in GenEval's six categories with
metadata in GenEval's format. Everything is seeded: the same ``random.Random`` state gives
the same scenes, texts and pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterable

from PIL import Image, ImageDraw

from asg_kit.geneval import CATEGORIES
from asg_kit.geneval import relations as box_relations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 225),
    "yellow": (235, 205, 30),
    "purple": (145, 60, 195),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = {"small": 0.19, "large": 0.31}  # the object's extent as a share of the canvas side
BACKGROUND = (245, 245, 240)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
# Objects keep this gap (share of the canvas) between their boxes so they never touch.
GAP = 0.06
# GenEval's position rule: shrink each axis of the centre offset by this share of the sizes.
POSITION_THRESHOLD = 0.1


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cx: float  # centre, as a share of the canvas side (y grows downward)
    cy: float

    @property
    def extent(self) -> float:
        return SIZES[self.size]

    @property
    def box(self) -> tuple[float, float, float, float]:
        half = self.extent / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum(1 for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color))


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # color, shape, count, exist, position, yesno


def relations(a: Obj, b: Obj, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of object ``a`` to object ``b`` by GenEval's rule (``geneval.relations``)."""
    return box_relations(a.box, b.box, threshold)


def dominant_relation(a: Obj, b: Obj) -> str | None:
    """The one relation of ``a`` to ``b`` when exactly one holds, else None."""
    found = relations(a, b)
    return next(iter(found)) if len(found) == 1 else None


def _boxes_apart(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0


def place(rng: random.Random, specs: Iterable[tuple[str, str, str]], tries: int = 200) -> tuple[Obj, ...] | None:
    """Place objects (shape, colour, size) at random, apart from each other; None if the
    canvas could not hold them within ``tries`` attempts per object."""
    placed: list[Obj] = []
    for shape, color, size in specs:
        half = SIZES[size] / 2
        for _ in range(tries):
            obj = Obj(shape, color, size, rng.uniform(half + 0.03, 1 - half - 0.03), rng.uniform(half + 0.03, 1 - half - 0.03))
            if all(_boxes_apart(obj, other) for other in placed):
                placed.append(obj)
                break
        else:
            return None
    return tuple(placed)


def sample_scene(rng: random.Random, n_objects: int | None = None, max_objects: int = 4) -> Scene:
    """A random scene of 1..max_objects objects (or exactly ``n_objects``)."""
    while True:
        n = n_objects or rng.randint(1, max_objects)
        specs = [(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))) for _ in range(n)]
        objects = place(rng, specs)
        if objects is not None:
            return Scene(objects)


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw the scene at ``supersample`` times the size, then area-average down: exact
    anti-aliasing with flat colours inside each shape."""
    big = size * supersample
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        x0, y0, x1, y1 = (v * big for v in obj.box)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        elif obj.shape == "cross":
            third = (x1 - x0) / 3
            draw.rectangle((x0 + third, y0, x1 - third, y1), fill=fill)
            draw.rectangle((x0, y0 + third, x1, y1 - third), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return canvas.resize((size, size), Image.BOX)


# Text ------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: Obj, with_size: bool = False) -> str:
    words = ([obj.size] if with_size else []) + [obj.color, obj.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several caption templates, true of the scene."""
    objects = list(scene.objects)
    with_size = rng.random() < 0.3
    if len(objects) == 2 and rng.random() < 0.5:
        relation = dominant_relation(objects[0], objects[1])
        if relation:
            return f"{_phrase(objects[0], with_size)} {relation} {_phrase(objects[1], with_size)}"
    groups: dict[str, int] = {}
    for obj in objects:
        groups[obj.name] = groups.get(obj.name, 0) + 1
    parts = []
    for name, count in groups.items():
        color, shape = name.split()
        parts.append(f"{_article(color)} {name}" if count == 1 else f"{NUMBER_WORDS[count]} {color} {PLURALS[shape]}")
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = rng.choice(("{listing}", "an image of {listing}", "there is {listing}" if len(objects) == 1 else "there are {listing}"))
    return template.format(listing=listing)


def _unique(scene: Scene, predicate) -> Obj | None:
    found = [o for o in scene.objects if predicate(o)]
    return found[0] if len(found) == 1 else None


def _reference(scene: Scene, obj: Obj) -> str | None:
    """The shortest unambiguous name of ``obj``: "the circle", "the red circle", or None."""
    if scene.count(shape=obj.shape) == 1:
        return f"the {obj.shape}"
    if scene.count(shape=obj.shape, color=obj.color) == 1:
        return f"the {obj.color} {obj.shape}"
    return None


def scene_questions(scene: Scene) -> list[QA]:
    """Every question this world asks about a scene, each with its one true answer."""
    out: list[QA] = []
    for obj in scene.objects:
        ref = _reference(scene, obj)
        if ref:
            out.append(QA(f"what color is {ref} ?", obj.color, "color"))
        if scene.count(color=obj.color) == 1:
            out.append(QA(f"what shape is the {obj.color} object ?", obj.shape, "shape"))
    for shape in SHAPES:
        out.append(QA(f"how many {PLURALS[shape]} are there ?", str(scene.count(shape=shape)), "count"))
    for color in COLORS:
        if scene.count(color=color):
            out.append(QA(f"how many {color} objects are there ?", str(scene.count(color=color)), "count"))
    out.append(QA("how many objects are there ?", str(len(scene.objects)), "count"))
    for color in COLORS:
        for shape in SHAPES:
            present = scene.count(shape=shape, color=color) > 0
            out.append(QA(f"is there {_article(color)} {color} {shape} ?", "yes" if present else "no", "exist"))
    for a in scene.objects:
        for b in scene.objects:
            ref_a, ref_b = _reference(scene, a), _reference(scene, b)
            if a is b or not ref_a or not ref_b:
                continue
            relation = dominant_relation(a, b)
            if relation:
                out.append(QA(f"where is {ref_a} relative to {ref_b} ?", relation.split()[0], "position"))
            held = relations(a, b)
            for asked in RELATIONS:
                # Ask yes/no only where the answer is clear-cut both ways.
                if asked in held or (held and asked not in held):
                    out.append(_relation_question(ref_a, asked, ref_b, asked in held))
    return out


def _relation_question(ref_a: str, asked: str, ref_b: str, holds: bool) -> QA:
    return QA(f"is {ref_a} {asked} {ref_b} ?", "yes" if holds else "no", "yesno")


def converse_position_questions(scene: Scene, rng: random.Random) -> tuple[QA, QA] | None:
    """"where is A relative to B ?" and "where is B relative to A ?" about one pair of the
    scene's objects with one clear relation (None when no named pair has one). Asked of one
    image together, the answers are opposite and the questions differ in the order of the
    names alone, so an answer that follows the axis the objects lie on but not the names is
    wrong on one of the two."""
    pairs = [
        (ref_a, ref_b, forward, backward)
        for a in scene.objects
        for b in scene.objects
        if a is not b and (ref_a := _reference(scene, a)) and (ref_b := _reference(scene, b)) and (forward := dominant_relation(a, b)) and (backward := dominant_relation(b, a))
    ]
    if not pairs:
        return None
    ref_a, ref_b, forward, backward = rng.choice(pairs)
    return QA(f"where is {ref_a} relative to {ref_b} ?", forward.split()[0], "position"), QA(f"where is {ref_b} relative to {ref_a} ?", backward.split()[0], "position")


def contrasting_relation_questions(scene: Scene, rng: random.Random, opposite_share: float = 0.5) -> tuple[QA, QA] | None:
    """"is A left of B ?" (yes: the relation holds) and the same question with a relation
    that does not hold (no), about one pair of the scene's objects; None when no named pair
    holds a relation. Asked of one image together, they can be answered only by looking:
    the answer's prior is even and the words differ in the relation alone. The relation
    that does not hold is the opposite one with probability ``opposite_share`` (a swapped
    pair is what a judge must catch), else any of those that do not hold."""
    pairs = [
        (ref_a, ref_b, held)
        for a in scene.objects
        for b in scene.objects
        if a is not b and (ref_a := _reference(scene, a)) and (ref_b := _reference(scene, b)) and (held := relations(a, b))
    ]
    if not pairs:
        return None
    ref_a, ref_b, held = rng.choice(pairs)
    seen = rng.choice(sorted(held))
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[seen]
    unseen = opposite if rng.random() < opposite_share else rng.choice([relation for relation in RELATIONS if relation not in held])
    return _relation_question(ref_a, seen, ref_b, True), _relation_question(ref_a, unseen, ref_b, False)


def side_questions(scene: Scene, margin: float = 0.12) -> list[QA]:
    """"where is the circle ?": the side of the canvas a named object lies on (left, right,
    above or below its centre), asked only where the object is at least ``margin`` from the
    centre and one axis leads the other by half that. Not one of ``scene_questions`` (no
    benchmark asks it): a training drill that reads one named object's place, the half of
    "where is A relative to B ?" that binds a name to a location."""
    out = []
    for obj in scene.objects:
        ref = _reference(scene, obj)
        dx, dy = obj.cx - 0.5, obj.cy - 0.5
        if not ref or max(abs(dx), abs(dy)) < margin or abs(abs(dx) - abs(dy)) < margin / 2:
            continue
        side = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("above" if dy < 0 else "below")
        out.append(QA(f"where is {ref} ?", side, "side"))
    return out


def presence_questions(scene: Scene) -> list[QA]:
    """"is there a circle ?" for each shape: the form a prompt's spec asks of an uncoloured
    object (``specs.spec_from_geneval``), which ``scene_questions`` leaves out."""
    return [QA(f"is there a {shape} ?", "yes" if scene.count(shape=shape) else "no", "exist") for shape in SHAPES]


def sample_question(scene: Scene, rng: random.Random, kind_weights: dict[str, float] | None = None, extra: Iterable[QA] = ()) -> QA:
    """A question drawn over kinds (evenly, or by ``kind_weights``, 1 for a kind not named),
    then over the questions of that kind; ``extra`` questions join the scene's."""
    by_kind: dict[str, list[QA]] = {}
    for qa in [*scene_questions(scene), *extra]:
        by_kind.setdefault(qa.kind, []).append(qa)
    kinds = sorted(by_kind)
    kind = rng.choice(kinds) if kind_weights is None else rng.choices(kinds, weights=[kind_weights.get(k, 1.0) for k in kinds])[0]
    options = by_kind[kind]
    if kind == "exist":  # as many yes as no
        yes = [q for q in options if q.answer == "yes"]
        no = [q for q in options if q.answer == "no"]
        options = yes if yes and rng.random() < 0.5 else no
    return rng.choice(options)


# Generation prompts (GenEval's six categories) --------------------------------------------

def _two_shapes(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(SHAPES, 2)
    return first, second


def sample_prompt(rng: random.Random, category: str | None = None) -> dict:
    """A generation prompt with GenEval-format metadata: tag, include, exclude, prompt."""
    tag = category or rng.choice(CATEGORIES)
    if tag == "single_object":
        shape = rng.choice(SHAPES)
        return {"tag": tag, "include": [{"class": shape, "count": 1}], "prompt": f"a photo of a {shape}"}
    if tag == "two_object":
        a, b = _two_shapes(rng)
        return {"tag": tag, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}], "prompt": f"a photo of a {a} and a {b}"}
    if tag == "counting":
        shape, n = rng.choice(SHAPES), rng.randint(2, 4)
        return {
            "tag": tag,
            "include": [{"class": shape, "count": n}],
            "exclude": [{"class": shape, "count": n + 1}],
            "prompt": f"a photo of {NUMBER_WORDS[n]} {PLURALS[shape]}",
        }
    if tag == "colors":
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        return {"tag": tag, "include": [{"class": shape, "count": 1, "color": color}], "prompt": f"a photo of {_article(color)} {color} {shape}"}
    if tag == "position":
        a, b = _two_shapes(rng)
        relation = rng.choice(RELATIONS)
        return {
            "tag": tag,
            "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of a {a} {relation} a {b}",
        }
    if tag == "color_attr":
        a, b = _two_shapes(rng)
        ca, cb = rng.sample(list(COLORS), 2)
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
            "prompt": f"a photo of {_article(ca)} {ca} {a} and {_article(cb)} {cb} {b}",
        }
    raise ValueError(f"unknown GenEval category {tag!r}; categories: {', '.join(CATEGORIES)}")


def scene_for_prompt(metadata: dict, rng: random.Random, margin: float = 2 * POSITION_THRESHOLD) -> Scene:
    """A scene that satisfies a prompt's metadata (what it leaves open is random).

    Positions hold with twice GenEval's threshold, so a judge's box a pixel off still agrees.
    """
    include = metadata["include"]
    while True:
        specs = []
        for clause in include:
            for _ in range(clause["count"]):
                specs.append((clause["class"], clause.get("color") or rng.choice(list(COLORS)), rng.choice(list(SIZES))))
        objects = place(rng, specs)
        if objects is None:
            continue
        scene = Scene(objects)
        ok = True
        for i, clause in enumerate(include):
            if "position" in clause:
                relation, target = clause["position"]
                subject = [o for o in objects if o.shape == clause["class"]]
                anchor = [o for o in objects if o.shape == include[target]["class"]]
                ok &= all(relation in relations(s, t, margin) for s in subject for t in anchor)
        if ok:
            return scene


ONE_ERRORS: dict[str, tuple[str, ...]] = {  # each error and the prompt categories it can break
    "wrong colour": ("colors", "color_attr"),
    "wrong count": ("counting",),
    "swapped position": ("position",),
    "missing object": ("two_object", "color_attr", "position"),
}


def with_one_error(scene: Scene, metadata: dict, error: str, rng: random.Random) -> Scene | None:
    """``scene`` (made for ``metadata``) with one error that contradicts the prompt: a wrong
    colour, one object too many or too few, the two objects' positions swapped, or an object
    missing. None when the error cannot be made (no room for an extra object)."""
    objects = list(scene.objects)
    if error == "wrong colour":
        clause = rng.choice([c for c in metadata["include"] if c.get("color")])
        index = next(i for i, o in enumerate(objects) if o.shape == clause["class"])
        colour = rng.choice([c for c in COLORS if c != clause["color"]])
        objects[index] = replace(objects[index], color=colour)
        return Scene(tuple(objects))
    if error == "wrong count":
        clause = metadata["include"][0]
        if rng.random() < 0.5 or clause["count"] >= 4:
            objects.pop(rng.randrange(len(objects)))
            return Scene(tuple(objects))
        extra = place(rng, [(o.shape, o.color, o.size) for o in objects] + [(clause["class"], rng.choice(list(COLORS)), "small")])
        return Scene(extra) if extra else None
    if error == "swapped position":
        a, b = objects
        return Scene((replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)))
    if error == "missing object":
        objects.pop(rng.randrange(len(objects)))
        return Scene(tuple(objects))
    raise ValueError(f"unknown error {error!r}; errors: {', '.join(ONE_ERRORS)}")


def prompt_scene(rng: random.Random, error_share: float = 0.5, category_weights: dict[str, float] | None = None) -> tuple[dict, Scene]:
    """A random GenEval-style prompt (its category drawn evenly, or by ``category_weights``,
    1 for a category not named) and a scene for it, with probability ``error_share`` one
    error against it: the images a Solver judges during generation steps."""
    category = rng.choices(CATEGORIES, weights=[category_weights.get(c, 1.0) for c in CATEGORIES])[0] if category_weights else None
    metadata = sample_prompt(rng, category)
    scene = scene_for_prompt(metadata, rng)
    errors = [e for e, categories in ONE_ERRORS.items() if metadata["tag"] in categories]
    if errors and rng.random() < error_share:
        scene = with_one_error(scene, metadata, rng.choice(errors), rng) or scene
    return metadata, scene


def spec_for_scene(scene: Scene, rng: random.Random, max_pairs: int = 3):
    """A generation spec a perfect Proposer would write for this scene: a caption as the
    prompt and up to three of the scene's questions with their answers."""
    from asg_kit.rewards.spec import GenerationSpec, QAPair

    questions = scene_questions(scene)
    rng.shuffle(questions)
    kinds_seen: set[str] = set()
    pairs = []
    for qa in questions:
        if qa.kind in kinds_seen or (qa.kind == "exist" and qa.answer == "no"):
            continue
        kinds_seen.add(qa.kind)
        pairs.append(QAPair(qa.question, qa.answer))
        if len(pairs) == max_pairs:
            break
    return GenerationSpec(caption(scene, rng), tuple(pairs))
