"""What a detector returns, shared by every GenEval backend (Shapes exact detector, open-vocabulary
detectors, user classes) and by the GenEval rules that score it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class Detection:
    """One detected object.

    label: class name as it appears in GenEval metadata (e.g. "red circle" is NOT a label; "circle" is).
    box: (x1, y1, x2, y2) in pixels, y grows downwards.
    score: confidence in [0, 1].
    mask: optional boolean HxW mask of the object.
    color: optional color name when the detector knows it exactly (the Shapes detector does);
        the GenEval rules then skip the color classifier for this detection.
    """

    label: str
    box: tuple[float, float, float, float]
    score: float
    mask: np.ndarray | None = None
    color: str | None = None


@runtime_checkable
class Detector(Protocol):
    """Finds objects of the given classes in one RGB uint8 image (H, W, 3)."""

    def __call__(self, image: np.ndarray, classes: Sequence[str]) -> list[Detection]: ...


@runtime_checkable
class ColorClassifier(Protocol):
    """Names the color of one detected object among `colors` (GenEval: 10 colors)."""

    def __call__(self, image: np.ndarray, detection: Detection, colors: Sequence[str]) -> str: ...
