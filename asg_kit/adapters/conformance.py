"""One executable definition of a conforming backbone: ``check_backbone`` runs named checks
against any ``UnifiedBackbone`` and reports each one passed or failed with its measured gap.

The checks use only the protocol (plus the two hooks of ``ConformanceHooks``), so they hold
every backbone to the same contract whatever its paradigm. They run on a few tokens and tiny
images: seconds on the micro model. Role weights are made distinct from each other and from
the base model for the duration (random LoRA weights), because freshly initialised LoRA is
the identity and would hide a role mix-up; everything is restored afterwards (weights,
active role, gradients).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from asg_kit.adapters.base import AnswerRequest, NonFiniteLogits, UnifiedBackbone

# Largest accepted gap per quantity and weights dtype. Log-probs and entropies compare a
# KV-cached decode with one teacher-forced forward (different kernels, same math); a
# round trip through save/load must reproduce the outputs up to kernel noise.
TOLERANCES: dict[str, dict[torch.dtype, float]] = {
    "logprob": {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05},
    "entropy": {torch.float32: 1e-4, torch.bfloat16: 0.25, torch.float16: 0.05},
    "round_trip": {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3},
    "unit_norm": {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3},
    "embedding": {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-3},
}

# Prompts in plain words (the tiny tokenizers know them); a new token or two is enough.
PROMPTS = ("what color is the circle ?", "how many objects are there ?", "what shape is on the left ?", "describe the image .")
IMAGE_PROMPTS = ("a red circle", "two blue squares")


@dataclass
class CheckResult:
    """One named check: passed or not, its measured gap against its tolerance (``None``
    where the check counts rather than measures), and a one-line detail."""

    name: str
    passed: bool
    gap: float | None = None
    tolerance: float | None = None
    detail: str = ""


@dataclass
class ConformanceReport:
    backbone: str
    paradigm: str
    dtype: str
    device: str
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def to_json(self) -> dict:
        return {
            "backbone": self.backbone, "paradigm": self.paradigm, "dtype": self.dtype, "device": self.device,
            "passed": self.passed, "seconds": round(self.seconds, 2),
            "checks": [{"name": c.name, "passed": c.passed, "gap": c.gap, "tolerance": c.tolerance, "detail": c.detail} for c in self.checks],
        }  # fmt: skip


def tiny_image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _max_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max()) if a.numel() else 0.0


def _modules(backbone) -> list[torch.nn.Module]:
    return [value for value in vars(backbone).values() if isinstance(value, torch.nn.Module)]


def _dtype_and_device(backbone) -> tuple[torch.dtype, torch.device]:
    dtype, device = getattr(backbone, "dtype", None), getattr(backbone, "device", None)
    if not isinstance(dtype, torch.dtype) or device is None:
        first = next(p for m in _modules(backbone) for p in m.parameters())
        dtype, device = dtype if isinstance(dtype, torch.dtype) else first.dtype, device or first.device
    return dtype, torch.device(device)


class _Checker:
    def __init__(self, backbone: UnifiedBackbone, seed: int, max_new_tokens: int) -> None:
        self.b = backbone
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.dtype, self.device = _dtype_and_device(backbone)
        self.roles = tuple(backbone.roles)
        self.role_parameters = {role: list(backbone.trainable_parameters(role)) for role in self.roles}
        role_ids = {id(p) for ps in self.role_parameters.values() for p in ps}
        seen: set[int] = set()
        self.frozen = []
        for module in _modules(backbone):
            for p in module.parameters():
                if id(p) not in role_ids and id(p) not in seen:
                    seen.add(id(p))
                    self.frozen.append(p)
        self.images = [tiny_image(seed + 1), tiny_image(seed + 2)]

    def tolerance(self, kind: str) -> float:
        return TOLERANCES[kind].get(self.dtype, TOLERANCES[kind][torch.bfloat16])

    # -- helpers -------------------------------------------------------------------------

    def requests(self, temperature: float = 1.0, seeds: bool = True) -> list[AnswerRequest]:
        """Two prompts on one image, one on another image, one without an image."""
        images = [self.images[0], self.images[0], self.images[1], None]
        return [
            AnswerRequest(image, prompt, temperature=temperature, top_p=1.0, seed=self.seed + 100 + i if seeds else None)
            for i, (image, prompt) in enumerate(zip(images, PROMPTS))
        ]

    def score(self, role: str | None, requests=None, completions=None) -> torch.Tensor:
        requests = requests or self.requests()
        completions = completions or self.completions
        with torch.no_grad(), self.b.role(role):
            return self.b.score_completions(requests, completions).logprobs.float().cpu()

    @property
    def completions(self) -> list[list[int]]:
        if not hasattr(self, "_completions"):
            with self.b.role(self.roles[0]):
                samples = self.b.sample_answers(self.requests(), max_new_tokens=self.max_new_tokens, seed=self.seed)
            self._completions = [s.token_ids for s in samples]
        return self._completions

    def clear_grads(self) -> None:
        for p in [*self.frozen, *(p for ps in self.role_parameters.values() for p in ps)]:
            p.grad = None

    def gradient_split(self, role: str) -> tuple[list[float], dict[str, float], int]:
        """After a backward: gradient norm of each of ``role``'s weights, total gradient on
        each other role, and how many frozen base weights received any gradient."""
        def norm(p):
            return 0.0 if p.grad is None else float(p.grad.detach().float().norm())

        own = [norm(p) for p in self.role_parameters[role]]
        others = {r: sum(norm(p) for p in ps) for r, ps in self.role_parameters.items() if r != role}
        frozen = sum(1 for p in self.frozen if p.grad is not None and bool(p.grad.detach().abs().sum() > 0))
        return own, others, frozen

    def generator_loss(self, rollout) -> torch.Tensor:
        if hasattr(self.b, "generator_loss"):
            return self.b.generator_loss(rollout)
        if self.b.generation_paradigm == "ar_tokens":
            return -self.b.generation_logprobs(rollout).mean()
        raise NotImplementedError(f"a {self.b.generation_paradigm!r} backbone must implement generator_loss(rollout) (see ConformanceHooks)")

    # -- the checks ----------------------------------------------------------------------

    def check_protocol(self):
        missing = [name for name in ("name", "generation_paradigm", "roles", *_protocol_methods()) if not hasattr(self.b, name)]
        problems = missing[:]
        if self.b.generation_paradigm not in ("ar_tokens", "rectified_flow", "diffusion"):
            problems.append(f"paradigm {self.b.generation_paradigm!r}")
        if "generator" not in self.roles:
            problems.append("no generator role")
        if any(not ps for ps in self.role_parameters.values()):
            problems.append("a role without trainable weights")
        yield CheckResult("protocol", not problems, float(len(problems)), 0.0, "; ".join(problems) or f"roles {', '.join(self.roles)}")

    def check_behaviour_logprobs(self):
        requests = self.requests()
        role = self.roles[1 % len(self.roles)]
        with self.b.role(role):
            samples = self.b.sample_answers(requests, max_new_tokens=self.max_new_tokens, seed=self.seed)
            with torch.no_grad():
                scores = self.b.score_completions(requests, [s.token_ids for s in samples])
        lp_gap = ent_gap = 0.0
        for row, sample in enumerate(samples):
            n = len(sample.token_ids)
            lp_gap = max(lp_gap, _max_gap(scores.logprobs[row, :n], sample.logprobs))
            ent_gap = max(ent_gap, _max_gap(scores.entropies[row, :n], sample.entropies))
        tokens = sum(len(s.token_ids) for s in samples)
        lp_tol, ent_tol = self.tolerance("logprob"), self.tolerance("entropy")
        yield CheckResult("behaviour_logprobs", lp_gap <= lp_tol, lp_gap, lp_tol, f"sample_answers vs score_completions, role {role}, {tokens} tokens")
        yield CheckResult("behaviour_entropies", ent_gap <= ent_tol, ent_gap, ent_tol, f"per-step entropies, {tokens} tokens")

    def check_batch_invariance(self):
        requests = self.requests()
        role = self.roles[1 % len(self.roles)]
        with self.b.role(role):
            together = self.b.sample_answers(requests, max_new_tokens=self.max_new_tokens, seed=self.seed)
            again = self.b.sample_answers(requests, max_new_tokens=self.max_new_tokens, seed=self.seed)
            alone = [self.b.sample_answers([r], max_new_tokens=self.max_new_tokens, seed=self.seed)[0] for r in requests]
            # Hot enough that a confident real model still varies within a few tokens.
            unseeded = self.requests(temperature=2.0, seeds=False)
            length = max(self.max_new_tokens, 8)
            first = self.b.sample_answers(unseeded, max_new_tokens=length, seed=self.seed)
            others = [self.b.sample_answers(unseeded, max_new_tokens=length, seed=self.seed + 1000 * k) for k in (1, 2, 3)]
        differ = sum(a.token_ids != b.token_ids for a, b in zip(together, alone))
        yield CheckResult("batch_invariance", differ == 0, float(differ), 0.0, f"requests whose tokens change inside a batch of {len(requests)} (2 images, 1 text-only)")
        repeat = sum(a.token_ids != b.token_ids for a, b in zip(together, again))
        yield CheckResult("seed_repeats", repeat == 0, float(repeat), 0.0, "requests whose tokens change for the same seed")
        changed = sum(any(a.token_ids != b.token_ids for a, b in zip(first, other)) for other in others)
        yield CheckResult("seed_varies", changed > 0, float(changed), None, f"of {len(others)} other seeds, how many change the samples at temperature 2 (needs > 0)")

    def check_roles(self):
        base = self.score(None)
        with torch.no_grad():
            noise = torch.Generator().manual_seed(self.seed + 7)
            saved = {r: [p.detach().clone() for p in ps] for r, ps in self.role_parameters.items()}
            try:
                for ps in self.role_parameters.values():
                    for p in ps:
                        p.add_(torch.randn(p.shape, generator=noise).to(p.device, p.dtype) * 0.02)
                moved_base = self.score(None)
            finally:
                for r, ps in self.role_parameters.items():
                    for p, old in zip(ps, saved[r]):
                        p.copy_(old)
        gap = _max_gap(base, moved_base)
        yield CheckResult("reference_is_base", gap == 0.0, gap, 0.0, "role(None) scores change when every role's weights change")
        # A Generator whose LoRA text never passes through shows its effect in the
        # Generator objective instead of in text scores.
        by_role = {r: self.score(r) for r in self.text_roles}
        gaps = [_max_gap(by_role[r], base) for r in self.text_roles]
        if "generator" not in self.text_roles:
            with torch.no_grad():
                rollout = self.b.generate_images(list(IMAGE_PROMPTS[:1]), n=1, seed=self.seed).rollout
                losses = {}
                for role in (None, "generator"):
                    with self.b.role(role):
                        losses[role] = float(self.generator_loss(rollout))
            gaps.append(abs(losses["generator"] - losses[None]))
        distinct = min(gaps)
        yield CheckResult("roles_take_effect", distinct > 0.0, distinct, None, "smallest change of the teacher-forced log-probs between a role and role(None) (needs > 0)")

    @property
    def text_roles(self) -> tuple[str, ...]:
        """The roles whose LoRA text passes through: all of them, unless the backbone's
        Generator LoRA sits where text never goes (``generator_on_text = False``: BAGEL's
        generation expert); that Generator is checked through its objective alone."""
        if getattr(self.b, "generator_on_text", True):
            return self.roles
        return tuple(r for r in self.roles if r != "generator")

    def check_gradient_isolation(self):
        requests, completions = self.requests(), self.completions
        for role in self.text_roles:
            self.clear_grads()
            with self.b.role(role):
                loss = -self.b.score_completions(requests, completions).logprobs.sum()
            loss.backward()  # after the block: a training loop may backpropagate later
            own, others, frozen = self.gradient_split(role)
            self.clear_grads()
            leaked = sum(others.values())
            ok = sum(own) > 0 and leaked == 0 and frozen == 0
            detail = f"own {sum(own):.3g}, other roles {leaked:.3g}, frozen weights with gradient {frozen}"
            yield CheckResult(f"gradient_isolation[{role}]", ok, leaked + frozen, 0.0, detail)

    def check_save_load(self):
        before = {r: self.score(r) for r in self.roles}
        saved = {r: [p.detach().clone() for p in ps] for r, ps in self.role_parameters.items()}
        with tempfile.TemporaryDirectory(prefix="asgkit-check-") as folder:
            self.b.save_roles(folder)
            try:
                with torch.no_grad():
                    for ps in self.role_parameters.values():
                        for p in ps:
                            p.mul_(-1.0).add_(0.01)  # anything else, so that loading has to restore it
                self.b.load_roles(folder)
                after = {r: self.score(r) for r in self.roles}
            finally:
                with torch.no_grad():
                    for r, ps in self.role_parameters.items():
                        for p, old in zip(ps, saved[r]):
                            p.copy_(old)
            gap = max(_max_gap(before[r], after[r]) for r in self.roles)
            tolerance = self.tolerance("round_trip")
            yield CheckResult("save_load_roles", gap <= tolerance, gap, tolerance, "scores of every role after save_roles, overwrite, load_roles")
            yield self._peft_loading(Path(folder), saved)

    def _peft_loading(self, folder: Path, saved: dict) -> CheckResult:
        """Each role folder loads with ``peft.PeftModel.from_pretrained`` onto a weightless
        (meta-device) copy of the base model, with exactly that role's LoRA weights, and its
        tensors equal the role's. The weightless copy keeps this cheap for a 7B model; peft
        leaves the loaded LoRA tensors on the base's (meta) device, so their values are read
        from the files ``from_pretrained`` read. A base that cannot be built from its config
        alone (upstream models with sub-models) is checked with ``PeftModel.load_adapter``,
        the same loader, into the live model under a scratch name that is deleted after."""
        from peft import PeftModel
        from peft.utils import load_peft_weights

        peft_models = [m for m in _modules(self.b) if isinstance(m, PeftModel)]
        if not peft_models:
            return CheckResult("peft_loading", False, None, None, "no peft.PeftModel among the backbone's modules")
        live = peft_models[0]
        base = live.get_base_model()
        try:
            with torch.device("meta"):
                type(base)(base.config)
            weightless = True
        except Exception:
            weightless = False
        named = dict(live.named_parameters())
        worst, mismatched = 0.0, []
        for role in self.roles:
            expected = {name: p for name, p in named.items() if "lora_" in name and f".{role}." in name}
            if weightless:
                with torch.device("meta"):
                    skeleton = type(base)(base.config)
                loaded = PeftModel.from_pretrained(skeleton, str(folder / role), adapter_name=role, low_cpu_mem_usage=True)
                names = {name for name, _ in loaded.named_parameters() if "lora_" in name}
                del loaded, skeleton
            else:
                scratch = f"conformance_{role}"
                live.load_adapter(str(folder / role), adapter_name=scratch)
                names = {name.replace(f".{scratch}.", f".{role}.") for name, _ in live.named_parameters() if f".{scratch}." in name}
                live.delete_adapter(scratch)
            if names != set(expected):
                mismatched.append(role)
                continue
            files = load_peft_weights(str(folder / role), device="cpu")
            for name, p in expected.items():
                key = name.replace(f".{role}.", ".")
                if key not in files:
                    mismatched.append(role)
                    break
                worst = max(worst, _max_gap(files[key], p))
        how = "from_pretrained on a weightless base" if weightless else "load_adapter into the live model"
        detail = f"roles whose folder holds other weights: {', '.join(mismatched)}" if mismatched else f"{len(self.roles)} role folders ({how}), weights equal"
        return CheckResult("peft_loading", not mismatched and worst == 0.0, worst, 0.0, detail)

    def check_embeddings(self):
        texts = list(PROMPTS[:2])
        results = {}
        for role in (None, *self.roles):
            with torch.no_grad(), self.b.role(role):
                results[role] = (self.b.embed_text(texts).float().cpu(), self.b.embed_image_text(self.images, texts).float().cpu())
        text, joint = results[None]
        norm_gap = max(float((text.norm(dim=-1) - 1).abs().max()), float((joint.norm(dim=-1) - 1).abs().max()))
        tolerance = self.tolerance("unit_norm")
        yield CheckResult("embeddings_unit_norm", norm_gap <= tolerance, norm_gap, tolerance, f"embed_text {tuple(text.shape)}, embed_image_text {tuple(joint.shape)}")
        role_gap = max(max(_max_gap(results[r][0], text), _max_gap(results[r][1], joint)) for r in self.roles)
        tolerance = self.tolerance("embedding")
        yield CheckResult("embeddings_role_invariant", role_gap <= tolerance, role_gap, tolerance, "embeddings under each role vs role(None)")

    def check_generation(self):
        prompts, n = list(IMAGE_PROMPTS), 2
        with self.b.role("generator"):
            first = self.b.generate_images(prompts, n=n, guidance_scale=3.0, temperature=1.0, seed=self.seed)
            again = self.b.generate_images(prompts, n=n, guidance_scale=3.0, temperature=1.0, seed=self.seed)
            other = self.b.generate_images(prompts, n=n, guidance_scale=3.0, temperature=1.0, seed=self.seed + 1000)
        shape = [len(row) for row in first.images]
        pil = all(isinstance(image, Image.Image) for row in first.images for image in row)
        miscount = sum(abs(k - n) for k in shape) + abs(len(shape) - len(prompts))
        yield CheckResult("generate_images_count", miscount == 0 and pil, float(miscount), 0.0, f"{len(prompts)} prompts x n={n}: {shape} PIL={pil}")

        def pixels(result):
            return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for row in result.images for image in row])

        repeat = float(np.abs(pixels(first) - pixels(again)).max())
        yield CheckResult("generate_images_seed_repeats", repeat == 0.0, repeat, 0.0, "largest pixel change for the same seed")
        change = float(np.abs(pixels(first) - pixels(other)).max())
        yield CheckResult("generate_images_seed_varies", change > 0.0, change, None, "largest pixel change for another seed (needs > 0)")

        self.clear_grads()
        with self.b.role("generator"):
            loss = self.generator_loss(first.rollout)
        loss.backward()
        own, others, frozen = self.gradient_split("generator")
        self.clear_grads()
        leaked = sum(others.values())
        yield CheckResult("generator_objective_isolation", leaked == 0 and frozen == 0 and sum(own) > 0, leaked + frozen, 0.0,
                          f"own {sum(own):.3g}, other roles {leaked:.3g}, frozen weights with gradient {frozen}")  # fmt: skip
        silent = sum(1 for g in own if g == 0)
        yield CheckResult("generator_objective_reaches_every_target", silent == 0, float(silent), 0.0, f"generator LoRA weights without gradient, of {len(own)}")

        if self.b.generation_paradigm == "ar_tokens":
            with self.b.role("generator"):
                plain = self.b.generate_images(prompts[:1], n=n, guidance_scale=1.0, temperature=1.0, seed=self.seed)
                with torch.no_grad():
                    forced = self.b.generation_logprobs(plain.rollout)
            gap = _max_gap(forced, plain.rollout.behaviour_logprobs)
            tolerance = self.tolerance("logprob")
            yield CheckResult("generation_logprobs", gap <= tolerance, gap, tolerance, f"teacher-forced vs behaviour, guidance 1, temperature 1, {plain.rollout.tokens.numel()} tokens")

    def check_non_finite(self):
        failures = []
        saved = {r: [p.detach().clone() for p in ps] for r, ps in self.role_parameters.items()}
        try:
            with torch.no_grad():
                for ps in self.role_parameters.values():
                    for p in ps:
                        p.fill_(float("nan"))
            for what, call in (
                ("sample_answers", lambda: self.b.sample_answers(self.requests()[:1], max_new_tokens=2, seed=self.seed)),
                ("generate_images", lambda: self.b.generate_images(list(IMAGE_PROMPTS[:1]), n=1, seed=self.seed)),
            ):
                role = "generator" if what == "generate_images" else self.roles[0]
                try:
                    with self.b.role(role):
                        call()
                    failures.append(f"{what} returned")
                except NonFiniteLogits:
                    pass
                except Exception as error:  # the wrong error is a failure, not a crash of the checker
                    failures.append(f"{what} raised {type(error).__name__}")
        finally:
            with torch.no_grad():
                for r, ps in self.role_parameters.items():
                    for p, old in zip(ps, saved[r]):
                        p.copy_(old)
        yield CheckResult("nan_logits_raise", not failures, float(len(failures)), 0.0, "; ".join(failures) or "NonFiniteLogits from sample_answers and generate_images")

    def check_prompt_injection(self):
        if not (hasattr(self.b, "prompt_ids") and hasattr(self.b, "tokenizer")):
            yield CheckResult("prompt_injection", False, None, None, "needs the backbone's prompt_ids(text, with_image) and tokenizer (ConformanceHooks)")
            return
        tokenizer = self.b.tokenizer
        special = {index for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(token, "special", False)}
        special |= set(tokenizer.all_special_ids)
        special.discard(tokenizer.unk_token_id)
        clean = {with_image: self.b.prompt_ids("what is this ?", with_image) for with_image in (False, True)}
        # Every special token a clean prompt has (template, image slots) and every named one,
        # pasted into the text of both prompts.
        pasted = (set(clean[False]) | set(clean[True])) & special | (set(tokenizer.all_special_ids) - {tokenizer.unk_token_id})
        strings = sorted(s for s in {tokenizer.convert_ids_to_tokens(i) for i in pasted} if s)
        extra = 0
        for with_image, ids in clean.items():
            dirty = self.b.prompt_ids("what " + " ".join(strings) + " is this ?", with_image)
            extra += sum((Counter(i for i in dirty if i in special) - Counter(i for i in ids if i in special)).values())
        yield CheckResult("prompt_injection", extra == 0, float(extra), 0.0, f"special tokens added by {len(strings)} special-token strings pasted into prompt text")


def _protocol_methods() -> list[str]:
    return [
        "role", "trainable_parameters", "save_roles", "load_roles", "sample_answers", "score_completions",
        "caption", "embed_text", "embed_image_text", "generate_images", "generation_logprobs",
    ]  # fmt: skip


CHECKS: dict[str, Callable[[_Checker], Iterator[CheckResult]]] = {
    "protocol": _Checker.check_protocol,
    "behaviour": _Checker.check_behaviour_logprobs,
    "batch": _Checker.check_batch_invariance,
    "roles": _Checker.check_roles,
    "gradients": _Checker.check_gradient_isolation,
    "save_load": _Checker.check_save_load,
    "embeddings": _Checker.check_embeddings,
    "generation": _Checker.check_generation,
    "non_finite": _Checker.check_non_finite,
    "prompt_injection": _Checker.check_prompt_injection,
}


@contextmanager
def distinct_roles(checker: _Checker, scale: float = 0.02) -> Iterator[None]:
    """Every role's LoRA weights plus seeded noise for the block, then restored: fresh LoRA
    is the identity (B = 0), which would let a role mix-up pass unseen."""
    noise = torch.Generator().manual_seed(checker.seed)
    saved = {r: [p.detach().clone() for p in ps] for r, ps in checker.role_parameters.items()}
    try:
        with torch.no_grad():
            for ps in checker.role_parameters.values():
                for p in ps:
                    p.add_(torch.randn(p.shape, generator=noise).to(p.device, p.dtype) * scale)
        yield
    finally:
        with torch.no_grad():
            for r, ps in checker.role_parameters.items():
                for p, old in zip(ps, saved[r]):
                    p.copy_(old)
        checker.clear_grads()


def check_backbone(
    backbone: UnifiedBackbone,
    seed: int = 0,
    max_new_tokens: int = 4,
    only: Sequence[str] | None = None,
    progress: Callable[[str], None] = lambda name: None,
) -> ConformanceReport:
    """Run the conformance checks (``CHECKS``, or the groups named in ``only``) on
    ``backbone`` and return every result; a check that raises fails with the error as its
    detail. Tolerances per dtype: ``TOLERANCES``."""
    started = time.perf_counter()
    unknown = [name for name in only or () if name not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check group(s) {', '.join(unknown)}; groups: {', '.join(CHECKS)}")
    try:
        checker = _Checker(backbone, seed, max_new_tokens)
    except Exception as error:  # not even the roles and weights can be listed
        report = ConformanceReport(getattr(backbone, "name", type(backbone).__name__), str(getattr(backbone, "generation_paradigm", "?")), "?", "?")
        report.checks.append(CheckResult("protocol", False, None, None, f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]))
        return report
    report = ConformanceReport(
        backbone=getattr(backbone, "name", type(backbone).__name__),
        paradigm=str(getattr(backbone, "generation_paradigm", "?")),
        dtype=str(checker.dtype).replace("torch.", ""),
        device=str(checker.device),
    )
    with distinct_roles(checker):
        for group, run in CHECKS.items():
            if only and group not in only:
                continue
            progress(group)
            try:
                report.checks.extend(run(checker))
            except Exception as error:
                message = " ".join(str(error).split()) or type(error).__name__
                report.checks.append(CheckResult(group, False, None, None, f"{type(error).__name__}: {message}"[:300]))
    report.seconds = time.perf_counter() - started
    return report
