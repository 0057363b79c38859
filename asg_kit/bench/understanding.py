"""The paper's understanding suite through lmms-eval, in-process, optionally offline.

lmms-eval fetches each task's dataset from the hub. For machines without network,
``save_task_data`` copies a task's dataset to ``DATA_DIR/<task>`` (run it where the hub is
reachable), and ``run_tasks(..., data_dir=DATA_DIR)`` then evaluates from those copies:
each task is re-declared in a generated yaml that includes lmms-eval's own (same prompts,
metrics and scoring) and only points the dataset at the local copy.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# lmms-eval's tasks for the paper's eight understanding metrics (SPEC section 6).
PAPER_TASKS = ("mmmu_val", "mmbench_en_dev", "textvqa_val", "seedbench", "realworldqa", "mmvet", "mme")

# Tasks whose official metric asks an OpenAI-compatible model to judge or extract answers.
JUDGED_TASKS = ("mmbench_en_dev", "mmvet")


def missing_judge(tasks) -> str | None:
    """Why ``tasks`` cannot be scored here, when some need lmms-eval's LLM judge and no
    key for it is set (without one, lmms-eval retries every document with pauses)."""
    judged = [task for task in tasks if task in JUDGED_TASKS]
    key = "AZURE_API_KEY" if os.environ.get("API_TYPE", "openai") == "azure" else "OPENAI_API_KEY"
    if not judged or os.environ.get(key):
        return None
    return (
        f"{', '.join(judged)} score with lmms-eval's LLM judge (gpt-4o-class, OpenAI-compatible): set {key} "
        "(and OPENAI_API_URL for another compatible server), or leave them out of --tasks"
    )

LOCAL_PREFIX = "asgkit_local_"


@dataclass(frozen=True)
class PaperMetric:
    """A column of the paper's table: which task and metric give it, and the factor that
    turns lmms-eval's value into the paper's unit (fractions become percentages)."""

    label: str
    task: str
    metric: str
    scale: float


PAPER_METRICS = (
    PaperMetric("MMMU", "mmmu_val", "mmmu_acc", 100.0),
    PaperMetric("MMBench", "mmbench_en_dev", "gpt_eval_score", 1.0),
    PaperMetric("TextVQA", "textvqa_val", "exact_match", 100.0),
    PaperMetric("SEED", "seedbench", "seed_image", 100.0),
    PaperMetric("RWQA", "realworldqa", "exact_match", 100.0),
    PaperMetric("MM-Vet", "mmvet", "gpt_eval_score", 1.0),
    PaperMetric("MME-P", "mme", "mme_perception_score", 1.0),
    PaperMetric("MME-C", "mme", "mme_cognition_score", 1.0),
)


def require_lmms_eval():
    try:
        import lmms_eval  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"lmms-eval is not installed ({error}). Install the bench extra: pip install -e '.[bench]'; "
            "on a machine without a CUDA torch, see the README's 'Benchmarks' section for the --no-deps install"
        ) from error


def task_manager(include_path: str | None = None):
    """lmms-eval's task index (lmms-eval's own tasks, plus ``include_path``'s). Indexing
    takes seconds, so the one without extra tasks is built once per process."""
    return _task_manager(include_path) if include_path is not None else _default_task_manager()


@functools.lru_cache(maxsize=1)
def _default_task_manager():
    return _task_manager(None)


def _task_manager(include_path: str | None):
    from lmms_eval.tasks import TaskManager

    from asg_kit.bench.lmms_model import MODEL_NAME

    # model_name picks the prompt variant of each task (lmms_eval_specific_kwargs): ours is "default".
    return TaskManager(verbosity="ERROR", include_path=include_path, model_name=MODEL_NAME)


def local_task_yamls(tasks: Sequence[str], data_dir: str | Path, folder: str | Path, manager) -> dict[str, str]:
    """Write one yaml per task into ``folder`` that includes lmms-eval's task and loads its
    dataset from ``data_dir/<task>`` (a ``save_to_disk`` copy). Returns task -> local name."""
    data_dir, folder = Path(data_dir), Path(folder)
    names = {}
    for task in tasks:
        copy = data_dir / task
        if not copy.is_dir():
            raise FileNotFoundError(
                f"no local copy of lmms-eval task {task!r} at {copy}; make one where the hub is reachable with "
                f"`asgkit bench save-data {task} --data-dir {data_dir}` and copy the folder over"
            )
        entry = manager.task_index.get(task)
        if entry is None or entry.get("type") != "task":
            raise ValueError(f"{task!r} is not an lmms-eval task (groups are not supported with --data-dir; name their tasks)")
        local = LOCAL_PREFIX + task
        (folder / f"{local}.yaml").write_text(
            f"include: {entry['yaml_path']}\ntask: {local}\ndataset_path: {copy.resolve()}\n"
            "dataset_kwargs:\n  load_from_disk: true\n",
            encoding="utf-8",
        )
        names[task] = local
    return names


def check_tasks(tasks: Sequence[str], data_dir: str | Path | None = None) -> None:
    """Fail before any model loads: every name must be an lmms-eval task, and with
    ``data_dir`` each must have its local copy there."""
    require_lmms_eval()
    manager = task_manager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)}; asg-kit's own are shapes_vqa, shapes_geneval, geneval, "
                         "the rest are lmms-eval's (list them with `lmms-eval --tasks list`)")  # fmt: skip
    if data_dir is not None:
        with tempfile.TemporaryDirectory() as scratch:
            local_task_yamls(tasks, data_dir, scratch, manager)
    else:
        offline = hub_unreachable()
        if offline:
            raise ValueError(f"lmms-eval task(s) {', '.join(tasks)} load their data from the hub, which {offline}: pass --data-dir DIR "
                             f"with local copies (make them where the hub is reachable: `asgkit bench save-data {' '.join(tasks)} --data-dir DIR`)")  # fmt: skip


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached (offline switch set, or no connection
    within ``timeout`` seconds), or None when it can: datasets would otherwise retry for
    minutes before failing."""
    import socket
    from urllib.parse import urlparse

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"is switched off here ({key}={os.environ[key]})"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        return f"cannot be reached from here ({host}:{port}: {error})"
    return None


def save_task_data(task: str, data_dir: str | Path) -> Path:
    """Download ``task``'s dataset as lmms-eval loads it and save it to ``data_dir/<task>``
    (needs the hub; the copy then serves ``run_tasks(..., data_dir=...)`` offline)."""
    import datasets

    require_lmms_eval()
    manager = task_manager()
    if task not in manager.all_tasks:
        raise ValueError(f"unknown lmms-eval task {task!r} (list them with `lmms-eval --tasks list`)")
    config = manager._get_config(task)
    if "dataset_path" not in config:
        raise ValueError(f"{task!r} is not a single lmms-eval task with a dataset")
    kwargs = {k: v for k, v in (config.get("dataset_kwargs") or {}).items() if k in ("token", "revision", "data_files")}
    dataset = datasets.load_dataset(config["dataset_path"], name=config.get("dataset_name"), **kwargs)
    target = Path(data_dir) / task
    dataset.save_to_disk(str(target))
    return target


def run_tasks(
    model,
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    gen_kwargs: str | None = None,
    log_file: str | Path | None = None,
) -> dict:
    """Evaluate ``model`` (an ``AsgkitLMM``) on lmms-eval ``tasks``.

    Returns ``{"tasks": {task: {"metrics", "samples", "version", "dataset"}}, "samples":
    {task: per-document records}, "lmms_eval_version"}``; metrics are lmms-eval's values
    (``"mmmu_acc"``...), without their filter suffix. ``gen_kwargs`` ("max_new_tokens=64,...")
    overrides the tasks' generation arguments, as lmms-eval's ``--gen_kwargs`` does. What
    lmms-eval prints (per-subject tables and the like) goes to ``log_file`` when given.
    """
    require_lmms_eval()
    with contextlib.ExitStack() as stack:
        if data_dir is not None:
            stack.enter_context(_hub_offline())
        from lmms_eval import evaluator  # after the switch: datasets reads it when first imported

        include = stack.enter_context(tempfile.TemporaryDirectory(prefix="asgkit-lmms-tasks-"))
        names = {task: task for task in tasks}
        if data_dir is not None:
            names = local_task_yamls(tasks, data_dir, include, task_manager())
        manager = task_manager(include if data_dir is not None else None)
        unknown = [task for task in names.values() if task not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lmms-eval task(s): {', '.join(unknown)} (list them with `lmms-eval --tasks list`)")
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(log_file, "a", encoding="utf-8"))))
        raw = evaluator.simple_evaluate(
            model=model,
            tasks=list(names.values()),
            task_manager=manager,
            limit=limit,
            gen_kwargs=gen_kwargs,
            bootstrap_iters=0,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            verbosity="ERROR",
        )
    if raw is None:  # lmms-eval returns None on ranks other than 0
        return {}
    results: dict = {"tasks": {}, "samples": {}, "lmms_eval_version": raw.get("lmms_eval_version")}
    for task, name in names.items():
        values = raw["results"].get(name, {})
        metrics = {
            key.split(",")[0]: value
            for key, value in values.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        config = raw["configs"].get(name, {})
        results["tasks"][task] = {
            "metrics": metrics,
            "samples": raw.get("n-samples", {}).get(name, {}).get("effective"),
            "version": raw.get("versions", {}).get(name),
            "dataset": config.get("dataset_path"),
        }
        results["samples"][task] = [_sample_record(s) for s in raw.get("samples", {}).get(name, [])]
    return results


@contextlib.contextmanager
def _hub_offline():
    """The hub switched off for datasets and huggingface_hub inside the block."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {key: os.environ.get(key) for key in keys}
    os.environ.update({key: "1" for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _sample_record(sample: dict) -> dict:
    """A per-document record without the document itself (it holds the images)."""
    kept = {k: v for k, v in sample.items() if k not in ("doc", "arguments", "doc_hash")}
    arguments = sample.get("arguments")
    if arguments:
        first = arguments[0] if isinstance(arguments[0], (list, tuple)) else arguments
        kept["prompt"] = first[0] if first and isinstance(first[0], str) else None
        kept["gen_kwargs"] = first[1] if len(first) > 1 and isinstance(first[1], dict) else None
    return kept


def paper_values(task_results: dict) -> dict[str, float]:
    """The paper's columns that these results fill, in the paper's units."""
    values = {}
    for column in PAPER_METRICS:
        metric = task_results.get(column.task, {}).get("metrics", {}).get(column.metric)
        if metric is not None:
            values[column.label] = metric * column.scale
    return values
