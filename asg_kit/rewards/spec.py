"""Generation specs: a prompt plus question / expected-answer pairs that a generated image
must satisfy, their sanitisation and quality (SPEC section 3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from asg_kit.rewards._math import clip01
from asg_kit.rewards.answers import normalize_answer, polarity


@dataclass(frozen=True)
class QAPair:
    question: str
    expected: str


@dataclass(frozen=True)
class GenerationSpec:
    prompt: str
    qa: tuple[QAPair, ...] = field(default_factory=tuple)

    @classmethod
    def from_pairs(cls, prompt: str, pairs: Iterable[tuple[str, str]]) -> "GenerationSpec":
        return cls(prompt, tuple(QAPair(q, a) for q, a in pairs))


@dataclass(frozen=True)
class SanitizedSpec:
    """A spec after sanitisation, with the counts its quality is computed from."""

    spec: GenerationSpec
    n_raw: int
    n_valid: int
    uniqueness: float


def sanitize_spec(
    spec: GenerationSpec, max_pairs: int = 3, max_question_words: int = 24, max_answer_words: int = 8
) -> SanitizedSpec:
    """Keep the valid pairs (non-empty question of at most 24 words, expected answer of 1 to
    8 words), drop repeated questions (compared normalised), keep at most 3.

    ``uniqueness`` = distinct valid questions / valid questions (1.0 when none is valid).
    """
    valid = [
        pair
        for pair in spec.qa
        if 0 < len(pair.question.split()) <= max_question_words and 0 < len(pair.expected.split()) <= max_answer_words
    ]
    kept: list[QAPair] = []
    seen: set[str] = set()
    for pair in valid:
        key = normalize_answer(pair.question, max_words=max_question_words)
        if key not in seen:
            seen.add(key)
            kept.append(pair)
    uniqueness = len(kept) / len(valid) if valid else 1.0
    return SanitizedSpec(GenerationSpec(spec.prompt, tuple(kept[:max_pairs])), len(spec.qa), len(valid), uniqueness)


def spec_quality(spec: GenerationSpec, yes_no_penalty: float = 0.2) -> float:
    """Quality q of a spec, in [0, 1].

    ``q = clip01(0.5 * min(1, n_qa / 2) + 0.3 * n_valid / n_raw + 0.2 * uniqueness
    - 0.2 * [all expected answers are yes/no])`` with counts from ``sanitize_spec``
    (n_qa = pairs kept). A spec with no pairs at all has q = 0.
    """
    clean = sanitize_spec(spec)
    if clean.n_raw == 0:
        return 0.0
    kept = clean.spec.qa
    all_yes_no = bool(kept) and all(polarity(normalize_answer(p.expected)) for p in kept)
    return clip01(
        0.5 * min(1.0, len(kept) / 2)
        + 0.3 * clean.n_valid / clean.n_raw
        + 0.2 * clean.uniqueness
        - yes_no_penalty * all_yes_no
    )
