"""Files of Solver votes: one JSON object per question with its N raw Solver replies and
the raw STE of its greedy decode, as the understanding step produces them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from asg_kit.jsonl import JsonlError, read_jsonl
from asg_kit.rewards import QuestionScore, UnderstandingScorer


@dataclass(frozen=True)
class VoteRecord:
    question: str
    replies: tuple[str, ...]
    ste: float


def example_votes_path() -> Path:
    """The example vote file shipped in the package."""
    return Path(str(resources.files("asg_kit") / "data" / "example_votes.jsonl"))


def load_vote_records(path: str | os.PathLike) -> list[VoteRecord]:
    """Read ``{"question": str, "replies": [str, ...], "ste": float}`` lines, failing with
    the file and line of the first malformed record."""
    records = []
    for number, raw in read_jsonl(path):
        where = f"{path}:{number}"
        replies = raw.get("replies")
        if not isinstance(replies, list) or not replies or not all(isinstance(r, str) for r in replies):
            raise JsonlError(f"{where}: 'replies' must be a non-empty list of strings")
        ste = raw.get("ste")
        if isinstance(ste, bool) or not isinstance(ste, (int, float)) or not math.isfinite(ste):
            raise JsonlError(f"{where}: 'ste' must be a finite number, got {ste!r}")
        records.append(VoteRecord(str(raw.get("question", "")), tuple(replies), float(ste)))
    if not records:
        raise JsonlError(f"{path}: no vote records in the file")
    return records


def score_vote_records(records: list[VoteRecord], scorer: UnderstandingScorer | None = None) -> list[QuestionScore]:
    """Score the records in order, carrying the STE window and easy threshold across them."""
    scorer = scorer or UnderstandingScorer()
    return [scorer.score(record.replies, record.ste) for record in records]
