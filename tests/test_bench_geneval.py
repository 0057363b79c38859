"""GenEval: prompts read from a GenEval copy, the folder layout GenEval's evaluator reads,
the summary arithmetic, the decision rules of the portable mode on given detections, and
the portable mode end to end with a tiny Mask2Former and a tiny CLIP built from configs."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from asg_kit import geneval as rules
from asg_kit.bench import geneval
from asg_kit.cli import app

GENEVAL_COPY = Path(__file__).parent / "data" / "geneval"
NAMES = (GENEVAL_COPY / "object_names.txt").read_text().split("\n")[:80]


def found(cls, box, score=0.95, color=None):
    return rules.FoundObject(cls, box, color, score)


# Prompts and layout --------------------------------------------------------------------


def test_metadata_from_a_geneval_copy():
    metadata = geneval.load_metadata(GENEVAL_COPY)
    assert len(metadata) == 553
    counts = {tag: sum(m["tag"] == tag for m in metadata) for tag in rules.CATEGORIES}
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}
    assert geneval.load_metadata(GENEVAL_COPY / "evaluation_metadata.jsonl") == metadata
    assert {c["class"] for m in metadata for c in m["include"]} <= set(NAMES)


def test_metadata_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="GenEval checkout"):
        geneval.load_metadata(tmp_path)
    bad = tmp_path / "evaluation_metadata.jsonl"
    bad.write_text('{"tag": "single_object", "include": [], "prompt": "a photo"}\n{"tag": "counting"}\n')
    with pytest.raises(ValueError, match=r"evaluation_metadata.jsonl:2: .*needs include, prompt"):
        geneval.load_metadata(tmp_path)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r":1: not valid JSON"):
        geneval.load_metadata(bad)


@pytest.mark.janus
def test_layout_is_geneval_s_and_resumes(tmp_path):
    from asg_kit.adapters.registry import load_backbone

    micro = load_backbone("micro")
    metadata = geneval.load_metadata(GENEVAL_COPY)[:3]
    folders = rules.write_layout(micro, metadata, tmp_path, images_per_prompt=2, seed=5)
    assert [f.name for f in folders] == ["00000", "00001", "00002"]
    for folder, meta in zip(folders, metadata):
        assert json.load(open(folder / "metadata.jsonl")) == meta  # GenEval reads it with one json.load
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
    images = geneval.layout_images(tmp_path)
    assert len(images) == 6 and images[0][1] == metadata[0]
    stamps = {p: p.stat().st_mtime_ns for p, _ in images}
    rules.write_layout(micro, metadata, tmp_path, images_per_prompt=2, seed=5)
    assert {p: p.stat().st_mtime_ns for p, _ in images} == stamps  # done prompts are not redrawn
    (folders[1] / "samples" / "0001.png").unlink()
    rules.write_layout(micro, metadata, tmp_path, images_per_prompt=2, seed=5)
    assert (folders[1] / "samples" / "0001.png").is_file()
    with pytest.raises(ValueError, match="holds another prompt"):
        rules.write_layout(micro, metadata[1:], tmp_path, images_per_prompt=2)


# Summary -------------------------------------------------------------------------------


def test_summary_of_a_results_file(tmp_path):
    outcomes = {"single_object": [1, 1, 1, 0], "two_object": [1, 0], "counting": [0, 0, 0], "colors": [1], "position": [0, 1, 0, 1, 0], "color_attr": [1, 1]}  # fmt: skip
    lines = [{"filename": f"{tag}/{i}.png", "tag": tag, "prompt": "p", "correct": bool(c), "reason": "", "metadata": "{}", "details": "{}"}
             for tag, values in outcomes.items() for i, c in enumerate(values)]  # fmt: skip
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = rules.summarize(geneval.read_results(path))
    assert summary["categories"] == {"single_object": 0.75, "two_object": 0.5, "counting": 0.0, "colors": 1.0, "position": 0.4, "color_attr": 1.0}
    assert summary["overall"] == pytest.approx((0.75 + 0.5 + 0.0 + 1.0 + 0.4 + 1.0) / 6)  # mean of category means
    assert summary["images"] == 17
    path.write_text('{"tag": "colors"}\n')
    with pytest.raises(ValueError, match="results.jsonl:1: not a GenEval result"):
        geneval.read_results(path)


# Decision rules on given detections --------------------------------------------------


def test_detection_filter_follows_geneval_thresholds():
    dets = [found("cat", (0, 0, 10, 10), 0.3), found("cat", (20, 0, 30, 10), 0.31), found("dog", (0, 20, 9, 29), 0.89), found("dog", (40, 0, 50, 10), 0.95)]
    assert sorted((o.cls, o.score) for o in rules.keep_detections(dets, "two_object")) == [("cat", 0.31), ("dog", 0.89), ("dog", 0.95)]
    assert [(o.cls, o.score) for o in rules.keep_detections(dets, "counting")] == [("dog", 0.95)]  # 0.9 for every class
    many = [found("cup", (i, i, i + 5, i + 5), 0.5 + i / 100) for i in range(20)]
    kept = rules.keep_detections(many, "single_object")
    assert len(kept) == 16 and kept[0].score == max(o.score for o in many)
    overlapping = [found("cup", (0, 0, 10, 10), 0.9), found("cup", (1, 0, 11, 10), 0.8), found("cup", (30, 30, 40, 40), 0.7)]
    assert len(rules.keep_detections(overlapping, "colors", rules.Thresholds(max_overlap=0.5))) == 2
    assert len(rules.keep_detections(overlapping, "colors")) == 3  # suppression off by default
    assert rules.box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0 and rules.box_iou((0, 0, 9, 9), (10, 10, 19, 19)) == 0.0


def test_counting_is_exact_at_high_confidence():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}], "prompt": "a photo of two cats"}  # fmt: skip
    two = [found("cat", (0, 0, 10, 10)), found("cat", (20, 0, 30, 10))]
    assert rules.judge(meta, rules.keep_detections(two, "counting"))[0]
    third_sure = two + [found("cat", (40, 0, 50, 10), 0.93)]
    third_unsure = two + [found("cat", (40, 0, 50, 10), 0.6)]
    assert rules.judge(meta, rules.keep_detections(third_sure, "counting")) == (False, "expected cat<3, found 3")
    assert rules.judge(meta, rules.keep_detections(third_unsure, "counting"))[0]  # below 0.9: not counted


def test_colour_is_asked_only_for_the_objects_a_clause_examines():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}], "prompt": "a photo of a red car and a blue bench"}  # fmt: skip
    cars = [found("car", (0, 0, 10, 10), 0.9), found("car", (50, 50, 60, 60), 0.5)]
    bench = [found("bench", (20, 20, 40, 30), 0.8)]
    truth = {cars[0].box: "red", cars[1].box: "green", bench[0].box: "blue"}
    asked = []

    def classify(cls, objects):
        asked.append((cls, [o.box for o in objects]))
        return [truth[o.box] for o in objects]

    assert rules.judge(meta, cars + bench, classify_colors=classify) == (True, "correct")
    assert asked == [("car", [cars[0].box]), ("bench", [bench[0].box])]  # the most confident car only
    truth[cars[0].box] = "green"
    assert rules.judge(meta, cars + bench, classify_colors=classify) == (False, "expected red car, found green car")


def test_position_needs_the_margin():
    meta = {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a cat left of a dog"}  # fmt: skip
    dog = found("dog", (100, 0, 140, 40))
    assert rules.judge(meta, [dog, found("cat", (0, 0, 40, 40))])[0]
    # Centres 12 px apart, boxes 40 px wide: the 8 px margin leaves 4 px, and 4 / 12 is short of 0.5.
    ok, reason = rules.judge(meta, [dog, found("cat", (88, 0, 128, 40))])
    assert not ok and reason == "expected cat left of target, found no relation"
    assert not rules.judge(meta, [found("cat", (0, 0, 40, 40))])[0]  # no target: wrong


# Portable mode with tiny models --------------------------------------------------------


def _tiny_mask2former(folder: Path) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    torch.manual_seed(0)
    swin = SwinConfig(image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    config = Mask2FormerConfig(
        backbone_config=swin, hidden_dim=32, mask_feature_size=32, feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64,
        decoder_layers=2, encoder_layers=1, num_queries=12, num_attention_heads=2, num_labels=80,
        id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)},
    )  # fmt: skip
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32).save_pretrained(folder)
    return folder


def _tiny_clip(folder: Path) -> Path:
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    words = {w for n in NAMES for w in n.split()} | set(geneval.COLORS) | {"a", "photo", "of", "object", "-", "colored"}
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *sorted(words)])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "eos_token_id": 3, "pad_token_id": 0, "bos_token_id": 2}  # fmt: skip
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    return _tiny_mask2former(root / "mask2former"), _tiny_clip(root / "clip")


def test_detector_masks_and_boxes_fit_the_image(tiny_judges):
    detector = geneval.Mask2FormerDetector(str(tiny_judges[0]), max_per_image=30)
    assert detector.class_names == list(NAMES)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))  # not a multiple of 32
    detections = detector.detect(image)
    assert 0 < len(detections) <= 30
    for obj, mask in detections:
        assert mask.shape == (50, 70) and mask.any() and 0.0 <= obj.score <= 1.0 and obj.cls in NAMES
        rows, cols = np.where(mask)
        assert obj.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_colour_classifier_is_geneval_s_zero_shot_on_the_masked_crop(tiny_judges):
    colors = geneval.ClipColorClassifier(str(tiny_judges[1]))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    mask = np.zeros((40, 40), bool)
    mask[5:20, 10:30] = True
    obj = found("car", (10.0, 5.0, 29.0, 19.0))
    predicted = colors.classify(image, [(obj, mask), (obj, None)], "car")

    # By hand: grey outside the mask, crop to the box, mean of the 3 templates' unit embeddings.
    crop = Image.composite(image, Image.new("RGB", image.size, "#999"), Image.fromarray(mask.astype(np.uint8) * 255)).crop((10, 5, 29, 19))
    with torch.no_grad():
        pixels = colors.image_processor(images=[crop, image.crop((10, 5, 29, 19))], return_tensors="pt")["pixel_values"]
        image_features = torch.nn.functional.normalize(colors._features(colors.model.get_image_features(pixel_values=pixels)), dim=-1)
        weights = []
        for color in geneval.COLORS:
            tokens = colors.tokenizer([t.format(color=color, cls="car") for t in geneval.COLOR_TEMPLATES], padding=True, return_tensors="pt")
            features = colors.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            text = torch.nn.functional.normalize(colors._features(features), dim=-1)
            weights.append(torch.nn.functional.normalize(text.mean(0), dim=-1))
    expected = [geneval.COLORS[i] for i in (image_features @ torch.stack(weights, 1)).argmax(1).tolist()]
    assert predicted == expected


@pytest.mark.janus
def test_portable_mode_end_to_end(tiny_judges, tmp_path):
    out = tmp_path / "bench"
    args = ["bench", "--tasks", "geneval", "--geneval", str(GENEVAL_COPY), "--limit", "6", "--images-per-prompt", "1",
            "--detector", str(tiny_judges[0]), "--clip", str(tiny_judges[1]), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "not official" in result.output and "GenEval overall" in result.output
    rows = [json.loads(line) for line in (out / "geneval" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["mode"] == "portable" for r in rows)
    assert set(rows[0]) >= {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}  # GenEval's columns
    metadata = geneval.load_metadata(GENEVAL_COPY)[:6]
    assert [json.loads(r["metadata"]) for r in rows] == metadata
    entry = json.loads((out / "results.json").read_text())["tasks"]["geneval"]
    assert entry["official"] is False and entry["prompts"] == 6 and entry["samples"] == 6
    summary = rules.summarize(rows)
    assert entry["metrics"]["overall"] == summary["overall"]
    assert entry["paper_values"]["GenEval overall"] == pytest.approx(100 * summary["overall"])

    # Images of a run that stopped before its results were written are not reused for other settings.
    (out / "results.json").unlink()
    other = CliRunner().invoke(app, [*args, "--guidance", "3"])
    assert other.exit_code == 2 and "drawn with other settings" in other.output

    # The same folder scored on its own, as images drawn by another toolkit would be.
    rescored = CliRunner().invoke(app, ["bench", "geneval-score", str(out / "geneval" / "images"), "--detector", str(tiny_judges[0]),
                                        "--clip", str(tiny_judges[1]), "--reference", "bagel", "--out", str(tmp_path / "rescored")])  # fmt: skip
    assert rescored.exit_code == 0, rescored.output
    assert "BAGEL" in rescored.output and "82.0" in rescored.output  # the published base overall beside ours
    again = [json.loads(line) for line in (tmp_path / "rescored" / "results.jsonl").read_text().splitlines()]
    assert [(r["filename"], r["correct"], r["details"]) for r in again] == [(r["filename"], r["correct"], r["details"]) for r in rows]


def test_geneval_score_reports_bad_folders_and_modes(tmp_path):
    result = CliRunner().invoke(app, ["bench", "geneval-score", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no GenEval image folder" in result.output
    result = CliRunner().invoke(app, ["bench", "geneval-score", str(tmp_path), "--geneval-mode", "images", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "official or portable mode" in result.output


def test_official_mode_needs_a_geneval_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate_images.py"):
        geneval.run_official(tmp_path, tmp_path, tmp_path, tmp_path / "results.jsonl")


def test_official_mode_reports_an_evaluator_that_cannot_run(tmp_path):
    # What happens on a machine without GenEval's environment: its evaluator's first import fails.
    script = tmp_path / "geneval" / "evaluation" / "evaluate_images.py"
    script.parent.mkdir(parents=True)
    script.write_text("import mmdet  # GenEval's evaluator needs mmdetection\n")
    lines = []
    with pytest.raises(RuntimeError, match=r"(?s)exit 1.*python of GenEval's environment.*No module named 'mmdet'"):
        geneval.run_official(tmp_path / "images", tmp_path / "geneval", tmp_path / "detector", tmp_path / "results.jsonl", log=lines.append)
    assert lines[0].startswith("running ") and str(script) in lines[0] and "--model-path" in lines[0]


def test_unknown_classes_are_named(tiny_judges):
    with pytest.raises(ValueError, match="does not know the class.*unicorn"):
        geneval.check_classes([{"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "a unicorn"}], NAMES)
