"""Files: packaged paths (`dualfw:assets/...`) and JSON lines, the format of prompts, rollouts,
GenEval metadata and POPE files."""

from __future__ import annotations

import json
import os
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

from dualfw.core.errors import ConfigError, MissingFileError

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


def iter_jsonl(
    path: str | os.PathLike[str], error: type[Exception] = ValueError, torn_tail: bool = False
) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; `error` names file and line when a
    line is not a JSON object. With `torn_tail`, an unparsable last line without its newline (a
    write cut short by a crash) is skipped with a warning instead."""
    with open(path, encoding="utf-8") as fp:
        for lineno, line in enumerate(fp, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if torn_tail and not line.endswith("\n"):
                    warnings.warn(f"{path}:{lineno}: torn last line skipped (a write cut short)", stacklevel=3)
                    return
                raise error(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_jsonl(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> list[dict]:
    """Every object of a JSON-lines file, in order (see `iter_jsonl`)."""
    return [obj for _, obj in iter_jsonl(path, error)]


def read_model_config(path: str | os.PathLike[str]) -> tuple[Path, dict]:
    """(folder, parsed config.json) of a local model checkpoint folder; a missing folder or a
    missing, non-UTF-8 or non-JSON-object config.json fails naming the file."""
    folder = resolve_path(path)
    if not folder.is_dir():
        raise MissingFileError(
            f"model folder '{folder}' does not exist (set model.init_args.model.init_args.path to a local checkpoint folder)"
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"model folder '{folder}' has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"'{config_file}' is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"'{config_file}' is not UTF-8 text (byte {err.start}): a corrupt config.json") from None
    if not isinstance(config, dict):
        raise ConfigError(f"'{config_file}' is not a JSON object")
    return folder, config


def check_model_weights(folder: Path) -> None:
    """The checkpoint's weights are there and readable (safetensors headers and sizes, or torch
    .bin files), without loading them; fails naming the file."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"'{index}' is not a valid safetensors index ({type(err).__name__}: {err})") from None
        files = [folder / name for name in shards]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            if any(folder.glob("pytorch_model*.bin")):
                return  # torch weights: transformers reads them
            raise MissingFileError(f"model folder '{folder}' has no weights (model.safetensors)")
    for file in files:
        if not file.is_file():
            raise MissingFileError(f"model folder '{folder}' lacks the weight file '{file.name}' that its index names")
        try:
            with safe_open(str(file), framework="pt") as weights:
                names = list(weights.keys())
        except Exception as err:  # safetensors raises its own SafetensorError for every kind of damage
            raise ConfigError(f"'{file}' is not a readable safetensors file ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        if not names:
            raise ConfigError(f"'{file}' holds no tensors")
