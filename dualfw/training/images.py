"""Image inputs for the understanding direction: a folder of images or a JSON-lines file of paths.
No captions are needed (the data is non-parallel). Unreadable images are reported by path and
skipped, never fatal."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from dualfw.core.files import iter_jsonl
from dualfw.core.files import resolve_path
from dualfw.core.errors import ConfigError, MissingFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(path: str | Path, key: str = "data.images") -> list[Path]:
    """Image files of a folder (sorted, recursive) or of a JSON-lines file whose lines hold an
    "image" or "path" field (relative paths are taken from the file's folder)."""
    source = resolve_path(path)
    if not source.exists():
        raise MissingFileError(f"image source '{source}' does not exist (set {key})")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"image folder '{source}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) (set {key})")
        return files
    files = []
    for lineno, record in iter_jsonl(source, ConfigError):
        name = record.get("image", record.get("path"))
        if not isinstance(name, str):
            raise ConfigError(f"{source}:{lineno}: expected an object with an 'image' or 'path' field")
        files.append(source.parent / name)
    if not files:
        raise ConfigError(f"image list '{source}' holds no images (set {key})")
    return files


def load_image(path: Path, size: int) -> torch.Tensor | None:
    """RGB image as (3, size, size) floats in [0, 1], or None (with a warning naming the file)
    when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for missing, truncated, corrupt files
        warnings.warn(f"skipping unreadable image '{path}': {err}", stacklevel=2)
        return None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
