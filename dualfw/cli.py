"""`dualfw fit | validate | test | predict --config conf/t2i.yaml` on LightningCLI.

Several --config files compose (later wins); values may use omegaconf interpolation
(`${data.init_args.k}`); `--print_config` shows the resolved config. Bad input ends in one line,
`dualfw: error: ...`, naming the key, file or line.
"""

from __future__ import annotations

import re
import sys

from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from dualfw.core.errors import find_config_error

# the command line of the latest `cli_main` call, for reports (dualfw.eval.callbacks.command_line)
COMMAND: list[str] | None = None

# phrases that mark the informative line of jsonargparse's nested error reports
_CULPRIT_MARKS = ("not accepted", "does not accept", "is required", "does not exist", "Unexpected", "unknown",
                  "Expected a <class", "Expected a typing")


def condense(message: str) -> str:
    """One line from jsonargparse's multi-line parse error: the path of nested keys down to the
    culprit ('Parser key "model.optimizer.lr": Expected a <class 'float'>')."""
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    if not lines:
        return message
    # skip "Expected a <class 'NoneType'>": the optional (None) branch of every class-valued key
    at = next((i for i, line in enumerate(lines[1:], 1)
               if any(mark in line for mark in _CULPRIT_MARKS) and "NoneType" not in line), None)
    if at is None:
        return lines[0]
    keys = re.findall(r'Parser key "([^"]+)"', "\n".join(lines[:at]))
    path = ".".join(dict.fromkeys(keys))  # nested classes' keys, outermost first
    return f'Parser key "{path}": {lines[at]}' if path else lines[at]


class DualfwCLI(LightningCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # parse without jsonargparse's usage dump; report the culprit in one line
        subcommands = getattr(parser, "_subcommands_action", None)
        parsers = [parser, *(subcommands.choices.values() if subcommands else [])]
        for p in parsers:
            p.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            print(f"dualfw: error: {condense(str(err))}", file=sys.stderr)
            sys.exit(2)
        finally:
            for p in parsers:
                p.exit_on_error = True


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Entry point of the `dualfw` command (also callable in-process, e.g. from tests)."""
    import lightning as L

    global COMMAND
    COMMAND = ["dualfw", *(sys.argv[1:] if args is None else [str(a) for a in args])]
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
