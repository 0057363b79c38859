"""Rewards of the understanding step: the Solver's per-sample rewards and the Proposer's
question reward (SPEC section 2)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

from asg_kit.rewards._math import clip, gaussian
from asg_kit.rewards.answers import Form, normalize_answer, split_answer
from asg_kit.rewards.entropy import RollingPercentile
from asg_kit.rewards.votes import Bucket, EasyThreshold, VoteStats, difficulty_bucket, informativeness, vote_stats


def length_factor(words_before: int, penalty: float = 0.10, tau: float = 6.0) -> float:
    """``1 - penalty * min(1, max(0, (w - tau) / tau))``: a mild cost for long preambles."""
    return 1.0 - penalty * min(1.0, max(0.0, (words_before - tau) / tau))


def solver_rewards(
    answers: Sequence[str],
    word_counts: Sequence[int],
    stats: VoteStats,
    bucket: Bucket | None = None,
    form: Literal["asg", "evolmm", "bagel_f1"] = "asg",
    gamma: float = 0.7,
    length_penalty: float = 0.10,
    length_tau: float = 6.0,
    minority_weight: float = 0.25,
    signal_floor: float = 1e-4,
    informative_scale: float | None = None,
) -> list[float]:
    """Per-sample Solver rewards.

    ASG (signed) form, with ``sc = max(1e-4, informativeness(stats))``:
    ``raw_i = +sc`` if a_i is the majority else ``-0.25 * sc`` (all ``-0.25 * sc`` when
    the bucket is "unsolvable"), and
    ``r_i = p(a_i)^0.7 * (1 - 0.10 * min(1, max(0, (w_i - 6) / 6))) * raw_i``.

    EvoLMM form: ``r_i = p(a_i)^0.7 * (1 - 0.10 * min(1, max(0, (w_i - 6) / 6)))``.

    ``informative_scale=0.20`` multiplies every ``r_i`` by ``max(0.20, s)`` as the released
    BLIP3o trainer does before its Solver update (so its reward carries s twice); default
    None: no scaling.

    BAGEL's released form (``"bagel_f1"``): ``r_i = F1(a_i, majority)``, the token F1 of
    the two normalised answers (1 when equal), negated for a unanimous vote (H_SC <= 1e-6,
    BAGEL's easy case) and 0 for "unsolvable"; no share or length weighting.

    ``answers`` are compared after ``normalize_answer``; ``word_counts`` are the words
    before each answer (``split_answer``). Skipping the update for easy and unsolvable
    questions is the training loop's gate, not this function's.
    """
    if len(answers) != len(word_counts):
        raise ValueError(f"{len(answers)} answers but {len(word_counts)} word counts")
    if form not in ("asg", "evolmm", "bagel_f1"):
        raise ValueError(f"form must be 'asg', 'evolmm' or 'bagel_f1', got {form!r}")
    if form == "bagel_f1":
        scores = [token_f1(normalize_answer(answer), stats.majority) for answer in answers]
        unanimous = stats.entropy <= 1e-6 or stats.majority_share >= 1.0
        rewards = [0.0] * len(answers) if bucket == "unsolvable" else [-abs(r) for r in scores] if unanimous else scores
    else:
        signal = max(signal_floor, informativeness(stats))
        rewards = []
        for answer, words in zip(answers, word_counts):
            label = normalize_answer(answer)
            weight = stats.shares.get(label, 0.0) ** gamma * length_factor(words, length_penalty, length_tau)
            if form == "evolmm":
                rewards.append(weight)
            elif bucket == "unsolvable" or label != stats.majority:
                rewards.append(-minority_weight * signal * weight)
            else:
                rewards.append(signal * weight)
    if informative_scale is not None:
        scale = max(informative_scale, informativeness(stats))
        rewards = [r * scale for r in rewards]
    return rewards


def token_f1(answer: str, reference: str) -> float:
    """F1 of the word multisets of two answers: ``2 P R / (P + R)`` with
    ``P = overlap / |answer|``, ``R = overlap / |reference|``; 1 when equal, 0 when either
    is empty."""
    if not answer or not reference:
        return 0.0
    if answer == reference:
        return 1.0
    a, r = answer.split(), reference.split()
    overlap = sum((Counter(a) & Counter(r)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(a), overlap / len(r)
    return 2.0 * precision * recall / (precision + recall)


def proposer_reward(
    d_ste: float,
    stats: VoteStats,
    bucket: Bucket,
    ste_weight: float = 0.70,
    sc_weight: float = 0.30,
    entropy_target: float = 0.90,
    entropy_width: float = 0.25,
    band_weight: float = 0.90,
    easy_cap: float = 0.20,
    form: Form = "asg-kit",
    greedy_answer: str | None = None,
    easy_floor: float = -0.65,
) -> float:
    """Reward of a Proposer question.

    ``g = exp(-(H_SC - 0.90)^2 / (2 * 0.25^2))``, ``band = clip(2 s - 1, -1, 1)`` with
    ``s = informativeness(stats)``, ``r_SC = clip(0.9 * band + 0.1 * g, -1, 1)``,
    ``R_P = 0.70 * d_STE + 0.30 * r_SC * [H_SC > 0]``; 0 for "unsolvable"; at most 0.20 for
    "easy".

    ``form="released"``, the order of the released BLIP3o code (without its extra shaping
    bonuses and penalties): when ``d_STE > 0`` STE is primary and
    ``R_P = 0.70 * d_STE + 0.30 * r_SC * [H_SC > 1e-6]`` whatever the bucket, unsolvable
    included; when ``d_STE = 0``: 0 for "unsolvable", ``0.5 f`` for a unanimous vote whose
    ``greedy_answer`` (normalised) differs from the majority, else ``r_SC`` at full weight,
    and at most ``easy_floor`` (-0.65) for "easy"; then "easy" (or H_SC < 1e-6) is capped
    at 0.20 and the result clipped to [-1, 1].
    """
    band = clip(2.0 * informativeness(stats) - 1.0, -1.0, 1.0)
    bump = gaussian(stats.entropy, entropy_target, entropy_width)
    r_sc = clip(band_weight * band + (1.0 - band_weight) * bump, -1.0, 1.0)
    if form == "released":
        return _released_proposer_reward(d_ste, stats, bucket, r_sc, ste_weight, sc_weight, easy_cap, greedy_answer, easy_floor)
    if form != "asg-kit":
        raise ValueError(f"form must be 'asg-kit' or 'released', got {form!r}")
    if bucket == "unsolvable":
        return 0.0
    reward = ste_weight * d_ste + (sc_weight * r_sc if stats.entropy > 0 else 0.0)
    if bucket == "easy" and not math.isnan(reward):
        reward = min(reward, easy_cap)
    return reward


def _released_proposer_reward(
    d_ste: float, stats: VoteStats, bucket: Bucket, r_sc: float, ste_weight: float, sc_weight: float,
    easy_cap: float, greedy_answer: str | None, easy_floor: float,
) -> float:
    if math.isnan(d_ste) or math.isnan(r_sc):
        return math.nan
    unanimous = stats.entropy < 1e-6 or stats.majority_share >= 1.0
    if d_ste > 0:
        reward = ste_weight * d_ste + (sc_weight * r_sc if stats.entropy > 1e-6 else 0.0)
    else:
        greedy = normalize_answer(greedy_answer) if greedy_answer else ""
        if bucket == "unsolvable":
            reward = 0.0
        elif unanimous and greedy and greedy != stats.majority:
            reward = 0.5 * stats.majority_share
        else:
            reward = r_sc
        if bucket == "easy":
            reward = min(reward, easy_floor)
    if bucket == "easy" or unanimous:
        reward = min(reward, easy_cap)
    return clip(reward, -1.0, 1.0)


@dataclass(frozen=True)
class QuestionScore:
    """Everything the understanding step derives from one question's Solver replies."""

    answers: tuple[str, ...]
    word_counts: tuple[int, ...]
    stats: VoteStats
    bucket: Bucket
    informativeness: float
    d_ste: float
    solver_rewards: tuple[float, ...]
    proposer_reward: float
    skip_reason: str | None

    @property
    def update_solver(self) -> bool:
        return self.skip_reason is None


def score_question(
    replies: Sequence[str],
    d_ste: float,
    tau_easy: float,
    form: Literal["asg", "evolmm", "bagel_f1"] = "asg",
    informative_scale: float | None = None,
    **bucket_options: float,
) -> QuestionScore:
    """Votes, bucket, Solver and Proposer rewards for one question's N Solver replies.

    The Solver update is gated off (``skip_reason``) for "easy" and "unsolvable" buckets;
    ``bucket_options`` go to ``difficulty_bucket`` (e.g. ``easy_share``);
    ``informative_scale`` to ``solver_rewards``.
    """
    split = [split_answer(reply) for reply in replies]
    answers = tuple(answer for answer, _ in split)
    words = tuple(count for _, count in split)
    stats = vote_stats(answers)
    bucket = difficulty_bucket(stats, tau_easy, **bucket_options)
    return QuestionScore(
        answers=answers,
        word_counts=words,
        stats=stats,
        bucket=bucket,
        informativeness=informativeness(stats),
        d_ste=d_ste,
        solver_rewards=tuple(solver_rewards(answers, words, stats, bucket, form=form, informative_scale=informative_scale)),
        proposer_reward=proposer_reward(d_ste, stats, bucket),
        skip_reason=f"{bucket} question" if bucket in ("easy", "unsolvable") else None,
    )


class UnderstandingScorer:
    """``score_question`` with the running state it needs across questions: the STE
    percentile window (d_STE) and the adaptive easy threshold (tau_easy).

    Each question is judged against the history before it, then added to it.
    """

    def __init__(
        self,
        percentile: RollingPercentile | None = None,
        easy: EasyThreshold | None = None,
        form: Literal["asg", "evolmm"] = "asg",
    ) -> None:
        self.percentile = percentile or RollingPercentile()
        self.easy = easy or EasyThreshold()
        self.form = form

    def score(self, replies: Sequence[str], ste_raw: float) -> QuestionScore:
        d_ste = self.percentile.update(ste_raw)
        result = score_question(replies, d_ste, self.easy.value, form=self.form)
        self.easy.update(result.stats.entropy)
        return result

    def state_dict(self) -> dict:
        return {"percentile": self.percentile.state_dict(), "easy": self.easy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.percentile.load_state_dict(state["percentile"])
        self.easy.load_state_dict(state["easy"])
