"""Model pixels <-> 8-bit images: what a saved PNG holds, the values evaluations judge and predictions write."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """Pixels (n, 3, H, W) in [0, 1] -> uint8 (n, H, W, 3), the values a saved PNG holds."""
    return (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_pixels(images: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (n, 3, H, W) in [0, 1], what a model reads."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
