"""Published numbers to set measured ones beside (SPEC section 6 and its research notes).

Understanding metrics are in the paper's units (percentages; MME raw scores); GenEval
columns are percentages of images judged correct. A reference has the base model's numbers
and, where the paper trained that backbone, the numbers after ASG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GENEVAL_COLUMNS = {
    "single_object": "GenEval single",
    "two_object": "GenEval two obj.",
    "counting": "GenEval counting",
    "colors": "GenEval colours",
    "position": "GenEval position",
    "color_attr": "GenEval colour attr.",
}
GENEVAL_OVERALL = "GenEval overall"
SHAPES_VQA = "shapes-VQA"
SHAPES_GENEVAL = "shapes-GenEval"


@dataclass(frozen=True)
class Reference:
    label: str
    source: str
    base: dict[str, float]
    asg: dict[str, float] = field(default_factory=dict)


def _geneval(single, two, counting, colors, position, color_attr, overall) -> dict[str, float]:
    values = dict(zip(GENEVAL_COLUMNS.values(), (single, two, counting, colors, position, color_attr)))
    return {**values, GENEVAL_OVERALL: overall}


_UNDERSTANDING = ("MMMU", "MMBench", "TextVQA", "SEED", "RWQA", "MM-Vet", "MME-P", "MME-C")
_ASG_PAPER = "ASG paper, base -> ours (SPEC section 6; research/asg_method.md section 10)"

REFERENCES: dict[str, Reference] = {
    "blip3o-8b": Reference(
        "BLIP3o-8B",
        _ASG_PAPER,
        base={**dict(zip(_UNDERSTANDING, (50.6, 83.5, 83.1, 77.5, 69.0, 66.6, 1682.6, 647.1))), **_geneval(100, 85, 63, 92, 90, 74, 84)},
        asg={**dict(zip(_UNDERSTANDING, (52.8, 86.1, 85.2, 79.4, 70.9, 68.7, 1698.4, 660.3))), **_geneval(99, 93, 71, 94, 90, 75, 87)},
    ),
    "bagel": Reference(
        "BAGEL",
        _ASG_PAPER,
        base={**dict(zip(_UNDERSTANDING, (55.3, 85.0, 86.0, 79.3, 71.2, 67.2, 1687.0, 701.0))), **_geneval(99, 94, 81, 88, 64, 63, 82)},
        asg={**dict(zip(_UNDERSTANDING, (58.8, 87.1, 88.5, 81.8, 73.9, 69.5, 1701.7, 715.9))), **_geneval(99, 95, 87, 90, 67, 72, 85)},
    ),
    "vargpt-v1.1": Reference(
        "VARGPT-v1.1",
        _ASG_PAPER,
        base={**dict(zip(_UNDERSTANDING, (48.6, 81.0, 82.0, 76.1, 67.5, 51.9, 1678.3, 592.9))), **_geneval(96, 53, 48, 83, 13, 21, 53)},
        asg={**dict(zip(_UNDERSTANDING, (51.6, 83.7, 84.8, 79.2, 71.1, 54.0, 1695.7, 606.4))), **_geneval(97, 59, 56, 85, 15, 24, 56)},
    ),
    "janus-pro-7b": Reference(
        "Janus-Pro-7B",
        "Janus-Pro technical report, Tables 3-4 (as in the ASG paper's comparison rows)",
        base={"MMMU": 41.0, "MMBench": 79.2, "SEED": 72.1, "MM-Vet": 50.0, "MME-P": 1567.1, **_geneval(99, 89, 59, 90, 79, 66, 80)},
    ),
    "janus-pro-1b": Reference(
        "Janus-Pro-1B",
        "Janus-Pro technical report, Tables 3-4",
        base={"MMMU": 36.3, **_geneval(98, 82, 51, 89, 65, 56, 73)},
    ),
    "micro": Reference(
        "shipped micro model",
        "README, recorded with `asgkit bench --backbone micro` (seed 0, 50 questions per kind, 76 prompts x 4 images, guidance 5)",
        base={SHAPES_VQA: 88.0, SHAPES_GENEVAL: 26.6},
    ),
}


def default_reference(backbone: str, model: str | None) -> str | None:
    """The reference a backbone is compared with unless the user names one."""
    if backbone == "micro":
        return "micro" if model is None else None
    if backbone == "janus":
        return "janus-pro-7b" if model and "7b" in str(model).lower() else "janus-pro-1b"
    if backbone == "blip3o":
        return "blip3o-8b"
    return backbone if backbone in REFERENCES else None
