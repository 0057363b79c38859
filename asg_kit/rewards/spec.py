"""Generation specs: a prompt plus question / expected-answer pairs that a generated image
must satisfy, their sanitisation and quality (SPEC section 3)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from asg_kit.rewards._math import clip01
from asg_kit.rewards.answers import Form, normalize_answer, polarity


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


def spec_quality(spec: GenerationSpec, yes_no_penalty: float = 0.2, form: Form = "asg-kit", min_qa_pairs: int = 2) -> float:
    """Quality q of a spec, in [0, 1].

    ``q = clip01(0.5 * min(1, n_qa / 2) + 0.3 * n_valid / n_raw + 0.2 * uniqueness
    - 0.2 * [all expected answers are yes/no])`` with counts from ``sanitize_spec``
    (n_qa = pairs kept). A spec with no pairs at all has q = 0.

    ``form="released"``, the released code's counts: a pair is valid when its question
    (with "?" appended if missing) has at most 24 ``[a-z0-9]+`` words and its expected
    answer 1 to 8; repeats are dropped by the released normalisation of the question (its
    first 8 words); n_qa = the first 3 kept; ``q = clip01(0.5 * min(1, n_qa / 2)
    + 0.3 * n_qa / n_raw + 0.2 * [n_qa > 0] - 0.2 * [all yes/no and n_qa >= 2])``
    (uniqueness is measured after the repeats are gone, so it is 1 whenever a pair is
    kept; yes/no by the released polarity).
    """
    if form == "released":
        return _released_spec_quality(spec, yes_no_penalty, min_qa_pairs)
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


def _released_spec_quality(spec: GenerationSpec, yes_no_penalty: float, min_qa_pairs: int) -> float:
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    for pair in spec.qa:
        question, expected = " ".join(pair.question.split()), " ".join(pair.expected.split())
        if question and not question.endswith("?"):
            question += "?"
        q_words, e_words = len(re.findall(r"[a-z0-9]+", question.lower())), len(re.findall(r"[a-z0-9]+", expected.lower()))
        if not (question and expected and q_words <= 24 and 1 <= e_words <= 8):
            continue
        key = normalize_answer(question, form="released")
        if key not in seen:
            seen.add(key)
            kept.append((question, expected))
    kept = kept[:3]
    n = len(kept)
    all_yes_no = n > 0 and all(polarity(e, form="released") for _, e in kept)
    penalty = yes_no_penalty if all_yes_no and n >= min_qa_pairs else 0.0
    return clip01(0.5 * min(1.0, n / max(1, min_qa_pairs)) + 0.3 * n / max(1, len(spec.qa)) + 0.2 * (1.0 if n else 0.0) - penalty)
