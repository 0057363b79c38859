import importlib.util
from pathlib import Path

import pytest
import torch

from asg_kit.adapters.janus import JanusAdapter
from asg_kit.adapters.tiny_janus import build_tiny_janus


def load_bench_script(name):
    """A script under bench/ (not a package) imported as a module, for its functions."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def perturb_roles(adapter, scale=0.5, seed=0):
    """LoRA B starts at zero (every role equals the reference); give each role its own
    random weights so that roles really differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for role in adapter.roles:
            for p in adapter.trainable_parameters(role):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def tiny_janus():
    model, processor = build_tiny_janus(seed=0)
    adapter = JanusAdapter(model, processor)
    perturb_roles(adapter)
    return adapter


# Upstream backbones (VARGPT-v1.1, BAGEL, BLIP3o): their tests carry the marker of their
# backbone and run in that backbone's environment (`pip install -e ".[vargpt]"` etc., one venv
# each in .ci/run) against the upstream trees in $ASGKIT_UPSTREAM. Anywhere else they skip
# with one line saying what is missing. The backbone adapters refine these requirements.
UPSTREAM_ENV = "ASGKIT_UPSTREAM"
UPSTREAM_BACKBONES = {
    # marker: checkout folder, modules the environment must have, transformers [from, below)
    "vargpt": {"folder": "VARGPT-v1.1", "modules": ("timm", "einops", "cv2", "imageio", "torchvision", "pandas", "yaml", "pytz", "tqdm"), "transformers": ("4.46", "4.47")},
    "bagel": {"folder": "Bagel", "modules": ("einops", "accelerate"), "transformers": ("4.49", "4.50")},
    # BLIP3o understands through transformers 5's own Qwen2.5-VL (asg_kit/adapters/blip3o.py)
    "blip3o": {"folder": "BLIP3o", "modules": ("diffusers", "einops"), "transformers": ("5.23", "6.0")},
}


def _version_tuple(text):
    return tuple(int(part) for part in text.split(".")[:2])


def upstream_skip_reason(name):
    """Why the tests of upstream backbone ``name`` cannot run here, or None when they can."""
    import importlib.metadata
    import importlib.util
    import os
    from pathlib import Path

    spec = UPSTREAM_BACKBONES[name]
    root = os.environ.get(UPSTREAM_ENV)
    if not root:
        return f"{name}: {UPSTREAM_ENV} is not set (a folder holding {spec['folder']}/; CI sets ../shared/upstream)"
    if not (Path(root) / spec["folder"]).is_dir():
        return f"{name}: {UPSTREAM_ENV}={root} has no {spec['folder']}/"
    missing = [module for module in spec["modules"] if importlib.util.find_spec(module) is None]
    if missing:
        return f"{name}: this environment lacks {', '.join(missing)} (pip install -e '.[{name}]')"
    low, high = spec["transformers"]
    version = importlib.metadata.version("transformers")
    if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
        return f"{name}: needs transformers {low}.x, this environment has {version} (pip install -e '.[{name}]')"
    return None


def pytest_runtest_setup(item):
    for name in UPSTREAM_BACKBONES:
        if item.get_closest_marker(name) is not None:
            reason = upstream_skip_reason(name)
            if reason:
                pytest.skip(reason)


@pytest.fixture
def upstream_root():
    """$ASGKIT_UPSTREAM (tests marked with an upstream backbone only run when it is usable)."""
    import os
    from pathlib import Path

    return Path(os.environ[UPSTREAM_ENV])
