"""The Reference: the frozen initial policy, for the KL anchors of DPO, IPO and GRPO, the frozen
scorer's model and the sampler of `Policy(rollouts_from="initial")` (one copy serves all three)."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager

import lightning as L
import torch
from torch import Tensor

from dualfw.core.interface import LMMAdapter
from dualfw.core.selfreward import Group, sequence_logps


class Reference(L.LightningModule):
    """The initial model, frozen. Either a copy of the policy taken at start-up (its weights are not
    saved in checkpoints: they are the starting point, rebuilt from the config on resume) or, with
    LoRA, the policy itself with its adapters disabled (no second copy in memory).

    Args:
        model: the policy's adapter.
        initial: a context-manager factory under which `model` computes as the initial model
            (peft's `disable_adapter`); None takes a frozen copy.
    """

    def __init__(self, model: LMMAdapter, initial: Callable[[], ContextManager] | None = None) -> None:
        super().__init__()
        if initial is None:
            self._model = [copy.deepcopy(model).eval().requires_grad_(False)]
            self._initial = contextlib.nullcontext
        else:
            self._model, self._initial = [model], initial

    @property
    def model(self) -> LMMAdapter:
        return self._model[0]

    @property
    def context(self) -> Callable[[], ContextManager]:
        """The context under which `model` computes as the initial model (a no-op for a copy)."""
        return self._initial

    @property
    def holds_copy(self) -> bool:
        return self._initial is contextlib.nullcontext

    def move_frozen_to(self, device: torch.device) -> None:
        if self.holds_copy:
            self.model.to(device)

    @torch.no_grad()
    def image_logprobs(self, prompts: list[str], tokens: Tensor) -> Tensor:
        with self._initial():
            return self.model.image_logprobs(prompts, tokens)

    @torch.no_grad()
    def sequence_logps(self, group: Group, samples: Tensor, guided: bool = False) -> tuple[Tensor, Tensor]:
        with self._initial():
            return sequence_logps(self.model, group, samples, guided)

    # ---- as a sampler (Policy(rollouts_from="initial")): the calls rollouts make, as the initial model
    @torch.no_grad()
    def sample_images(self, *args, **kwargs) -> Tensor:
        with self._initial():
            return self.model.sample_images(*args, **kwargs)

    @torch.no_grad()
    def sample_texts(self, *args, **kwargs) -> list[list[str]]:
        with self._initial():
            return self.model.sample_texts(*args, **kwargs)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        with self._initial():
            return self.model.encode_images(pixels)
