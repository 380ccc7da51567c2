"""`dualfw fit | validate | test | predict --config conf/t2i.yaml` on LightningCLI.

Several --config files compose (later wins); values may use omegaconf interpolation
(`${data.init_args.k}`); `--print_config` shows the resolved config. Bad input ends in one line,
`dualfw: error: ...`, naming the key, file or line.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_warn

from dualfw.core.errors import ConfigError, MissingFileError, find_config_error

# the command line of the latest `cli_main` call, for reports (dualfw.eval.callbacks.command_line)
COMMAND: list[str] | None = None

# phrases that mark the informative line of jsonargparse's nested error reports
_CULPRIT_MARKS = ("not accepted", "does not accept", "is required", "does not exist", "Unexpected", "unknown",
                  "Expected a <class", "Expected a typing")


# how jsonargparse reports a class path that does not import
_IMPORT_FAILURES = ("has no attribute", "No module named", "cannot import", "not accessible or invalid")


def condense(message: str) -> str:
    """One line from jsonargparse's multi-line parse error: the path of nested keys down to the
    culprit ('Parser key "model.optimizer.lr": Expected a <class 'float'>'); a class path that
    does not import is named with the reason."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    if not lines:
        return message
    for i, line in enumerate(lines[:-1]):
        found = re.match(r"Problem with given class_path '([^']+)':", line)
        if found and any(mark in lines[i + 1] for mark in _IMPORT_FAILURES):
            keys = re.findall(r'Parser key "([^"]+)"', "\n".join(lines[:i]))
            path = ".".join(dict.fromkeys(keys))
            where = f'Parser key "{path}": ' if path else ""
            return f"{where}class_path '{found.group(1)}' cannot be imported ({lines[i + 1]})"
    # skip "Expected a <class 'NoneType'>": the optional (None) branch of every class-valued key
    at = next((i for i, line in enumerate(lines[1:], 1)
               if any(mark in line for mark in _CULPRIT_MARKS) and "NoneType" not in line), None)
    if at is None:
        return lines[0]
    keys = re.findall(r'Parser key "([^"]+)"', "\n".join(lines[:at]))
    path = ".".join(dict.fromkeys(keys))  # nested classes' keys, outermost first
    return f'Parser key "{path}": {lines[at]}' if path else lines[at]


def _init_args(node) -> dict:
    """A class-valued config node's init_args as a dict ({} when unset)."""
    if node is None:
        return {}
    args = node.get("init_args") if isinstance(node, (Namespace, dict)) else None
    if args is None:
        return {}
    return args.as_dict() if isinstance(args, Namespace) else dict(args)


def _class_path(node) -> str:
    return str(node.get("class_path", "")) if isinstance(node, (Namespace, dict)) else ""


def _as_dict(value) -> dict:
    return value.as_dict() if isinstance(value, Namespace) else dict(value)


# --ckpt_path values Lightning resolves itself
_CKPT_NAMES = ("last", "best", "hpc", "registry")


def check_checkpoint(path: str) -> None:
    """A --ckpt_path that exists and holds a checkpoint: a torch.save zip file, or a sharded
    (torch.distributed.checkpoint) folder."""
    if path in _CKPT_NAMES or str(path).startswith("registry:") or "://" in str(path):
        return
    file = Path(path).expanduser()
    if not file.exists():
        raise MissingFileError(f"--ckpt_path '{file}' does not exist")
    if file.is_dir():
        if not (file / ".metadata").is_file() and not (file / "meta.pt").is_file():
            raise ConfigError(f"--ckpt_path '{file}' is a folder without a sharded checkpoint (.metadata)")
        return
    try:
        with zipfile.ZipFile(file) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl")
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ConfigError(f"--ckpt_path '{file}' is not a readable checkpoint (truncated or not a torch.save file: {err})") from None


def _check_folder(path, key: str) -> None:
    """A folder the run writes into: not a file, and writable where it exists (or its parent)."""
    if path is None:
        return
    folder = Path(str(path)).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key} '{folder}' is a file, not a folder")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} '{folder}' is not writable ('{existing}' refuses writes)")


def check_config(config: Namespace, subcommand: str | None) -> None:
    """The checks that need no model, run before any model loads: sampling options, margin,
    learning rate, the prompt and image files or predictions folder, the model folder, --ckpt_path,
    the run folder, and an evaluation callback for `dualfw test`. Each failure is a ConfigError
    naming its key."""
    from dualfw.adapters.janus import check_janus_folder
    from dualfw.core.interface import ImageSampling, TextSampling
    from dualfw.training.datamodule import SCHEDULES, check_margin, directions_needed
    from dualfw.training.images import list_images
    from dualfw.training.predict import read_predictions
    from dualfw.training.prompts import read_prompts

    data_node, model_node, trainer = config.get("data"), config.get("model"), config.get("trainer")
    data = _init_args(data_node)
    if _class_path(data_node).endswith("SelfRewardDataModule"):
        for key, cls in (("sampling", ImageSampling), ("text_sampling", TextSampling)):
            if data.get(key) is not None:
                try:
                    cls(**_as_dict(data[key]))
                except ConfigError as err:
                    raise ConfigError(f"data.init_args.{key}.{err}") from None
        if data.get("margin") is not None:
            check_margin(data["margin"], "data.init_args.margin")
        schedule, every = data.get("schedule", "t2i"), max(1, int(data.get("alternate_every") or 1))
        needs = directions_needed(schedule, every) if schedule in SCHEDULES else set()
        if data.get("from_predictions"):
            read_predictions(data["from_predictions"])
        elif "t2i" in needs and data.get("prompts"):
            read_prompts(data["prompts"], key="data.init_args.prompts", balance_by=data.get("balance_by"))
        if "i2t" in needs and data.get("images"):
            list_images(data["images"], key="data.init_args.images")
    policy = _init_args(model_node)
    adapter = policy.get("model")
    if _class_path(adapter).endswith("JanusAdapter") and _init_args(adapter).get("path"):
        check_janus_folder(_init_args(adapter)["path"])
    per_step = data.get("inputs_per_step")
    if _init_args(policy.get("scorer")).get("batch_contrast") and isinstance(per_step, int) and per_step < 2:
        raise ConfigError(
            "model.init_args.scorer.init_args.batch_contrast scores each input against the step's other inputs: "
            f"set data.init_args.inputs_per_step >= 2 (got {per_step}) or batch_contrast false"
        )
    lr = _init_args(policy.get("optimizer")).get("lr")
    if isinstance(lr, (int, float)) and not lr > 0:
        raise ConfigError(f"model.init_args.optimizer.init_args.lr must be > 0, got {lr}")
    if config.get("ckpt_path"):
        check_checkpoint(str(config["ckpt_path"]))
    if trainer is not None:
        _check_folder(trainer.get("default_root_dir"), "trainer.default_root_dir")
        for logger in trainer.get("logger") if isinstance(trainer.get("logger"), list) else [trainer.get("logger")]:
            _check_folder(_init_args(logger).get("save_dir"), "trainer.logger.init_args.save_dir")
    if subcommand == "test":
        from dualfw.eval.callbacks import GenEvalCallback, PopeCallback

        callbacks = trainer.get("callbacks") or [] if trainer is not None else []
        classes = [_import(_class_path(c)) for c in (callbacks if isinstance(callbacks, list) else [callbacks]) if _class_path(c)]
        if not any(isinstance(c, type) and issubclass(c, (GenEvalCallback, PopeCallback)) for c in classes):
            raise ConfigError(
                "dualfw test evaluates in its callbacks and none is configured: add one to trainer.callbacks "
                "(e.g. --config conf/eval/shapes.yaml: dualfw.GenEvalCallback, dualfw.PopeCallback)"
            )


def _import(path: str):
    """The object a class path names (None when it cannot be imported)."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _is_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def prepare_run_folder(trainer, ckpt_path, self_reward: bool = True) -> None:
    """Before a fit writes anything: refuse a self-reward run folder that already holds a run
    unless resuming it (--ckpt_path), so two runs' rollouts never share a file; clear the partial
    files of checkpoint writes a crash interrupted, and make new ones land beside the checkpoints."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    folder = Path(trainer.log_dir or trainer.default_root_dir)
    callback = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)), None)
    checkpoints = Path(callback.dirpath) if callback is not None and callback.dirpath else folder / "checkpoints"
    if ckpt_path is None and self_reward:
        held = [p.name for p in folder.glob("rollouts*.jsonl") if p.stat().st_size > 0]
        held += [f"checkpoints/{p.name}" for p in checkpoints.glob("*.ckpt")] if checkpoints.is_dir() else []
        if held:
            raise ConfigError(
                f"run folder '{folder}' already holds a run ({', '.join(sorted(held)[:3])}): resume it with "
                "--ckpt_path last, or start a new one in another folder (leave trainer.logger.init_args.version "
                "unset for the next free version_N)"
            )
    elif ckpt_path is not None and ckpt_path not in _CKPT_NAMES and Path(ckpt_path).expanduser().resolve().parent != checkpoints.resolve():
        rank_zero_warn(
            f"--ckpt_path '{ckpt_path}' is not in this run's checkpoint folder '{checkpoints}': the run continues in "
            f"'{folder}' (resume a run in its own folder with its version and --ckpt_path last)"
        )
    if callback is None or "://" in str(checkpoints):
        return
    from dualfw.training.strategy import PARTIAL, clear_partial

    if _is_rank_zero():
        clear_partial(checkpoints)
    partial = checkpoints / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    # Lightning writes a checkpoint file through fsspec's transaction: into a temporary file, then
    # moved into place. Temporary files here lie on the checkpoints' filesystem and are cleared above
    # (sharded folders are staged there by dualfw.FSDP2Strategy).
    tempfile.tempdir = str(partial)


def _bad_config_file(args) -> str | None:
    """'config file X is not valid YAML: ... (line, column)' for the first --config file that does
    not parse (jsonargparse's own report names no file), else None."""
    import yaml

    argv = sys.argv[1:] if args is None else [str(a) for a in args] if isinstance(args, list) else []
    paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        try:
            yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue  # jsonargparse reports a missing or unreadable file with its name
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            return f"config file '{path}' is not valid YAML: {getattr(err, 'problem', None) or err}{where}"
    return None


class DualfwCLI(LightningCLI):
    def before_fit(self) -> None:
        from dualfw.training.datamodule import SelfRewardDataModule

        self_reward = isinstance(self.datamodule, SelfRewardDataModule)
        prepare_run_folder(self.trainer, self.config[self.subcommand].get("ckpt_path"), self_reward)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # parse without jsonargparse's usage dump; report the culprit in one line
        subcommands = getattr(parser, "_subcommands_action", None)
        parsers = [parser, *(subcommands.choices.values() if subcommands else [])]
        for p in parsers:
            p.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            print(f"dualfw: error: {_bad_config_file(args) or condense(str(err))}", file=sys.stderr)
            sys.exit(2)
        finally:
            for p in parsers:
                p.exit_on_error = True
        # before Lightning reads --ckpt_path's hyperparameters and before any model loads
        subcommand = self.config.get("subcommand")
        check_config(self.config.get(subcommand) if subcommand else self.config, subcommand)


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Entry point of the `dualfw` command (also callable in-process, e.g. from tests)."""
    global COMMAND
    COMMAND = ["dualfw", *(sys.argv[1:] if args is None else [str(a) for a in args])]
    tempdir = tempfile.tempdir
    try:
        return _cli(args, run)
    finally:
        tempfile.tempdir = tempdir  # prepare_run_folder points it into the run folder for the fit


def _cli(args, run: bool) -> LightningCLI:
    import lightning as L

    return DualfwCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # a re-run into an existing run folder must not abort on the config saved there
        save_config_callback=SaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main() -> None:
    try:
        cli_main()
    except Exception as exc:  # user input errors become one line; anything else keeps its traceback
        error = find_config_error(exc)
        if error is None:
            raise
        print(f"dualfw: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
