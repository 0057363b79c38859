import math

import numpy as np
import pytest

from asg_kit.rewards import (
    GenerationSpec,
    UnderstandingScorer,
    contradiction,
    diversity_contributions,
    generation_reward,
    length_factor,
    proposer_reward,
    qa_item_score,
    sanitize_spec,
    score_question,
    solver_rewards,
    spec_quality,
    vote_stats,
)

MIXED = ["3", "3", "3", "4", "4", "5", "3"]  # p = 4/7, 2/7, 1/7; H = 0.95570; m = 2/7; s = 0.77468


def test_length_factor():
    assert [length_factor(w) for w in (0, 6, 9, 12, 40)] == pytest.approx([1.0, 1.0, 0.95, 0.9, 0.9])


def test_solver_rewards_asg_form_by_hand():
    stats = vote_stats(MIXED)
    words = [0, 9, 0, 0, 0, 0, 0]
    r = solver_rewards(MIXED, words, stats, bucket="hard")
    majority = (4 / 7) ** 0.7 * 0.77468  # 0.52362
    minority_4 = -0.25 * 0.77468 * (2 / 7) ** 0.7  # -0.080582
    minority_5 = -0.25 * 0.77468 * (1 / 7) ** 0.7
    assert r == pytest.approx(
        [majority, majority * 0.95, majority, minority_4, minority_4, minority_5, majority], abs=1e-4
    )
    assert r[0] == pytest.approx(0.52362, abs=1e-4)
    assert r[3] == pytest.approx(-0.080582, abs=1e-5)


def test_solver_rewards_unsolvable_all_negative():
    answers = list("abcdefg")
    stats = vote_stats(answers)
    r = solver_rewards(answers, [0] * 7, stats, bucket="unsolvable")
    # s = 0.5*exp(-(ln 7 - 0.675)^2/(2*0.525^2)) + 0.5 = 0.526699; p^0.7 = (1/7)^0.7 = 0.256124
    assert r == pytest.approx([-0.25 * 0.526699 * 0.256124] * 7, abs=1e-5)


def test_solver_rewards_evolmm_form_and_floor():
    stats = vote_stats(MIXED)
    r = solver_rewards(MIXED, [0] * 7, stats, form="evolmm")
    assert r[0] == pytest.approx((4 / 7) ** 0.7) and r[3] == pytest.approx((2 / 7) ** 0.7)
    unanimous = vote_stats(["x"] * 3)
    # informativeness is 0.2188 here; the floor 1e-4 only matters when s is 0
    assert solver_rewards(["x"] * 3, [0] * 3, unanimous)[0] == pytest.approx(0.218788, abs=1e-5)
    with pytest.raises(ValueError):
        solver_rewards(MIXED, [0], stats)
    with pytest.raises(ValueError):
        solver_rewards(MIXED, [0] * 7, stats, form="grpo")


def test_proposer_reward_by_hand():
    stats = vote_stats(MIXED)
    # band = 2*0.77468 - 1; g = exp(-(0.95570 - 0.9)^2 / (2*0.25^2)); r_SC = 0.9 band + 0.1 g
    r_sc = 0.9 * 0.54935 + 0.1 * 0.975496
    assert proposer_reward(0.6, stats, "hard") == pytest.approx(0.7 * 0.6 + 0.3 * r_sc, abs=1e-4)
    assert proposer_reward(0.6, stats, "unsolvable") == 0.0
    unanimous = vote_stats(["blue"] * 7)
    assert proposer_reward(0.9, unanimous, "easy") == 0.20  # 0.63 capped
    assert proposer_reward(0.1, unanimous, "easy") == pytest.approx(0.07)  # H = 0: no SC term
    assert math.isnan(proposer_reward(math.nan, stats, "hard"))


def test_score_question_gates_solver_update():
    replies = [f"<answer>{a}</answer>" for a in MIXED]
    hard = score_question(replies, d_ste=0.5, tau_easy=0.1)
    assert hard.bucket == "hard" and hard.update_solver and hard.skip_reason is None
    easy = score_question(["<answer>blue</answer>"] * 7, d_ste=0.5, tau_easy=0.1)
    assert easy.bucket == "easy" and not easy.update_solver and "easy" in easy.skip_reason


def test_understanding_scorer_carries_state_and_resumes():
    scorer = UnderstandingScorer()
    replies = [f"<answer>{a}</answer>" for a in MIXED]
    for ste in [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]:
        scorer.score(replies, ste)
    assert len(scorer.percentile) == 8 and len(scorer.easy.values) == 8
    clone = UnderstandingScorer()
    clone.load_state_dict(scorer.state_dict())
    assert clone.score(replies, 2.2) == scorer.score(replies, 2.2)


def test_spec_quality_cases():
    full = GenerationSpec.from_pairs("a red circle above a blue square", [("What colour is the circle?", "red"), ("What shape is below?", "square"), ("How many objects?", "2")])
    assert spec_quality(full) == pytest.approx(1.0)
    messy = GenerationSpec.from_pairs(
        "p", [("What colour is it?", "red"), ("what colour is it", "blue"), ("Is it big?", ""), ("How many?", "3")]
    )
    clean = sanitize_spec(messy)
    assert (clean.n_raw, clean.n_valid, len(clean.spec.qa)) == (4, 3, 2)
    assert spec_quality(messy) == pytest.approx(0.5 + 0.3 * 3 / 4 + 0.2 * 2 / 3)
    yes_no = GenerationSpec.from_pairs("p", [("Is there a cat?", "yes"), ("Is there a dog?", "No")])
    assert spec_quality(yes_no) == pytest.approx(0.8)
    one = GenerationSpec.from_pairs("p", [("What colour?", "red")])
    assert spec_quality(one) == pytest.approx(0.75)
    assert spec_quality(GenerationSpec("just a prompt")) == 0.0
    many = GenerationSpec.from_pairs("p", [(f"Question {i}?", "red") for i in range(5)])
    assert len(sanitize_spec(many).spec.qa) == 3
    too_long = GenerationSpec.from_pairs("p", [("q " * 25, "red"), ("What?", "one two three four five six seven eight nine")])
    assert sanitize_spec(too_long).n_valid == 0 and spec_quality(too_long) == pytest.approx(0.2)


def test_qa_item_score_and_contradiction():
    assert qa_item_score(["red", "red", "blue"], "red") == pytest.approx(0.7 + 0.3 * 2 / 3)
    assert qa_item_score(["3 circles", "3 circles"], "three") == pytest.approx(0.7 * 0.8 + 0.3)
    assert contradiction(["yes", "no", "red"], ["no", "no", "blue"]) == pytest.approx(0.5)
    assert contradiction(["yes", "no", "red"], ["no", "no", "blue"], over="all") == pytest.approx(1 / 3)
    assert contradiction(["red"], ["blue"]) == 0.0
    assert contradiction([], []) == 0.0


def test_generation_reward_by_hand():
    assert generation_reward(0.8, 0.5, 1.0, 0.0, 0.9) == pytest.approx(0.9 * 0.72 / 0.95)
    assert generation_reward(0.8, 0.5, 1.0, 1.0, 0.9) == pytest.approx(0.9 * (0.72 / 0.95 - 0.2))
    assert generation_reward(1.0, 1.0, 1.0, 0.0, 0.6) == pytest.approx(0.6)
    assert generation_reward(0.0, 0.0, 0.0, 1.0, 1.0) == 0.0  # clipped at 0
    assert math.isnan(generation_reward(math.nan, 0.5, 0.5, 0.0, 1.0))


def _image(colour, shape=(40, 40)):
    img = np.zeros((*shape, 3), dtype=np.uint8)
    img[...] = colour
    return img


def test_diversity_contributions():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    grey = _image((120, 120, 120))
    twins = diversity_contributions([grey, grey.copy(), noise])
    assert twins == pytest.approx([0.0, 0.0, 1.0])
    assert diversity_contributions([grey, grey, grey]) == [0.0, 0.0, 0.0]
    assert diversity_contributions([grey, noise]) == pytest.approx([1.0, 1.0])
    assert diversity_contributions([grey]) == [0.0]
    assert diversity_contributions([]) == []
    mixed_sizes = diversity_contributions([_image((255, 0, 0), (64, 32)), _image((0, 0, 255), (10, 90)), noise])
    assert all(0.0 <= c <= 1.0 for c in mixed_sizes) and max(mixed_sizes) == 1.0
