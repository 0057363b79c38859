import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asg_kit.rewards import (
    EasyThreshold,
    difficulty_bucket,
    informativeness,
    normalize_answer,
    soft_match,
    split_answer,
    vote_stats,
)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Three.", "3"),
        ("The Red Cube!", "red cube"),
        ("Yep, it is", "yes"),
        ("NO.", "no"),
        ("false", "no"),
        ("right", "right"),
        ("A", "a"),
        ("1,000 apples", "1000 apples"),
        ("3.5", "3.5"),
        ("  twenty   two ", "20 2"),
        ("Ｂｌｕｅ", "blue"),
        ("one two three four five six seven eight nine ten", "1 2 3 4 5 6 7 8"),
        ("", ""),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_split_answer():
    assert split_answer("I think it is <answer>Blue</answer>") == ("Blue", 4)
    assert split_answer("<ANSWER> red </ANSWER> trailing") == ("red", 0)
    assert split_answer("reasoning here\nfinal") == ("final", 2)
    assert split_answer("cut off <answer>red") == ("red", 2)
    assert split_answer("   ") == ("", 0)


@pytest.mark.parametrize(
    "answer, expected, score",
    [
        ("Blue.", "blue", 1.0),
        ("101", "100", 1.0),
        ("104", "100", 0.7),
        ("119", "100", 0.4),
        ("150", "100", 0.0),
        ("0", "zero", 1.0),
        ("1", "0", 0.0),
        ("red cube", "cube", 0.8),
        ("cube", "the red cube", 0.8),
        ("big red", "red small", 1 / 3),
        ("circle", "square", 0.0),
        ("", "square", 0.0),
    ],
)
def test_soft_match(answer, expected, score):
    assert soft_match(answer, expected) == pytest.approx(score)


def test_vote_stats_worked_example():
    s = vote_stats(["3", "three", "3", "4", "four", "5", "The 3"])
    assert s.labels == ("3", "3", "3", "4", "4", "5", "3")
    assert s.shares == pytest.approx({"3": 4 / 7, "4": 2 / 7, "5": 1 / 7})
    assert list(s.shares) == ["3", "4", "5"]
    assert s.entropy == pytest.approx(0.9556999, abs=1e-6)
    assert (s.majority, s.majority_share, s.margin, s.n) == ("3", pytest.approx(4 / 7), pytest.approx(2 / 7), 7)


def test_vote_stats_ties_break_by_first_appearance_and_empty_fails():
    assert vote_stats(["b", "a", "a", "b"]).majority == "b"
    with pytest.raises(ValueError):
        vote_stats([])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["red", "blue", "3", "three", "yes", "no", "a cat", ""]), min_size=1, max_size=12))
def test_vote_stats_invariants(answers):
    s = vote_stats(answers)
    assert sum(s.shares.values()) == pytest.approx(1.0)
    unanimous = len(set(s.labels)) == 1
    assert (s.entropy == 0.0) == unanimous
    assert 0.0 <= s.entropy <= math.log(len(answers)) + 1e-12
    assert 0.0 <= s.margin <= s.majority_share <= 1.0
    assert s.majority_share == max(s.shares.values())
    assert s.shares[s.majority] == s.majority_share
    assert 0.0 <= informativeness(s) <= 1.0


def test_informativeness_worked_examples():
    mixed = vote_stats(["3", "3", "3", "4", "4", "5", "3"])
    # 0.5*exp(-(0.95570-0.675)^2/(2*0.525^2)) + 0.5*(1 - (2/7)/0.9)
    assert informativeness(mixed) == pytest.approx(0.43341 + 0.34127, abs=1e-4)
    unanimous = vote_stats(["blue"] * 7)
    assert informativeness(unanimous) == pytest.approx(0.5 * math.exp(-(0.675**2) / (2 * 0.525**2)), abs=1e-9)


def test_easy_threshold():
    tau = EasyThreshold()
    assert tau.value == 0.10  # no history: lower bound
    for h in [0.0, 0.2, 0.4, 0.6, 0.8]:
        tau.update(h)
    assert tau.value == pytest.approx(0.2 + 0.25 * 0.4)  # Q1 = 0.2, Q3 = 0.6
    low = EasyThreshold()
    low.update(0.0)
    assert low.value == 0.10
    high = EasyThreshold()
    high.update(5.0)
    assert high.value == 1.2
    tau.update(float("nan"))
    assert len(tau.values) == 5
    clone = EasyThreshold()
    clone.load_state_dict(tau.state_dict())
    assert clone.value == tau.value
    rolled = EasyThreshold(window=2)
    for h in [9.0, 0.3, 0.5]:
        rolled.update(h)
    assert list(rolled.values) == [0.3, 0.5]


@pytest.mark.parametrize(
    "answers, tau, bucket",
    [
        (["blue"] * 7, 0.1, "easy"),  # f = 1
        (["a", "a", "a", "a", "a", "a", "b"], 0.1, "easy"),  # f = 6/7 >= 0.85
        (["a", "a", "a", "a", "b", "b", "c"], 1.0, "easy"),  # H = 0.956 <= tau
        (list("abcdefg"), 0.1, "unsolvable"),  # f = 1/7
        (["3", "3", "3", "4", "4", "5", "3"], 0.1, "hard"),  # H 0.956, m 0.286
        (["a", "a", "a", "a", "a", "b", "b"], 0.1, "medium"),  # H 0.598
    ],
)
def test_difficulty_bucket(answers, tau, bucket):
    assert difficulty_bucket(vote_stats(answers), tau) == bucket
