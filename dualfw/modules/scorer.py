"""The DualScorer: the model grading its own samples through the inverse task."""

from __future__ import annotations

import copy
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from dualfw.errors import ConfigError
from dualfw.models.base import LMMAdapter


def reduce_logps(logps: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """Per-sequence reward from per-token log-probs: "mean" (the paper) or "sum" over `mask`."""
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if reduction == "mean" else total


class DualScorer(L.LightningModule):
    """Computes the dual self-reward R_G(y) = (1/|x|) sum_k log pi(x_k | y, x_<k): the likelihood of
    the prompt x when the model reads the sampled image y.

    Args:
        reduction: "mean" per token (the paper) or "sum".
        instruction: the user turn put before the scored prompt, in the model's understanding
            template ("<|User|>: <image>\\n{instruction}\\n\\n<|Assistant|>: {prompt}").
        frozen: score with a frozen copy of the initial model instead of the current policy.
        batch_size: candidates scored per forward pass.
    """

    def __init__(
        self,
        reduction: Literal["mean", "sum"] = "mean",
        instruction: str = "Describe this image.",
        frozen: bool = False,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"scorer.reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction, self.instruction, self.frozen, self.batch_size = reduction, instruction, frozen, batch_size
        self._model: list[LMMAdapter] = []  # a list keeps the policy's weights out of this module's state

    def attach(self, policy_model: LMMAdapter) -> None:
        """Score with `policy_model` itself, or with a frozen copy of it when `frozen`."""
        model = policy_model
        if self.frozen:
            model = copy.deepcopy(policy_model).eval().requires_grad_(False)
        self._model = [model]

    @property
    def model(self) -> LMMAdapter:
        if not self._model:
            raise RuntimeError("DualScorer has no model: call attach(policy_model) first")
        return self._model[0]

    @torch.no_grad()
    def image_rewards(self, tokens: Tensor, prompts: list[str]) -> Tensor:
        """R_G for each image (as VQ tokens, (n, N)) and the prompt it was sampled for; (n,)."""
        rewards = []
        for start in range(0, len(prompts), self.batch_size):
            part = slice(start, start + self.batch_size)
            pixels = self.model.decode_images(tokens[part])
            logps, mask = self.model.text_logprobs(pixels, prompts[part], self.instruction)
            rewards.append(reduce_logps(logps, mask, self.reduction))
        return torch.cat(rewards)
