"""Each upstream backbone's environment, proven in that environment (`pytest -m vargpt` in the
venv of `pip install -e ".[vargpt]"`, and so on): asg-kit finds the upstream tree through
$ASGKIT_UPSTREAM, and the upstream modules an adapter builds on import there. Each import runs
in a fresh interpreter, so that upstream packages and the flash-attn fallback never leak into
other tests. Elsewhere these tests skip (tests/conftest.py says why)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from asg_kit.adapters.upstream import UPSTREAMS, _checkout_commit, locate_upstream

# PyPI's torchvision is a CUDA build; beside a CPU torch its C++ ops do not load, and its
# import stops at the meta registrations of nms/qnms. Declaring those two schemas first lets
# the Python parts (transforms, what timm imports) load; VARGPT never calls the C++ ops.
CPU_TORCHVISION = """
import torch
try:
    import torchvision
except RuntimeError as error:
    if "torchvision::nms" not in str(error):
        raise
    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
        del sys.modules[name]
    schemas = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        schemas.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision
"""

KEY_MODULES = {
    # the language model with VARGPT's image generation, and Infinity's blocks (flash-attn varlen)
    "vargpt": ("vargpt_qwen_v1_1.modeling_vargpt_qwen2_vl", "vargpt_qwen_v1_1.var_model.infinity.models.basic", "vargpt_qwen_v1_1.processing_vargpt_qwen2_vl"),
    # the mixture-of-transformers language model and SigLIP (flash-attn varlen), the Bagel model, its VAE
    "bagel": ("modeling.bagel.qwen2_navit", "modeling.bagel.siglip_navit", "modeling.bagel.bagel", "modeling.autoencoder"),
    # the diffusion transformer that turns the language model's features into image features
    "blip3o": ("blip3o.model.lumina_nextdit2d", "blip3o.model.nextdit_crossattn"),
}


def import_in_fresh_interpreter(name):
    script = textwrap.dedent(
        f"""
        import importlib, json, sys
        from asg_kit.adapters.upstream import install_flash_attn_fallback, locate_upstream, put_on_path
        """
    ) + (CPU_TORCHVISION if name == "vargpt" else "") + textwrap.dedent(
        f"""
        checkout = locate_upstream({name!r})
        put_on_path(checkout)
        fallback = install_flash_attn_fallback() if {name!r} in ("vargpt", "bagel") else None
        for module in {KEY_MODULES[name]!r}:
            importlib.import_module(module)
        import transformers
        print(json.dumps({{"checkout": str(checkout), "fallback": fallback, "transformers": transformers.__version__,
                           "flash_attn": getattr(sys.modules.get("flash_attn"), "__version__", None)}}))
        """
    )
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_environment(name, upstream_root):
    repo = UPSTREAMS[name]
    checkout = locate_upstream(name)  # through $ASGKIT_UPSTREAM, as an adapter finds it
    assert checkout == (upstream_root / repo.folder).resolve()
    assert all((checkout / marker).is_file() for marker in repo.marker_files)
    assert _checkout_commit(checkout) in (None, repo.commit)  # a git checkout is at the verified commit
    result = import_in_fresh_interpreter(name)
    assert result["checkout"] == str(checkout)
    return result


@pytest.mark.vargpt
def test_vargpt_environment(upstream_root):
    result = check_environment("vargpt", upstream_root)
    assert result["transformers"].startswith("4.46.")
    assert result["fallback"] is not None


@pytest.mark.bagel
def test_bagel_environment(upstream_root):
    result = check_environment("bagel", upstream_root)
    assert result["transformers"].startswith("4.49.")
    assert result["fallback"] is not None


@pytest.mark.blip3o
def test_blip3o_environment(upstream_root):
    result = check_environment("blip3o", upstream_root)
    assert int(result["transformers"].split(".")[0]) >= 5


def test_flash_attn_fallback_keeps_transformers_importable():
    # transformers asks importlib.util.find_spec("flash_attn") while importing its modeling
    # code; a module registered without a spec made that a ValueError, and BAGEL unimportable.
    script = textwrap.dedent(
        """
        import importlib.util
        from asg_kit.adapters.upstream import install_flash_attn_fallback
        assert install_flash_attn_fallback()
        assert importlib.util.find_spec("flash_attn") is not None
        from transformers.utils import is_flash_attn_2_available
        print(is_flash_attn_2_available())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"
