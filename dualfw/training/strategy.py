"""FSDP2 through Lightning's ModelParallelStrategy, with sharded checkpoints that are written whole or
not at all, and the clean-up of what an interrupted checkpoint write leaves behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn

PARTIAL = ".partial"  # beside the checkpoints: writes in progress (files and sharded folders)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy (the model is sharded by `Policy.configure_model`) whose
    sharded checkpoints are atomic: every rank writes its shard into `<checkpoints>/.partial/<name>`,
    and once all have, rank 0 moves the whole folder into place. Lightning writes such a folder in
    place, so a run killed mid-write would leave new shards beside old metadata; here it leaves the
    previous checkpoint whole, and the next fit in that folder clears the leftover."""

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = path.parent / PARTIAL / path.name
        if self.is_global_zero and staging.exists():
            _remove(staging)
        self.barrier("dualfw_checkpoint_staged")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("dualfw_checkpoint_written")
        if self.is_global_zero:
            move_into_place(staging, path)
        self.barrier("dualfw_checkpoint_in_place")


def move_into_place(staging: Path, path: Path) -> None:
    """Replace `path` (a checkpoint file or folder, or nothing) by `staging`; the old one waits in
    `.partial/<name>.old` until the new one is in place, so a crash in between loses neither."""
    old = staging.with_name(staging.name + ".old")
    if old.exists():
        _remove(old)
    if path.exists():
        path.rename(old)
    staging.rename(path)
    if old.exists():
        _remove(old)


def clear_partial(checkpoints: Path) -> None:
    """Before a fit writes checkpoints into `checkpoints`: put back a checkpoint that a crash caught
    between `move_into_place`'s two renames, and remove every other leftover of interrupted writes."""
    partial = checkpoints / PARTIAL
    if not partial.is_dir():
        return
    restored = []
    for old in partial.glob("*.old"):
        target = checkpoints / old.stem
        if not target.exists():
            old.rename(target)
            restored.append(target.name)
    stale = list(partial.iterdir())
    for p in stale:
        _remove(p)
    if restored:
        rank_zero_warn(f"put back {', '.join(restored)} in '{checkpoints}': a crash had caught it being replaced")
    if stale:
        rank_zero_warn(f"removed {len(stale)} partial file(s) of interrupted checkpoint writes from '{partial}'")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
