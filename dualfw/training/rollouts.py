"""Every sampled rollout is written to the run folder as it is made, so nothing sampled is lost.

Format: `rollouts.jsonl`, JSON lines, one line per input per sampling round:

    t2i: {"direction": "t2i", "step": 12, "epoch": 0, "seed": 123, "prompt": "a red circle",
          "image_tokens": [[...N ints...] x K], "meta": {...prompt file fields...},
          "rewards": [K floats], "pairs": [[chosen, rejected], ...]}
    i2t: {"direction": "i2t", ..., "image_tokens": [...N ints of the real image...],
          "texts": [K strings], "meta": {"image": path}, "rewards": [...], "pairs": [...]}

`pairs` index the K samples (one [best, worst] for the paper's pairing; empty when the input was
skipped: reward spread not above the pairing margin). `read_rollouts` reads the file back.
"""

from __future__ import annotations

from pathlib import Path
import json
from typing import Iterator

from dualfw.core.files import iter_jsonl


class RolloutWriter:
    """Appends rollout records to a JSON-lines file, flushing each line (a crash loses nothing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_rollouts(path: str | Path) -> Iterator[dict]:
    """Yield the records of a rollouts file; a malformed line raises naming file and line."""
    for _, record in iter_jsonl(path):
        yield record
