"""Scores of generated images: per-question fidelity, contradiction, set diversity and the
combined generation reward R_G (SPEC section 3)."""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from asg_kit.rewards._math import clip01
from asg_kit.rewards.answers import Form, normalize_answer, polarity, soft_match
from asg_kit.rewards.votes import vote_stats


def qa_item_score(answers: Sequence[str], expected: str, match_weight: float = 0.7, form: Form = "asg-kit") -> float:
    """Fidelity of one spec question on one image, from the Solver's answers to it.

    ``0.7 * soft_match(majority, expected) + 0.3 * f`` (f = majority share). ``form``
    picks the answer normalisation (of the votes) and the soft-match rules
    (``"released"``: the released code's, see ``soft_match``).
    """
    stats = vote_stats([normalize_answer(a, form=form) for a in answers], normalize=False)
    return match_weight * soft_match(stats.majority, expected, form=form) + (1.0 - match_weight) * stats.majority_share


def contradiction(
    majorities: Sequence[str],
    expected: Sequence[str],
    over: Literal["yes_no", "all"] = "yes_no",
    form: Form = "asg-kit",
) -> float:
    """Share C of questions whose majority answer has the opposite yes/no polarity of the
    expected one.

    The denominator is the number of questions whose expected answer is yes/no
    (``over="yes_no"``, SPEC) or all questions (``over="all"``, the released code); 0 when
    it is empty. ``form`` picks the polarity rule (``"released"``: also "present"/"absent",
    "1"/"0", and anything starting with "yes"/"no", see ``polarity``).
    """
    if len(majorities) != len(expected):
        raise ValueError(f"{len(majorities)} answers but {len(expected)} expected answers")
    if form == "released":
        pairs = [(polarity(m, form=form), polarity(e, form=form)) for m, e in zip(majorities, expected)]
    else:
        pairs = [(polarity(normalize_answer(m, form=form)), polarity(normalize_answer(e))) for m, e in zip(majorities, expected)]
    flipped = sum(1 for got, want in pairs if got and want and got != want)
    total = sum(1 for _, want in pairs if want) if over == "yes_no" else len(pairs)
    return flipped / total if total else 0.0


def _thumbnails_and_pixels(images: Sequence, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Flattened grayscale thumbnails in [0, 1], and each image's RGB pixels as (N, 3) uint8."""
    gray, pixels = [], []
    for image in images:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        rgb = pil.convert("RGB")
        gray.append(np.asarray(rgb.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float64).ravel() / 255.0)
        pixels.append(np.asarray(rgb, dtype=np.uint8).reshape(-1, 3))
    return np.stack(gray), pixels


def _channel_histograms(pixels: np.ndarray, bins: int) -> np.ndarray:
    counts = np.stack([np.bincount(pixels[:, c].astype(np.int64) * bins // 256, minlength=bins) for c in range(3)]).astype(np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def _set_diversity(gray: np.ndarray, hists: np.ndarray, pixel_scale: float, hist_scale: float, pixel_weight: float) -> float:
    n = len(gray)
    if n < 2:
        return 0.0
    norms = np.linalg.norm(gray, axis=1)
    norms[norms == 0] = 1.0
    unit = gray / norms[:, None]
    cosine = unit @ unit.T
    upper = np.triu_indices(n, k=1)
    pixel = float(np.mean(1.0 - cosine[upper]))
    # Bhattacharyya (Hellinger) distance sqrt(1 - sum sqrt(p q)) per channel, channel mean.
    coeff = np.einsum("icb,jcb->ijc", np.sqrt(hists), np.sqrt(hists))
    distance = np.sqrt(np.clip(1.0 - coeff, 0.0, 1.0)).mean(axis=-1)
    colour = float(np.mean(distance[upper]))
    return pixel_weight * clip01(pixel / pixel_scale) + (1.0 - pixel_weight) * clip01(colour / hist_scale)


def diversity_contributions(
    images: Sequence,
    thumbnail: int = 96,
    bins: int = 32,
    pixel_scale: float = 0.30,
    hist_scale: float = 0.25,
    pixel_weight: float = 0.6,
    form: Form = "asg-kit",
) -> list[float]:
    """Leave-one-out contribution of each candidate to its set's diversity, in [0, 1].

    ``D(S) = 0.6 * clip01(mean pairwise (1 - cos) of 96x96 grayscale thumbnails / 0.30)
    + 0.4 * clip01(mean pairwise Bhattacharyya distance of 32-bin RGB histograms / 0.25)``;
    ``c_k = max(0, D(S) - D(S without k))``, divided by ``max_k c_k`` (all 0 when that is
    0). Images are PIL images or HxW(x3) uint8 arrays.

    Here the histogram distance is the per-channel Hellinger distance
    ``sqrt(1 - BC_c)``, ``BC_c = sum_b sqrt(p_cb q_cb)``, averaged over channels, on all
    pixels; grayscale thumbnails are bilinear. ``form="released"``, the released code's:
    thumbnails bicubic, histograms of a 64x64 bicubic thumbnail, distance
    ``1 - sum_c BC_c`` (three channel coefficients summed, so identical images score -2 and
    the term is clamped to 0 unless the colours barely overlap); a set of one image has
    ``D = 0.5``; with exactly two candidates both get ``clip01(D(S))`` instead of their
    leave-one-out share.
    """
    n = len(images)
    if n == 0:
        return []
    if form == "released":
        return _released_contributions(images, thumbnail, bins, pixel_scale, hist_scale, pixel_weight)
    if form != "asg-kit":
        raise ValueError(f"form must be 'asg-kit' or 'released', got {form!r}")
    gray, pixels = _thumbnails_and_pixels(images, thumbnail)
    hists = np.stack([_channel_histograms(p, bins) for p in pixels])
    whole = _set_diversity(gray, hists, pixel_scale, hist_scale, pixel_weight)
    contributions = []
    for k in range(n):
        rest = [i for i in range(n) if i != k]
        contributions.append(max(0.0, whole - _set_diversity(gray[rest], hists[rest], pixel_scale, hist_scale, pixel_weight)))
    top = max(contributions)
    return [c / top if top > 0 else 0.0 for c in contributions]


def _released_set_diversity(images: Sequence[Image.Image], thumbnail: int, bins: int, pixel_scale: float, hist_scale: float, pixel_weight: float) -> float:
    if len(images) <= 1:
        return 0.5
    gray = np.stack([np.asarray(im.convert("L").resize((thumbnail, thumbnail), Image.BICUBIC), dtype=np.float32).ravel() / 255.0 for im in images])
    hists = []
    for im in images:
        rgb = np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC), dtype=np.float32) / 255.0
        channels = [np.histogram(rgb[:, :, c].ravel(), bins=bins, range=(0.0, 1.0))[0].astype(np.float32) for c in range(3)]
        hists.append(np.concatenate([h / max(1.0, float(h.sum())) for h in channels]))
    pixel, colour = [], []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            norms = float(np.linalg.norm(gray[i])) * float(np.linalg.norm(gray[j]))
            pixel.append(1.0 - float(np.dot(gray[i], gray[j])) / max(1e-8, norms))
            colour.append(1.0 - float(np.sum(np.sqrt(hists[i] * hists[j]))))
    return pixel_weight * clip01(float(np.mean(pixel)) / pixel_scale) + (1.0 - pixel_weight) * clip01(float(np.mean(colour)) / hist_scale)


def _released_contributions(images: Sequence, thumbnail: int, bins: int, pixel_scale: float, hist_scale: float, pixel_weight: float) -> list[float]:
    pils = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    n = len(pils)
    options = (thumbnail, bins, pixel_scale, hist_scale, pixel_weight)
    if n == 1:
        return [0.0]
    if n == 2:
        return [clip01(_released_set_diversity(pils, *options))] * 2
    whole = _released_set_diversity(pils, *options)
    contributions = [max(0.0, whole - _released_set_diversity(pils[:k] + pils[k + 1 :], *options)) for k in range(n)]
    top = max(contributions)
    return [min(1.0, c / top) if top >= 1e-8 else 0.0 for c in contributions]


def generation_reward(
    s_fid: float,
    s_cyc: float,
    s_div: float,
    contradiction: float,
    quality: float,
    w_fid: float = 0.65,
    w_cyc: float = 0.20,
    w_div: float = 0.10,
    w_contradiction: float = 0.20,
) -> float:
    """Generation reward of one candidate.

    ``R_G = q * clip01((0.65 * S_fid + 0.20 * S_cyc + 0.10 * S_div) / 0.95 - 0.20 * C)``,
    the divisor being the sum of the three weights. NaN in any input gives NaN.
    """
    values = (s_fid, s_cyc, s_div, contradiction, quality)
    if any(math.isnan(v) for v in values):
        return math.nan
    mix = (w_fid * s_fid + w_cyc * s_cyc + w_div * s_div) / (w_fid + w_cyc + w_div)
    return quality * clip01(mix - w_contradiction * contradiction)
