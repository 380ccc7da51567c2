"""The model interface: what the self-reward loop needs from a unified LMM.

Adding a new LMM means one file implementing `LMMAdapter` and a YAML overlay in `conf/models/`;
`tests/test_adapter_contract.py` runs the same contract against every registered adapter.

Conventions shared by every adapter:
- images are float tensors (n, 3, H, W) in [0, 1] at `image_size`;
- image tokens are LongTensors (n, num_image_tokens) of VQ codebook indices;
- log-probs are per token, float32, with gradients whenever grad mode is on;
- prompts are plain strings; the adapter applies the model's own chat templates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass
class ImageSampling:
    """How images are sampled. guidance_scale 1 disables classifier-free guidance; 0 temperature
    means greedy; top_k 0 and top_p 1 disable those filters."""

    guidance_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class TextSampling:
    """How descriptions are sampled (understanding direction)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


class LMMAdapter(nn.Module, ABC):
    """A unified LMM seen through the two directions the dual self-reward needs.

    Subclasses hold the underlying model as a submodule (so Lightning moves, shards and
    checkpoints it) and implement the abstract methods below.
    """

    #: number of VQ tokens per generated image
    num_image_tokens: int
    #: side in pixels of generated images
    image_size: int

    @abstractmethod
    def sample_images(
        self,
        prompts: list[str],
        k: int,
        sampling: ImageSampling = ImageSampling(),
        seed: int | None = None,
        progress: bool = False,
    ) -> torch.LongTensor:
        """Sample `k` images per prompt; returns tokens (len(prompts), k, num_image_tokens).

        The prompt prefix is computed once per prompt and shared by its k samples.
        """

    @abstractmethod
    def decode_images(self, tokens: torch.LongTensor) -> torch.Tensor:
        """VQ tokens (n, N) -> pixels (n, 3, H, W) in [0, 1]."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.LongTensor:
        """Pixels (n, 3, H, W) in [0, 1] -> VQ tokens (n, N)."""

    @abstractmethod
    def image_logprobs(self, prompts: list[str], tokens: torch.LongTensor, guidance_scale: float = 1.0) -> torch.Tensor:
        """Per-token log p(image token | prompt, earlier image tokens), (n, N).

        `prompts[i]` conditions `tokens[i]`; this is the policy log-prob of a generated image.
        guidance_scale 1: the conditional model alone. s != 1: the classifier-free-guided
        distribution that `sample_images` draws from at temperature 1 with the same scale,
        log softmax(uncond + s * (cond - uncond)), with the same unconditional input.
        """

    @abstractmethod
    def text_logprobs(
        self, pixels: torch.Tensor | None, texts: list[str], instruction: str, eos: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log p(text | image) with `instruction` as the user turn and `texts[i]` as the
        assistant answer about `pixels[i]` (no image in the prompt when `pixels` is None). With
        `eos` the end-of-sequence token after each text is scored too. Returns (logps, mask), both
        (n, T_max); mask marks the scored tokens, logps is 0 elsewhere."""

    def sample_texts(
        self,
        pixels: torch.Tensor,
        k: int,
        instruction: str,
        sampling: TextSampling = TextSampling(),
        seed: int | None = None,
    ) -> list[list[str]]:
        """Sample `k` descriptions per image (understanding direction)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement the understanding direction yet")

    def save_pretrained(self, folder: str) -> Path:
        """Save weights and processing files where the model's own library loads them."""
        raise NotImplementedError(f"{type(self).__name__} cannot export yet")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
