"""The linear probes behind the README's "where the positions get lost" table."""

import sys

import pytest
import torch
from conftest import load_bench_script


def _probe_script():
    return load_bench_script("position_probe")


def test_a_probe_reads_what_is_linearly_there_and_nothing_else():
    probe = _probe_script()
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(600, 16, generator=generator)
    column = (features[:, 3] > 0).long() + 2 * (features[:, 7] > 0).long()  # 4 classes, linear
    assert probe.probe_accuracy(features, column) > 0.9
    noise = torch.randint(0, 4, (600,), generator=generator)
    assert abs(probe.probe_accuracy(features, noise) - 0.25) < 0.1
    assert probe.majority_share(torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])) == 1.0  # held-out: the last 3


@pytest.mark.janus  # the shipped micro model (main environment)
def test_probe_script_runs_on_the_shipped_model(monkeypatch, capsys):
    probe = _probe_script()
    monkeypatch.setattr(sys, "argv", ["position_probe.py", "--questions", "12", "--images", "3"])
    probe.main()
    out = capsys.readouterr().out
    # The vision encoder is taught each patch's column: its probe must find it.
    vision_row = next(line for line in out.splitlines() if "vision encoder" in line)
    assert float(vision_row.split()[-2]) > 0.9
    assert "A's half" in out and "layer 4" in out
