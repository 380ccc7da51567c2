"""Crash-safe runs: a fit killed (SIGKILL) at several moments and resumed each time ends where an
uninterrupted run of the same seed ends; the rollouts log survives torn writes; a finished run's
folder is never reused by accident."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fit_args
from dualfw.training.rollouts import RolloutWriter, read_rollouts

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf" / "t2i.yaml")
STEPS = 8

# A callback the killed fits load: it records which round each training step takes and kills its
# own process (SIGKILL) after a given step, or halfway through writing that step's checkpoint.
KILLER = '''
import json, os, signal
import lightning as L


class Trace(L.Callback):
    def __init__(self, trace: str, kill_at: int = -1, during_save: bool = False, before_last: bool = False):
        self.trace, self.kill_at, self.during_save, self.before_last = trace, kill_at, during_save, before_last
        self.saves = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.trace, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "step": trainer.global_step, "round": list(batch["round"])}) + "\\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.kill_at and not (self.during_save or self.before_last):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == self.kill_at and self.before_last:
            self.saves += 1
            if self.saves == 2:  # the step's checkpoint is on disk, last.ckpt not yet updated
                os.kill(os.getpid(), signal.SIGKILL)
        if trainer.global_step == self.kill_at and self.during_save:
            from fsspec.implementations.local import LocalFileOpener

            def write(opener, data):  # half the bytes reach the disk, then the process dies
                opener.f.write(data[: len(data) // 2])
                opener.f.flush()
                os.fsync(opener.f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)

            LocalFileOpener.write = write
'''


def _overlay(tmp_path: Path, name: str, trace: Path, kill_at: int = -1, during_save: bool = False,
             before_last: bool = False) -> Path:
    overlay = tmp_path / f"{name}.yaml"
    overlay.write_text(  # conf/t2i.yaml's checkpointing, every 2 steps
        "trainer:\n  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true, every_n_train_steps: 2, monitor: step, mode: max, save_top_k: 2,\n"
        "                  enable_version_counter: false}\n"
        "    - class_path: killer.Trace\n"
        f"      init_args: {{trace: '{trace}', kill_at: {kill_at}, during_save: {str(during_save).lower()}, "
        f"before_last: {str(before_last).lower()}}}\n"
    )
    return overlay


def _fit(tmp_path: Path, root: Path, tiny_folder, overlay: Path, *extra, wait: bool = True):
    prompts = tmp_path / "prompts.txt"
    # 3 rounds an epoch: checkpoints (every 2 steps) fall mid-epoch and at an epoch's turn
    prompts.write_text("a red circle\ntwo blue squares\na green triangle\na yellow star\nthree circles\n")
    (tmp_path / "killer.py").write_text(KILLER)
    args = [
        sys.executable, "-m", "dualfw.cli", "fit", "--config", CONF, "--config", str(overlay),
        f"--model.init_args.model.init_args.path={tiny_folder}", f"--data.init_args.prompts={prompts}",
        "--data.init_args.inputs_per_step=2", "--data.init_args.k=3", "--data.init_args.progress=false",
        f"--trainer.max_steps={STEPS}", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={root}", "--trainer.logger.name=t2i", "--trainer.logger.version=run", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out, _ = process.communicate(timeout=300)
        return process.returncode, out
    return process


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lineage(trace: list[dict]) -> dict[int, tuple]:
    """The round each step trained in the run's final history (a later process redoes the steps
    after the checkpoint it resumed from; those of a killed process's lost tail are replaced)."""
    return {t["step"]: tuple(t["round"]) for t in trace}


def test_killed_and_resumed_fit_matches_an_uninterrupted_run(tmp_path, tiny_folder):
    # the uninterrupted run
    code, out = _fit(tmp_path, tmp_path / "a", tiny_folder, _overlay(tmp_path, "a", tmp_path / "a.trace"))
    assert code == 0, out[-3000:]
    run = tmp_path / "b" / "t2i" / "run"
    checkpoints = run / "checkpoints"
    trace = tmp_path / "b.trace"

    # killed halfway through writing the step-4 checkpoint: the last whole one is step 2's, and the
    # rounds sampled after it (Lightning fetches one ahead) are on disk, untrained
    code, out = _fit(tmp_path, tmp_path / "b", tiny_folder, _overlay(tmp_path, "b1", trace, kill_at=4, during_save=True))
    assert code == -signal.SIGKILL, out[-3000:]
    partial = list((checkpoints / ".partial").iterdir())
    assert partial and torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 2
    # resumed in place, killed from outside once 6 rounds are on disk (any moment: mid-sampling,
    # mid-write of the log, mid-checkpoint)
    process = _fit(tmp_path, tmp_path / "b", tiny_folder, _overlay(tmp_path, "b2", trace), "--ckpt_path=last", wait=False)
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline:
        rounds = {r["round"] for r in read_rollouts(run / "rollouts.jsonl")} if (run / "rollouts.jsonl").exists() else set()
        if len(rounds) >= 6:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.communicate(timeout=60)
    assert not any(p.exists() for p in partial), "the interrupted checkpoint write's temp file was removed"
    code, out = _fit(tmp_path, tmp_path / "b", tiny_folder, _overlay(tmp_path, "b3", trace), "--ckpt_path=last")
    assert code == 0, out[-3000:]

    a_ckpt = torch.load(tmp_path / "a" / "t2i" / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    b_ckpt = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert a_ckpt["global_step"] == b_ckpt["global_step"] == STEPS
    # the same rounds at the same steps, none trained twice in the run's history
    expected, got = _lineage(_trace(tmp_path / "a.trace")), _lineage(_trace(trace))
    assert got == expected and len(set(expected.values())) == STEPS
    for pid in {t["pid"] for t in _trace(trace)}:  # each process trained consecutive rounds, none twice
        rounds = [tuple(t["round"]) for t in _trace(trace) if t["pid"] == pid]
        assert len(set(rounds)) == len(rounds)
    # the same weights
    for key, value in a_ckpt["state_dict"].items():
        torch.testing.assert_close(b_ckpt["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    # every round once in the log, as the uninterrupted run sampled it; nothing sampled twice
    # (a round cut short mid-write is the one the log may hold twice: dedupe keeps the trained copy)
    a_rollouts = list(read_rollouts(tmp_path / "a" / "t2i" / "run" / "rollouts.jsonl"))
    b_rollouts = list(read_rollouts(run / "rollouts.jsonl", dedupe=True))
    assert b_rollouts == a_rollouts
    keys = [(r["round"], r["item"]) for r in read_rollouts(run / "rollouts.jsonl")]
    assert len(keys) - len(set(keys)) <= 2, "at most one round (2 inputs) written twice, after a torn write"
    assert sorted({r["round"] for r in b_rollouts}) == list(range(len({r["round"] for r in b_rollouts})))
    # retention: the newest two step checkpoints and last.ckpt
    assert len([p for p in checkpoints.glob("*.ckpt") if p.name != "last.ckpt"]) <= 2


def test_a_step_checkpoint_saved_again_after_a_resume_replaces_the_killed_runs_copy(tmp_path, tiny_folder):
    # killed after step 4's checkpoint reached the disk but before last.ckpt did: the resumed run
    # starts from step 2 and saves step 4 again, under the same name, not beside it as a "-v1" copy
    import yaml

    for conf in ROOT.glob("conf/**/*.yaml"):  # the overlay's setting is every shipped recipe's
        for callback in (yaml.safe_load(conf.read_text()).get("trainer") or {}).get("callbacks") or []:
            if callback["class_path"].endswith("ModelCheckpoint"):
                assert callback["init_args"]["enable_version_counter"] is False, conf
    run = tmp_path / "r" / "t2i" / "run"
    trace = tmp_path / "r.trace"
    code, out = _fit(tmp_path, tmp_path / "r", tiny_folder, _overlay(tmp_path, "r1", trace, kill_at=4, before_last=True))
    assert code == -signal.SIGKILL, out[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert len(list((run / "checkpoints").glob("*step=4*.ckpt"))) == 1
    code, out = _fit(tmp_path, tmp_path / "r", tiny_folder, _overlay(tmp_path, "r2", trace), "--ckpt_path=last")
    assert code == 0, out[-3000:]
    steps = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    assert steps == ["epoch=1-step=6.ckpt", "epoch=2-step=8.ckpt"], steps  # the newest two, no copies


def test_torn_last_line_is_reported_and_cut(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    first = {"direction": "t2i", "round": 0, "rank": 0, "item": 0, "rewards": [0.1, 0.2], "pairs": [[1, 0]]}
    writer = RolloutWriter(path)
    writer.write_many([first])
    writer.close()
    with open(path, "a") as f:
        f.write('{"direction": "t2i", "round": 1, "rank": 0, "ite')  # a write cut short
    with pytest.warns(UserWarning, match="torn last line skipped"):
        assert list(read_rollouts(path)) == [first]  # a reader skips it
    with pytest.warns(UserWarning, match=f"rollouts file '{path}' ended in a torn line"):
        writer = RolloutWriter(path)  # a writer cuts it
    second = {**first, "round": 1}
    writer.write_many([second])
    writer.close()
    assert list(read_rollouts(path)) == [first, second]
    assert path.read_text().count("\n") == 2
    # a round written again (it was cut short before a resume): dedupe keeps its last copy
    again = {**second, "rewards": [0.3, 0.4]}
    with open(path, "a") as f:
        f.write(json.dumps(again) + "\n")
    assert list(read_rollouts(path, dedupe=True)) == [first, again]


def test_second_fit_into_a_finished_run_folder_refuses(tmp_path, tiny_folder):
    from dualfw.cli import cli_main
    from dualfw.core.errors import ConfigError

    def args(*extra):
        return fit_args(tmp_path, tiny_folder, "--trainer.max_steps=1", *extra)

    cli_main(args())
    run = tmp_path / "t2i" / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=f"run folder '{run}' already holds a run .*--ckpt_path last"):
        cli_main(args("--data.init_args.k=4"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    # resuming it is the way in
    cli = cli_main(args("--trainer.max_steps=2", "--ckpt_path=last"))
    assert cli.trainer.global_step == 2


def test_a_checkpoint_caught_between_its_swap_renames_is_put_back(tmp_path):
    from dualfw.training.strategy import PARTIAL, clear_partial, move_into_place

    checkpoints = tmp_path / "checkpoints"
    old, new = checkpoints / "last.ckpt", checkpoints / PARTIAL / "last.ckpt"
    for folder, step in ((old, "2"), (new, "4")):
        folder.mkdir(parents=True)
        (folder / "meta.pt").write_text(step)
    move_into_place(new, old)  # the whole swap: the new folder in place, nothing left behind
    assert (old / "meta.pt").read_text() == "4" and not list((checkpoints / PARTIAL).iterdir())

    # a crash after the old one moved aside and before the new one moved in
    old.rename(checkpoints / PARTIAL / "last.ckpt.old")
    (checkpoints / PARTIAL / "last.ckpt").mkdir()
    (checkpoints / PARTIAL / "last.ckpt" / "half.distcp").write_text("torn")
    (checkpoints / PARTIAL / "tmp123").write_text("torn file write")
    with pytest.warns(UserWarning, match="put back last.ckpt"):
        clear_partial(checkpoints)
    assert (old / "meta.pt").read_text() == "4"
    assert not list((checkpoints / PARTIAL).iterdir())
