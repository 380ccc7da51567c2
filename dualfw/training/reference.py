"""The Reference: the frozen initial policy, for the KL anchors of DPO, IPO and GRPO, the frozen
scorer's model and the sampler of `Policy(rollouts_from="initial")` (one copy serves all three)."""

from __future__ import annotations

import copy
from typing import Callable, ContextManager

import lightning as L
import torch
from torch import Tensor

from dualfw.core.interface import FrozenView, LMMAdapter
from dualfw.core.selfreward import Group, sequence_logps


class Reference(L.LightningModule):
    """The initial model, frozen. Either a copy of the policy taken at start-up (its weights are not
    saved in checkpoints: they are the starting point, rebuilt from the config on resume) or, with
    LoRA, the policy itself with its adapters disabled (no second copy in memory).

    Args:
        model: the policy's adapter.
        initial: a context-manager factory under which `model` computes as the initial model
            (`dualfw.core.lora.adapters_off`); None takes a frozen copy.
    """

    def __init__(self, model: LMMAdapter, initial: Callable[[], ContextManager] | None = None) -> None:
        super().__init__()
        self.holds_copy = initial is None
        if self.holds_copy:
            model = copy.deepcopy(model).eval().requires_grad_(False)
        # a list keeps the initial weights out of this module's state (and out of checkpoints)
        self._view = [FrozenView(model, initial)]

    @property
    def view(self) -> FrozenView:
        """The initial model, read-only: the adapter's calls, without gradients, as the initial model."""
        return self._view[0]

    def move_frozen_to(self, device: torch.device) -> None:
        if self.holds_copy:
            self.view.adapter.to(device)

    def sequence_logps(self, group: Group, samples: Tensor, guided: bool = False) -> tuple[Tensor, Tensor]:
        """`dualfw.core.selfreward.sequence_logps` under the initial model."""
        return sequence_logps(self.view, group, samples, guided)
