import math

import numpy as np
import pytest
import torch
from PIL import Image

from asg_kit.adapters.base import AnswerRequest, UnifiedBackbone
from asg_kit.adapters.janus import JanusAdapter
from asg_kit.adapters.registry import BackboneUnavailable, adapter_class, load_backbone
from asg_kit.adapters.tiny_janus import build_tiny_janus
from asg_kit.rewards import token_entropy
from conftest import perturb_roles

pytestmark = pytest.mark.janus


def image(seed, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def requests_for(img, temperature=1.0, top_p=1.0):
    return [AnswerRequest(img, f"what {w} is the circle ?", temperature, top_p) for w in ("color", "shape", "size")]


def test_implements_the_protocol(tiny_janus):
    assert isinstance(tiny_janus, UnifiedBackbone)
    assert tiny_janus.generation_paradigm == "ar_tokens"
    assert tiny_janus.roles == ("proposer", "solver", "generator")


def test_behaviour_logprobs_equal_teacher_forced_and_entropies_match(tiny_janus):
    reqs = requests_for(image(0))
    with tiny_janus.role("solver"):
        samples = tiny_janus.sample_answers(reqs, max_new_tokens=12, seed=5)
        scores = tiny_janus.score_completions(reqs, [s.token_ids for s in samples], keep_logits=True)
    for row, sample in enumerate(samples):
        n = len(sample.token_ids)
        assert scores.mask[row].sum() == n
        assert torch.allclose(scores.logprobs[row, :n], sample.logprobs, atol=1e-4)
        assert torch.allclose(scores.entropies[row, :n], sample.entropies, atol=1e-4)
        assert torch.allclose(token_entropy(scores.logits[row, :n]), sample.entropies, atol=1e-4)


def test_behaviour_logprobs_follow_temperature_and_top_p(tiny_janus):
    reqs = requests_for(image(1), temperature=1.7, top_p=0.5)
    with tiny_janus.role("solver"):
        samples = tiny_janus.sample_answers(reqs, max_new_tokens=6, seed=2)
        scores = tiny_janus.score_completions(reqs, [s.token_ids for s in samples], keep_logits=True)
    for row, sample in enumerate(samples):
        for t, token in enumerate(sample.token_ids):
            scaled = scores.logits[row, t] / 1.7
            probs, order = scaled.softmax(-1).sort(descending=True)
            nucleus = order[(probs.cumsum(-1) - probs) < 0.5]
            assert token in nucleus.tolist()
            expected = scaled[token] - torch.logsumexp(scaled[nucleus], -1)
            assert sample.logprobs[t].item() == pytest.approx(expected.item(), abs=1e-4)


def test_greedy_is_deterministic_and_logs_policy_logprob(tiny_janus):
    reqs = requests_for(image(2), temperature=0.0)
    with tiny_janus.role("solver"):
        first = tiny_janus.sample_answers(reqs, max_new_tokens=6, seed=1)
        second = tiny_janus.sample_answers(reqs, max_new_tokens=6, seed=99)
        scores = tiny_janus.score_completions(reqs, [s.token_ids for s in first], keep_logits=True)
    assert [s.token_ids for s in first] == [s.token_ids for s in second]
    for row, sample in enumerate(first):
        n = len(sample.token_ids)
        assert scores.logits[row, :n].argmax(-1).tolist() == sample.token_ids
        assert torch.allclose(scores.logprobs[row, :n], sample.logprobs, atol=1e-4)


def test_seeded_sampling_reproducible_and_batches_equal_one_at_a_time(tiny_janus):
    img = image(3)
    reqs = requests_for(img) + [AnswerRequest(img, "what color is the circle ?", 1.0, seed=77)]
    # Requests alone with their image (or with none) decode as one batch across images.
    others = [AnswerRequest(image(4), "how many objects ?", 1.3, 0.9), AnswerRequest(None, "what is red ?", 1.0), AnswerRequest(image(6), "is it big ?", 0.0)]
    batch = reqs + others
    with tiny_janus.role("solver"):
        together = tiny_janus.sample_answers(batch, max_new_tokens=10, seed=10)
        again = tiny_janus.sample_answers(batch, max_new_tokens=10, seed=10)
        alone = [
            tiny_janus.sample_answers([r], max_new_tokens=10, seed=10 + i)[0] if r.seed is None else tiny_janus.sample_answers([r], max_new_tokens=10)[0]
            for i, r in enumerate(batch)
        ]
    assert [s.token_ids for s in together] == [s.token_ids for s in again]
    for a, b in zip(together, alone):
        assert a.token_ids == b.token_ids and a.text == b.text
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    with tiny_janus.role("solver"):  # every row with its own image: the shared prefix stops before the image
        pair = tiny_janus.sample_answers([others[0], others[2]], max_new_tokens=10, seed=10 + len(reqs))
    assert [s.token_ids for s in pair] == [alone[-3].token_ids, alone[-1].token_ids]


def test_role_gradients_reach_only_that_role_and_reference_is_untouched(tiny_janus):
    reqs = requests_for(image(5))
    completions = [tiny_janus.encode_completion("<answer> red </answer>")] * 3
    with torch.no_grad(), tiny_janus.role(None):
        reference_before = tiny_janus.score_completions(reqs, completions).logprobs.clone()
    with torch.no_grad(), tiny_janus.role("proposer"):
        proposer_before = tiny_janus.score_completions(reqs, completions).logprobs.clone()
    solver_params = tiny_janus.trainable_parameters("solver")
    saved = [p.detach().clone() for p in solver_params]
    with tiny_janus.role("solver"):
        loss = -tiny_janus.score_completions(reqs, completions).logprobs.sum()
        loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in solver_params)
    for role in ("proposer", "generator"):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in tiny_janus.trainable_parameters(role))
    frozen = [p for n, p in tiny_janus.peft.named_parameters() if "lora_" not in n]
    assert frozen and all(p.grad is None for p in frozen)
    optimizer = torch.optim.SGD(solver_params, lr=0.5)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), tiny_janus.role(None):
        assert torch.equal(tiny_janus.score_completions(reqs, completions).logprobs, reference_before)
    with torch.no_grad(), tiny_janus.role("proposer"):
        assert torch.equal(tiny_janus.score_completions(reqs, completions).logprobs, proposer_before)
    with torch.no_grad():
        for p, old in zip(solver_params, saved):
            p.copy_(old)


def test_roles_change_outputs_and_context_restores(tiny_janus):
    reqs = requests_for(image(6))[:1]
    completion = [tiny_janus.encode_completion("red")]
    with torch.no_grad():
        with tiny_janus.role("solver"):
            solver = tiny_janus.score_completions(reqs, completion).logprobs
            with tiny_janus.role(None):
                reference = tiny_janus.score_completions(reqs, completion).logprobs
            assert tiny_janus.active_role == "solver"
    assert not torch.allclose(solver, reference)
    with pytest.raises(ValueError, match="unknown role"):
        with tiny_janus.role("critic"):
            pass


def test_generation_logprobs_are_finite_differentiable_and_match_sampling_at_guidance_one(tiny_janus):
    with tiny_janus.role("generator"):
        out = tiny_janus.generate_images(["a red circle", "two blue squares"], n=2, guidance_scale=1.0, seed=3)
        logprobs = tiny_janus.generation_logprobs(out.rollout)
    assert logprobs.shape == out.rollout.tokens.shape == (4, tiny_janus.num_image_tokens)
    assert torch.isfinite(logprobs).all()
    assert torch.allclose(logprobs.detach(), out.rollout.behaviour_logprobs, atol=1e-4)
    logprobs.sum().backward()
    generator = tiny_janus.trainable_parameters("generator")
    assert all(p.grad is not None for p in generator) and any(p.grad.abs().sum() > 0 for p in generator)
    for p in generator:
        p.grad = None
    assert [len(images) for images in out.images] == [2, 2]
    assert out.images[0][0].size == (32, 32) and out.images[0][0].mode == "RGB"
    with tiny_janus.role("generator"), torch.no_grad():
        guided = tiny_janus.generate_images(["a red circle"], n=1, guidance_scale=5.0, seed=3)
        conditional = tiny_janus.generation_logprobs(guided.rollout)
    assert not torch.allclose(conditional, guided.rollout.behaviour_logprobs, atol=1e-3)


def test_image_generation_is_seeded_and_batch_independent(tiny_janus):
    with tiny_janus.role("generator"):
        both = tiny_janus.generate_images(["a red circle", "a green star"], n=2, seed=11)
        again = tiny_janus.generate_images(["a red circle", "a green star"], n=2, seed=11)
        second_alone = tiny_janus.generate_images(["a green star"], n=2, seed=13)
    assert torch.equal(both.rollout.tokens, again.rollout.tokens)
    assert torch.equal(both.rollout.tokens[2:], second_alone.rollout.tokens)
    assert np.array_equal(np.asarray(both.images[1][0]), np.asarray(second_alone.images[0][0]))
    with pytest.raises(ValueError, match="temperature"):
        tiny_janus.generate_images(["x"], temperature=0.0)


def test_embeddings_use_the_base_model(tiny_janus):
    img = image(7)
    with tiny_janus.role(None):
        text_ref = tiny_janus.embed_text(["a red circle", "blue square"])
        mm_ref = tiny_janus.embed_image_text([img], ["describe this image briefly ."])
    with tiny_janus.role("solver"):
        text = tiny_janus.embed_text(["a red circle", "blue square"])
        mm = tiny_janus.embed_image_text([img])
    assert torch.allclose(text, text_ref) and torch.allclose(mm, mm_ref)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert text.shape == (2, 32) and mm.shape == (1, 32)
    assert tiny_janus.active_role == "solver" or tiny_janus.active_role is None


def test_text_cannot_smuggle_in_image_slots(tiny_janus):
    img = image(10)
    sneaky = "what is <image_placeholder> <begin_of_image> this ?"
    with tiny_janus.role("solver"):
        samples = tiny_janus.sample_answers([AnswerRequest(img, sneaky), AnswerRequest(None, sneaky)], max_new_tokens=3)
    assert len(samples) == 2
    assert tiny_janus.prompt_ids(sneaky, True).count(tiny_janus.image_token_id) == tiny_janus.num_image_tokens
    assert tiny_janus.embed_text([sneaky]).shape == (1, 32)


def test_caption_is_text(tiny_janus):
    captions = tiny_janus.caption([image(8), image(9)], max_new_tokens=5)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_roles_save_and_reload_bit_exactly_and_peft_reads_them(tiny_janus, tmp_path):
    from peft import PeftModel

    tiny_janus.save_roles(tmp_path)
    saved = {role: [p.detach().clone() for p in tiny_janus.trainable_parameters(role)] for role in tiny_janus.roles}
    for role in tiny_janus.roles:
        assert (tmp_path / role / "adapter_model.safetensors").is_file()
    perturb_roles(tiny_janus, seed=123)
    tiny_janus.load_roles(tmp_path)
    for role in tiny_janus.roles:
        assert all(torch.equal(a, b) for a, b in zip(tiny_janus.trainable_parameters(role), saved[role]))
    base, _ = build_tiny_janus(seed=0)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "solver", adapter_name="solver")
    loaded = [p for n, p in peft_model.named_parameters() if "lora_" in n and ".solver." in n]
    assert all(torch.equal(a, b) for a, b in zip(loaded, saved["solver"]))
    with pytest.raises(FileNotFoundError, match="proposer"):
        tiny_janus.load_roles(tmp_path / "missing")


def test_from_pretrained_local_directory_and_registry(tmp_path):
    model, processor = build_tiny_janus(seed=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    direct = JanusAdapter(model, processor)
    loaded = load_backbone("janus", model=str(tmp_path))
    assert isinstance(loaded, JanusAdapter)
    assert torch.allclose(loaded.embed_text(["a red circle"]), direct.embed_text(["a red circle"]), atol=1e-6)
    assert not any(p.name.endswith(".bin") for p in tmp_path.iterdir())


def test_registry_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="registered backbones: .*janus"):
        load_backbone("dalle")
    with pytest.raises(OSError, match="local directory"):
        load_backbone("janus", model=str(tmp_path / "nothing-here"))
    from asg_kit.adapters import registry

    monkeypatch.setitem(registry.BACKBONES, "broken", {"adapter": "asg_kit.adapters.not_a_module:X", "tiny": "asg_kit.adapters.not_a_module:y", "install": "pip install something"})
    with pytest.raises(BackboneUnavailable, match="pip install something"):
        adapter_class("broken")
