"""The core algorithm: sample K -> self-score -> pair -> (loss in Policy), in both directions.

    text-to-image (t2i), for each prompt x:
        y_1..y_K ~ pi(. | x)                        images, with CFG            sample_images
        R_G(y_i) = mean_k log pi(x_k | y_i, x_<k)   the model reads y_i         DualScorer.image_rewards
    image-to-text (i2t), for each image v (VQ tokens v_1..v_N):
        t_1..t_K ~ pi(. | v, instruction)           descriptions                sample_texts
        R_U(t_i) = mean_k log pi(v_k | t_i, v_<k)   the model draws v from t_i  DualScorer.text_rewards
    pairs = select_pairs(R, "best_worst" | "all" | "top_bottom", margin)
    loss  = SimPO / DPO / IPO on pairs, or GRPO on the whole group               Policy.training_step
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dualfw.core.errors import ConfigError
from dualfw.core.interface import Images, ImageSampling, LMMAdapter, TextSampling

Pairing = Literal["best_worst", "all", "top_bottom"]
PAIRINGS = ("best_worst", "all", "top_bottom")


def derive_seed(*keys: int) -> int:
    """A sampling seed derived from integer keys (e.g. run seed, epoch, round): the same keys give
    the same seed wherever rollouts, predictions or evaluations are sampled."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@dataclass
class Group:
    """K samples for each of B inputs in one direction, their self-rewards and the pairs drawn.

    t2i: inputs are prompts (list[str]); samples are image tokens (B, K, N).
    i2t: inputs are images (pixels (B, 3, H, W) and their VQ tokens (B, N)); samples are texts
    (B lists of K strings).
    """

    direction: Literal["t2i", "i2t"]
    rewards: Tensor  # (B, K)
    pairs: Tensor  # (P, 3) rows of (input index, chosen sample, rejected sample)
    prompts: list[str] = field(default_factory=list)
    image_tokens: Tensor | None = None  # t2i: (B, K, N) samples; i2t: (B, N) the real images
    pixels: Tensor | None = None  # i2t
    texts: list[list[str]] = field(default_factory=list)  # i2t samples
    instruction: str = ""  # i2t: the user turn the descriptions answer
    meta: list[dict] = field(default_factory=list)  # per input: prompt-file fields or image path
    guidance_scale: float = 1.0  # t2i: the CFG scale the images were sampled with
    seconds: dict[str, float] = field(default_factory=dict)  # wall seconds spent: "sample", "score" (empty: read back)

    @property
    def kept(self) -> Tensor:
        """(B,) bool: inputs with at least one pair (the others were skipped)."""
        kept = torch.zeros(self.rewards.shape[0], dtype=torch.bool, device=self.rewards.device)
        kept[self.pairs[:, 0]] = True
        return kept


def select_pairs(rewards: Tensor, pairing: Pairing = "best_worst", margin: float = 0.0, top_k: int = 2) -> Tensor:
    """(input, chosen, rejected) index triples from rewards (B, K); a pair needs r_c - r_r > margin.

    best_worst: argmax vs argmin (the paper). all: every ordered pair. top_bottom: the i-th best
    vs the i-th worst, i < top_k (disjoint samples only).
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown pairing {pairing!r}: choose one of {', '.join(PAIRINGS)}")
    b, k = rewards.shape
    if pairing == "best_worst":
        chosen, rejected = rewards.argmax(-1), rewards.argmin(-1)
        rows = torch.arange(b, device=rewards.device)
    elif pairing == "all":
        rows, chosen, rejected = torch.meshgrid(
            torch.arange(b, device=rewards.device), torch.arange(k, device=rewards.device),
            torch.arange(k, device=rewards.device), indexing="ij",
        )
        rows, chosen, rejected = rows.flatten(), chosen.flatten(), rejected.flatten()
    else:
        n = min(top_k, k // 2)
        order = rewards.argsort(-1, descending=True)
        rows = torch.arange(b, device=rewards.device).repeat_interleave(n)
        chosen, rejected = order[:, :n].flatten(), order.flip(-1)[:, :n].flatten()
    ok = rewards[rows, chosen] - rewards[rows, rejected] > margin
    return torch.stack([rows[ok], chosen[ok], rejected[ok]], dim=1)


def clock(device: torch.device | str | None = None) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously, so a phase's
    time is only its own after a synchronisation)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def rollout_t2i(
    policy: LMMAdapter,
    scorer,
    prompts: list[str],
    k: int,
    sampling: ImageSampling,
    pairing: Pairing = "best_worst",
    margin: float = 0.0,
    seed: int | None = None,
    progress: bool = False,
    top_k: int = 2,
) -> Group:
    """Sample k images per prompt from `policy`, reward each by `scorer` (R_G), pick pairs
    (`select_pairs` with `pairing`, `margin`, `top_k`)."""
    start = clock(policy.device)
    tokens = policy.sample_images(prompts, k, sampling, seed=seed, progress=progress)
    sampled = clock(tokens.device)
    rewards = scorer.image_rewards(tokens.flatten(0, 1), [p for p in prompts for _ in range(k)]).view(len(prompts), k)
    scored = clock(rewards.device)
    return Group(
        "t2i", rewards, select_pairs(rewards, pairing, margin, top_k), prompts=prompts, image_tokens=tokens,
        guidance_scale=sampling.guidance_scale, seconds={"sample": sampled - start, "score": scored - sampled},
    )


@torch.no_grad()
def rollout_i2t(
    policy: LMMAdapter,
    scorer,
    pixels: Tensor,
    k: int,
    sampling: TextSampling,
    instruction: str,
    pairing: Pairing = "best_worst",
    margin: float = 0.0,
    seed: int | None = None,
    top_k: int = 2,
) -> Group:
    """Sample k descriptions per image from `policy`, reward each by `scorer` (R_U), pick pairs
    (`select_pairs` with `pairing`, `margin`, `top_k`)."""
    start = clock(pixels.device)
    texts = policy.sample_texts(pixels, k, instruction, sampling, seed=seed)
    sampled = clock(pixels.device)
    image_tokens = policy.encode_images(pixels)  # R_U's target: part of scoring
    rewards = scorer.text_rewards(image_tokens, texts)
    scored = clock(rewards.device)
    return Group(
        "i2t", rewards, select_pairs(rewards, pairing, margin, top_k),
        image_tokens=image_tokens, pixels=pixels, texts=texts, instruction=instruction,
        seconds={"sample": sampled - start, "score": scored - sampled},
    )


def sequence_logps(model: LMMAdapter, group: Group, samples: Tensor, guided: bool = False) -> tuple[Tensor, Tensor]:
    """Summed policy log-prob and length of the chosen samples (rows of (input, sample) pairs).

    t2i: log pi(image tokens | prompt), the conditional model alone or, when `guided`, the
    classifier-free-guided distribution the images were sampled from (group.guidance_scale).
    i2t: log pi(text + end-of-sequence | image).
    """
    rows, cols = samples[:, 0].tolist(), samples[:, 1].tolist()
    if group.direction == "t2i":
        tokens = group.image_tokens[samples[:, 0], samples[:, 1]]
        scale = group.guidance_scale if guided else 1.0
        logps = model.image_logprobs([group.prompts[r] for r in rows], tokens, scale).sum(-1)
        return logps, torch.full_like(logps, float(tokens.shape[1]))
    texts = [group.texts[r][c] for r, c in zip(rows, cols)]
    images = Images(group.image_tokens[samples[:, 0]], group.pixels[samples[:, 0]])
    logps, mask = model.text_logprobs(images, texts, group.instruction, eos=True)
    return logps.sum(-1), mask.sum(-1).float()
