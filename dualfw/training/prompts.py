"""Prompt files: JSON lines with a `prompt` field (GenEval metadata files included; the other
fields are kept as metadata) or plain text, one prompt a line. Errors name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from dualfw.core.errors import ConfigError, MissingFileError
from dualfw.core.files import resolve_path


def read_prompts(path: str | Path, key: str = "data.prompts", balance_by: str | None = None) -> list[dict]:
    """Read prompt records ({"prompt": str, ...metadata}) from `path`.

    JSON lines when the file ends in .jsonl / .json or its first non-blank line starts with "{";
    plain text otherwise. `key` is the config key named in errors.

    `balance_by` names a metadata field (e.g. GenEval's "tag"): each of its values then comes
    equally often, a value's records repeated in turn up to the most frequent value's count, so a
    category the file holds few prompts of is trained as often as the largest one.
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
    records, groups = [], {}
    balance_key = key.rpartition(".")[0] + ".balance_by"
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
        if balance_by is not None:
            if balance_by not in record:
                raise ConfigError(f"{file}:{lineno}: no {balance_by!r} field to balance the prompts by ({balance_key})")
            groups.setdefault(json.dumps(record[balance_by], sort_keys=True), []).append(record)
        records.append(record)
    if not records:
        raise ConfigError(f"prompt file '{file}' holds no prompts (set {key})")
    if balance_by is not None:
        if not as_json:
            raise ConfigError(f"{file}: plain-text prompts have no {balance_by!r} field to balance by ({balance_key})")
        most = max(len(group) for group in groups.values())
        records = [group[i % len(group)] for group in groups.values() for i in range(most)]
    return records
