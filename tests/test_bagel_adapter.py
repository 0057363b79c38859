"""BAGEL on a tiny random-weight instance of the real upstream classes, written as a
checkpoint folder in the released layout and loaded through the adapter's real path.

Needs the BAGEL environment (``pip install -e '.[bagel]'``) and ``$ASGKIT_UPSTREAM/Bagel``;
the flow-loss math at the top runs everywhere."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from asg_kit.train.losses import (
    advantage_weighted_flow_loss,
    flow_matching_error,
    gaussian_logprob,
    gaussian_mean_kl,
    sde_step,
    sde_transitions,
    velocity_drift,
)

# ---- the rectified-flow update's pieces, by hand -----------------------------------------


def test_flow_matching_error_and_drift_by_hand():
    velocity = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    target = torch.tensor([[[0.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 3.0]]])
    # sample 0: (1 + 4 + 0 + 4) / 4 = 2.25; sample 1: (0 + 0 + 0 + 4) / 4 = 1
    assert flow_matching_error(velocity, target).tolist() == pytest.approx([2.25, 1.0])
    reference = torch.ones(2, 2, 2, requires_grad=True)
    # sample 0: (0 + 1 + 1 + 1) / 4 = 0.75; sample 1: 0
    drift = velocity_drift(velocity, reference)
    assert drift.tolist() == pytest.approx([0.75, 0.0])
    drift.sum().backward()
    assert reference.grad is None  # the reference is a constant


def test_advantage_weighted_flow_loss_by_hand():
    advantage = torch.tensor([1.224745, 0.0, -1.224745])  # z-scored rewards (1, 2, 3) reversed
    error = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    drift = torch.tensor([0.1, 0.2, 0.3])
    loss = advantage_weighted_flow_loss(advantage, error, drift, beta=0.5)
    # (1.224745 * 0.5 + 0 - 1.224745 * 2 + 0.5 * 0.6) / 3
    assert loss.item() == pytest.approx((1.224745 * 0.5 - 1.224745 * 2.0 + 0.3) / 3)
    loss.backward()
    # d loss / d FM_k = A_k / L: a good candidate's error is pushed down, a bad one's up
    assert error.grad.tolist() == pytest.approx([1.224745 / 3, 0.0, -1.224745 / 3])


def test_sde_step_by_hand():
    x, v = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    # x0 = x - t v = (0.75, 2.5); score = -(x - (1 - t) x0) / t^2 = (-2.5, -3.0)
    # mean = x - (v - eta^2 / 2 * score) dt = (1 - 0.095, 2 + 0.046); std = 0.6 sqrt(0.1)
    mean, std = sde_step(x, 0.5, 0.1, v, 0.6)
    assert mean.tolist()[0] == pytest.approx([0.905, 2.046]) and float(std) == pytest.approx(0.6 * math.sqrt(0.1))
    ode, zero = sde_step(x, 0.5, 0.1, v, 0.0)
    assert ode.tolist()[0] == pytest.approx([0.95, 2.1]) and float(zero) == 0.0  # the Euler step


def test_gaussian_logprob_transitions_and_kl_by_hand():
    mean = torch.zeros(1, 2)
    # at the mean: -log(std) - log(2 pi) / 2; one std away adds -1/2 (averaged over elements)
    assert gaussian_logprob(mean, mean, 0.5).item() == pytest.approx(-math.log(0.5) - 0.5 * math.log(2 * math.pi))
    assert gaussian_logprob(torch.tensor([[0.5, 0.0]]), mean, 0.5).item() == pytest.approx(-math.log(0.5) - 0.5 * math.log(2 * math.pi) - 0.25)
    # a two-step trajectory drawn from the SDE scores the same step by step
    latents, times, velocity = torch.zeros(1, 3, 2), torch.tensor([1.0, 0.6, 0.0]), torch.ones(1, 2, 2)
    first, std0 = sde_step(latents[:, 0], 1.0, 0.4, velocity[:, 0], 0.5)
    latents[:, 1] = first + std0 * torch.tensor([[0.3, -0.2]])
    second, std1 = sde_step(latents[:, 1], 0.6, 0.6, velocity[:, 1], 0.5)
    latents[:, 2] = second
    logprob, means, stds = sde_transitions(latents, times, velocity, 0.5)
    assert logprob.shape == (1, 2) and stds.tolist() == pytest.approx([float(std0), float(std1)])
    assert logprob[0, 0].item() == pytest.approx(gaussian_logprob(latents[:, 1], first, std0).item())
    assert torch.allclose(means[:, 1], second)
    # KL of equal-std Gaussians: mean gap^2 / (2 std^2), element-averaged
    kl = gaussian_mean_kl(torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[0.0, 3.0]]]), torch.tensor([0.5]))
    assert kl.item() == pytest.approx((1.0 / 2) / (2 * 0.25))


# ---- the adapter on a tiny BAGEL -------------------------------------------------------


needs_bagel = pytest.mark.bagel  # conftest skips it with one line outside the BAGEL environment


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from asg_kit.adapters.tiny_bagel import save_tiny_bagel

    torch.set_num_threads(1)
    return save_tiny_bagel(tmp_path_factory.mktemp("bagel") / "tiny", upstream=os.environ["ASGKIT_UPSTREAM"])


@pytest.fixture(scope="module")
def bagel(tiny_folder):
    from asg_kit.adapters.registry import load_backbone

    adapter = load_backbone("bagel", model=str(tiny_folder))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): give every role its own weights
        for role in adapter.roles:
            for parameter in adapter.trainable_parameters(role):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return adapter


def _image(seed: int):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    pixels[10:30, 12:30] = (220, 30, 30)
    return Image.fromarray(pixels)


@needs_bagel
def test_checkpoint_folder_has_the_released_layout(tiny_folder):
    names = {p.name for p in tiny_folder.iterdir()}
    assert {"llm_config.json", "vit_config.json", "ae.safetensors", "ema.safetensors", "vocab.json", "merges.txt"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)


@needs_bagel
def test_asgkit_check_passes_on_the_tiny_bagel(tmp_path):
    from typer.testing import CliRunner

    from asg_kit.cli import app

    report = tmp_path / "check.json"
    result = CliRunner().invoke(app, ["check", "--backbone", "bagel", "--tiny", "--upstream", os.environ["ASGKIT_UPSTREAM"], "--json", str(report)])
    checks = json.loads(report.read_text())["checks"]
    assert result.exit_code == 0, [c for c in checks if not c["passed"]]
    assert {"behaviour_logprobs", "generator_objective_reaches_every_target", "peft_loading"} <= {c["name"] for c in checks}


@needs_bagel
def test_sampled_logprobs_equal_teacher_forced_ones(bagel):
    from asg_kit.adapters.base import AnswerRequest

    image = _image(1)
    requests = [AnswerRequest(image, "what color is the square ?", temperature=1.0, seed=3),
                AnswerRequest(image, "how many shapes are there ?", temperature=0.0),
                AnswerRequest(_image(2), "describe the image .", temperature=1.5, top_p=0.9, seed=4),
                AnswerRequest(None, "a red circle", temperature=1.0, seed=5)]  # fmt: skip
    with bagel.role("solver"):
        samples = bagel.sample_answers(requests, max_new_tokens=8)
        scored = bagel.score_completions(requests, [s.token_ids for s in samples])
        shifted = bagel.score_completions([AnswerRequest(image, "a different prompt")], [samples[0].token_ids])
    for row, sample in enumerate(samples):
        n = len(sample.token_ids)
        forced = scored.logprobs[row, :n].detach()
        if requests[row].temperature == 1.0 or requests[row].temperature <= 0:  # behaviour = policy at temperature 1
            assert torch.allclose(forced, sample.logprobs, atol=0.05), (row, forced, sample.logprobs)
        assert torch.allclose(scored.entropies[row, :n], sample.entropies, atol=0.05)
        assert bool(scored.mask[row, :n].all()) and not bool(scored.mask[row, n:].any())
    # negative control: the same tokens after another prompt score differently
    n = len(samples[0].token_ids)
    assert (shifted.logprobs[0, :n].detach() - scored.logprobs[0, :n].detach()).abs().max() > 0.05


@needs_bagel
def test_images_per_prompt_reproducible_by_seed_and_batch_free(bagel):
    with bagel.role("generator"):
        first = bagel.generate_images(["a red circle", "a blue square"], n=2, guidance_scale=4.0, seed=11)
        again = bagel.generate_images(["a red circle", "a blue square"], n=2, guidance_scale=4.0, seed=11)
        alone = bagel.generate_images(["a blue square"], n=1, guidance_scale=4.0, seed=11 + 2 + 1)
        other = bagel.generate_images(["a red circle"], n=2, guidance_scale=4.0, seed=12)
    rollout = first.rollout
    steps = bagel.settings.num_timesteps - 1
    assert [len(row) for row in first.images] == [2, 2] and first.images[0][0].size == (32, 32)
    assert rollout.latents.shape[:2] == (4, steps + 1) and rollout.timesteps.shape == (steps + 1,)
    assert rollout.prompt_index == [0, 0, 1, 1] and rollout.seeds == [11, 12, 13, 14]
    # the trajectory starts from our seeded noise and ends at the generated latent
    assert torch.equal(rollout.latents[0, 0], torch.randn(rollout.latents.shape[2:], generator=torch.Generator().manual_seed(11)))
    assert torch.equal(rollout.latents, again.rollout.latents)
    assert not torch.equal(rollout.latents[:2], other.rollout.latents)
    # row 1 of prompt 1, drawn in a batch of 2, equals that image drawn alone (bf16 compute)
    assert (rollout.latents[3] - alone.rollout.latents[0]).abs().max() < 2e-2
    assert float(rollout.guidance.max()) == 4.0


@needs_bagel
def test_training_path_velocities_match_the_rollout(bagel):
    """Without guidance each rollout step is x_{i+1} = x_i - v(x_i, t_i) dt: the packed
    training forward must give back that inference-path velocity at the stored states."""
    with bagel.role("generator"):
        drawn = bagel.generate_images(["a red circle", "a blue square"], n=2, guidance_scale=1.0, seed=21)
        rollout = drawn.rollout
        grid = rollout.timesteps
        worst, scale = 0.0, 0.0
        for i in range(len(grid) - 1):
            stepped = (rollout.latents[:, i] - rollout.latents[:, i + 1]) / (grid[i] - grid[i + 1])
            with torch.no_grad():
                recomputed = bagel.velocities(rollout, rollout.latents[:, i], grid[i].expand(rollout.latents.shape[0]))
            worst = max(worst, float((recomputed - stepped).abs().max()))
            scale = max(scale, float(stepped.abs().max()))
        with torch.no_grad():  # negative control: another prompt's conditioning
            swapped = rollout.prompt_ids[2:] + rollout.prompt_ids[:2]
            rollout.prompt_ids = swapped
            other = bagel.velocities(rollout, rollout.latents[:, 0], grid[0].expand(rollout.latents.shape[0]))
    assert worst < 0.03 * scale, (worst, scale)  # bf16 compute on both paths
    first = (rollout.latents[:, 0] - rollout.latents[:, 1]) / (grid[0] - grid[1])
    assert float((other - first).abs().max()) > 0.1 * scale


@needs_bagel
def test_guided_velocities_and_sde_rollouts(bagel):
    """CFG recomputed on the training path gives back the guided ODE steps; SDE rollouts
    are seeded, differ from the ODE, and their transitions score as Gaussians."""
    with bagel.role("generator"):
        ode = bagel.generate_images(["a red circle"], n=2, guidance_scale=4.0, seed=31).rollout
        sde = bagel.generate_images(["a red circle"], n=2, guidance_scale=4.0, seed=31, noise_level=0.7).rollout
        again = bagel.generate_images(["a red circle"], n=2, guidance_scale=4.0, seed=31, noise_level=0.7).rollout
        with torch.no_grad():
            guided = bagel.guided_velocities(ode)
            sde_velocity = bagel.guided_velocities(sde)
    grid = ode.timesteps
    stepped = (ode.latents[:, :-1] - ode.latents[:, 1:]) / (grid[:-1] - grid[1:])[None, :, None, None]
    assert float(ode.guidance.min()) > 1.0  # every step guided
    assert float((guided - stepped).abs().max()) < 0.03 * float(stepped.abs().max())
    assert torch.equal(sde.latents, again.latents) and torch.equal(sde.latents[:, 0], ode.latents[:, 0])
    assert not torch.equal(sde.latents[:, -1], ode.latents[:, -1]) and sde.noise_level == 0.7
    logprob, _, std = sde_transitions(sde.latents, sde.timesteps, sde_velocity, sde.noise_level)
    # each recorded step is one Gaussian draw: its element-averaged log-density is near the
    # expected -log(std) - log(2 pi)/2 - 1/2, far above that of an unrelated velocity
    expected = -torch.log(std) - 0.5 * math.log(2 * math.pi) - 0.5
    assert (logprob - expected).abs().max() < 0.5, (logprob, expected)
    wrong, _, _ = sde_transitions(sde.latents, sde.timesteps, -sde_velocity, sde.noise_level)
    assert bool((wrong < logprob - 1.0).all())


@needs_bagel
def test_flow_update_moves_only_the_generator(bagel):
    """The loop's rectified-flow branch on the adapter: fresh noise, policy and reference
    velocities, the weighted loss; one AdamW step changes the Generator's LoRA only."""
    from asg_kit.train.losses import group_advantages

    with bagel.role("generator"):
        drawn = bagel.generate_images(["a red circle"], n=3, guidance_scale=4.0, seed=5)
    noised = bagel.noised_latents(drawn.rollout, seed=8)
    assert torch.allclose(noised.noisy, (1 - noised.timesteps[:, None, None]) * drawn.rollout.latents[:, -1] + noised.timesteps[:, None, None] * (noised.target + drawn.rollout.latents[:, -1]), atol=1e-5)
    params = {role: bagel.trainable_parameters(role) for role in bagel.roles}
    before = {role: [p.detach().clone() for p in ps] for role, ps in params.items()}
    optimizer = torch.optim.AdamW(params["generator"], lr=1e-2)
    bagel.model.train(True)
    with bagel.role("generator"):
        velocity = bagel.velocities(drawn.rollout, noised.noisy, noised.timesteps)
    bagel.model.train(False)
    with torch.no_grad(), bagel.role(None):
        reference = bagel.velocities(drawn.rollout, noised.noisy, noised.timesteps)
    advantages = torch.tensor(group_advantages([0.2, 0.9, 0.4]))
    loss = advantage_weighted_flow_loss(advantages, flow_matching_error(velocity, noised.target), velocity_drift(velocity, reference), 0.01)
    assert math.isfinite(loss.item()) and velocity_drift(velocity, reference).max() > 0  # perturbed LoRA: policy != reference
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    moved = {role: max(float((p.detach() - q).abs().max()) for p, q in zip(params[role], before[role])) for role in bagel.roles}
    assert moved["generator"] > 0 and moved["proposer"] == 0 and moved["solver"] == 0
    with torch.no_grad():
        for p, q in zip(params["generator"], before["generator"]):
            p.copy_(q)


SCENE = "draw : a red circle on a white background | what color is the circle ? red | what shape is it ? circle"


@pytest.fixture(scope="module")
def taught_folder(tiny_folder, tmp_path_factory):
    """The tiny BAGEL with its base weights taught one scene (teacher-forced through the
    adapter's packed forward): the Proposer writes SCENE as its spec and asks its first
    question, the Solver answers the scene's questions, whatever the image. Its specs then
    pass the loop's gates, so generation steps reach the Generator update."""
    import shutil

    from safetensors.torch import save_file

    from asg_kit import prompts
    from asg_kit.adapters.base import AnswerRequest
    from asg_kit.adapters.registry import load_backbone
    from asg_kit.micro.pool import write_pool

    folder = tmp_path_factory.mktemp("bagel") / "taught"
    shutil.copytree(tiny_folder, folder)
    adapter = load_backbone("bagel", model=str(folder), lora=None)
    spec = prompts.parse_spec(SCENE)
    lessons = [(prompts.PROPOSER_SPEC, SCENE), (prompts.PROPOSER_QUESTION, spec.qa[0].question)]
    lessons += [(prompts.solver_prompt(pair.question), prompts.format_answer(pair.expected)) for pair in spec.qa]
    from PIL import Image

    pool = write_pool(4, tmp_path_factory.mktemp("bagel") / "pool", seed=0)  # the training run's pool
    images = [Image.open(path).convert("RGB") for path in pool]
    requests = [AnswerRequest(image, prompt) for image in images for prompt, _ in lessons]
    completions = [adapter.encode_completion(text) for _ in images for _, text in lessons]
    parameters = [p for p in adapter.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    adapter.model.train(False)
    for _ in range(100):
        scored = adapter.score_completions(requests, completions)
        loss = -(scored.logprobs.sum() / scored.mask.sum())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.02, loss.item()
    with torch.no_grad():  # sharper: the loop samples specs at temperature 1 and answers at 1.3
        adapter.model.language_model.lm_head.weight.mul_(4.0)
    state = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()).contiguous() for k, v in adapter.model.state_dict().items()}
    save_file(state, str(folder / "ema.safetensors"), metadata={"format": "pt"})
    return folder


@needs_bagel
def test_asgkit_train_runs_cycles_and_resumes_exactly(taught_folder, tmp_path):
    from typer.testing import CliRunner

    from asg_kit.cli import app
    from asg_kit.micro.pool import write_pool

    write_pool(4, tmp_path / "pool", seed=0)
    common = ["--backbone", "bagel", "--model", str(taught_folder), "--upstream", os.environ["ASGKIT_UPSTREAM"], "--images", str(tmp_path / "pool"),
              "--solver-max-new-tokens", "8", "--proposer-max-new-tokens", "40", "--lr", "1e-5"]  # fmt: skip
    runner = CliRunner()
    straight = runner.invoke(app, ["train", *common, "--steps", "6", "--out", str(tmp_path / "a"), "--checkpoint-every", "3"])
    assert straight.exit_code == 0, straight.output
    first = runner.invoke(app, ["train", *common, "--steps", "3", "--out", str(tmp_path / "b"), "--checkpoint-every", "3"])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, ["train", "--resume", str(tmp_path / "b"), "--steps", "6"])
    assert resumed.exit_code == 0, resumed.output

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("a"), rows("b")
    assert [r["kind"] for r in a] == ["understanding"] * 3 + ["generation"] * 2 + ["understanding"]
    generation = [r for r in a if r["kind"] == "generation"]
    assert all(r["spec"] == SCENE and r["generator_skip"] is None for r in generation), [(r["spec"], r.get("alignment"), r["generator_skip"]) for r in generation]
    assert all(math.isfinite(r["generator_loss"]) and len(r["flow_matching"]) == 3 for r in generation)
    drop = lambda row: {k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in a] == [drop(r) for r in b]
    from safetensors.torch import load_file

    for role in ("proposer", "solver", "generator"):
        wa = load_file(str(tmp_path / "a" / "checkpoint" / "roles" / role / "adapter_model.safetensors"))
        wb = load_file(str(tmp_path / "b" / "checkpoint" / "roles" / role / "adapter_model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the Generator's LoRA (B starts at 0) moved: only generation steps update it
    generator = load_file(str(tmp_path / "a" / "checkpoint" / "roles" / "generator" / "adapter_model.safetensors"))
    assert max(float(v.abs().max()) for k, v in generator.items() if "lora_B" in k) > 0


@needs_bagel
def test_asgkit_score_judges_the_example_folder_with_bagel(tiny_folder, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from asg_kit.cli import app

    example = Path(__file__).resolve().parents[1] / "examples" / "shapes_geneval"
    for group in sorted(p for p in example.iterdir() if p.is_dir())[:2]:
        shutil.copytree(group, tmp_path / "images" / group.name)
    out = tmp_path / "scores.jsonl"
    args = ["score", str(tmp_path / "images"), "--backbone", "bagel", "--model", str(tiny_folder), "--upstream", os.environ["ASGKIT_UPSTREAM"], "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    images = sorted(str(p.relative_to(tmp_path / "images")) for p in (tmp_path / "images").rglob("*.png"))
    assert sorted(r["image"] for r in rows) == images and all(r["status"] == "scored" and math.isfinite(r["reward"]) for r in rows)


@needs_bagel
def test_flow_grpo_option_updates_the_generator(taught_folder, tmp_path):
    from asg_kit.micro.pool import write_pool
    from asg_kit.train.loop import TrainConfig, train

    write_pool(4, tmp_path / "pool", seed=0)
    config = TrainConfig(backbone="bagel", model=str(taught_folder), upstream=os.environ["ASGKIT_UPSTREAM"], images=str(tmp_path / "pool"),
                         out=str(tmp_path / "run"), steps=5, lr=1e-5, solver_max_new_tokens=8, proposer_max_new_tokens=40,
                         spec_max_new_tokens=40, checkpoint_every=5, flow_update="flow_grpo")  # fmt: skip
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    generation = [r for r in rows if r["kind"] == "generation"]
    assert len(generation) == 2 and all(r["generator_skip"] is None and math.isfinite(r["generator_loss"]) for r in generation), generation
    assert all(r["kl"] >= 0 for r in generation)


@needs_bagel
def test_roles_sit_on_their_experts(bagel):
    """Proposer and Solver LoRA on the understanding expert's projections, the Generator's
    on the generation expert's, nothing on the ViT, connector or flow heads."""
    wrapped = {role: set() for role in bagel.roles}
    for name, _ in bagel.peft.named_parameters():
        if ".lora_A." in name:
            module, role = name.split(".lora_A.")[0], name.split(".lora_A.")[1].split(".")[0]
            wrapped[role].add(module.split("language_model.model.layers.")[-1].split(".", 1)[-1])
    understanding = {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    generation = {f"self_attn.{p}_moe_gen" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {f"mlp_moe_gen.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert wrapped["proposer"] == wrapped["solver"] == understanding
    assert wrapped["generator"] == generation
    layers = bagel.model.config.llm_config.num_hidden_layers
    assert len(bagel.trainable_parameters("generator")) == 2 * len(generation) * layers


@needs_bagel
def test_asgkit_bench_runs_the_shapes_tasks_with_bagel(tiny_folder, tmp_path):
    from typer.testing import CliRunner

    from asg_kit.cli import app

    args = ["bench", "--backbone", "bagel", "--model", str(tiny_folder), "--upstream", os.environ["ASGKIT_UPSTREAM"], "--tasks", "shapes",
            "--limit", "2", "--images-per-prompt", "2", "--out", str(tmp_path / "bench")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert set(results["tasks"]) == {"shapes_vqa", "shapes_geneval"} and results["model"]["backbone"] == "bagel"
