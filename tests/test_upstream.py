"""Locating upstream checkouts and the flash-attn fallback, on real tensors and real folders."""

import subprocess
import sys
import textwrap

import pytest
import torch

from asg_kit.adapters.upstream import UPSTREAMS, UpstreamNotFound, locate_upstream, varlen_attention


def explicit_attention(q, k, v, cu_q, cu_k, causal, scale=None):
    """float64, one query at a time, explicit scores, mask and softmax."""
    q, k, v = q.double(), k.double(), v.double()
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros(q.shape[0], heads, v.shape[-1], dtype=torch.float64)
    for s in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        for i in range(q1 - q0):
            for h in range(heads):
                g = h // (heads // kv_heads)
                keys = [j for j in range(k1 - k0) if not causal or j <= i + (k1 - k0) - (q1 - q0)]
                if not keys:
                    continue
                scores = torch.stack([(q[q0 + i, h] * k[k0 + j, g]).sum() * scale for j in keys])
                weights = scores.softmax(0)
                out[q0 + i, h] = sum(w * v[k0 + j, g] for w, j in zip(weights, keys))
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_varlen_attention_matches_explicit_reference(causal, kv_heads):
    gen = torch.Generator().manual_seed(kv_heads + 10 * causal)
    # sequences: ordinary, decode-against-cache (Lq < Lk), Lq > Lk (some queries see no key), empty
    lengths_q, lengths_k = [5, 1, 4, 0], [5, 6, 2, 3]
    cu_q = torch.tensor([0] + list(torch.tensor(lengths_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lengths_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(lengths_q), 4, 8, generator=gen)
    k = torch.randn(sum(lengths_k), kv_heads, 8, generator=gen)
    v = torch.randn(sum(lengths_k), kv_heads, 8, generator=gen)
    got = varlen_attention(q, k, v, cu_q, cu_k, causal=causal)
    want = explicit_attention(q, k, v, cu_q, cu_k, causal)
    assert got.dtype == q.dtype and got.shape == q.shape
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.isfinite(got).all()


def test_varlen_attention_is_differentiable_and_keeps_dtype():
    q = torch.randn(6, 2, 4, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(6, 2, 4, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(6, 2, 4, dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, cu, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in (q, k, v))


def test_fallback_registers_only_without_flash_attn_and_serves_its_entry_points(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        from asg_kit.adapters.upstream import install_flash_attn_fallback, varlen_attention
        assert install_flash_attn_fallback() is True
        from flash_attn import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_func
        q = torch.randn(7, 4, 8); k = torch.randn(7, 2, 8); v = torch.randn(7, 2, 8)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        ref = varlen_attention(q, k, v, cu, cu, causal=True)
        assert torch.equal(flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, causal=True), ref)
        assert torch.equal(flash_attn_varlen_kvpacked_func(q, torch.stack([k, v], 1), cu, cu, 4, 4, causal=True), ref)
        dense = flash_attn_func(q[:6].view(2, 3, 4, 8), k[:6].view(2, 3, 2, 8), v[:6].view(2, 3, 2, 8))
        cu3 = torch.tensor([0, 3, 6], dtype=torch.int32)
        assert torch.allclose(dense.view(6, 4, 8), varlen_attention(q[:6], k[:6], v[:6], cu3, cu3))
        try:
            flash_attn_varlen_func(q, k, v, cu, cu, dropout_p=0.1)
        except NotImplementedError as error:
            assert "flash-attn" in str(error)
        else:
            raise AssertionError("dropout accepted")
        assert install_flash_attn_fallback() is True  # idempotent
        print("ok")
        """
    )
    # a real flash_attn package on the path wins: the fallback stays out of the way
    real = tmp_path / "flash_attn"
    real.mkdir()
    (real / "__init__.py").write_text("__version__ = '2.7.3'\n")
    with_real = "from asg_kit.adapters.upstream import install_flash_attn_fallback\nimport sys\nassert install_flash_attn_fallback() is False\nimport flash_attn\nassert flash_attn.__version__ == '2.7.3'\nprint('ok')"
    # a flash_attn that cannot load (a CUDA build on a CPU machine) means the fallback
    broken = tmp_path / "broken" / "flash_attn"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    for code, path in ((script, None), (with_real, tmp_path), (script, tmp_path / "broken")):
        env_path = [str(path)] if path else []
        run = subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}\n" + code], capture_output=True, text=True
        )
        assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def make_checkout(root, backbone):
    repo = UPSTREAMS[backbone]
    for marker in repo.marker_files:
        (root / marker).parent.mkdir(parents=True, exist_ok=True)
        (root / marker).write_text("# upstream file\n")
    return root


def test_locate_upstream_finds_the_checkout_itself_or_below_a_parent(tmp_path, monkeypatch):
    monkeypatch.delenv("ASGKIT_UPSTREAM", raising=False)
    checkout = make_checkout(tmp_path / "Bagel", "bagel")
    assert locate_upstream("bagel", checkout) == checkout.resolve()
    assert locate_upstream("bagel", tmp_path) == checkout.resolve()
    monkeypatch.setenv("ASGKIT_UPSTREAM", str(tmp_path))
    assert locate_upstream("bagel") == checkout.resolve()


def test_missing_checkout_is_one_error_naming_repository_commit_and_remedy(tmp_path, monkeypatch):
    monkeypatch.delenv("ASGKIT_UPSTREAM", raising=False)
    with pytest.raises(UpstreamNotFound) as error:
        locate_upstream("vargpt", tmp_path)
    message = str(error.value)
    assert "VARGPT-family/VARGPT-v1.1" in message and UPSTREAMS["vargpt"].commit in message
    assert str(tmp_path) in message and "--upstream" in message and "\n" not in message
    # a wrong --upstream is an error even where another copy could be found
    make_checkout(tmp_path / "elsewhere" / "VARGPT-v1.1", "vargpt")
    monkeypatch.setenv("ASGKIT_UPSTREAM", str(tmp_path / "elsewhere"))
    with pytest.raises(UpstreamNotFound, match="--upstream .* holds no"):
        locate_upstream("vargpt", tmp_path)
    assert locate_upstream("vargpt") == (tmp_path / "elsewhere" / "VARGPT-v1.1").resolve()
    with pytest.raises(ValueError, match="known: bagel, blip3o, vargpt"):
        locate_upstream("janus")


def test_checkout_at_another_commit_warns(tmp_path, monkeypatch):
    monkeypatch.delenv("ASGKIT_UPSTREAM", raising=False)
    checkout = make_checkout(tmp_path / "BLIP3o", "blip3o")
    (checkout / ".git" / "refs" / "heads").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (checkout / ".git" / "refs" / "heads" / "main").write_text("0" * 40 + "\n")
    with pytest.warns(UserWarning, match="verified with 4689ec389e2b"):
        assert locate_upstream("blip3o", checkout) == checkout.resolve()
    (checkout / ".git" / "refs" / "heads" / "main").write_text(UPSTREAMS["blip3o"].commit + "\n")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        locate_upstream("blip3o", checkout)


@pytest.mark.parametrize("backbone", sorted(UPSTREAMS))
def test_the_fixture_trees_are_recognised(backbone, monkeypatch):
    import os

    root = os.environ.get("ASGKIT_UPSTREAM")
    if not root:
        pytest.skip("set ASGKIT_UPSTREAM to a folder holding the upstream checkouts (CI: ../shared/upstream)")
    monkeypatch.delenv("ASGKIT_UPSTREAM")
    assert locate_upstream(backbone, root).name == UPSTREAMS[backbone].folder


def test_uncompile_module_gives_back_the_plain_functions_of_that_module_only():
    import types

    from asg_kit.adapters.upstream import uncompile_module

    def norm(x):
        return x / x.norm()

    module = types.ModuleType("fake_upstream_fused_op")
    module.norm = torch.compile(norm, fullgraph=True)
    module.plain = len
    elsewhere = torch.compile(norm)
    assert uncompile_module(module) == ["norm"]
    assert module.norm is norm and module.plain is len
    assert getattr(elsewhere, "_torchdynamo_orig_callable", None) is norm  # other compiled functions stay compiled
    x = torch.tensor([3.0, 4.0])
    assert torch.equal(module.norm(x), torch.tensor([0.6, 0.8]))
