"""Exponential moving average of the weights, kept in fp32 beside the model."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after every optimizer step.

    Tied parameters (a shared embedding / LM head) share one shadow tensor, and `state_dict()` has the
    model's own keys, so EMA weights load into the model exactly like the trained ones.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        by_id: Dict[int, torch.Tensor] = {}
        self.shadow: Dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in by_id:
                by_id[id(p)] = p.detach().float().clone()
            self.shadow[name] = by_id[id(p)]
        self._unique = list(by_id.values())

    def to(self, device) -> "EMA":
        moved = {id(t): t.to(device) for t in self._unique}
        self.shadow = {k: moved[id(v)] for k, v in self.shadow.items()}
        self._unique = list(moved.values())
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach().float() for p in model.parameters()]  # parameters() skips duplicates
        torch._foreach_lerp_(self._unique, params, 1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The model's state dict with every parameter replaced by its average (buffers as they are)."""
        return {k: self.shadow.get(k, v) for k, v in model.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        for name, t in self.shadow.items():
            t.copy_(state[name])
