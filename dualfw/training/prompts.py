"""Prompt files: JSON lines with a `prompt` field (GenEval metadata files included; the other
fields are kept as metadata) or plain text, one prompt a line. Errors name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from dualfw.core.errors import ConfigError, MissingFileError
from dualfw.core.files import resolve_path


def read_prompts(path: str | Path, key: str = "data.prompts") -> list[dict]:
    """Read prompt records ({"prompt": str, ...metadata}) from `path`.

    JSON lines when the file ends in .jsonl / .json or its first non-blank line starts with "{";
    plain text otherwise. `key` is the config key named in errors.
    """
    file = resolve_path(path)
    if not file.is_file():
        raise MissingFileError(f"prompt file '{file}' does not exist (set {key})")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(f"{file}:{lineno}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}; save the file as UTF-8)") from None
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    as_json = file.suffix in {".jsonl", ".json"} or first.startswith("{")
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not as_json:
            records.append({"prompt": line.strip()})
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}:{lineno}: malformed JSON line ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ConfigError(f"{file}:{lineno}: expected an object with a non-empty string 'prompt' field")
        records.append(record)
    if not records:
        raise ConfigError(f"prompt file '{file}' holds no prompts (set {key})")
    return records
