"""Where generation specs come from when scoring: GenEval metadata, the Proposer reading a
free-text prompt, or a user's file of questions."""

from __future__ import annotations

from typing import Sequence

from asg_kit import prompts
from asg_kit.rewards.spec import GenerationSpec, QAPair

NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}
_IRREGULAR = {"person": "people", "mouse": "mice", "sheep": "sheep", "skis": "skis", "scissors": "scissors"}


def plural(noun: str) -> str:
    """English plural of a class name ("cross" -> "crosses", "person" -> "people")."""
    *head, last = noun.split()
    if last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return " ".join([*head, word])


def spec_from_geneval(metadata: dict) -> GenerationSpec:
    """Deterministic questions from a GenEval prompt's ``include`` clauses: presence or
    count of each class, its colour, and its position relative to its target, each with the
    answer the prompt implies. At most 3 pairs, positions and colours first (they are what
    composition prompts test)."""
    include = metadata["include"]
    relational, colour, counting = [], [], []
    for clause in include:
        cls, count = clause["class"], clause["count"]
        if "position" in clause:
            relation, target = clause["position"]
            relational.append(QAPair(f"is the {cls} {relation} the {include[target]['class']} ?", "yes"))
        if clause.get("color"):
            colour.append(QAPair(f"what color is the {cls} ?", clause["color"]))
        if count == 1:
            counting.append(QAPair(f"is there a {cls} ?", "yes"))
        else:
            counting.append(QAPair(f"how many {plural(cls)} are there ?", str(count)))
    return GenerationSpec(metadata["prompt"], tuple((relational + colour + counting)[:3]))


def spec_from_questions(prompt: str, questions: Sequence[dict]) -> GenerationSpec:
    """A spec from a user's ``[{"question": ..., "expected": ...}, ...]``."""
    pairs = []
    for item in questions:
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not isinstance(item.get("expected"), str):
            raise ValueError(f"each question needs string 'question' and 'expected', got {item!r}")
        pairs.append(QAPair(item["question"], item["expected"]))
    return GenerationSpec(prompt, tuple(pairs))


def decompose_prompt(prompt: str) -> str:
    """The Proposer's instruction to turn a free-text prompt into a spec (no image)."""
    return f"{prompts.PROPOSER_DECOMPOSE} Prompt : {prompt}"


def specs_from_proposer(backbone, texts: Sequence[str], max_new_tokens: int = 64, seed: int = 0) -> list[GenerationSpec]:
    """The Proposer (greedy) decomposes each prompt; a reply it cannot parse keeps the prompt
    with no questions (quality 0)."""
    from asg_kit.adapters.base import AnswerRequest

    requests = [AnswerRequest(None, decompose_prompt(text), temperature=0.0) for text in texts]
    with backbone.role("proposer"):
        replies = backbone.sample_answers(requests, max_new_tokens=max_new_tokens, seed=seed)
    specs = []
    for text, reply in zip(texts, replies):
        parsed = prompts.parse_spec(reply.text)
        specs.append(GenerationSpec(text, parsed.qa if parsed else ()))
    return specs
