"""Label-free rewards of Ask, Solve, Generate as pure functions and small stateful trackers.

Every formula and default follows SPEC; each function's docstring states its formula.
"""

from asg_kit.rewards.answers import normalize_answer, polarity, soft_match, split_answer
from asg_kit.rewards.entropy import RollingPercentile, reduce_first_k, solver_token_entropy, token_entropy
from asg_kit.rewards.generation import contradiction, diversity_contributions, generation_reward, qa_item_score
from asg_kit.rewards.spec import GenerationSpec, QAPair, SanitizedSpec, sanitize_spec, spec_quality
from asg_kit.rewards.understanding import (
    QuestionScore,
    length_factor,
    proposer_reward,
    score_question,
    solver_rewards,
    UnderstandingScorer,
)
from asg_kit.rewards.votes import Bucket, EasyThreshold, VoteStats, difficulty_bucket, informativeness, vote_stats

__all__ = [
    "Bucket",
    "EasyThreshold",
    "GenerationSpec",
    "QAPair",
    "QuestionScore",
    "RollingPercentile",
    "SanitizedSpec",
    "UnderstandingScorer",
    "VoteStats",
    "contradiction",
    "difficulty_bucket",
    "diversity_contributions",
    "generation_reward",
    "informativeness",
    "length_factor",
    "normalize_answer",
    "polarity",
    "proposer_reward",
    "qa_item_score",
    "reduce_first_k",
    "sanitize_spec",
    "score_question",
    "soft_match",
    "solver_rewards",
    "solver_token_entropy",
    "spec_quality",
    "split_answer",
    "token_entropy",
    "vote_stats",
]
