"""The switches to the released ASG code's reward rules (docs/fidelity.md): each shows
asg-kit's default and the released variant on small inputs, the released one against a
hand computation of the released formula."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from asg_kit.rewards import (
    EasyThreshold,
    GenerationSpec,
    RollingPercentile,
    contradiction,
    difficulty_bucket,
    diversity_contributions,
    normalize_answer,
    polarity,
    proposer_reward,
    qa_item_score,
    soft_match,
    solver_rewards,
    spec_quality,
    vote_stats,
)
from asg_kit.rewards.understanding import token_f1
from asg_kit.train.losses import group_advantages

# ---- answers: normalisation, soft match, yes/no ---------------------------------------------


def test_normalisation_released_keeps_words_and_articles():
    assert normalize_answer("  Three, cats. ") == "3 cats"
    assert normalize_answer("  Three, cats. ", form="released") == "three cats"
    assert normalize_answer("The red ball!") == "red ball"
    assert normalize_answer("The red ball!", form="released") == "the red ball"
    assert normalize_answer("Yep, it is") == "yes"
    assert normalize_answer("Yes, it is", form="released") == "yes it is"
    assert normalize_answer("a b c d e f g h i j", form="released") == "a b c d e f g h"
    with pytest.raises(ValueError, match="form"):
        normalize_answer("x", form="upstream")


@pytest.mark.parametrize(
    "answer, expected, ours, released",
    [
        ("10", "100", 0.0, 0.8),  # released: character containment is checked before numbers
        ("red", "reddish", 0.0, 0.8),  # released: "red" is a substring of "reddish"
        ("3 cats", "3.1", 0.0, 0.7),  # released: first number of each, |3 - 3.1| / 3.1 = 3.2 %
        ("0.3", "0.2", 0.0, 0.4),  # released: error over max(|e|, 1) = 0.1; ours 0.1 / 0.2 = 50 %
        ("red", "", 0.0, 0.5),  # released: an empty expected answer scores 0.5
        ("Three", "3", 1.0, 0.0),  # ours: number words are digits; released: no shared token
        ("red big ball", "big blue ball", 0.5, 0.5),  # both: Jaccard 2 / 4
        ("a red ball", "red ball", 1.0, 0.8),  # ours: articles dropped; released: containment
    ],
)
def test_soft_match_both_orders(answer, expected, ours, released):
    assert soft_match(answer, expected) == pytest.approx(ours)
    assert soft_match(answer, expected, form="released") == pytest.approx(released)


def test_polarity_and_contradiction_released():
    assert polarity(normalize_answer("none")) is None
    assert polarity("none", form="released") == "no"  # starts with "no"
    assert polarity("present", form="released") == "yes" and polarity("0", form="released") == "no"
    assert polarity("red", form="released") is None
    majorities, expected = ["none", "yes", "red"], ["yes", "no", "red"]
    # ours: "none" has no polarity; 1 flip over the 2 yes/no questions (or over all 3)
    assert contradiction(majorities, expected) == pytest.approx(1 / 2)
    assert contradiction(majorities, expected, over="all") == pytest.approx(1 / 3)
    # released: "none" flips "yes" too; 2 flips over all 3 questions
    assert contradiction(majorities, expected, over="all", form="released") == pytest.approx(2 / 3)
    assert contradiction(["absent"], ["yes"]) == 0.0
    assert contradiction(["absent"], ["yes"], over="all", form="released") == 1.0


def test_qa_item_score_votes_with_the_released_normalisation():
    answers = ["Three", "3", "three."]
    assert qa_item_score(answers, "3") == pytest.approx(1.0)  # all "3": match 1, f = 1
    # released labels: "three" x2, "3" x1; soft_match("three", "3") = 0 (no shared token)
    assert qa_item_score(answers, "3", form="released") == pytest.approx(0.7 * 0.0 + 0.3 * 2 / 3)


# ---- spec quality ----------------------------------------------------------------------------


def test_spec_quality_released_counts():
    spec = GenerationSpec.from_pairs(
        "p",
        [("How many cats", "2"), ("How many cats?", "2"), ("Is it red?", "yes"), ("What colour is the ball?", "red"), ("Where?", "left")],
    )
    # ours: 5 valid, 4 distinct (uniqueness 4/5), 3 kept: 0.5 + 0.3 * 5/5 + 0.2 * 4/5
    assert spec_quality(spec) == pytest.approx(0.5 + 0.3 + 0.16)
    # released: 4 kept after the repeat, first 3: 0.5 + 0.3 * 3/5 + 0.2 * 1
    assert spec_quality(spec, form="released") == pytest.approx(0.5 + 0.18 + 0.2)
    one_yes_no = GenerationSpec.from_pairs("p", [("Is it red?", "yes")])
    assert spec_quality(one_yes_no) == pytest.approx(0.25 + 0.3 + 0.2 - 0.2)
    assert spec_quality(one_yes_no, form="released") == pytest.approx(0.25 + 0.3 + 0.2)  # penalty needs >= 2 pairs
    # released: questions are told apart by their first 8 normalised words only
    long = GenerationSpec.from_pairs(
        "p", [("Is the red ball on the left of the blue box?", "yes"), ("Is the red ball on the left of the green box?", "no")]
    )
    assert spec_quality(long) == pytest.approx(0.5 + 0.3 + 0.2 - 0.2)
    assert spec_quality(long, form="released") == pytest.approx(0.25 + 0.3 * 1 / 2 + 0.2)


# ---- diversity -------------------------------------------------------------------------------


def solid(value, size=64):
    return Image.new("RGB", (size, size), (value, value, value))


def halves(left, right, size=64):
    pixels = np.full((size, size, 3), left, dtype=np.uint8)
    pixels[:, size // 2 :] = right
    return Image.fromarray(pixels)


def test_diversity_two_candidates_released_is_the_set_score():
    images = [solid(100), solid(200)]  # same grayscale shape, disjoint colour histograms
    # ours: leave-one-out, each takes the whole D(S) = 0.4, normalised by the max -> 1
    assert diversity_contributions(images) == pytest.approx([1.0, 1.0])
    # released: both get D(S) = 0.6 * 0 (constant images, cosine 1) + 0.4 * clip01((1 - 0) / 0.25)
    assert diversity_contributions(images, form="released") == pytest.approx([0.4, 0.4], abs=1e-5)


def test_diversity_histogram_distance_released_sums_the_channels():
    # Colour term alone (pixel_weight 0), scale 1 so nothing clips from above. 64 px images,
    # so the released 64x64 histogram thumbnail is the image itself. Per channel:
    # A = bin 12, B = half bin 12 / half bin 25, C = bin 25: BC(A,B) = BC(B,C) = sqrt(0.5), BC(A,C) = 0.
    a, b, c = solid(100), halves(100, 200), solid(200)
    bc = math.sqrt(0.5)
    hellinger = math.sqrt(1 - bc)
    whole = (2 * hellinger + 1) / 3
    without = [hellinger, 1.0, hellinger]  # drop A, B, C
    raw = [max(0.0, whole - w) for w in without]
    ours = diversity_contributions([a, b, c], pixel_weight=0.0, hist_scale=1.0)
    assert ours == pytest.approx([r / max(raw) for r in raw], abs=1e-6)  # [1, 0, 1]
    # released: distance 1 - 3 * BC: A-B and B-C are -1.12, A-C is 1; D(all) = clip01(-0.41) = 0,
    # D without B = 1, without A or C = 0: no candidate adds diversity.
    released_whole = (2 * (1 - 3 * bc) + 1) / 3
    assert released_whole < 0
    assert diversity_contributions([a, b, c], pixel_weight=0.0, hist_scale=1.0, form="released") == [0.0, 0.0, 0.0]
    # identical images: the released histogram distance is 1 - 3 = -2, clamped to 0
    assert diversity_contributions([a, a], pixel_weight=0.0, form="released") == [0.0, 0.0]


# ---- understanding: STE window, easy threshold, Solver and Proposer rewards ------------------


def test_ste_rank_of_a_certain_decode_is_zero_in_the_released_cold_start():
    assert RollingPercentile().update(0.0) == pytest.approx(1 / (1 + math.exp(3.0)))  # sigmoid(1.5 * (0 - 2))
    assert RollingPercentile(form="released").update(0.0) == 0.0
    ours, released = RollingPercentile(), RollingPercentile(form="released")
    for v in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0):
        assert ours.update(v) == released.update(v)  # both sigmoid, then ranks
    assert ours.update(0.0) == released.update(0.0) == 0.0


def test_easy_threshold_released_waits_for_32_entropies():
    ours, released = EasyThreshold(), EasyThreshold(min_samples=32, cold_value=0.15)
    assert ours.value == 0.10 and released.value == 0.15
    for i in range(31):
        ours.update(0.5 + 0.01 * i)
        released.update(0.5 + 0.01 * i)
    values = [0.5 + 0.01 * i for i in range(31)]
    q1, q3 = np.percentile(values, [25, 75])
    assert ours.value == pytest.approx(q1 + 0.25 * (q3 - q1))
    assert released.value == 0.15
    released.update(0.81)
    q1, q3 = np.percentile(values + [0.81], [25, 75])
    assert released.value == pytest.approx(q1 + 0.25 * (q3 - q1))


def test_solver_rewards_bagel_token_f1():
    answers = ["red ball", "red", "blue", "red ball"]
    stats = vote_stats(answers)
    assert stats.majority == "red ball"
    assert token_f1("red", "red ball") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert solver_rewards(answers, [0] * 4, stats, "medium", form="bagel_f1") == pytest.approx([1.0, 2 / 3, 0.0, 1.0])
    unanimous = vote_stats(["red"] * 3)
    assert solver_rewards(["red"] * 3, [0] * 3, unanimous, "easy", form="bagel_f1") == [-1.0] * 3
    assert solver_rewards(answers, [0] * 4, stats, "unsolvable", form="bagel_f1") == [0.0] * 4
    # the ASG form on the same vote: p^0.7 * (+sc or -0.25 sc), no length penalty
    asg = solver_rewards(answers, [0] * 4, stats, "medium")
    assert asg[0] > 0 and asg[1] < 0 and asg[1] == asg[2]


def test_solver_rewards_released_informative_scale():
    from asg_kit.rewards import informativeness

    answers = ["3"] * 4 + ["4"] * 2 + ["5"]
    stats = vote_stats(answers)
    s = informativeness(stats)
    plain = solver_rewards(answers, [0] * 7, stats, "hard")
    # released: each reward times max(0.20, s) before the update; s carried twice
    assert plain[0] == pytest.approx((4 / 7) ** 0.7 * s)
    assert solver_rewards(answers, [0] * 7, stats, "hard", informative_scale=0.20) == pytest.approx([r * max(0.20, s) for r in plain])
    unanimous = vote_stats(["3"] * 7)  # s = 0.5 * exp(-0.675^2 / (2 * 0.525^2)) + 0 = 0.219: below a 0.30 floor
    assert informativeness(unanimous) == pytest.approx(0.5 * math.exp(-(0.675**2) / (2 * 0.525**2)))
    assert solver_rewards(["3"] * 7, [0] * 7, unanimous, "medium", informative_scale=0.30) == pytest.approx(
        [r * 0.30 for r in solver_rewards(["3"] * 7, [0] * 7, unanimous, "medium")]
    )


def r_sc_by_hand(stats):
    s = min(1.0, max(0.0, 0.5 * math.exp(-((stats.entropy - 0.675) ** 2) / (2 * 0.525**2)) + 0.5 * max(0.0, 1 - stats.margin / 0.9)))
    g = math.exp(-((stats.entropy - 0.9) ** 2) / (2 * 0.25**2))
    return max(-1.0, min(1.0, 0.9 * max(-1.0, min(1.0, 2 * s - 1)) + 0.1 * g))


def test_proposer_reward_released_order():
    unsolvable = vote_stats([str(i) for i in range(7)])
    assert difficulty_bucket(unsolvable, 0.10) == "unsolvable"
    assert proposer_reward(0.5, unsolvable, "unsolvable") == 0.0
    # released: STE primary overrides the unsolvable zero
    assert proposer_reward(0.5, unsolvable, "unsolvable", form="released") == pytest.approx(0.7 * 0.5 + 0.3 * r_sc_by_hand(unsolvable))
    assert proposer_reward(0.0, unsolvable, "unsolvable", form="released") == 0.0

    hard = vote_stats(["3"] * 4 + ["4"] * 2 + ["5"])
    assert difficulty_bucket(hard, 0.10) == "hard"
    # d_STE = 0: ours keeps the 0.30 weight, released gives r_SC its full weight
    assert proposer_reward(0.0, hard, "hard") == pytest.approx(0.3 * r_sc_by_hand(hard))
    assert proposer_reward(0.0, hard, "hard", form="released") == pytest.approx(r_sc_by_hand(hard))
    assert proposer_reward(0.6, hard, "hard", form="released") == pytest.approx(proposer_reward(0.6, hard, "hard"))

    easy = vote_stats(["red"] * 7)
    assert proposer_reward(0.0, easy, "easy") == 0.0
    # released, d_STE = 0: the unanimous "gotcha" 0.5 f is floored at -0.65 for an easy question
    assert proposer_reward(0.0, easy, "easy", form="released", greedy_answer="blue") == pytest.approx(-0.65)
    assert proposer_reward(0.0, easy, "easy", form="released", greedy_answer="blue", easy_floor=1.0) == pytest.approx(0.20)
    assert proposer_reward(0.9, easy, "easy", form="released") == proposer_reward(0.9, easy, "easy") == pytest.approx(0.20)


# ---- the Generator's group advantages ---------------------------------------------------------


def test_group_advantages_unbiased_std_as_vargpt():
    assert group_advantages([0.0, 1.0, 2.0]) == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert group_advantages([0.0, 1.0, 2.0], unbiased=True) == pytest.approx([-1.0, 0.0, 1.0])
    assert group_advantages([0.3, 0.3], unbiased=True) is None


# ---- the scorer and the training loop pass the switch on -----------------------------------------


@pytest.mark.janus
def test_generation_scorer_released_form_on_a_spec_without_questions():
    from asg_kit.adapters.registry import load_backbone
    from asg_kit.rewards.scorers import GenerationScorer, QAFidelityScorer

    judge = load_backbone("micro")
    spec = GenerationSpec("a red circle")
    image = solid(128, 32)
    assert QAFidelityScorer(judge).score([image], [spec])[0].s_fid == 0.0
    assert QAFidelityScorer(judge, form="released").score([image], [spec])[0].s_fid == 0.5
    scorer = GenerationScorer(judge, w_cyc=0.0, form="released")
    assert scorer.cycle is None and scorer.fidelity.form == "released"
    assert GenerationScorer(judge, form="released").cycle.temperature == 0.8
    # both images are solid: the released two-candidate rule gives each the set score, not 1
    scores = scorer.score(spec, [solid(100, 32), solid(200, 32)])
    assert [s.diversity for s in scores] == pytest.approx([0.4, 0.4], abs=1e-5)


@pytest.mark.janus
def test_training_loop_runs_with_released_rules_and_old_runs_resume(tmp_path):
    from asg_kit.adapters.tiny_janus import build_tiny_janus
    from asg_kit.micro.pool import write_pool
    from asg_kit.train.loop import TrainConfig, train

    model, processor = build_tiny_janus(seed=1)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    write_pool(3, tmp_path / "pool", seed=0)
    base = dict(backbone="janus", model=str(tmp_path / "model"), images=str(tmp_path / "pool"), lr=1e-3, seed=3,
                solver_max_new_tokens=4, proposer_max_new_tokens=5, spec_max_new_tokens=8, generator_candidates=2, spec_samples=1,
                checkpoint_every=1, spec_quality_min=0.0, alignment_min=0.0)  # fmt: skip
    run = tmp_path / "released"
    train(TrainConfig(**base, out=str(run), steps=5, reward_form="released"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["understanding"] * 3 + ["generation"] * 2
    assert all(-1.0 <= r["proposer_reward"] <= 1.0 for r in rows if "proposer_reward" in r)
    with pytest.raises(ValueError, match="reward_form"):
        train(TrainConfig(**base, out=str(tmp_path / "bad"), steps=1, reward_form="upstream"))
    # a run saved before reward_form existed resumes
    old = tmp_path / "old"
    train(TrainConfig(**base, out=str(old), steps=1, understanding_per_cycle=1, generation_per_cycle=0))
    for path in (old / "config.json", old / "checkpoint" / "state.json"):
        saved = json.loads(path.read_text())
        (saved.get("config", saved)).pop("reward_form")
        path.write_text(json.dumps(saved))
    train(TrainConfig(**base, out=str(old), steps=2, understanding_per_cycle=1, generation_per_cycle=0), resume=True)
    assert len((old / "metrics.jsonl").read_text().splitlines()) == 2
