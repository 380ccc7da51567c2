"""The core algorithm, text-to-image direction: sample K -> self-score -> pair -> (loss in Policy).

    for each prompt x:
        y_1..y_K ~ pi(. | x)                      (images, with CFG)        sample_images
        R_G(y_i) = mean_k log pi(x_k | y_i, x_<k) (the model reads y_i)     DualScorer.image_rewards
        chosen, rejected = argmax R_G, argmin R_G (skip if spread < margin) best_vs_worst
    loss = SimPO / DPO on (x, y_chosen, y_rejected)                        Policy.training_step
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dualfw.models.base import ImageSampling, LMMAdapter


@dataclass
class Rollout:
    """K samples for each of B inputs, their self-rewards and the pair chosen from them."""

    prompts: list[str]
    tokens: Tensor  # (B, K, N) image tokens
    rewards: Tensor  # (B, K)
    chosen: Tensor  # (B,) index into K
    rejected: Tensor  # (B,)
    keep: Tensor  # (B,) bool: False when the reward spread is below the margin

    def pairs(self) -> dict:
        """The kept (chosen, rejected) pairs as a training batch."""
        keep = self.keep.nonzero().squeeze(-1)
        rows = torch.arange(len(self.prompts), device=self.tokens.device)
        return {
            "prompts": [self.prompts[i] for i in keep.tolist()],
            "chosen": self.tokens[rows, self.chosen][keep],
            "rejected": self.tokens[rows, self.rejected][keep],
            "chosen_reward": self.rewards[rows, self.chosen][keep],
            "rejected_reward": self.rewards[rows, self.rejected][keep],
        }


def best_vs_worst(rewards: Tensor, margin: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Pair the highest-reward sample against the lowest, per row of `rewards` (B, K).

    Rows whose spread max - min is not above `margin` are not kept: equal rewards give no pair.
    """
    chosen, rejected = rewards.argmax(-1), rewards.argmin(-1)
    spread = rewards.max(-1).values - rewards.min(-1).values
    keep = (spread > margin) & (chosen != rejected)
    return chosen, rejected, keep


@torch.no_grad()
def rollout_t2i(
    policy: LMMAdapter,
    scorer,
    prompts: list[str],
    k: int,
    sampling: ImageSampling,
    margin: float = 0.0,
    seed: int | None = None,
    progress: bool = False,
) -> Rollout:
    """Sample k images per prompt from `policy`, reward each by `scorer` (R_G), pair best vs worst."""
    tokens = policy.sample_images(prompts, k, sampling, seed=seed, progress=progress)
    flat_prompts = [p for p in prompts for _ in range(k)]
    rewards = scorer.image_rewards(tokens.flatten(0, 1), flat_prompts).view(len(prompts), k)
    chosen, rejected, keep = best_vs_worst(rewards, margin)
    return Rollout(prompts, tokens, rewards, chosen, rejected, keep)
