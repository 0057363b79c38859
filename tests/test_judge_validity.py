"""bench/judge_validity.py's second table: which of a prompt's spec questions an error changes."""

from __future__ import annotations

import random

from asg_kit.micro import world
from asg_kit.specs import spec_from_geneval
from conftest import load_bench_script


def _judge_validity():
    return load_bench_script("judge_validity")


def test_the_questions_an_error_changes_are_the_spec_questions_whose_truth_flips():
    """A swapped pair flips the spec's relation question from yes to no and leaves its
    presence questions; a wrong count changes the count; every question listed is one of
    the spec's, with the world's answer on each scene."""
    module = _judge_validity()
    rng = random.Random(3)
    seen = {error: 0 for error in world.ONE_ERRORS}
    for error, metadata, scene, wrong in module.error_pairs(rng, 15):
        spec = spec_from_geneval(metadata)
        changed = module.questions_the_error_changes(spec, scene, wrong)
        truth = [{qa.question: qa.answer for qa in [*world.scene_questions(s), *world.presence_questions(s)]} for s in (scene, wrong)]
        for question, on_good, on_bad in changed:
            assert question in {qa.question for qa in spec.qa}
            assert (on_good, on_bad) == (truth[0][question], truth[1][question]) and on_good != on_bad
        if error == "swapped position":
            assert [(good, bad) for _, good, bad in changed] == [("yes", "no")]
        seen[error] += bool(changed)
    assert min(seen.values()) >= 10, seen
