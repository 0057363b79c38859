"""The lmms-eval wrapper: mmmu_val on a small local MMMU-shaped dataset, answered by the
tiny Janus through lmms-eval's own evaluator, offline; and the `asgkit` model name on
lmms-eval's registry and command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from asg_kit.bench.lmms_model import AsgkitLMM, GenerationSettings, cut_at_stops, one_image
from asg_kit.bench.understanding import PAPER_METRICS, PAPER_TASKS, local_task_yamls, paper_values, run_tasks, task_manager

pytestmark = pytest.mark.janus

DOCS = [
    # (subject, question, options, answer, question type, image sizes)
    ("Art", "What colour fills <image 1>?", "['red', 'blue', 'green', 'white']", "A", "multiple-choice", [(32, 24)]),
    ("Math", "How many corners has the shape in <image 1>?", "['3', '4', '5']", "B", "multiple-choice", [(20, 20)]),
    ("Physics", "Which of <image 1> and <image 2> is larger?", "['the first', 'the second']", "B", "multiple-choice", [(16, 16), (24, 32)]),
    ("Biology", "Name the colour of <image 1>.", "[]", "blue", "open", [(28, 28)]),
]


def _image(size, index):
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mmmu_copy(tmp_path_factory):
    """An MMMU-shaped dataset (lmms-lab/MMMU's columns, ids, split) saved with save_to_disk."""
    import datasets

    rows = []
    for i, (subject, question, options, answer, kind, sizes) in enumerate(DOCS):
        row = {"id": f"validation_{subject}_{i + 1}", "question": question, "options": options, "explanation": "",
               "img_type": "['Diagrams']", "answer": answer, "topic_difficulty": "Easy", "question_type": kind, "subfield": subject}  # fmt: skip
        for k in range(1, 8):
            row[f"image_{k}"] = _image(sizes[k - 1], 10 * i + k) if k <= len(sizes) else None
        rows.append(row)
    text = {k: datasets.Value("string") for k in ("id", "question", "options", "explanation", "img_type", "answer", "topic_difficulty", "question_type", "subfield")}  # fmt: skip
    features = datasets.Features({**text, **{f"image_{k}": datasets.Image() for k in range(1, 8)}})
    data_dir = tmp_path_factory.mktemp("lmms-data")
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows, features=features)}).save_to_disk(str(data_dir / "mmmu_val"))
    return data_dir


class Recording:
    """The real backbone, with a record of what reached it."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.backbone, name)

    def sample_answers(self, requests, max_new_tokens=96, seed=0):
        samples = self.backbone.sample_answers(requests, max_new_tokens=max_new_tokens, seed=seed)
        self.calls.append((list(requests), max_new_tokens, samples))
        return samples


def test_generation_settings_follow_lmms_eval_kwargs():
    greedy = GenerationSettings.from_gen_kwargs({"max_new_tokens": 16, "until": "\n\n", "temperature": 0.7})
    assert greedy == GenerationSettings(16, 0.0, 1.0, ("\n\n",))  # no do_sample: greedy, as in lmms-eval's models
    sampled = GenerationSettings.from_gen_kwargs({"do_sample": True, "temperature": 0.7, "top_p": 0.9, "until": ["A", ""]})
    assert sampled == GenerationSettings(128, 0.7, 0.9, ("A",))
    with pytest.raises(ValueError, match="until"):
        GenerationSettings.from_gen_kwargs({"until": [3]})
    assert cut_at_stops("yes\n\nand more. Done", ["Done", "\n\n"]) == "yes"
    assert cut_at_stops("no stop here", ["\n\n"]) == "no stop here"


def test_one_image_per_document():
    assert one_image([]) is None
    single = _image((10, 12), 0)
    assert np.array_equal(np.asarray(one_image([single])), np.asarray(single))
    strip = one_image([_image((10, 10), 1), _image((20, 40), 2)])
    assert strip.size == (40 + 20, 40)  # both scaled to the tallest height, side by side
    with pytest.raises(TypeError, match="image tasks only"):
        one_image(["/videos/clip.mp4"])


def test_mmmu_val_offline_through_lmms_eval(tiny_janus, mmmu_copy):
    backbone = Recording(tiny_janus)
    model = AsgkitLMM(backbone, role="solver", batch_size=3)
    before = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    results = run_tasks(model, ["mmmu_val"], data_dir=mmmu_copy)
    assert {key: os.environ.get(key) for key in before} == before  # the offline switch is undone

    # Every document reached the backbone once, with its images and lmms-eval's arguments.
    requests = [(request, max_new, sample) for batch, max_new, samples in backbone.calls for request, sample in zip(batch, samples)]
    assert len(requests) == len(DOCS) and all(max_new == 128 for _, max_new, _ in requests)  # mmmu_val's max_new_tokens
    by_question = {doc[1]: doc for doc in DOCS}
    for i, (subject, question, options, answer, kind, sizes) in enumerate(DOCS):
        request, _, sample = next(r for r in requests if question in r[0].prompt)
        assert request.temperature == 0.0 and len(sample.token_ids) <= 128
        if kind == "multiple-choice":
            assert "A. " in request.prompt and "Answer with the option's letter" in request.prompt
        expected = one_image([_image(size, 10 * i + k + 1) for k, size in enumerate(sizes)])
        assert np.array_equal(np.asarray(request.image), np.asarray(expected))
    assert len(by_question) == len(DOCS)

    # The score comes back, and it is the fraction of documents lmms-eval judged correct.
    task = results["tasks"]["mmmu_val"]
    samples = results["samples"]["mmmu_val"]
    assert task["samples"] == len(DOCS) and task["dataset"] == str(mmmu_copy.resolve() / "mmmu_val")
    answers = {s["doc_id"]: s["resps"][0][0] for s in samples}
    recorded = {r[0].prompt: r[2].text for r in requests}
    assert sorted(answers.values()) == sorted(recorded.values())  # no stop string occurs in these answers
    from lmms_eval.tasks.mmmu.utils import eval_multi_choice, eval_open

    judged = [s["mmmu_acc"] for s in samples]
    correct = [(eval_multi_choice if j["question_type"] == "multiple-choice" else eval_open)(j["answer"], j["parsed_pred"][0]) for j in judged]
    assert task["metrics"]["mmmu_acc"] == pytest.approx(sum(correct) / len(DOCS), abs=1e-5)
    assert paper_values(results["tasks"]) == {"MMMU": pytest.approx(100 * task["metrics"]["mmmu_acc"])}


def test_generation_overrides_and_limit_reach_the_backbone(tiny_janus, mmmu_copy):
    backbone = Recording(tiny_janus)
    results = run_tasks(AsgkitLMM(backbone, role="none"), ["mmmu_val"], data_dir=mmmu_copy, limit=2, gen_kwargs="max_new_tokens=3")
    requests = [(r, m, s) for batch, m, samples in backbone.calls for r, s in zip(batch, samples)]
    assert len(requests) == 2 and all(m == 3 and len(s.token_ids) <= 3 for _, m, s in requests)
    assert results["tasks"]["mmmu_val"]["samples"] == 2


def test_missing_local_copy_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="asgkit bench save-data textvqa_val"):
        local_task_yamls(["textvqa_val"], tmp_path, tmp_path, task_manager())


def test_task_names_and_local_copies_are_checked_before_a_model_loads(tmp_path, mmmu_copy):
    from asg_kit.bench.run import BenchConfig, run_bench

    with pytest.raises(ValueError, match="unknown task.*mmmu_vall"):
        run_bench(BenchConfig(backbone="micro", tasks=("mmmu_vall",), out=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no local copy of lmms-eval task 'textvqa_val'"):
        run_bench(BenchConfig(backbone="micro", tasks=("mmmu_val", "textvqa_val"), data_dir=str(mmmu_copy), out=str(tmp_path)))


def test_save_data_names_unknown_tasks(tmp_path):
    from typer.testing import CliRunner

    from asg_kit.cli import app

    result = CliRunner().invoke(app, ["bench", "save-data", "mmmu_vall", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown lmms-eval task 'mmmu_vall'" in result.output


def test_paper_preset_names_real_lmms_eval_tasks_and_metrics():
    manager = task_manager()
    assert all(task in manager.all_tasks for task in PAPER_TASKS)
    assert {m.task for m in PAPER_METRICS} == set(PAPER_TASKS) and len(PAPER_METRICS) == 8


def test_asgkit_is_a_model_on_lmms_eval_registry_and_cli(mmmu_copy, tmp_path):
    from lmms_eval.models import get_model

    assert get_model("asgkit") is AsgkitLMM
    model = AsgkitLMM.create_from_arg_string("backbone=micro,role=none,batch_size=2")
    assert model.backbone.name == "micro" and model.role is None and model.batch_size == 2
    with pytest.raises(TypeError, match="unknown asgkit model argument"):
        AsgkitLMM.create_from_arg_string("backbone=micro,temperature=3")

    # lmms-eval's own command line, with a task yaml pointing at the local copy.
    include = tmp_path / "tasks"
    include.mkdir()
    local_task_yamls(["mmmu_val"], mmmu_copy, include, task_manager())
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "asgkit", "--model_args", "backbone=micro,batch_size=4",
               "--tasks", "asgkit_local_mmmu_val", "--include_path", str(include), "--limit", "2",
               "--output_path", str(tmp_path / "out")]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("*results.json")]
    assert written and written[0]["results"]["asgkit_local_mmmu_val"]["mmmu_acc,none"] >= 0.0


def test_asgkit_bench_runs_an_lmms_eval_task_from_local_data(mmmu_copy, tmp_path):
    from typer.testing import CliRunner

    from asg_kit.cli import app

    out = tmp_path / "bench"
    args = ["bench", "--tasks", "mmmu_val,shapes_vqa", "--per-kind", "1", "--data-dir", str(mmmu_copy), "--limit", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "MMMU" in result.output and "shapes-VQA" in result.output
    entry = json.loads((out / "results.json").read_text())["tasks"]["mmmu_val"]
    assert entry["samples"] == 3 and entry["dataset"] == str(mmmu_copy.resolve() / "mmmu_val") and entry["lmms_eval_version"]
    assert entry["paper_values"]["MMMU"] == pytest.approx(100 * entry["metrics"]["mmmu_acc"])
    samples = [json.loads(line) for line in (out / "samples" / "mmmu_val.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(s["gen_kwargs"]["max_new_tokens"] == 128 and "<image 1>" in s["prompt"] for s in samples)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("kept from the previous run") == 2


def test_two_processes_under_torchrun_answer_as_one(mmmu_copy, tmp_path):
    import socket

    include = tmp_path / "tasks"
    include.mkdir()
    local_task_yamls(["mmmu_val"], mmmu_copy, include, task_manager())
    with socket.socket() as probe:  # a free port, so parallel or leftover runs never collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "lmms_eval", "--model", "asgkit", "--model_args", "backbone=micro", "--batch_size", "2",
               "--tasks", "asgkit_local_mmmu_val", "--include_path", str(include), "--output_path", str(tmp_path / "out"), "--log_samples"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Running on rank 1" in run.stdout + run.stderr  # lmms-eval's own log: the second process took part
    [samples_file] = (tmp_path / "out").rglob("*samples_asgkit_local_mmmu_val.jsonl")

    def answer(sample):
        filtered = sample["filtered_resps"]
        return filtered[0] if isinstance(filtered, list) else filtered

    sharded = {s["doc_id"]: answer(s) for s in map(json.loads, samples_file.read_text().splitlines())}
    alone = run_tasks(AsgkitLMM("micro", batch_size=2), ["mmmu_val"], data_dir=mmmu_copy)
    assert len(sharded) == len(DOCS)
    assert sharded == {s["doc_id"]: answer(s) for s in alone["samples"]["mmmu_val"]}  # every document once, same answers
