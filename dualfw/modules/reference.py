"""The Reference: a frozen copy of the initial policy, for DPO's KL anchor."""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import Tensor

from dualfw.models.base import LMMAdapter


class Reference(L.LightningModule):
    """Frozen initial model. Its weights are not saved in checkpoints: they are the starting point,
    rebuilt from the policy's own config on resume."""

    def __init__(self, model: LMMAdapter) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def image_logprobs(self, prompts: list[str], tokens: Tensor) -> Tensor:
        return self.model.image_logprobs(prompts, tokens)
