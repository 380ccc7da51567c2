"""Where a fit's time goes: per-step sampling / scoring / update seconds, throughput, end-of-fit summary."""

import csv

import lightning as L
import pytest

from conftest import fit_args
from dualfw.cli import cli_main



def _fit(tmp_path, tiny_folder, *extra):
    return cli_main(fit_args(tmp_path, tiny_folder, "--trainer.max_steps=3", *extra))


def test_fit_logs_the_time_split_per_step_and_prints_a_summary(tmp_path, tiny_folder, capsys):
    from dualfw.training.callbacks import TimeSplit

    cli = _fit(tmp_path, tiny_folder)
    timers = [cb for cb in cli.trainer.callbacks if isinstance(cb, TimeSplit)]
    assert len(timers) == 1  # added by the DataModule, not listed in the recipe

    with open(tmp_path / "t2i" / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("time/step_s")]
    assert len(rows) == 3
    images_per_round, tokens_per_image = 2 * 3, cli.model.model.num_image_tokens
    for row in rows:
        step, sample, score, update = (float(row[f"time/{k}"]) for k in ("step_s", "sample_s", "score_s", "update_s"))
        assert sample > 0 and score > 0 and update > 0
        assert sample + score + update <= step
        # the step's rounds (the first step samples two: Lightning fetches one ahead)
        rounds = round(float(row["time/images_per_s"]) * sample / images_per_round)
        assert rounds in (1, 2)
        assert float(row["time/image_tokens_per_s"]) == pytest.approx(float(row["time/images_per_s"]) * tokens_per_image)

    totals = timers[0].totals
    assert totals["steps"] == 3 and totals["images"] == images_per_round * 4  # 3 rounds trained, 1 prefetched
    assert totals["sample_s"] == pytest.approx(sum(float(r["time/sample_s"]) for r in rows))
    out = capsys.readouterr().out
    summary = out[out.index("time split: 3 steps in "):]
    for phase in ("sampling", "scoring", "updating", "other"):
        assert phase in summary
    assert f"{int(totals['images'])} images" in summary and "image tokens/s" in summary


@pytest.mark.parametrize("time_split, listed, expected", [(True, False, 1), (False, False, 0), (True, True, 1)])
def test_the_datamodule_adds_one_time_split_unless_off(tmp_path, time_split, listed, expected):
    from dualfw.training.callbacks import TimeSplit
    from dualfw.training.datamodule import SelfRewardDataModule

    (tmp_path / "prompts.txt").write_text("a circle\n")
    dm = SelfRewardDataModule(prompts=str(tmp_path / "prompts.txt"), time_split=time_split)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[TimeSplit()] if listed else [])
    dm.trainer = trainer
    dm.setup("fit")
    dm.setup("fit")  # a second fit on the same trainer adds none
    assert sum(isinstance(cb, TimeSplit) for cb in trainer.callbacks) == expected
