"""Answer text: extraction from a Solver reply, normalisation, and soft matching
(SPEC sections 2 and 3)."""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

# "asg-kit": this toolkit's rules; "released": the released ASG code's (docs/fidelity.md).
Form = Literal["asg-kit", "released"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[^\W_]+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_RELEASED_EDGES = " .,:;!?\"'"
_RELEASED_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")
_RELEASED_WORD = re.compile(r"[a-z0-9]+")

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
} | {"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100"}
# "right" is left out of YES on purpose: it is a position answer in its own right.
YES_WORDS = frozenset({"yes", "yeah", "yep", "yup", "true", "correct", "affirmative", "y"})
NO_WORDS = frozenset({"no", "nope", "nah", "false", "incorrect", "negative", "n"})


def split_answer(text: str) -> tuple[str, int]:
    """Split a Solver reply into (answer text, number of words before the answer).

    The answer is the content of the first ``<answer>...</answer>`` (an unclosed tag runs
    to the end); without a tag it is the last non-empty line, as in EvoLMM. The word count
    ``w`` feeds the length factor of the Solver reward.
    """
    match = _ANSWER_TAG.search(text)
    if match:
        return match.group(1).strip(), len(text[: match.start()].split())
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "", 0
    return lines[-1], len(" ".join(lines[:-1]).split())


def normalize_answer(text: str, max_words: int = 8, form: Form = "asg-kit") -> str:
    """Canonical form of a short answer, used for votes and matching.

    Lowercase (NFKC), strip punctuation (decimal points and thousands separators of numbers
    survive as numbers), number words become digits ("three" -> "3"), drop the articles
    a/an/the unless nothing else is left, fold a leading yes/no variant ("Yep, it is") to
    "yes"/"no", collapse spaces, keep at most ``max_words`` words.

    ``form="released"``: the released code's rule instead: lowercase, commas become spaces,
    collapse spaces, strip `` .,:;!?"'`` from both ends, keep at most ``max_words`` words
    (so "Three." -> "three", "the red one" stays, "Yes, it is" -> "yes it is").
    """
    if form == "released":
        text = " ".join(text.strip().lower().replace(",", " ").split()).strip(_RELEASED_EDGES)
        return " ".join(text.split()[:max_words]) if max_words > 0 else text
    _check_form(form)
    text = unicodedata.normalize("NFKC", text).lower()
    words = _TOKEN.findall(_THOUSANDS.sub("", text))
    words = [NUMBER_WORDS.get(w, w) for w in words]
    content = [w for w in words if w not in ARTICLES]
    if content:
        words = content
    if words and words[0] in YES_WORDS:
        words = ["yes"]
    elif words and words[0] in NO_WORDS:
        words = ["no"]
    return " ".join(words[:max_words])


def polarity(normalized: str, form: Form = "asg-kit") -> str | None:
    """"yes" or "no" for a normalised yes/no answer, else None.

    ``form="released"``: the released code's rule on any text: after the released
    ``normalize_answer``, "yes" if it starts with "yes" or is "true", "1" or "present";
    "no" if it starts with "no" (so also "none", "not sure", "north") or is "false", "0"
    or "absent".
    """
    if form == "released":
        text = normalize_answer(normalized, form="released")
        if text.startswith("yes") or text in ("true", "1", "present"):
            return "yes"
        if text.startswith("no") or text in ("false", "0", "absent"):
            return "no"
        return None
    _check_form(form)
    return normalized if normalized in ("yes", "no") else None


def _check_form(form: str) -> None:
    if form not in ("asg-kit", "released"):
        raise ValueError(f"form must be 'asg-kit' or 'released', got {form!r}")


def as_number(normalized: str) -> float | None:
    return float(normalized) if _NUMBER.match(normalized) else None


def soft_match(
    answer: str,
    expected: str,
    containment: float = 0.8,
    numeric_bands: tuple[tuple[float, float], ...] = ((0.01, 1.0), (0.05, 0.7), (0.20, 0.4)),
    form: Form = "asg-kit",
) -> float:
    """Graded agreement of an answer with an expected answer, in [0, 1].

    After ``normalize_answer`` on both: 1.0 if equal; if both are numbers, by relative
    error ``|a - e| / |e|``: 1.0 / 0.7 / 0.4 within 1% / 5% / 20%, else 0; 0.8 if one's
    words appear as a contiguous run in the other's; otherwise the Jaccard index of the two
    word sets. An empty side scores 0.

    ``form="released"``, the released code's order and rules: released normalisation; an
    empty expected answer scores 0.5; equal 1.0; then 0.8 if either string is a
    *character* substring of the other ("10" in "100", "red" in "reddish"), checked before
    numbers; then, if both contain a number, the first number of each by relative error
    ``|a - e| / max(|e|, 1)`` in the same bands, else 0; otherwise the Jaccard index of the
    ``[a-z0-9]+`` token sets (0 when either is empty).
    """
    if form == "released":
        return _released_soft_match(answer, expected, containment, numeric_bands)
    _check_form(form)
    a, e = normalize_answer(answer), normalize_answer(expected)
    if not a or not e:
        return 0.0
    if a == e:
        return 1.0
    na, ne = as_number(a), as_number(e)
    if na is not None and ne is not None:
        error = abs(na - ne) / abs(ne) if ne != 0 else float("inf")
        return next((score for limit, score in numeric_bands if error <= limit), 0.0)
    aw, ew = a.split(), e.split()
    if _contains(aw, ew) or _contains(ew, aw):
        return containment
    sa, se = set(aw), set(ew)
    return len(sa & se) / len(sa | se)


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def _released_soft_match(answer: str, expected: str, containment: float, numeric_bands: tuple[tuple[float, float], ...]) -> float:
    a, e = normalize_answer(answer, form="released"), normalize_answer(expected, form="released")
    if not e:
        return 0.5
    if a == e:
        return 1.0
    if a and (a in e or e in a):
        return containment
    na, ne = _RELEASED_NUMBER.search(a), _RELEASED_NUMBER.search(e)
    if na and ne:
        error = abs(float(na.group()) - float(ne.group())) / max(abs(float(ne.group())), 1.0)
        return next((score for limit, score in numeric_bands if error <= limit), 0.0)
    sa, se = set(_RELEASED_WORD.findall(a)), set(_RELEASED_WORD.findall(e))
    return len(sa & se) / len(sa | se) if sa and se else 0.0
