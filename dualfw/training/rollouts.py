"""Every sampled rollout is written to the run folder as it is made, so nothing sampled is lost.

Format: `rollouts.jsonl`, JSON lines, one line per input per sampling round:

    t2i: {"direction": "t2i", "round": 12, "rank": 0, "item": 0, "items": 4, "directions": ["t2i"],
          "step": 11, "epoch": 0, "seed": 123, "prompt": "a red circle",
          "image_tokens": [[...N ints...] x K], "meta": {...prompt file fields...},
          "rewards": [K floats], "pairs": [[chosen, rejected], ...]}
    i2t: {"direction": "i2t", ..., "image_tokens": [...N ints of the real image...],
          "texts": [K strings], "meta": {"image": path}, "rewards": [...], "pairs": [...]}

`round` counts sampling rounds from the start of the run (over epochs); a round is trained at one
optimizer step. `rank` is the process that sampled it, `item` the input's place among the `items`
inputs of its direction, `directions` every direction the round wrote; `step` is the global step
of the policy that drew it (Lightning fetches one batch ahead, so one step before the round is
trained). `pairs` index the K samples (one [best, worst] for the paper's pairing; empty when the
input was skipped: reward spread not above the pairing margin).

The file is an append-only log: a round's lines are written in one piece, flushed and fsync'd;
reopening a file whose last line was cut short by a crash cuts that fragment (with a warning).
A resumed run reads back the rounds it had sampled but not trained, so no round is sampled twice;
only a round cut short mid-write is written again, and `read_rollouts(path, dedupe=True)` keeps
the last copy of each input of each round.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterator

from dualfw.core.files import iter_jsonl


def cut_torn_tail(path: str | Path) -> int:
    """Cut a last line without its newline (a write cut short) from `path`; the bytes cut."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        end, block = size, 1 << 16
        while end > 0:  # the last newline, reading backwards
            start = max(0, end - block)
            f.seek(start)
            at = f.read(end - start).rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        else:
            keep = 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


class RolloutWriter:
    """Appends rollout records to a JSON-lines file: each record whole, flushed as written; a
    round's records (`write_many`) in one write, fsync'd. Opening cuts a torn last line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cut = cut_torn_tail(self.path)
        if cut:
            warnings.warn(f"rollouts file '{self.path}' ended in a torn line ({cut} bytes, a write cut short): cut", stacklevel=2)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_many(self, records: list[dict]) -> None:
        """Write records in one piece, then flush and fsync (one round survives a crash whole or
        leaves a torn tail that the next open cuts)."""
        self._file.write("".join(json.dumps(r) + "\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _key(record: dict):
    """What identifies one input of one sampling round (None for files without round indices)."""
    if "round" not in record:
        return None
    return record.get("rank", 0), record["round"], record["direction"], record.get("item", 0)


def read_rollouts(path: str | Path, dedupe: bool = False) -> Iterator[dict]:
    """Yield the records of a rollouts file; a malformed line raises naming file and line, except
    a torn last line (no newline: a crash mid-write), which is skipped with a warning.

    dedupe: each input of each round once, its last copy (the one a resumed run trained on), in
    the order those copies were written.
    """
    records: list[dict] = []
    for _, obj in iter_jsonl(path, torn_tail=True):
        if not dedupe:
            yield obj
        else:
            records.append(obj)
    if dedupe:
        last = {}
        for i, record in enumerate(records):
            key = _key(record)
            last[key if key is not None else ("line", i)] = i
        keep = sorted(last.values())
        yield from (records[i] for i in keep)
