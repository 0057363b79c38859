"""Where models run: the GPU choice as a pure function of what a machine has, CPU defaults
unchanged, and the options of score, train and check that carry it."""

import pytest
import torch
from typer.testing import CliRunner

from asg_kit.checks import UserError
from asg_kit.cli import app
from asg_kit.devices import choose_device, default_device, placement, process_group_backend


def test_the_gpu_is_chosen_when_there_is_one():
    assert choose_device(None, cuda_available=True) == "cuda"
    assert choose_device(None, cuda_available=True, local_rank=3) == "cuda:3"  # torchrun: the rank's own GPU
    assert choose_device("cuda", cuda_available=True, local_rank=1) == "cuda:1"
    assert choose_device("cuda:0", cuda_available=True, local_rank=1) == "cuda:0"  # an explicit index wins
    assert choose_device("cpu", cuda_available=True, local_rank=1) == "cpu"


def test_without_a_gpu_the_backbone_default_stays():
    assert choose_device(None, cuda_available=False) is None
    assert choose_device(None, cuda_available=False, local_rank=1) is None
    assert choose_device("cpu", cuda_available=False) == "cpu"


def test_process_group_backend():
    assert process_group_backend("cuda:1") == "nccl"
    assert process_group_backend("cpu") == "gloo" and process_group_backend(None) == "gloo"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults are checked on a machine without a GPU")
def test_cpu_machine_defaults_are_unchanged(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert default_device() is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert default_device() is None
    assert placement(None, None) == {}
    assert placement("cpu", "bfloat16") == {"device": "cpu", "dtype": "bfloat16"}
    with pytest.raises(UserError, match="no CUDA GPU"):
        placement("cuda", None)
    with pytest.raises(UserError, match="float32"):
        placement(None, "float8")


@pytest.mark.parametrize("command", ["score", "train", "check"])
def test_device_and_dtype_options_say_their_defaults(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())
    assert "--device" in text and "--dtype" in text
    assert "default: cuda when there is a GPU, else cpu" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a GPU on a machine without one")
def test_check_refuses_a_missing_gpu_in_one_line():
    result = CliRunner().invoke(app, ["check", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output and "Traceback" not in result.output


@pytest.mark.janus
def test_train_runs_in_the_asked_dtype_on_the_asked_device(tmp_path):
    import json

    from safetensors.torch import load_file

    from asg_kit.micro.pool import write_pool
    from asg_kit.train.loop import TrainConfig, train

    write_pool(3, tmp_path / "pool", seed=0)
    config = TrainConfig(images=str(tmp_path / "pool"), out=str(tmp_path / "run"), steps=3, lr=1e-3, seed=3, checkpoint_every=3, solver_max_new_tokens=4,
                         proposer_max_new_tokens=6, generation_per_cycle=0, device="cpu", dtype="bfloat16")  # fmt: skip
    train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("proposer_skip") is None and "proposer_loss" in r for r in rows)  # an update ran in bfloat16
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "bfloat16"
    weights = load_file(tmp_path / "run" / "checkpoint" / "roles" / "proposer" / "adapter_model.safetensors")
    # peft keeps the adapters in float32 over a bfloat16 base (its autocast_adapter_dtype), as they train best
    assert weights and all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in weights.values())
