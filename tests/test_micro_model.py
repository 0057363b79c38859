"""The shipped micro model: it loads offline through the registry, its ground-truth
benchmarks run deterministically, and the CLI wraps them."""

import random

import pytest
from typer.testing import CliRunner

from asg_kit.adapters.micro import MicroAdapter
from asg_kit.adapters.registry import load_backbone
from asg_kit.cli import app
from asg_kit.micro import benchmarks, world
from asg_kit.micro.model import micro_weights_dir

pytestmark = pytest.mark.janus


@pytest.fixture(scope="module")
def micro():
    return load_backbone("micro")


def test_ships_small_safetensors_and_loads_offline(micro):
    files = {p.name: p.stat().st_size for p in micro_weights_dir().iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert sum(files.values()) <= 25 * 2**20
    assert isinstance(micro, MicroAdapter) and micro.roles == ("proposer", "solver", "generator")
    assert micro.num_image_tokens == 64


def test_benchmarks_are_deterministic(micro):
    items = benchmarks.vqa_items(per_kind=4, seed=3)
    first, second = benchmarks.run_vqa(micro, items), benchmarks.run_vqa(micro, items)
    assert first.rows == second.rows and 0.0 <= first.accuracy <= 1.0
    assert set(first.per_kind) == set(benchmarks.QUESTION_KINDS)
    prompts = benchmarks.geneval_prompts(per_category=1, seed=3)
    gen = benchmarks.run_geneval(micro, prompts, images_per_prompt=1)
    again = benchmarks.run_geneval(micro, prompts, images_per_prompt=1)
    assert [r["correct"] for r in gen.rows] == [r["correct"] for r in again.rows]
    assert len(gen.rows) == 6 and 0.0 <= gen.overall <= 1.0


def test_shipped_model_is_a_competent_solver(micro):
    """A guard on the shipped weights, on 20 held-out questions of each kind (seed 9, not
    the benchmark's): measured 91 % overall, colour 100 %, shape 100 %, count 90 %, existence
    75 %, position 100 %, yes/no position 80 % (issue 15's bar on `asgkit bench`'s questions:
    80 % overall, 60 % on every kind)."""
    result = benchmarks.run_vqa(micro, benchmarks.vqa_items(per_kind=20, seed=9))
    assert result.accuracy >= 0.75, result.per_kind
    assert all(share >= 0.6 for share in result.per_kind.values()), result.per_kind


def test_shipped_model_counts_what_a_counting_prompt_asks(micro):
    """The judge's count questions: 2-5 objects of one shape (a counting prompt's scene, half
    with one object too many or too few). The shipped weights count all 30 right; a model
    before the refinement stage counted them right 21 % of the time."""
    rng = random.Random("count-guard")
    items = []
    for _ in range(30):
        metadata = world.sample_prompt(rng, "counting")
        scene = world.scene_for_prompt(metadata, rng)
        if rng.random() < 0.5:
            scene = world.with_one_error(scene, metadata, "wrong count", rng) or scene
        shape = metadata["include"][0]["class"]
        items.append(benchmarks.VQAItem(scene, f"how many {world.PLURALS[shape]} are there ?", str(scene.count(shape=shape)), "count"))
    assert benchmarks.run_vqa(micro, items).accuracy >= 0.7
