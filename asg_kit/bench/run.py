"""One benchmark run: load a backbone once, run the asked-for tasks, keep every result.

Tasks are the shapes world's ``shapes_vqa`` and ``shapes_geneval``, ``geneval`` (GenEval's
553 prompts), and any lmms-eval task name; presets name groups of them. Results go to
``OUT/results.json`` (rewritten atomically after each task) with what is needed to run them
again; a task already there with the same settings is kept, not re-run, so a killed run
resumes where it stopped. Per-item records go to ``OUT/samples/<task>.jsonl``.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from asg_kit.bench import published
from asg_kit.bench.understanding import PAPER_TASKS, check_tasks, missing_judge, paper_values
from asg_kit.devices import default_device  # a benchmark runs on the GPU when there is one

SHAPES_TASKS = ("shapes_vqa", "shapes_geneval")
OWN_TASKS = (*SHAPES_TASKS, "geneval")
PRESETS: dict[str, tuple[str, ...]] = {
    "paper": (*PAPER_TASKS, "geneval"),
    "understanding": PAPER_TASKS,
    "shapes": SHAPES_TASKS,
}
GENEVAL_MODES = ("portable", "official", "images")
# What a run writes into OUT; --fresh removes these and nothing else.
BENCH_FILES = ("results.json", "samples", "shapes_geneval_grid.png", "geneval", "lmms_eval.log")

ProgressBar = Callable[[str, int], Callable[[int], None]]


@dataclass
class BenchConfig:
    backbone: str = "micro"
    model: str | None = None  # checkpoint folder or hub id; None: the backbone's default
    upstream: str | None = None  # upstream checkout, for the backbones that run one
    roles: str | None = None  # trained role adapters: a training run's folder or a save_roles folder
    base: bool = False  # evaluate the base model (adapters off) instead of the roles
    tasks: tuple[str, ...] = ()  # task names and presets; empty: the backbone's default
    out: str = "runs/bench"
    seed: int = 0
    device: str | None = None  # None: cuda when available
    dtype: str | None = None
    reference: str | None = None  # a key of published.REFERENCES; None: the backbone's default
    fresh: bool = False  # re-run tasks already in results.json
    # lmms-eval
    data_dir: str | None = None  # save_to_disk copies, one folder per task: offline runs
    limit: int | None = None  # documents per lmms-eval task, prompts for GenEval
    batch_size: int = 8
    gen_kwargs: str | None = None  # lmms-eval overrides, "max_new_tokens=64,temperature=0"
    # GenEval
    geneval: str | None = None  # GenEval checkout, its prompts folder or evaluation_metadata.jsonl
    geneval_mode: str = "portable"
    images_per_prompt: int = 4
    guidance: float = 5.0
    image_temperature: float = 1.0  # sampling temperature of generated images (VARGPT: upstream's tau 0.5)
    evaluator_python: str = sys.executable  # official mode: the GenEval environment's python
    detector_dir: str | None = None  # official mode: folder of the mmdetection Mask2Former checkpoint
    model_config: str | None = None  # official mode: mmdetection config path (for wheel installs of mmdet)
    detector: str | None = None  # portable mode: transformers Mask2Former (folder or hub id)
    clip: str | None = None  # portable mode: transformers CLIP (folder or hub id)
    # shapes world
    per_kind: int = 50
    per_category: int = 16
    shapes_images: int = 4


def expand_tasks(names: tuple[str, ...] | list[str], backbone: str) -> list[str]:
    """Presets expanded, duplicates dropped, order kept; nothing named: the backbone's
    default (the shapes benchmarks for micro, the paper's suite otherwise)."""
    names = list(names) or (["shapes"] if backbone == "micro" else ["paper"])
    tasks: list[str] = []
    for name in names:
        for task in PRESETS.get(name, (name,)):
            if task not in tasks:
                tasks.append(task)
    return tasks


def check_config(config: BenchConfig, tasks: list[str]) -> None:
    """Every problem with the options that can be seen before loading a model."""
    from asg_kit.checks import UserError, check_backbone_name, check_device, check_dtype, check_model, check_output_folder, check_seed

    check_backbone_name(config.backbone)
    problems = []
    if config.geneval_mode not in GENEVAL_MODES:
        problems.append(f"--geneval-mode must be one of {', '.join(GENEVAL_MODES)}, not {config.geneval_mode!r}")
    if "geneval" in tasks:
        if config.geneval is None:
            problems.append("the geneval task needs GenEval's prompts: pass --geneval (a GenEval checkout or its evaluation_metadata.jsonl)")
        if config.geneval_mode == "official" and config.detector_dir is None:
            problems.append("--geneval-mode official needs --detector-dir (the folder of GenEval's Mask2Former checkpoint)")
    if config.base and config.roles:
        problems.append("--base evaluates the model with every adapter off, so --roles would be ignored: pass one of them")
    judge = missing_judge(tasks)
    if judge:
        problems.append(judge)
    if problems:
        raise ValueError("\n".join(problems))
    check_model(config.backbone, config.model)
    check_device(config.device)
    check_dtype(config.dtype)
    check_seed(config.seed)
    if config.roles is not None and not Path(config.roles).is_dir():
        raise UserError(f"--roles {config.roles}: no such folder (pass a training run's folder or a folder of saved roles)")
    check_output_folder("--out", config.out, inputs=(config.roles, config.data_dir), nested=True)


def _common_settings(config: BenchConfig) -> dict:
    return {"backbone": config.backbone, "model": config.model, "roles": config.roles, "base": config.base, "seed": config.seed}


def _fingerprint(config: BenchConfig, task: str) -> dict:
    common = _common_settings(config)
    if task == "shapes_vqa":
        specific = {"per_kind": config.per_kind}
    elif task == "shapes_geneval":
        specific = {"per_category": config.per_category, "images": config.shapes_images, "guidance": config.guidance, "temperature": config.image_temperature}
    elif task == "geneval":
        specific = {"geneval": config.geneval, "mode": config.geneval_mode, "limit": config.limit, "images": config.images_per_prompt, "guidance": config.guidance, "temperature": config.image_temperature}  # fmt: skip
    else:
        specific = {"data_dir": config.data_dir, "limit": config.limit, "gen_kwargs": config.gen_kwargs}
    return {**common, **specific}


def environment() -> dict:
    import torch
    import transformers

    import asg_kit

    env = {
        "asg_kit": asg_kit.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        from importlib.metadata import version

        env["lmms_eval"] = version("lmms_eval")
    except Exception:
        env["lmms_eval"] = None
    return env


def run_bench(config: BenchConfig, progress_bar: ProgressBar = lambda description, total: (lambda n: None), log: Callable[[str], None] = lambda line: None) -> dict:
    """Run ``config``'s tasks; return the results (also in ``OUT/results.json``)."""
    from asg_kit.adapters.registry import adapter_class, load_backbone, roles_folder
    from asg_kit.jsonl import write_json_atomic, write_jsonl_atomic

    tasks = expand_tasks(config.tasks, config.backbone)
    check_config(config, tasks)
    out = Path(config.out)
    results_path = out / "results.json"
    previous = {}
    if results_path.is_file() and not config.fresh:
        previous = json.loads(results_path.read_text(encoding="utf-8")).get("tasks", {})
        common = _common_settings(config)
        other = [task for task, entry in previous.items() if {k: entry.get("settings", {}).get(k) for k in common} != common]
        if other:
            raise ValueError(
                f"{results_path} holds results of another model, roles or seed ({', '.join(other)}); "
                "pass another --out, or --fresh to replace them"
            )
    lmms_tasks = [task for task in tasks if task not in OWN_TASKS]
    if lmms_tasks:
        check_tasks(lmms_tasks, config.data_dir)
    reference = config.reference or published.default_reference(config.backbone, config.model)
    if reference is not None and reference not in published.REFERENCES:
        raise ValueError(f"unknown reference {reference!r}; known: {', '.join(published.REFERENCES)}")
    if config.fresh:  # the previous model's results, samples and grids go; nothing else in OUT is touched
        for name in BENCH_FILES:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    results: dict = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "config": asdict(config),
        "environment": environment(),
        "reference": reference,
        "tasks": {},
    }

    def save() -> None:
        write_json_atomic(results_path, results)

    solver = None if config.base else "solver"
    generator = None if config.base else "generator"
    default_model = getattr(adapter_class(config.backbone), "default_model", None)
    results["model"] = {"backbone": config.backbone, "model": config.model or default_model or "(shipped weights)", "roles": config.roles, "solver_role": solver, "generator_role": generator}  # fmt: skip

    todo = []
    for task, entry in previous.items():  # earlier tasks of this model in this folder stay
        if task not in tasks:
            results["tasks"][task] = entry
    for task in tasks:
        old = previous.get(task)
        if old is not None and old.get("settings") == _fingerprint(config, task):
            results["tasks"][task] = old
            log(f"{task}: kept from the previous run in {results_path}")
        else:
            todo.append(task)
    if not todo:
        save()
        return results

    options = {key: value for key, value in {"device": config.device or default_device(), "dtype": config.dtype, "upstream": config.upstream}.items() if value}
    backbone = load_backbone(config.backbone, model=config.model, **options)
    if config.roles:
        backbone.load_roles(roles_folder(config.roles))

    def finish(task: str, entry: dict, samples: list[dict]) -> None:
        entry["settings"] = _fingerprint(config, task)
        results["tasks"][task] = entry
        write_jsonl_atomic(out / "samples" / f"{task}.jsonl", samples)
        save()

    lmms_tasks = [t for t in todo if t not in OWN_TASKS]
    for task in [t for t in todo if t in OWN_TASKS]:
        if task == "shapes_vqa":
            entry, samples = _shapes_vqa(backbone, config, solver, progress_bar)
        elif task == "shapes_geneval":
            entry, samples = _shapes_geneval(backbone, config, generator, progress_bar, out)
        else:
            entry, samples = _geneval(backbone, config, generator, progress_bar, out, log)
        finish(task, entry, samples)
    if lmms_tasks:
        from asg_kit.bench.lmms_model import AsgkitLMM
        from asg_kit.bench.understanding import run_tasks

        model = AsgkitLMM(backbone, role=solver or "none", batch_size=config.batch_size, seed=config.seed, progress_bar=progress_bar)
        log(f"lmms-eval: {', '.join(lmms_tasks)}" + (f" from {config.data_dir}" if config.data_dir else ""))
        raw = run_tasks(model, lmms_tasks, data_dir=config.data_dir, limit=config.limit, seed=config.seed, gen_kwargs=config.gen_kwargs, log_file=out / "lmms_eval.log")  # fmt: skip
        for task in lmms_tasks:
            entry = dict(raw["tasks"][task])
            entry["lmms_eval_version"] = raw["lmms_eval_version"]
            entry["paper_values"] = paper_values({task: entry})
            finish(task, entry, raw["samples"][task])
    return results


def _shapes_vqa(backbone, config: BenchConfig, role, progress_bar: ProgressBar) -> tuple[dict, list[dict]]:
    from asg_kit.micro import benchmarks

    items = benchmarks.vqa_items(config.per_kind, config.seed)
    result = benchmarks.run_vqa(backbone, items, progress=progress_bar("shapes-VQA", len(items)), role=role)
    entry = {"metrics": {"accuracy": result.accuracy, **{f"accuracy_{k}": v for k, v in result.per_kind.items()}}, "samples": len(items)}
    entry["paper_values"] = {published.SHAPES_VQA: 100 * result.accuracy}
    return entry, result.rows


def _shapes_geneval(backbone, config: BenchConfig, role, progress_bar: ProgressBar, out: Path) -> tuple[dict, list[dict]]:
    from asg_kit.micro import benchmarks

    metadata = benchmarks.geneval_prompts(config.per_category, config.seed)
    result = benchmarks.run_geneval(
        backbone, metadata, config.shapes_images, config.guidance, temperature=config.image_temperature, seed=config.seed, progress=progress_bar("shapes-GenEval", len(metadata)), role=role
    )
    picks = [next(i for i, m in enumerate(metadata) if m["tag"] == tag) for tag in dict.fromkeys(m["tag"] for m in metadata)]
    grid = out / "shapes_geneval_grid.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    benchmarks.prompt_grid([metadata[i]["prompt"] for i in picks], [result.images[i] for i in picks]).save(grid)
    entry = {"metrics": {"overall": result.overall, **result.categories}, "samples": len(result.rows), "prompts": len(metadata), "grid": str(grid)}
    entry["paper_values"] = {published.SHAPES_GENEVAL: 100 * result.overall}
    return entry, result.rows


def _geneval(backbone, config: BenchConfig, role, progress_bar: ProgressBar, out: Path, log) -> tuple[dict, list[dict]]:
    from asg_kit import geneval as rules
    from asg_kit.bench import geneval
    from asg_kit.jsonl import write_json_atomic

    source = geneval.metadata_path(config.geneval)
    metadata = geneval.load_metadata(source)[: config.limit]
    images = out / "geneval" / "images"
    # Drawing resumes image by image, so the folder must hold this model's images only.
    drawn_with = out / "geneval" / "drawn_with.json"
    settings = {**_common_settings(config), "images": config.images_per_prompt, "guidance": config.guidance, "temperature": config.image_temperature, "metadata": str(source.resolve())}
    if config.fresh:
        shutil.rmtree(images, ignore_errors=True)
    elif images.exists() and (not drawn_with.is_file() or json.loads(drawn_with.read_text(encoding="utf-8")) != settings):
        raise ValueError(f"{images} holds images drawn with other settings (see {drawn_with}); pass another --out, or --fresh to redraw")
    write_json_atomic(drawn_with, settings)
    rules.write_layout(backbone, metadata, images, config.images_per_prompt, config.guidance, config.image_temperature, seed=config.seed, progress=progress_bar("GenEval images", len(metadata)), role=role)  # fmt: skip
    entry: dict = {"metadata": str(source), "prompts": len(metadata)}
    if config.geneval_mode == "images":
        log(f"GenEval images written to {images}; score them with `asgkit bench geneval-score {images}` or GenEval's evaluator")
        return {**entry, "images": str(images), "mode": "images"}, []
    scored, rows = score_geneval(images, config, out / "geneval" / "results.jsonl", _device(backbone), progress_bar, log)
    return {**entry, **scored}, rows


def score_geneval(images: Path, config: BenchConfig, outfile: Path, device: str = "cpu", progress_bar: ProgressBar = lambda d, t: (lambda n: None), log=lambda line: None) -> tuple[dict, list[dict]]:  # fmt: skip
    """Judge a GenEval image folder in ``config.geneval_mode`` ("official" or "portable"),
    writing GenEval's results file to ``outfile``; return the task entry and the rows."""
    from asg_kit import geneval as rules
    from asg_kit.bench import geneval

    entry: dict = {"images": str(images), "mode": config.geneval_mode, "results_file": str(outfile)}
    if config.geneval_mode == "official":
        if config.geneval is None or config.detector_dir is None:
            raise ValueError("official mode needs --geneval (a GenEval checkout) and --detector-dir (its Mask2Former checkpoint folder)")
        source = Path(config.geneval)
        geneval_root = source if source.is_dir() else geneval.metadata_path(source).parent.parent
        rows = geneval.run_official(images, geneval_root, config.detector_dir, outfile, python=config.evaluator_python, model_config=config.model_config, log=log)  # fmt: skip
        entry["official"] = True
    elif config.geneval_mode == "portable":
        found = geneval.layout_images(images)
        detector = geneval.Mask2FormerDetector(config.detector or geneval.DEFAULT_DETECTOR, device=device)
        colors = geneval.ClipColorClassifier(config.clip or geneval.DEFAULT_CLIP, device=device)
        rows = geneval.run_portable(found, outfile, detector, colors, progress=progress_bar("GenEval portable judge", len(found)))
        entry.update(official=False, detector=config.detector or geneval.DEFAULT_DETECTOR, clip=config.clip or geneval.DEFAULT_CLIP)
    else:
        raise ValueError(f"GenEval images are scored in official or portable mode, not {config.geneval_mode!r}")
    summary = rules.summarize(rows)
    entry["metrics"] = {"overall": summary["overall"], **summary["categories"]}
    entry["samples"] = summary["images"]
    values = {published.GENEVAL_COLUMNS[tag]: 100 * v for tag, v in summary["categories"].items() if v is not None and tag in published.GENEVAL_COLUMNS}
    if summary["overall"] is not None:
        values[published.GENEVAL_OVERALL] = 100 * summary["overall"]
    entry["paper_values"] = values
    return entry, rows


def score_geneval_folder(images: str | Path, config: BenchConfig, progress_bar: ProgressBar = lambda d, t: (lambda n: None), log=lambda line: None) -> dict:  # fmt: skip
    """Score GenEval images drawn elsewhere (any model, any toolkit); results as ``run_bench``
    gives them, written to ``OUT/results.json`` and ``OUT/results.jsonl``."""
    from asg_kit.jsonl import write_json_atomic

    from asg_kit.checks import check_device, check_output_folder

    if config.reference is not None and config.reference not in published.REFERENCES:
        raise ValueError(f"unknown reference {config.reference!r}; known: {', '.join(published.REFERENCES)}")
    check_device(config.device)
    check_output_folder("--out", config.out)
    out = Path(config.out)
    entry, _ = score_geneval(Path(images), config, out / "results.jsonl", default_device(config.device) or "cpu", progress_bar, log)
    # Drawn elsewhere, so only what the folder shows is recorded: its prompts and images per prompt.
    prompts = len({path.parent.parent for path, _ in geneval_layout(Path(images))})
    per_prompt = entry["samples"] / prompts if prompts else None
    entry.update(prompts=prompts, settings={"mode": config.geneval_mode, "images": int(per_prompt) if per_prompt and per_prompt.is_integer() else per_prompt})
    results = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv, "config": asdict(config), "environment": environment(),
               "reference": config.reference, "tasks": {"geneval": entry}}  # fmt: skip
    write_json_atomic(out / "results.json", results)
    return results


def geneval_layout(images: Path):
    from asg_kit.bench import geneval

    return geneval.layout_images(images)


def _device(backbone) -> str:
    device = getattr(backbone, "device", None)
    return str(device) if device is not None else "cpu"


def measured_values(results: dict) -> dict[str, float]:
    """The paper's columns (in the paper's units) that a run's tasks filled."""
    return {label: value for entry in results.get("tasks", {}).values() for label, value in entry.get("paper_values", {}).items()}


def _published(reference: published.Reference | None, label: str) -> tuple[float | None, float | None]:
    return (reference.base.get(label), reference.asg.get(label)) if reference else (None, None)


def beside_published(results: dict) -> list[dict]:
    """Each measured column beside the published base and ASG numbers of the run's reference."""
    reference = published.REFERENCES.get(results.get("reference") or "")
    rows = []
    for label, value in measured_values(results).items():
        base, asg = _published(reference, label)
        rows.append({"metric": label, "measured": value, "published_base": base, "published_asg": asg})
    return rows


# Settings that name the model (what a comparison compares) or where data lives (the same
# data may sit elsewhere); every other recorded setting must match for a like-with-like comparison.
NOT_COMPARED = ("backbone", "model", "roles", "base", "data_dir", "geneval")
SETTING_NAMES = {"per_kind": "questions per kind", "per_category": "prompts per category", "images": "images per prompt",
                 "limit": "--limit", "samples": "items measured", "prompts": "prompts", "gen_kwargs": "generation arguments"}  # fmt: skip


def comparison_problems(before: dict, after: dict) -> tuple[list[str], list[str]]:
    """Why two runs' numbers are not like with like: (differences, unknowns). Differences
    are settings or counts of a task in both runs that differ (question counts, images per
    prompt, seeds, guidance, GenEval mode, ...); unknowns are tasks whose settings one run
    did not record."""
    differences, unknowns = [], []
    for task in [t for t in before.get("tasks", {}) if t in after.get("tasks", {})]:
        first, second = before["tasks"][task], after["tasks"][task]
        if "settings" not in first or "settings" not in second:
            unknowns.append(f"{task} (settings not recorded in the {'first' if 'settings' not in first else 'second'} run)")
            continue
        a = {**first["settings"], **{k: first.get(k) for k in ("samples", "prompts") if first.get(k) is not None}}
        b = {**second["settings"], **{k: second.get(k) for k in ("samples", "prompts") if second.get(k) is not None}}
        changed = [f"{SETTING_NAMES.get(k, k)} {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if k not in NOT_COMPARED and a.get(k) != b.get(k)]
        if changed:
            differences.append(f"{task}: {', '.join(changed)}")
    return differences, unknowns


def compare(before: dict, after: dict) -> list[dict]:
    """Rows of the paper's values measured in two runs (e.g. base and after ASG), beside the
    published base -> ASG numbers of the reference the later run names (or the earlier)."""
    reference = published.REFERENCES.get(after.get("reference") or before.get("reference") or "")
    first, second = measured_values(before), measured_values(after)
    rows = []
    for label in [*first, *(label for label in second if label not in first)]:
        base, asg = _published(reference, label)
        rows.append({
            "metric": label, "before": first.get(label), "after": second.get(label),
            "change": second[label] - first[label] if label in first and label in second else None,
            "published_base": base, "published_asg": asg,
            "published_change": asg - base if base is not None and asg is not None else None,
        })  # fmt: skip
    return rows
