"""Score a folder of generated images with a backbone's own judgement, resumably.

One JSON line per image is appended (and flushed to disk) as soon as the image is scored,
so a killed run loses nothing; re-running skips every image already in the output, and a
line torn by the kill is cut off first. Bad images get a line with their reason and the run
goes on. The summary (per prompt, per GenEval category when known, overall) is computed
from the output file and written atomically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from asg_kit import specs as spec_sources
from asg_kit.adapters.base import UnifiedBackbone
from asg_kit.folders import Discovery, ImageEntry, discover
from asg_kit.images import BadImage, load_image
from asg_kit.jsonl import JsonlError, append_jsonl, read_jsonl, write_json_atomic
from asg_kit.rewards.scorers import DifficultyScorer, GenerationScorer
from asg_kit.rewards.spec import GenerationSpec


@dataclass
class ScoreOptions:
    samples: int = 2  # Solver samples per spec question
    seed: int = 0
    questions: Path | None = None  # JSONL: {"prompt": ..., "questions": [{"question", "expected"}]}
    proposer_specs: bool = True  # let the Proposer decompose prompts that have no questions
    difficulty: bool = False  # rank unlabeled images instead of judging generations


def read_done(out: Path) -> dict[str, dict]:
    """Rows already written, by image key; a torn last line (a killed writer) is cut off."""
    if not out.exists():
        return {}
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as handle:
            handle.truncate(end)
    rows: dict[str, dict] = {}
    try:
        for _, row in read_jsonl(out):
            if isinstance(row.get("image"), str):
                rows[row["image"]] = row
    except JsonlError as error:
        raise JsonlError(f"{error}; remove or fix the output file to start over") from None
    return rows


def load_user_questions(path: Path) -> dict[str, GenerationSpec]:
    specs: dict[str, GenerationSpec] = {}
    for number, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("questions"), list):
            raise JsonlError(f"{path}:{number}: each line needs 'prompt' (string) and 'questions' (list)")
        try:
            specs[row["prompt"]] = spec_sources.spec_from_questions(row["prompt"], row["questions"])
        except ValueError as error:
            raise JsonlError(f"{path}:{number}: {error}") from None
    return specs


def _spec_for(entry: ImageEntry, user: dict[str, GenerationSpec], proposer: dict[str, GenerationSpec]) -> tuple[GenerationSpec, str]:
    if entry.prompt in user:
        return user[entry.prompt], "user"
    if entry.questions:
        return spec_sources.spec_from_questions(entry.prompt, entry.questions), "mapping file"
    if entry.metadata and entry.metadata.get("include"):
        return spec_sources.spec_from_geneval(entry.metadata), "geneval metadata"
    if entry.prompt in proposer:
        return proposer[entry.prompt], "proposer"
    return GenerationSpec(entry.prompt or ""), "none"


def run_score(
    backbone: UnifiedBackbone,
    folder: str | Path,
    out: str | Path,
    options: ScoreOptions = ScoreOptions(),
    progress: Callable[[int, int], None] = lambda done, total: None,
    discovery: Discovery | None = None,
) -> dict:
    """Score every image of ``folder`` not yet in ``out``; return the summary (also written
    next to ``out`` as ``<out stem>.summary.json``). ``progress(advance, total)`` is called
    once with the images already done, then after each image."""
    folder, out = Path(folder), Path(out)
    discovery = discovery or discover(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    todo = [e for e in discovery.entries if e.key not in done]
    progress(len(discovery.entries) - len(todo), len(discovery.entries))
    user = load_user_questions(options.questions) if options.questions else {}

    def write(row: dict) -> None:
        append_jsonl(out, row)
        done[row["image"]] = row
        progress(1, len(discovery.entries))

    if options.difficulty:
        scorer = DifficultyScorer(backbone, seed=options.seed)
        for index, entry in enumerate(todo):
            try:
                loaded = load_image(entry.path)
            except BadImage as error:
                write({"image": entry.key, "status": "error", "error": str(error)})
                continue
            result = scorer.score(loaded.image, index)
            write({"image": entry.key, "status": "scored", "notes": loaded.notes, **asdict(result)})
        return _summarize(discovery, done, out, options)

    groups: dict[str, list[ImageEntry]] = {}
    for entry in discovery.entries:
        groups.setdefault(entry.group, []).append(entry)
    needs_proposer = sorted({e.prompt for e in todo if e.prompt and e.prompt not in user and not e.questions and not (e.metadata and e.metadata.get("include"))})
    proposer = dict(zip(needs_proposer, spec_sources.specs_from_proposer(backbone, needs_proposer))) if needs_proposer and options.proposer_specs else {}
    scorer = GenerationScorer(backbone, samples=options.samples, seed=options.seed)
    for entries in groups.values():
        pending = [e for e in entries if e.key not in done]
        if not pending:
            continue
        loaded, images = {}, {}
        for entry in entries:  # every candidate counts for diversity, scored or not
            if entry.problem:
                continue
            try:
                loaded[entry.key] = load_image(entry.path)
                images[entry.key] = loaded[entry.key].image
            except BadImage as error:
                if entry.key not in done:
                    write({"image": entry.key, "status": "error", "error": str(error)})
        for entry in pending:
            if entry.problem and entry.key not in done:
                write({"image": entry.key, "status": "error", "error": entry.problem})
        scorable = [e for e in pending if e.key in images and e.key not in done]
        if not scorable:
            continue
        spec, source = _spec_for(scorable[0], user, proposer)
        scores = scorer.score(spec, [images[e.key] for e in scorable], diversity_over=list(images.values()))
        for entry, score in zip(scorable, scores):
            row = {"image": entry.key, "status": "scored", "group": entry.group, "spec_source": source, "notes": loaded[entry.key].notes}
            if entry.metadata and entry.metadata.get("tag"):
                row["tag"] = entry.metadata["tag"]
            write({**row, **score.to_dict()})
    return _summarize(discovery, done, out, options)


def _summarize(discovery: Discovery, rows: dict[str, dict], out: Path, options: ScoreOptions) -> dict:
    scored = [r for r in rows.values() if r.get("status") == "scored"]
    errors = {k: r.get("error", "") for k, r in rows.items() if r.get("status") == "error"}
    summary: dict = {
        "layout": discovery.layout,
        "images": len(discovery.entries),
        "scored": len(scored),
        "errors": len(errors),
        "error_reasons": errors,
        "output": str(out),
    }
    if options.difficulty:
        buckets: dict[str, int] = {}
        for row in scored:
            buckets[row["bucket"]] = buckets.get(row["bucket"], 0) + 1
        summary.update(buckets=buckets, mean_d_ste=_mean(r["d_ste"] for r in scored), mean_entropy=_mean(r["entropy"] for r in scored))
    else:
        per_prompt: dict[str, list[float]] = {}
        per_tag: dict[str, list[float]] = {}
        for row in scored:
            per_prompt.setdefault(row["prompt"], []).append(row["reward"])
            if row.get("tag"):
                per_tag.setdefault(row["tag"], []).append(row["reward"])
        summary.update(
            overall=_mean(r["reward"] for r in scored),
            per_prompt={p: {"mean_reward": _mean(v), "images": len(v)} for p, v in per_prompt.items()},
            per_category={t: _mean(v) for t, v in per_tag.items()},
        )
    write_json_atomic(summary_path(out), summary)
    return summary


def summary_path(out: Path) -> Path:
    return out.with_name(out.name + ".summary.json") if out.suffix != ".jsonl" else out.with_suffix(".summary.json")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def default_output(folder: Path, difficulty: bool) -> Path:
    return folder / ("asg_difficulty.jsonl" if difficulty else "asg_scores.jsonl")

