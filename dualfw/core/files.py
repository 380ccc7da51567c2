"""Files: packaged paths (`dualfw:assets/...`) and JSON lines, the format of prompts, rollouts,
GenEval metadata and POPE files."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

PACKAGE_PREFIX = "dualfw:"


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """`dualfw:assets/x.txt` names a file shipped inside the package; anything else is a local path."""
    text = str(path)
    if text.startswith(PACKAGE_PREFIX):
        return Path(str(resources.files("dualfw").joinpath(text[len(PACKAGE_PREFIX) :])))
    return Path(text).expanduser()


def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write one JSON object per line (creating the parent folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fp:
        for record in records:
            fp.write(json.dumps(record) + "\n")
    return path


def iter_jsonl(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; `error` names file and line when a
    line is not a JSON object."""
    with open(path, encoding="utf-8") as fp:
        for lineno, line in enumerate(fp, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> list[dict]:
    """Every object of a JSON-lines file, in order (see `iter_jsonl`)."""
    return [obj for _, obj in iter_jsonl(path, error)]
