"""The micro model: a tiny Janus trained on the shapes world, shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from asg_kit.adapters.janus import JanusAdapter
from asg_kit.micro.model import micro_weights_dir


class MicroAdapter(JanusAdapter):
    """Janus's adapter on the shipped micro weights (same code path as real Janus)."""

    name = "micro"
    default_model = None  # the shipped weights

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, **options) -> "MicroAdapter":
        folder = Path(model) if model is not None else micro_weights_dir()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"no micro model at {folder}: train one with `asgkit micro train RUN` and pass "
                "model=RUN/model, or reinstall asg-kit (the package ships the weights)"
            )
        return super().from_pretrained(folder, local_files_only=True, **options)
