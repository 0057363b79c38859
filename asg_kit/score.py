"""Score a folder of generated images with a backbone's own judgement, resumably.

One JSON line per image is appended (and flushed to disk) as soon as that image is scored,
so a killed run loses at most the image in progress. The output belongs to one job: a
sidecar ``<out stem>.job.json`` records the input folder, the judge and every setting that
changes results, and a re-run only resumes an output whose record matches; anything else at
``--out`` is refused before any work (``fresh=True`` replaces an output). One run at a time
writes an output (an advisory lock on a hidden ``.<out name>.lock`` beside it).

Results depend on content and settings only: each image's Solver seeds come from its bytes'
hash and the seed, each image is judged alone (never batched with its siblings), questions
are decomposed per prompt, and the diversity share is computed over the image's whole
current group (every readable candidate of the prompt, identical files counted alike) on
every run, so rows whose group changed are brought up to date. Difficulty mode replays the
rolling windows (d_STE percentile, easy threshold) from the rows already written, in the
folder's order, so a resumed run gives what an uninterrupted one gives.

Rows that are errors, and rows whose image or prompt changed since, are redone on re-run;
the superseded rows are dropped when the run ends (one atomic rewrite). Bad images, prompts
over the length cap and images over the pixel limit get a row with their reason and the run
goes on. The summary (per prompt, per GenEval category when known, overall) covers the
folder's current images and is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import asg_kit
from asg_kit.checks import UserError, check_backbone_name, check_device, check_dtype, check_model
from asg_kit import specs as spec_sources
from asg_kit.adapters.base import UnifiedBackbone
from asg_kit.folders import MAPPING_FILES, Discovery, ImageEntry, discover
from asg_kit.images import IMAGE_EXTENSIONS, MAX_PIXELS, BadImage, load_image
from asg_kit.jsonl import JsonlError, append_jsonl, read_jsonl, write_json_atomic, write_jsonl_atomic
from asg_kit.rewards.generation import diversity_contributions, generation_reward
from asg_kit.rewards.scorers import DifficultyScorer, GenerationScorer
from asg_kit.rewards.spec import GenerationSpec

MAX_SEED = 2**32 - 1


class ScoreSetupError(UserError):
    """A problem with the options, the output or the judge, seen before any work."""


@dataclass
class ScoreOptions:
    samples: int = 2  # Solver samples per spec question
    seed: int = 0
    questions: Path | None = None  # JSONL: {"prompt": ..., "questions": [{"question", "expected"}]}
    proposer_specs: bool = True  # let the Proposer decompose prompts that have no questions
    difficulty: bool = False  # rank unlabeled images instead of judging generations
    max_prompt_chars: int = 2000  # longer prompts and questions get a reason row, never a model call
    max_pixels: int = MAX_PIXELS  # larger images get a reason row (default: Pillow's own limit)
    fresh: bool = False  # replace an existing output (of any asgkit score job) instead of resuming it
    reward_form: str | None = None  # "released": the released ASG code's rules where asg-kit's differ (docs/fidelity.md)


@dataclass
class Judge:
    """What identifies the judging model in an output's job record."""

    backbone: str
    model: str | None = None  # None: the backbone's own default
    dtype: str | None = None
    device: str | None = None  # recorded, not compared: a run may resume on another device


def read_done(out: Path) -> dict[str, dict]:
    """Rows already written, by image key (the last row of a key wins); a torn last line
    (a killed writer) is cut off. Call it only on an output this job owns."""
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
                rows.pop(row["image"], None)
                rows[row["image"]] = row
    except (JsonlError, UnicodeDecodeError) as error:
        raise JsonlError(f"{error}; fix the output file, or pass --fresh to start over") from None
    return rows


def load_user_questions(path: Path) -> dict[str, GenerationSpec]:
    specs: dict[str, GenerationSpec] = {}
    try:
        for number, row in read_jsonl(path):
            if not isinstance(row.get("prompt"), str) or not isinstance(row.get("questions"), list):
                raise JsonlError(f"{path}:{number}: each line needs 'prompt' (string) and 'questions' (list)")
            try:
                specs[row["prompt"]] = spec_sources.spec_from_questions(row["prompt"], row["questions"])
            except ValueError as error:
                raise JsonlError(f"{path}:{number}: {error}") from None
    except UnicodeDecodeError:
        raise JsonlError(f"{path}: not UTF-8 text") from None
    except OSError as error:
        raise JsonlError(f"cannot read --questions {path}: {error.strerror or error}") from None
    return specs


# Validation before any work -------------------------------------------------------------


def check_judge(judge: Judge, device: str | None = None) -> None:
    """Backbone name (and that it imports), model folder, device and dtype, checked before a model loads."""
    from asg_kit.adapters.registry import BackboneUnavailable, adapter_class

    try:
        check_backbone_name(judge.backbone)
        adapter_class(judge.backbone)
        check_model(judge.backbone, judge.model)
        check_dtype(judge.dtype)
        check_device(device)
    except (UserError, BackboneUnavailable) as error:
        raise ScoreSetupError(str(error)) from None


def check_options(options: ScoreOptions) -> dict[str, GenerationSpec]:
    """Seed, samples, caps and the questions file (read here: its errors name file and
    line); returns the user's questions by prompt."""
    if not 0 <= options.seed <= MAX_SEED:
        raise ScoreSetupError(f"--seed must be between 0 and {MAX_SEED}, not {options.seed}")
    if options.samples < 1:
        raise ScoreSetupError(f"--samples must be at least 1, not {options.samples}")
    if options.reward_form not in (None, "asg-kit", "released"):
        raise ScoreSetupError(f"--reward-form {options.reward_form}: use 'released', or leave it out for asg-kit's rules")
    if options.max_prompt_chars < 1:
        raise ScoreSetupError(f"--max-prompt-chars must be at least 1, not {options.max_prompt_chars}")
    if options.max_pixels < 4:
        raise ScoreSetupError(f"--max-pixels must be at least 4, not {options.max_pixels}")
    if options.questions is None:
        return {}
    if options.difficulty:
        raise ScoreSetupError("--questions checks generations; --difficulty asks its own questions, so pass one of them")
    if not Path(options.questions).is_file():
        raise ScoreSetupError(f"--questions {options.questions} is not a file")
    try:
        return load_user_questions(Path(options.questions))
    except JsonlError as error:
        raise ScoreSetupError(str(error)) from None


def _inputs(folder: Path, discovery: Discovery, options: ScoreOptions) -> dict[Path, str]:
    """Every file this job reads, resolved, with what it is."""
    inputs = {entry.path.resolve(): "an image of the folder" for entry in discovery.entries}
    for entry in discovery.entries:
        inputs[entry.path.with_suffix(".txt").resolve()] = "a prompt file of the folder"
        if discovery.layout == "geneval":
            inputs[(entry.path.parent.parent / "metadata.jsonl").resolve()] = "a GenEval metadata file of the folder"
    for name in MAPPING_FILES:
        inputs[(folder / name).resolve()] = "the folder's mapping file"
    if options.questions is not None:
        inputs[Path(options.questions).resolve()] = "the --questions file"
    return {path: what for path, what in inputs.items() if path.exists()}


def check_location(folder: Path, out: Path, discovery: Discovery, options: ScoreOptions) -> None:
    """``out`` and its companions are writable files that are not inputs of this job and
    would not become inputs (an image, a prompt, a mapping file of the folder)."""
    if out.is_dir():
        raise ScoreSetupError(f"--out {out} is a folder; give a file, e.g. {out / 'asg_scores.jsonl'}")
    if out.exists() and not out.is_file():
        raise ScoreSetupError(f"--out {out} exists and is not a regular file")
    inputs = _inputs(folder, discovery, options)
    for path in (out, summary_path(out), job_path(out), lock_path(out)):
        what = inputs.get(path.resolve())
        if what:
            raise ScoreSetupError(f"--out {out} would overwrite {path}, {what}; choose another --out")
    resolved, root = out.resolve(), folder.resolve()
    if root in resolved.parents:
        if out.suffix.lower() in IMAGE_EXTENSIONS:
            raise ScoreSetupError(f"--out {out} is inside the folder with an image's extension (it would be read as an image); use .jsonl")
        if out.name in MAPPING_FILES or out.name == "metadata.jsonl":
            raise ScoreSetupError(f"--out {out} would become the folder's mapping file; choose another name")
        if out.suffix.lower() == ".txt" and any(out.with_suffix(ext).exists() for ext in IMAGE_EXTENSIONS):
            raise ScoreSetupError(f"--out {out} would become an image's prompt file; choose another name")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ScoreSetupError(f"cannot create {out}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ScoreSetupError(f"cannot write {out}: {ancestor} is not writable")


# Ownership of the output ----------------------------------------------------------------


def job_path(out: Path) -> Path:
    return out.with_name(out.name + ".job.json") if out.suffix != ".jsonl" else out.with_suffix(".job.json")


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


def _model_identity(model: str | None) -> str | dict | None:
    if model is None:
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        return model  # a hub id
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    digest = hashlib.sha256(json.dumps(files).encode())
    if (path / "config.json").is_file():
        digest.update((path / "config.json").read_bytes())
    return {"path": str(path.resolve()), "files": digest.hexdigest()[:16]}


def job_record(folder: Path, options: ScoreOptions, judge: Judge) -> dict:
    """Everything that makes two runs' rows comparable: the input folder, the judge and the
    settings that change results (device and asg-kit's version are recorded, not compared)."""
    job = {
        "made_by": "asgkit score",
        "folder": str(Path(folder).resolve()),
        "mode": "difficulty" if options.difficulty else "generation",
        "backbone": judge.backbone,
        "model": _model_identity(judge.model),
        "dtype": judge.dtype,
        "seed": options.seed,
        "max_pixels": options.max_pixels,
        "device": judge.device,
    }
    if not options.difficulty:
        questions = Path(options.questions).read_bytes() if options.questions else None
        job.update(
            samples=options.samples,
            questions=hashlib.sha256(questions).hexdigest()[:16] if questions is not None else None,
            proposer_specs=options.proposer_specs,
            max_prompt_chars=options.max_prompt_chars,
        )
        if options.reward_form:  # only when set: records written before the option existed still match
            job["reward_form"] = options.reward_form
    return job


NOT_COMPARED = ("asgkit_version", "device")


def _describe(path: Path) -> str:
    head = path.read_bytes()[:4096]
    if head.startswith(b"\x89PNG") or head[:3] == b"\xff\xd8\xff" or head[:4] in (b"GIF8", b"RIFF", b"II*\x00", b"MM\x00*"):
        return "an image"
    try:
        first = head.decode("utf-8").splitlines()[0]
    except (UnicodeDecodeError, IndexError):
        return f"{path.stat().st_size} bytes of binary data"
    try:
        row = json.loads(first)
    except ValueError:
        return f"a text file starting {first[:40]!r}"
    if isinstance(row, dict) and "image" in row and "status" in row:
        return "rows like asgkit score's but no record of the job that wrote them"
    return f"JSON lines starting {first[:40]!r}"


def check_ownership(out: Path, job: dict) -> str | None:
    """None when ``out`` may be resumed by ``job`` (it does not exist, is empty, or is this
    job's output); otherwise one line saying what is there."""
    record = job_path(out)
    try:
        theirs = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        theirs = None
    ours = isinstance(theirs, dict) and theirs.get("made_by") == job["made_by"]
    if record.exists() and not ours:
        return f"{record} exists and is not a job record of asgkit score (this job would write its record there)"
    if not out.exists() or out.stat().st_size == 0:
        return None
    if not ours:
        return f"--out {out} exists and is not an output of asgkit score ({_describe(out)}; no {record.name} beside it)"
    differ = [key for key in sorted(set(job) | set(theirs)) if key not in NOT_COMPARED and job.get(key) != theirs.get(key)]
    if not differ:
        return None
    if "mode" in differ:  # the other settings of another mode say nothing more
        differ = ["mode"]
    shown = "; ".join(f"{key}: {_short(theirs.get(key))} there, {_short(job.get(key))} now" for key in differ)
    return f"--out {out} holds the rows of another asgkit score job ({shown})"


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


class ScoreOutput:
    """An output claimed by one job. Constructing it checks the options, the location and
    the ownership (nothing is written); entering it takes the lock and checks again;
    ``begin`` (when the work starts, e.g. once the model has loaded) replaces the output when
    ``options.fresh`` (or when it is empty) and records the job."""

    def __init__(self, folder: str | Path, out: str | Path, discovery: Discovery, options: ScoreOptions, judge: Judge) -> None:
        self.folder, self.out, self.discovery, self.options = Path(folder), Path(out), discovery, options
        self.user_questions = check_options(options)
        check_location(self.folder, self.out, discovery, options)
        self.job = job_record(self.folder, options, judge)
        self._refuse_foreign()
        self._lock = None

    def _refuse_foreign(self) -> None:
        problem = check_ownership(self.out, self.job)
        if problem and not self.options.fresh:
            raise ScoreSetupError(f"{problem}; choose another --out, or pass --fresh to replace it")

    def __enter__(self) -> "ScoreOutput":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path(self.out), "a")
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no advisory locks on this platform: one run at a time is the user's care
            pass
        except OSError:
            handle.close()
            raise ScoreSetupError(f"another asgkit score is writing {self.out} now (it holds {lock_path(self.out)}); wait for it to end, or choose another --out") from None
        self._lock = handle
        try:
            self._refuse_foreign()
        except BaseException:
            self.__exit__()
            raise
        return self

    def begin(self) -> None:
        if self._lock is None:
            raise RuntimeError("enter the ScoreOutput (with ...) before writing to it")
        if self.options.fresh or (self.out.exists() and self.out.stat().st_size == 0):
            # Rows first, then the record: a crash in between leaves an empty output, which any job may take.
            write_jsonl_atomic(self.out, [])
            summary_path(self.out).unlink(missing_ok=True)
        write_json_atomic(job_path(self.out), {**self.job, "asgkit_version": asg_kit.__version__})

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.close()  # closing releases the lock
            self._lock = None


# Scoring ----------------------------------------------------------------------------------


def _needs_proposer(entry: ImageEntry, user: dict[str, GenerationSpec], options: ScoreOptions) -> bool:
    """Whether this prompt's questions come from the Proposer (see ``_spec_for``)."""
    has_geneval = bool(entry.metadata and entry.metadata.get("include"))
    return bool(options.proposer_specs and entry.prompt and entry.prompt not in user and not entry.questions and not has_geneval)


def _spec_for(entry: ImageEntry, user: dict[str, GenerationSpec], backbone: UnifiedBackbone, options: ScoreOptions) -> tuple[GenerationSpec, str]:
    if entry.prompt in user:
        return user[entry.prompt], "user"
    if entry.questions:
        return spec_sources.spec_from_questions(entry.prompt, entry.questions), "mapping file"
    if entry.metadata and entry.metadata.get("include"):
        return spec_sources.spec_from_geneval(entry.metadata), "geneval metadata"
    if options.proposer_specs and entry.prompt:
        # One prompt per call: its questions never depend on which other prompts are pending.
        return spec_sources.specs_from_proposer(backbone, [entry.prompt])[0], "proposer"
    return GenerationSpec(entry.prompt or ""), "none"


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def image_seed(content: str | None, seed: int) -> int:
    """An image's own base seed: from its bytes' hash and the run's seed (identical files
    are judged with identical draws, wherever they are)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{content}".encode()).digest()[:6], "big")


def _input_digest(entry: ImageEntry, content: str | None) -> str:
    what = [content, entry.prompt, entry.questions, entry.metadata]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()[:16]


def _group_diversity(members: list[ImageEntry], loaded: dict, contents: dict[str, str | None], form: str = "asg-kit") -> dict[str, float]:
    """Each readable candidate's diversity share within the whole group, computed in content
    order and given alike to identical files (independent of names and of the run's cuts)."""
    ordered = sorted((e for e in members if e.key in loaded), key=lambda e: (contents[e.key] or "", e.key))
    shares = diversity_contributions([loaded[e.key].image for e in ordered], form=form)
    by_content: dict[str | None, float] = {}
    for entry, share in zip(ordered, shares):
        by_content.setdefault(contents[entry.key], share)
    return {e.key: by_content[contents[e.key]] for e in ordered}


def _too_long(spec: GenerationSpec, limit: int) -> str | None:
    if len(spec.prompt) > limit:
        return f"prompt too long: {len(spec.prompt)} characters (limit {limit}; --max-prompt-chars)"
    for pair in spec.qa:
        if len(pair.question) > limit or len(pair.expected) > limit:
            return f"question too long: {max(len(pair.question), len(pair.expected))} characters (limit {limit}; --max-prompt-chars)"
    return None


def run_score(
    backbone: UnifiedBackbone,
    folder: str | Path,
    out: str | Path,
    options: ScoreOptions = ScoreOptions(),
    progress: Callable[[int, int], None] = lambda done, total: None,
    discovery: Discovery | None = None,
    judge: Judge | None = None,
    output: ScoreOutput | None = None,
    status: Callable[[str], None] = lambda text: None,
) -> dict:
    """Score every image of ``folder`` not yet (validly) in ``out``; return the summary
    (also written next to ``out`` as ``<out stem>.summary.json``). ``progress(advance,
    total)`` is called once with the images already done, then after each row. ``output``:
    an already entered ``ScoreOutput`` (its lock held); otherwise one is claimed here for
    ``judge`` (default: the backbone's registered name). Raises ``ScoreSetupError`` before
    any work for a refused output. ``status(text)`` says what runs between rows (the
    Proposer decomposing a free-text prompt), "" when that is over."""
    folder, out = Path(folder), Path(out)
    discovery = discovery or discover(folder)
    if output is None:
        judge = judge or Judge(getattr(backbone, "name", type(backbone).__name__))
        with ScoreOutput(folder, out, discovery, options, judge) as claimed:
            return _score_into(backbone, claimed, options, progress, status)
    return _score_into(backbone, output, options, progress, status)


def _score_into(backbone: UnifiedBackbone, output: ScoreOutput, options: ScoreOptions, progress: Callable[[int, int], None],
                status: Callable[[str], None] = lambda text: None) -> dict:
    output.begin()
    out, discovery = output.out, output.discovery
    rows_in_file = sum(1 for line in out.read_bytes().splitlines() if line.strip()) if out.exists() else 0
    done = read_done(out)
    rewrite = rows_in_file != len(done)  # superseded rows to drop at the end
    contents = {entry.key: _file_digest(entry.path) for entry in discovery.entries}
    total = len(discovery.entries)

    def valid(entry: ImageEntry) -> bool:
        row = done.get(entry.key)
        if not row or row.get("status") != "scored" or row.get("sha256") != contents[entry.key]:
            return False
        return options.difficulty or row.get("input") == _input_digest(entry, contents[entry.key])

    def write(row: dict) -> None:
        nonlocal rewrite
        rewrite = rewrite or row["image"] in done
        append_jsonl(out, row)
        done.pop(row["image"], None)
        done[row["image"]] = row
        progress(1, total)

    def error(entry: ImageEntry, reason: str) -> None:
        write({"image": entry.key, "status": "error", "error": reason, "sha256": contents[entry.key]})

    progress(sum(valid(e) for e in discovery.entries), total)
    if options.difficulty:
        scorer = DifficultyScorer(backbone, seed=options.seed)
        for entry in discovery.entries:  # the rolling windows see the folder in its order, resumed or not
            if valid(entry):
                scorer.replay(done[entry.key]["ste_raw"], done[entry.key]["entropy"])
                continue
            try:
                loaded = load_image(entry.path, options.max_pixels)
            except BadImage as failure:
                error(entry, str(failure))
                continue
            result = scorer.score(loaded.image, seed=image_seed(contents[entry.key], options.seed))
            write({"image": entry.key, "status": "scored", "sha256": contents[entry.key], "notes": loaded.notes, **asdict(result)})
    else:
        rewrite = _score_generations(backbone, output, options, contents, valid, write, error, done, status) or rewrite
    current = {e.key for e in discovery.entries}
    if rewrite:
        # Drop superseded rows and bring refreshed ones in: current images in the folder's
        # order, then rows of images no longer there (never ours to delete).
        ordered = [done[e.key] for e in discovery.entries if e.key in done] + [r for k, r in done.items() if k not in current]
        write_jsonl_atomic(out, ordered)
    return _summarize(discovery, {k: r for k, r in done.items() if k in current}, out, options)


def _score_generations(backbone, output: ScoreOutput, options: ScoreOptions, contents, valid, write, error, done, status=lambda text: None) -> bool:
    """Judge every pending image of each prompt group, one image a call; refresh the
    diversity share of rows whose group changed. True when rows were refreshed in place."""
    form = options.reward_form or "asg-kit"
    scorer = GenerationScorer(backbone, samples=options.samples, seed=options.seed, form=form)
    groups: dict[str, list[ImageEntry]] = {}
    for entry in output.discovery.entries:
        groups.setdefault(entry.group, []).append(entry)
    refreshed = False
    decomposed, to_decompose = 0, sum(_needs_proposer(members[0], output.user_questions, options) and not all(valid(e) for e in members) for members in groups.values())
    for members in groups.values():
        candidates = [e for e in members if not e.problem]  # every candidate counts for diversity, scored or not
        group_input = hashlib.sha256(json.dumps(sorted(contents[e.key] or "" for e in candidates)).encode()).hexdigest()[:16]
        pending = [e for e in members if not valid(e)]
        stale = [e for e in candidates if valid(e) and done[e.key].get("group_input") != group_input]
        if not pending and not stale:
            continue
        loaded, failed = {}, {}
        for entry in candidates:
            try:
                loaded[entry.key] = load_image(entry.path, options.max_pixels)
            except BadImage as failure:
                failed[entry.key] = str(failure)
        diversity = _group_diversity(candidates, loaded, contents, form)
        for entry in stale:
            row = done[entry.key]
            row.update(s_div=diversity[entry.key], group_input=group_input)
            row["reward"] = generation_reward(row["s_fid"] or 0.0, row["s_cyc"] or 0.0, row["s_div"], row["contradiction"] or 0.0, row["quality"], **scorer.weights)
            refreshed = True
        spec = None
        for entry in pending:
            if entry.problem or entry.key in failed:
                error(entry, entry.problem or failed[entry.key])
                continue
            if entry.prompt and len(entry.prompt) > options.max_prompt_chars:
                error(entry, f"prompt too long: {len(entry.prompt)} characters (limit {options.max_prompt_chars}; --max-prompt-chars)")
                continue
            if spec is None:
                if _needs_proposer(entry, output.user_questions, options):
                    decomposed += 1  # a model call with no row to show for it: say so
                    status(f"Proposer decomposing prompt {decomposed}/{max(decomposed, to_decompose)}: {entry.prompt[:40]}")
                spec = _spec_for(entry, output.user_questions, backbone, options)
                status("")
            too_long = _too_long(spec[0], options.max_prompt_chars)
            if too_long:
                error(entry, too_long)
                continue
            content = contents[entry.key]
            [score] = scorer.score(spec[0], [loaded[entry.key].image], diversity=[diversity[entry.key]], seeds=[image_seed(content, options.seed)])
            row = {"image": entry.key, "status": "scored", "group": entry.group, "spec_source": spec[1], "notes": loaded[entry.key].notes,
                   "sha256": content, "input": _input_digest(entry, content), "group_input": group_input}  # fmt: skip
            if entry.metadata and entry.metadata.get("tag"):
                row["tag"] = entry.metadata["tag"]
            write({**row, **score.to_dict()})
    return refreshed


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

