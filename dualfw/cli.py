"""`dualfw fit | validate | test | predict --config conf/t2i.yaml` on LightningCLI.

Several --config files compose (later wins); values may use omegaconf interpolation
(`${data.k}`); `--print_config` shows the resolved config.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Entry point of the `dualfw` command (also callable in-process, e.g. from tests)."""
    import lightning as L

    return LightningCLI(
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
    cli_main()


if __name__ == "__main__":
    main()
