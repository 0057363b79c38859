"""The LoRA role machinery every adapter shares: one peft adapter per role on a frozen
model, the reference policy with every adapter off, and the roles' safetensors files."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


class LoraRoles:
    """Mixed into an adapter that calls :meth:`install_roles` once its model is built;
    ``peft`` stays None for an adapter built without roles. Adapters with role weights
    outside peft (BLIP3o's query offset) extend :meth:`trainable_parameters`,
    :meth:`save_roles` and :meth:`load_roles`."""

    peft = None
    roles: tuple[str, ...] = ()
    _active: str | None = None
    _lora_parameters: list[torch.nn.Parameter] = []

    def install_roles(self, model: torch.nn.Module, configs: dict) -> None:
        """Freeze ``model`` and give it one peft LoRA adapter per role (``{role: LoraConfig}``)."""
        from peft import get_peft_model

        for parameter in model.parameters():
            parameter.requires_grad_(False)
        roles = tuple(configs)
        self.roles = roles
        self.peft = get_peft_model(model, configs[roles[0]], adapter_name=roles[0])  # injects into model
        for role in roles[1:]:
            self.peft.add_adapter(role, configs[role])
        self._lora_parameters = [p for name, p in self.peft.named_parameters() if "lora_" in name]
        self._active = roles[0]
        self._activate(None)

    def _activate(self, role: str | None) -> None:
        if self.peft is None:
            if role is not None:
                raise ValueError(f"this backbone was built without LoRA roles; it has no role {role!r}")
            return
        tuner = self.peft.base_model
        if role is None:
            tuner.disable_adapter_layers()
        else:
            if role not in self.roles:
                raise ValueError(f"unknown role {role!r}; roles: {', '.join(self.roles)}")
            tuner.enable_adapter_layers()
            self.peft.set_adapter(role)
        # peft flips requires_grad on every switch; keep all role weights trainable so that a
        # loss built under a role can be backpropagated after its block ends. Inactive
        # adapters take no part in the forward pass, so they receive no gradient anyway.
        for parameter in self._lora_parameters:
            parameter.requires_grad_(True)
        self._active = role

    @contextmanager
    def role(self, name: str | None) -> Iterator[None]:
        previous = self._active
        self._activate(name)
        try:
            yield
        finally:
            self._activate(previous)

    @property
    def active_role(self) -> str | None:
        return self._active

    def trainable_parameters(self, role: str) -> list[torch.nn.Parameter]:
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(self.roles)}")
        marker = f".{role}."
        return [p for name, p in self.peft.named_parameters() if "lora_" in name and marker in name]

    def save_roles(self, path: str | Path) -> None:
        if self.peft is None:
            raise ValueError("this backbone was built without LoRA roles: nothing to save")
        self.peft.save_pretrained(str(path), selected_adapters=list(self.roles), safe_serialization=True)

    def load_roles(self, path: str | Path) -> None:
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        from asg_kit.checks import UserError

        if self.peft is None:
            raise ValueError("this backbone was built without LoRA roles: nothing to load into")
        for role in self.roles:
            folder = Path(path) / role
            if not (folder / "adapter_model.safetensors").is_file():
                raise FileNotFoundError(f"no saved adapter for role {role!r}: expected {folder}/adapter_model.safetensors")
            file = folder / "adapter_model.safetensors"
            try:
                weights = load_peft_weights(str(folder), device=str(self.device))
            except Exception as error:  # safetensors' own error type for a truncated or foreign file
                raise UserError(f"{file}: not a readable safetensors file ({error})") from None
            loaded = set_peft_model_state_dict(self.peft, weights, adapter_name=role)
            # A silently partial load would evaluate or train other weights than the file's.
            unmatched = list(loaded.unexpected_keys)
            missing = [k for k in loaded.missing_keys if "lora_" in k and f".{role}." in k]
            if unmatched or missing or not weights:
                problem = f"{len(unmatched)} key(s) match nothing in this model, e.g. {unmatched[0]}" if unmatched else (
                    f"{len(missing)} of the role's weights are missing, e.g. {missing[0]}" if missing else "no weights")
                raise UserError(f"{file}: {problem}; is it an adapter of role {role!r} saved from this backbone?")
