"""Scorers that ask a backbone: the Solver judging generated images (QA fidelity, cycle
captioning, the combined generation reward) and the understanding-step difficulty of an
unlabeled image. They work with any ``UnifiedBackbone`` and return full breakdowns: every
question, every Solver answer, every match, the caption, the cosines.

Work on one image is shared: all questions and samples on an image go to the backbone in
one ``sample_answers`` call, which encodes the image once and prefills the common prefix
once (``shared=False`` makes one call per question and sample, for comparison).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from PIL import Image

from asg_kit import prompts
from asg_kit.adapters.base import AnswerRequest, TextSample, UnifiedBackbone
from asg_kit.rewards._math import clip01
from asg_kit.rewards.answers import Form, normalize_answer, polarity, soft_match, split_answer
from asg_kit.rewards.entropy import RollingPercentile, reduce_first_k
from asg_kit.rewards.generation import contradiction, diversity_contributions, generation_reward
from asg_kit.rewards.spec import GenerationSpec, sanitize_spec, spec_quality
from asg_kit.rewards.votes import EasyThreshold, difficulty_bucket, vote_stats


def _sample(backbone: UnifiedBackbone, requests: list[AnswerRequest], max_new_tokens: int, shared: bool) -> list[TextSample]:
    if shared:
        return backbone.sample_answers(requests, max_new_tokens=max_new_tokens)
    return [backbone.sample_answers([r], max_new_tokens=max_new_tokens)[0] for r in requests]


@dataclass
class QuestionCheck:
    question: str
    expected: str
    answers: list[str]
    majority: str
    majority_share: float
    match: float
    score: float  # 0.7 * match + 0.3 * majority_share
    contradicts: bool


@dataclass
class FidelityResult:
    checks: list[QuestionCheck]
    s_fid: float  # mean of the checks' scores (0 with no question)
    contradiction: float


class QAFidelityScorer:
    """The Solver answers each spec question on each image ``samples`` times (temperature
    1.3, canonical framing); per question ``0.7 * soft_match(majority, expected) + 0.3 * f``;
    ``S_fid`` is their mean and ``C`` the share of yes/no questions answered the other way.

    ``form="released"``: the released code's answer normalisation, soft match and yes/no
    rule; ``C`` over all questions; a spec without questions has ``S_fid = 0.5``
    (docs/fidelity.md)."""

    def __init__(
        self,
        backbone: UnifiedBackbone,
        samples: int = 2,
        temperature: float = 1.3,
        role: str | None = "solver",
        max_new_tokens: int = 16,
        seed: int = 0,
        shared: bool = True,
        form: Form = "asg-kit",
    ) -> None:
        if form not in ("asg-kit", "released"):
            raise ValueError(f"form must be 'asg-kit' or 'released', got {form!r}")
        self.backbone, self.samples, self.temperature, self.role = backbone, samples, temperature, role
        self.max_new_tokens, self.seed, self.shared, self.form = max_new_tokens, seed, shared, form

    def score(self, images: Sequence[Image.Image], specs: Sequence[GenerationSpec], seeds: Sequence[int] | None = None) -> list[FidelityResult]:
        """``seeds``: one base seed per image (e.g. from its content), so that an image's
        answers do not depend on its position among ``images``; default: by position."""
        if len(images) != len(specs):
            raise ValueError(f"{len(images)} images but {len(specs)} specs")
        pairs = [sanitize_spec(spec).spec.qa for spec in specs]
        requests, owners = [], []
        for i, (image, qa) in enumerate(zip(images, pairs)):
            for j, pair in enumerate(qa):
                for k in range(self.samples):
                    seed = self.seed + 1000 * i + 10 * j + k if seeds is None else seeds[i] + 1000 * j + k
                    requests.append(AnswerRequest(image, prompts.solver_prompt(pair.question), self.temperature, seed=seed))
                    owners.append((i, j))
        with self.backbone.role(self.role):
            replies = _sample(self.backbone, requests, self.max_new_tokens, self.shared) if requests else []
        answers: dict[tuple[int, int], list[str]] = {}
        for owner, reply in zip(owners, replies):
            answers.setdefault(owner, []).append(split_answer(reply.text)[0])
        results = []
        for i, qa in enumerate(pairs):
            checks = []
            for j, pair in enumerate(qa):
                if self.form == "released":
                    stats = vote_stats([normalize_answer(a, form="released") for a in answers[(i, j)]], normalize=False)
                    got, want = polarity(stats.majority, form="released"), polarity(pair.expected, form="released")
                else:
                    stats = vote_stats(answers[(i, j)])
                    got, want = polarity(stats.majority), polarity(normalize_answer(pair.expected))
                match = soft_match(stats.majority, pair.expected, form=self.form)
                checks.append(
                    QuestionCheck(
                        question=pair.question,
                        expected=pair.expected,
                        answers=answers[(i, j)],
                        majority=stats.majority,
                        majority_share=stats.majority_share,
                        match=match,
                        score=0.7 * match + 0.3 * stats.majority_share,
                        contradicts=bool(got and want and got != want),
                    )
                )
            s_fid = sum(c.score for c in checks) / len(checks) if checks else (0.5 if self.form == "released" else 0.0)
            over = "all" if self.form == "released" else "yes_no"
            contra = contradiction([c.majority for c in checks], [c.expected for c in checks], over=over, form=self.form)
            results.append(FidelityResult(checks, s_fid, contra))
        return results


@dataclass
class CycleResult:
    caption: str
    cos_prompt_caption: float
    cos_image_prompt: float
    s_cyc: float


class CycleCaptionScorer:
    """``S_cyc = clip01(0.5 * cos(e(prompt), e(caption)) + 0.5 * cos(e_mm(image, probe),
    e(prompt)))``: the Solver captions the image; ``e`` and ``e_mm`` are the backbone's own
    base-model embeddings (no external CLIP)."""

    def __init__(self, backbone: UnifiedBackbone, role: str | None = "solver", max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> None:
        self.backbone, self.role, self.max_new_tokens, self.temperature, self.seed = backbone, role, max_new_tokens, temperature, seed

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[CycleResult]:
        if not images:
            return []
        with self.backbone.role(self.role):
            captions = self.backbone.caption(images, prompts.CAPTION, self.max_new_tokens, self.temperature, self.seed)
        prompt_embeddings = self.backbone.embed_text(list(texts))
        caption_embeddings = self.backbone.embed_text(captions)
        image_embeddings = self.backbone.embed_image_text(list(images), [prompts.EMBED_PROBE] * len(images))
        text_cos = (prompt_embeddings * caption_embeddings).sum(-1).tolist()
        image_cos = (image_embeddings * prompt_embeddings).sum(-1).tolist()
        return [
            CycleResult(caption, a, b, clip01(0.5 * a + 0.5 * b))
            for caption, a, b in zip(captions, text_cos, image_cos)
        ]


@dataclass
class ImageScore:
    prompt: str
    quality: float
    fidelity: FidelityResult | None
    cycle: CycleResult | None
    diversity: float
    reward: float
    spec: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        row = {
            "prompt": self.prompt,
            "reward": self.reward,
            "quality": self.quality,
            "s_fid": self.fidelity.s_fid if self.fidelity else None,
            "contradiction": self.fidelity.contradiction if self.fidelity else None,
            "s_cyc": self.cycle.s_cyc if self.cycle else None,
            "s_div": self.diversity,
            "spec": self.spec,
        }
        if self.cycle:
            row.update(caption=self.cycle.caption, cos_prompt_caption=self.cycle.cos_prompt_caption, cos_image_prompt=self.cycle.cos_image_prompt)
        if self.fidelity:
            row["questions"] = [asdict(check) for check in self.fidelity.checks]
        return row


class GenerationScorer:
    """The generation reward R_G of each candidate image of a prompt, with its breakdown.

    ``R_G = q * clip01((0.65 S_fid + 0.20 S_cyc + 0.10 S_div) / 0.95 - 0.20 C)``; a weight
    of 0 switches its term off (and its scorer is not run), e.g. ``w_cyc=0`` for the
    ablation without cycle consistency.

    ``form="released"``: where asg-kit's rules differ from the released code's, use the
    released ones (docs/fidelity.md): answer normalisation, soft match, yes/no rule and
    contradiction over all questions (``QAFidelityScorer``), spec quality, the diversity
    histogram distance and two-candidate rule, and a sampled caption (temperature 0.8,
    at most 64 tokens) instead of a greedy one of at most 32.
    """

    def __init__(
        self,
        backbone: UnifiedBackbone,
        samples: int = 2,
        temperature: float = 1.3,
        w_fid: float = 0.65,
        w_cyc: float = 0.20,
        w_div: float = 0.10,
        w_contradiction: float = 0.20,
        role: str | None = "solver",
        seed: int = 0,
        shared: bool = True,
        form: Form = "asg-kit",
    ) -> None:
        self.weights = {"w_fid": w_fid, "w_cyc": w_cyc, "w_div": w_div, "w_contradiction": w_contradiction}
        self.form = form
        self.fidelity = QAFidelityScorer(backbone, samples, temperature, role, seed=seed, shared=shared, form=form) if w_fid or w_contradiction else None
        caption = {"temperature": 0.8, "max_new_tokens": 64} if form == "released" else {}
        self.cycle = CycleCaptionScorer(backbone, role, seed=seed, **caption) if w_cyc else None

    def score(
        self,
        spec: GenerationSpec,
        images: Sequence[Image.Image],
        diversity_over: Sequence[Image.Image] | None = None,
        diversity: Sequence[float] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[ImageScore]:
        """Score ``images``, candidates of one prompt. Diversity is each image's share in
        the diversity of ``diversity_over`` (default: ``images``), which must contain them,
        unless ``diversity`` gives each image's share directly. ``seeds``: one base seed per
        image for the Solver's samples (default: by position)."""
        if not images:
            return []
        if diversity is None:
            group = list(diversity_over) if diversity_over is not None else list(images)
            contributions = diversity_contributions(group, form=self.form)
            by_identity = {id(image): c for image, c in zip(group, contributions)}
            diversity = [by_identity[id(image)] for image in images]
        quality = spec_quality(spec, form=self.form)
        fidelity = self.fidelity.score(images, [spec] * len(images), seeds) if self.fidelity else [None] * len(images)
        cycle = self.cycle.score(images, [spec.prompt] * len(images)) if self.cycle else [None] * len(images)
        pairs = [{"question": p.question, "expected": p.expected} for p in sanitize_spec(spec).spec.qa]
        scores = []
        for fid, cyc, div in zip(fidelity, cycle, diversity):
            reward = generation_reward(
                fid.s_fid if fid else 0.0,
                cyc.s_cyc if cyc else 0.0,
                div,
                fid.contradiction if fid else 0.0,
                quality,
                **self.weights,
            )
            scores.append(ImageScore(spec.prompt, quality, fid, cyc, div, reward, pairs))
        return scores


@dataclass
class AskedQuestion:
    """Steps 1-3 of the understanding step on one image: the Proposer's candidates, their
    greedy Solver screening (STE and its rank), the kept candidate, and the Solver's 7
    replies to it (the greedy decode first, then the temperature / top-p ladder)."""

    asked: list[TextSample]
    questions: list[str]
    greedy: list[TextSample]
    ste: list[float]
    ranks: list[float]
    chosen: int
    replies: list[TextSample]

    @property
    def question(self) -> str:
        return self.questions[self.chosen]


def ask_screen_solve(
    backbone: UnifiedBackbone,
    image: Image.Image,
    percentile: RollingPercentile,
    seed: int,
    candidates: int = 3,
    proposer_temperature: float = 1.0,
    target: float = 0.5,
    easy_quantile: float = 0.30,
    screen: bool = True,
    proposer_max_new_tokens: int = 384,
    solver_max_new_tokens: int = 96,
) -> AskedQuestion:
    """Ask K questions, screen each by one greedy decode's STE ranked in ``percentile``
    (not updated here), keep the one nearest ``target`` preferring ranks >= ``easy_quantile``
    (``screen=False``: keep the first), and answer it under the 7 framings."""
    with backbone.role("proposer"):
        asked = backbone.sample_answers(
            [AnswerRequest(image, prompts.PROPOSER_QUESTION, proposer_temperature, seed=seed + c) for c in range(candidates)],
            max_new_tokens=proposer_max_new_tokens,
        )
    questions = [prompts.parse_question(a.text) for a in asked]
    with backbone.role("solver"):
        greedy = backbone.sample_answers([AnswerRequest(image, prompts.solver_prompt(q), 0.0) for q in questions], solver_max_new_tokens)
    ste = [float(reduce_first_k(g.entropies[None])[0]) if len(g.entropies) else 0.0 for g in greedy]
    ranks = [percentile.rank(v) for v in ste]
    # Screening buckets by quantile: below easy_quantile counts as easy and loses the tie.
    chosen = min(range(len(questions)), key=lambda i: (ranks[i] < easy_quantile, abs(ranks[i] - target))) if screen else 0
    ladder = prompts.pps_ladder()
    with backbone.role("solver"):
        sampled = backbone.sample_answers(
            [AnswerRequest(image, prompts.solver_prompt(questions[chosen], f), t, p, seed=seed + 10 + f) for f, (t, p) in enumerate(ladder) if f > 0],
            solver_max_new_tokens,
        )
    return AskedQuestion(asked, questions, greedy, ste, ranks, chosen, [greedy[chosen], *sampled])


@dataclass
class DifficultyResult:
    question: str
    candidates: list[dict]
    answers: list[str]
    ste_raw: float
    d_ste: float
    entropy: float
    majority: str
    majority_share: float
    margin: float
    bucket: str


class DifficultyScorer:
    """How hard an unlabeled image is for the Solver, as the understanding step measures it
    (``ask_screen_solve``), then judged: vote statistics, d_STE and the bucket."""

    def __init__(
        self, backbone: UnifiedBackbone, candidates: int = 3, target: float = 0.5, easy_quantile: float = 0.30, proposer_temperature: float = 1.0, seed: int = 0
    ) -> None:
        self.backbone, self.seed = backbone, seed
        self.options = {"candidates": candidates, "target": target, "easy_quantile": easy_quantile, "proposer_temperature": proposer_temperature,
                        "proposer_max_new_tokens": 24, "solver_max_new_tokens": 16}  # fmt: skip
        self.percentile = RollingPercentile()
        self.easy = EasyThreshold()

    def replay(self, ste_raw: float, entropy: float) -> None:
        """Move the rolling windows as ``score`` did for an image measured earlier (its
        ``ste_raw`` and ``entropy``), e.g. to resume a run exactly from its written rows."""
        self.percentile.update(ste_raw)
        self.easy.update(entropy)

    def score(self, image: Image.Image, index: int = 0, seed: int | None = None) -> DifficultyResult:
        """``seed``: this image's own seed (e.g. from its content); default: by ``index``."""
        found = ask_screen_solve(self.backbone, image, self.percentile, self.seed + 100 * index if seed is None else seed, **self.options)
        candidates = [
            {"question": q, "ste_raw": v, "d_ste": d, "greedy_answer": split_answer(g.text)[0]}
            for q, v, d, g in zip(found.questions, found.ste, found.ranks, found.greedy)
        ]
        answers = [split_answer(r.text)[0] for r in found.replies]
        stats = vote_stats(answers)
        d_ste = self.percentile.update(found.ste[found.chosen])
        bucket = difficulty_bucket(stats, self.easy.value)
        self.easy.update(stats.entropy)
        return DifficultyResult(found.question, candidates, answers, found.ste[found.chosen], d_ste, stats.entropy, stats.majority, stats.majority_share, stats.margin, bucket)
