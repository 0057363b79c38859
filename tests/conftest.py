import pytest
import torch

from asg_kit.adapters.janus import JanusAdapter
from asg_kit.adapters.tiny_janus import build_tiny_janus


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
