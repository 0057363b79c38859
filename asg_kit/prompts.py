"""The instructions each role is given, and the text format of generation specs.

Shared by the training loop, the scorers and the micro model's training data, so that a
model is asked exactly what it was taught to answer.
"""

from __future__ import annotations

import re

from asg_kit.rewards.spec import GenerationSpec, QAPair

# Prompt-perturbed sampling: the Solver answers one question under these 7 framings
# (canonical, observation, analyst, direct, examiner, concise, evidence).
SOLVER_FRAMINGS = (
    "Answer the question about the image.",
    "Look at the image carefully and answer the question.",
    "You are an analyst. Study the image and answer the question.",
    "Answer directly.",
    "You are an examiner checking the image. Answer the question.",
    "Be concise and answer the question.",
    "Use only the evidence in the image to answer the question.",
)
SOLVER_RULES = "Reply with the final answer in <answer> </answer> using 1 to 5 words."
PROPOSER_QUESTION = "Ask one short question about this image that can be answered from the image alone."
PROPOSER_SPEC = "Write a prompt to draw this image, then up to three questions with their expected answers."
PROPOSER_DECOMPOSE = "Write up to three questions with their expected answers that check an image drawn from this prompt."
CAPTION = "Describe this image in one concise sentence focusing on key visual facts."
EMBED_PROBE = "Describe this image briefly."

_SPEC_HEAD = "draw :"
# Where on the temperature / top-p ladder each framing samples: 0 is greedy, then spread.
PPS_QUANTILES = (0.0, 1.0, 0.2, 0.8, 0.4, 0.6, 0.1)


def pps_ladder(
    quantiles: tuple[float, ...] = PPS_QUANTILES, temperatures: tuple[float, float] = (0.5, 2.5), top_ps: tuple[float, float] = (0.3, 1.0)
) -> list[tuple[float, float]]:
    """(temperature, top_p) of each prompt-perturbed sample: sample 0 is greedy (the STE
    decode), the others stratified over [0.5, 2.5] with top-p anti-correlated in [0.3, 1.0]."""
    ladder = []
    for i, q in enumerate(quantiles):
        if i == 0:
            ladder.append((0.0, 1.0))
        else:
            ladder.append((temperatures[0] + q * (temperatures[1] - temperatures[0]), top_ps[1] - q * (top_ps[1] - top_ps[0])))
    return ladder


def solver_prompt(question: str, framing: int = 0) -> str:
    """The Solver's prompt for ``question`` under framing ``framing`` (0 is canonical)."""
    return f"{SOLVER_FRAMINGS[framing]} Question: {question} {SOLVER_RULES}"


def format_answer(answer: str) -> str:
    return f"<answer> {answer} </answer>"


def format_spec(spec: GenerationSpec) -> str:
    """``draw : PROMPT | QUESTION ? ANSWER | ...``: the text a Proposer writes as a spec."""
    parts = [f"{_SPEC_HEAD} {spec.prompt}"]
    parts += [f"{pair.question.rstrip(' ?')} ? {pair.expected}" for pair in spec.qa]
    return " | ".join(parts)


def parse_spec(text: str) -> GenerationSpec | None:
    """Read a spec written in ``format_spec``'s format; None when there is no prompt."""
    head, *rest = text.split("|")
    match = re.search(r"draw\s*:\s*(.*)", head, flags=re.IGNORECASE | re.DOTALL)
    prompt = (match.group(1) if match else head).strip()
    if not prompt:
        return None
    pairs = []
    for part in rest:
        question, mark, answer = part.partition("?")
        if mark and question.strip():
            pairs.append(QAPair(question.strip() + " ?", answer.strip()))
    return GenerationSpec(prompt, tuple(pairs))


def parse_question(text: str) -> str:
    """The first line of a Proposer's reply, ending at its first question mark."""
    line = next((line.strip() for line in text.strip().splitlines() if line.strip()), "")
    head, mark, _ = line.partition("?")
    return (head.strip() + " ?") if mark else line
