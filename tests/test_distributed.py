"""FSDP2 (Lightning's ModelParallelStrategy, `fully_shard` in Policy.configure_model) on CPU: two
gloo ranks fit the tiny Janus for 2 steps, save a sharded checkpoint, and resume it for 1 more.

Two `python -m dualfw.cli fit` launches; Lightning starts the second rank of each by subprocess, and
every rank pays ~10 s of imports: about 45 s for both on 2 CPU cores. Set DUALFW_DISTRIBUTED_TESTS=0
to skip it on a loaded machine.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualfw.data.rollouts import read_rollouts

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("DUALFW_DISTRIBUTED_TESTS", "1") == "0", reason="DUALFW_DISTRIBUTED_TESTS=0: 2-process CPU fit skipped"
)

def _fit(tmp_path: Path, *extra: str, recipe: str = "t2i") -> subprocess.CompletedProcess:
    args = [
        "fit",
        "--config", str(ROOT / "conf" / f"{recipe}.yaml"),
        "--config", str(ROOT / "conf" / "strategies" / "fsdp2.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.devices=2",
        "--trainer.strategy.init_args.data_parallel_size=2",
        "--data.init_args.inputs_per_step=1",
        "--data.init_args.k=2",
        "--data.init_args.progress=false",
        "--data.init_args.text_sampling.max_new_tokens=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        f"--trainer.logger.name={recipe}",
        "--trainer.logger.version=run",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dualfw.cli", *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_fsdp2_two_ranks_fit_checkpoint_and_resume(tmp_path):
    run = tmp_path / "t2i" / "run"
    last = run / "checkpoints" / "last.ckpt"

    _fit(tmp_path, "--trainer.max_steps=2")
    # a sharded (torch.distributed.checkpoint) folder: one file per rank plus Lightning's metadata
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 2  # Lightning's own metadata file
    assert list((run / "images").glob("pairs_step*.png")), "rank 0's image grid (run folder resolved on every rank)"
    first = {rank: list(read_rollouts(run / f"rollouts.rank{rank}.jsonl")) for rank in (0, 1)}
    for rank, rollouts in first.items():
        assert len(rollouts) >= 2, rank  # 2 steps, one prompt each (plus Lightning's prefetch)
        assert len(rollouts[0]["image_tokens"]) == 2 and len(rollouts[0]["rewards"]) == 2
    # disjoint prompt chunks: the two ranks' first rounds differ
    assert first[0][0]["seed"] != first[1][0]["seed"]
    # ExportPretrained gathers the shards into one whole model (written by rank 0)
    from dualfw.models.janus import JanusAdapter

    exported = JanusAdapter(path=str(run / "export")).model.state_dict()
    base = JanusAdapter(path="dualfw:assets/shapes_base").model.state_dict()
    assert exported.keys() == base.keys() and all(exported[k].shape == base[k].shape for k in base)
    changed = [k for k in base if not torch.equal(exported[k], base[k])]
    assert changed and not any("vqmodel" in k for k in changed)  # trained; the VQ stays frozen

    result = _fit(tmp_path, "--trainer.max_steps=3", f"--ckpt_path={last}")
    assert "Restored all states from the checkpoint" in result.stdout + result.stderr
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 3
    for rank in (0, 1):
        rollouts = list(read_rollouts(run / f"rollouts.rank{rank}.jsonl"))
        assert len(rollouts) > len(first[rank])  # appended after the resume, nothing lost
        assert max(r["step"] for r in rollouts) == 2  # the resumed run sampled at global step 2


def test_fsdp2_two_ranks_i2t_with_descriptions_of_different_lengths(tmp_path):
    # sampled descriptions end at different steps on the two ranks; generate must keep both
    # ranks stepping (every sharded forward is a collective) or the run hangs
    _fit(tmp_path, "--trainer.max_steps=2", "--data.init_args.text_sampling.max_new_tokens=12", recipe="i2t")
    lengths = {
        rank: {len(t) for r in read_rollouts(tmp_path / "i2t" / "run" / f"rollouts.rank{rank}.jsonl") for t in r["texts"]}
        for rank in (0, 1)
    }
    assert all(lengths.values()) and len(lengths[0] | lengths[1]) > 1, lengths
