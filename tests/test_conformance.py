"""The conformance checker on real adapters: the micro model and a tiny Janus pass every
check; Janus adapters with one behaviour broken are caught by the check named for it."""

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from asg_kit.adapters.conformance import CHECKS, check_backbone
from asg_kit.adapters.janus import JanusAdapter
from asg_kit.adapters.registry import load_backbone
from asg_kit.adapters.tiny_janus import build_tiny_janus
from asg_kit.cli import app

pytestmark = pytest.mark.janus
runner = CliRunner()


# Real adapters, each with one behaviour broken the way an adapter author could break it.


class RoleBlindScoring(JanusAdapter):
    """Teacher-forced log-probs always from the base model (the role is ignored)."""

    def score_completions(self, requests, completions, keep_logits=False):
        with self.role(None):
            return super().score_completions(requests, completions, keep_logits)


class ReferenceKeepsARole(JanusAdapter):
    """role(None) leaves the first role's adapter on instead of turning every adapter off."""

    def _activate(self, role):
        super()._activate(role if role is not None else self.roles[0])
        self._active = role


class BatchDependentSampling(JanusAdapter):
    """Drops each request's own seed, so a sample depends on its place in the batch."""

    def sample_answers(self, requests, max_new_tokens=96, seed=0):
        return super().sample_answers([dataclasses.replace(r, seed=None) for r in requests], max_new_tokens, seed)


class LeakyGeneratorLoss(JanusAdapter):
    """The Generator objective also scores the image tokens under the solver's adapter."""

    def generator_loss(self, rollout):
        own = super().generator_loss(rollout)
        with self.role("solver"):
            return own - self.generation_logprobs(rollout).mean()


class SmugglingPrompts(JanusAdapter):
    """Prompt text goes into the template untouched: image and turn markers become special tokens."""

    def _plain(self, text):
        return text


def tiny(cls=JanusAdapter):
    model, processor = build_tiny_janus(seed=0)
    return cls(model, processor)


def by_name(report):
    return {c.name: c for c in report.checks}


@pytest.fixture(scope="module")
def micro():
    return load_backbone("micro")


def test_micro_passes_every_check_and_leaves_the_backbone_as_it_was(micro):
    weights = {role: [p.detach().clone() for p in micro.trainable_parameters(role)] for role in micro.roles}
    report = check_backbone(micro)
    assert report.passed, [(c.name, c.gap, c.detail) for c in report.failed]
    names = set(by_name(report))
    assert {"behaviour_logprobs", "batch_invariance", "reference_is_base", "gradient_isolation[generator]", "peft_loading",
            "embeddings_role_invariant", "generator_objective_reaches_every_target", "generation_logprobs", "nan_logits_raise",
            "prompt_injection"} <= names  # fmt: skip
    assert by_name(report)["behaviour_logprobs"].gap <= 1e-4 and by_name(report)["behaviour_logprobs"].tolerance == 1e-4
    assert micro.active_role is None
    for role in micro.roles:
        for p, old in zip(micro.trainable_parameters(role), weights[role]):
            assert torch.equal(p, old) and p.grad is None


def test_tiny_janus_passes_every_check():
    report = check_backbone(tiny())
    assert report.passed, [(c.name, c.gap, c.detail) for c in report.failed]
    assert report.paradigm == "ar_tokens" and report.dtype == "float32"


@pytest.mark.parametrize(
    "broken, groups, caught",
    [
        (RoleBlindScoring, ("behaviour", "roles"), {"behaviour_logprobs", "roles_take_effect"}),
        (ReferenceKeepsARole, ("roles",), {"reference_is_base"}),
        (BatchDependentSampling, ("batch",), {"batch_invariance"}),
        (LeakyGeneratorLoss, ("generation",), {"generator_objective_isolation"}),
        (SmugglingPrompts, ("prompt_injection",), {"prompt_injection"}),
    ],
)
def test_a_broken_adapter_is_caught_by_the_named_check(broken, groups, caught):
    report = check_backbone(tiny(broken), only=groups)
    failed = {c.name for c in report.failed}
    assert caught <= failed, [(c.name, c.passed, c.gap) for c in report.checks]
    # The same adapter unbroken passes all of them (test_tiny_janus_passes_every_check).


def test_the_broken_generator_loss_leaks_into_the_solver_role():
    report = by_name(check_backbone(tiny(LeakyGeneratorLoss), only=("generation",)))
    assert report["generator_objective_isolation"].gap > 0
    assert "other roles 0," not in report["generator_objective_isolation"].detail


def test_something_that_is_no_backbone_fails_the_protocol_check():
    report = check_backbone(object())
    assert not report.passed and [c.name for c in report.checks] == ["protocol"]


def test_unknown_check_group_is_refused():
    with pytest.raises(ValueError, match="groups: " + ", ".join(CHECKS)):
        check_backbone(tiny(), only=("nonsense",))


# The command line.


def test_check_micro_prints_the_table_and_exits_0(tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["check", "--backbone", "micro", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "behaviour_logprobs" in result.output and "gradient_isolation[solver]" in result.output
    assert "all checks passed" in result.output and "FAIL" not in result.output
    import json

    saved = json.loads(out.read_text())
    assert saved["passed"] is True and saved["backbone"] == "micro" and len(saved["checks"]) >= 20


def test_save_tiny_then_model_round_trip(tmp_path):
    folder = tmp_path / "tiny-janus"
    result = runner.invoke(app, ["check", "--backbone", "janus", "--save-tiny", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    result = runner.invoke(app, ["check", "--backbone", "janus", "--model", str(folder)])
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output
    # The same folder is a checkpoint for everything else too.
    backbone = load_backbone("janus", model=str(folder))
    assert backbone.num_image_tokens == 16
    # --save-tiny never writes over a folder that holds something.
    result = runner.invoke(app, ["check", "--backbone", "janus", "--save-tiny", str(folder)])
    assert result.exit_code == 2 and "not empty" in result.output


def test_a_failing_check_exits_1(monkeypatch):
    from asg_kit.adapters import registry

    entry = {"adapter": f"{__name__}:RoleBlindScoring", "tiny": "asg_kit.adapters.tiny_janus:save_tiny_janus", "install": "-"}
    monkeypatch.setitem(registry.BACKBONES, "role-blind", entry)
    result = runner.invoke(app, ["check", "--backbone", "role-blind", "--tiny"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "behaviour_logprobs" in result.output.split("checks failed:")[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backbone", "dalle"], "registered backbones"),
        (["--backbone", "janus", "--tiny", "--model", "x"], "drop --model"),
        (["--backbone", "janus", "--tiny", "--upstream", "."], "runs no upstream checkout"),
        (["--backbone", "micro", "--upstream", "."], "runs no upstream checkout"),
        (["--backbone", "janus", "--model", "/nonexistent/janus"], "could not load a Janus checkpoint"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args, message):
    result = runner.invoke(app, ["check", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
