"""FSDP2 (dualfw.FSDP2Strategy over Lightning's ModelParallelStrategy, `fully_shard` in
Policy.configure_model) on CPU: two
gloo ranks fit the Shapes base, are killed together mid-checkpoint and resume exactly; the tiny Emu3
fits the same way.
FSDP1 (conf/strategies/fsdp.yaml; Lightning's FSDPStrategy refuses CPUs): raw FullyShardedDataParallel
on one in-process gloo rank, the two failures a GPU run met.

Each test launches `python -m dualfw.cli fit`; Lightning starts the second rank by subprocess, and
every rank imports lightning and transformers first (the slow part). Set DUALFW_DISTRIBUTED_TESTS=0
to skip them on a loaded machine.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import weights_by_base_name
from dualfw.training.rollouts import read_rollouts

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("DUALFW_DISTRIBUTED_TESTS", "1") == "0", reason="DUALFW_DISTRIBUTED_TESTS=0: 2-process CPU fit skipped"
)

def _fit(tmp_path: Path, *extra: str, recipe: str = "t2i", overlays: tuple[str, ...] = (), check: bool = True) -> subprocess.CompletedProcess:
    args = [
        "fit",
        "--config", str(ROOT / "conf" / f"{recipe}.yaml"),
        *[arg for overlay in overlays for arg in ("--config", str(ROOT / "conf" / overlay))],
        "--config", str(ROOT / "conf" / "strategies" / "fsdp2.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        "--trainer.devices=2",
        "--trainer.strategy.init_args.data_parallel_size=2",
        "--data.init_args.inputs_per_step=2",  # the recipe's batch_contrast needs two per rank
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # the tree under test, installed or not
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # a session of its own: a callback may kill the whole fit (both ranks) as a lost node would
    result = subprocess.run([sys.executable, "-m", "dualfw.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=240, start_new_session=True)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


# Loaded by the killed fits: records the round each rank trains at each step, and kills the whole
# fit (every rank) while it writes last.ckpt at step `kill_at`: after the shards, before Lightning's
# metadata file.
KILLER = '''
import json, os, signal
import lightning as L
import torch


class Trace(L.Callback):
    def __init__(self, trace: str, kill_at: int = -1):
        self.trace, self.kill_at = trace, kill_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with open(self.trace, "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "step": trainer.global_step, "round": list(batch["round"])}) + "\\n")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == self.kill_at and trainer.global_rank == 0:
            save = torch.save

            def killing_save(obj, f, *args, **kwargs):
                if str(f).endswith("meta.pt") and "last" in str(f):
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                return save(obj, f, *args, **kwargs)

            torch.save = killing_save
'''


def _overlay(tmp_path: Path, name: str, trace: Path, kill_at: int = -1) -> str:
    (tmp_path / "killer.py").write_text(KILLER)
    overlay = tmp_path / f"{name}.yaml"
    overlay.write_text(
        "trainer:\n  callbacks:\n"
        "    - class_path: dualfw.PairImageGrid\n      init_args: {every_n_steps: 2}\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true, every_n_train_steps: 2, monitor: step, mode: max, save_top_k: 1}\n"
        "    - class_path: dualfw.ExportPretrained\n"
        f"    - class_path: killer.Trace\n      init_args: {{trace: '{trace}', kill_at: {kill_at}}}\n"
    )
    return str(overlay)


def _trace(path: Path) -> dict[tuple[int, int], tuple]:
    """(rank, step) -> the round trained there, in the run's final history (a resumed process
    redoes the steps after its checkpoint)."""
    return {(t["rank"], t["step"]): tuple(t["round"]) for t in map(json.loads, path.read_text().splitlines())}


def _weights(checkpoint: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    whole = checkpoint.parent / (checkpoint.name + ".pt")
    dcp_to_torch_save(checkpoint, whole)
    return torch.load(whole, weights_only=False)["state_dict"]


def test_fsdp2_two_ranks_killed_while_checkpointing_resume_as_if_uninterrupted(tmp_path):
    """Two FSDP2 ranks, killed together while writing the step-4 sharded last.ckpt (shards written,
    metadata not), resume with --ckpt_path last and end where an uninterrupted run ends: the same
    rounds on each rank at each step, the same weights; the torn checkpoint never replaced the
    whole one, and its leftovers are cleared."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _fit(a, "--trainer.max_steps=6", overlays=(_overlay(a, "a", a / "trace"),))
    run = a / "t2i" / "run"
    last = run / "checkpoints" / "last.ckpt"
    # a sharded (torch.distributed.checkpoint) folder: one file per rank plus Lightning's metadata
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 6  # Lightning's own metadata file
    assert list((run / "images").glob("pairs_step*.png")), "rank 0's image grid (run folder resolved on every rank)"
    rollouts = {rank: list(read_rollouts(run / f"rollouts.rank{rank}.jsonl")) for rank in (0, 1)}
    assert all(len(r[0]["image_tokens"]) == 2 and len(r[0]["rewards"]) == 2 for r in rollouts.values())
    assert rollouts[0][0]["seed"] != rollouts[1][0]["seed"]  # disjoint prompt chunks
    # ExportPretrained gathers the shards into one whole model (written by rank 0)
    from dualfw.adapters.janus import JanusAdapter

    exported = JanusAdapter(path=str(run / "export")).model.state_dict()
    base = JanusAdapter(path="dualfw:assets/shapes_base").model.state_dict()
    assert exported.keys() == base.keys() and all(exported[k].shape == base[k].shape for k in base)
    changed = [k for k in base if not torch.equal(exported[k], base[k])]
    assert changed and not any("vqmodel" in k for k in changed)  # trained; the VQ stays frozen

    killed = _fit(b, "--trainer.max_steps=6", overlays=(_overlay(b, "b1", b / "trace", kill_at=4),), check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = b / "t2i" / "run" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 2
    assert list((checkpoints / ".partial").iterdir()), "the torn write stayed in .partial"
    resumed = _fit(b, "--trainer.max_steps=6", "--ckpt_path=last", overlays=(_overlay(b, "b2", b / "trace"),))
    assert "partial file(s) of interrupted checkpoint writes" in resumed.stderr
    assert torch.load(checkpoints / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == 6

    expected, got = _trace(a / "trace"), _trace(b / "trace")
    assert got == expected and len(expected) == 12
    ours, theirs = _weights(checkpoints / "last.ckpt"), _weights(last)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6)
    for rank in (0, 1):  # every round once after de-duplication, as the uninterrupted run sampled it
        assert list(read_rollouts(b / "t2i" / "run" / f"rollouts.rank{rank}.jsonl", dedupe=True)) == rollouts[rank]


def test_fsdp2_two_ranks_fit_the_second_family(tmp_path, tiny_emu3_folder):
    """Emu3 through the same two-rank FSDP2 fit: its declared units shard, and the export gathered
    by rank 0 is a whole model transformers loads, trained outside the frozen VQ."""
    from transformers import Emu3ForConditionalGeneration

    _fit(tmp_path, "--trainer.max_steps=2", "--trainer.accumulate_grad_batches=1",
         f"--model.init_args.model.init_args.path={tiny_emu3_folder}",
         "--model.init_args.model.init_args.image_size=64", "--model.init_args.model.init_args.dtype=float32",
         overlays=("models/emu3.yaml",))
    exported = Emu3ForConditionalGeneration.from_pretrained(tmp_path / "t2i" / "run" / "export", local_files_only=True).state_dict()
    base = Emu3ForConditionalGeneration.from_pretrained(tiny_emu3_folder, local_files_only=True).state_dict()
    assert exported.keys() == base.keys() and all(exported[k].shape == base[k].shape for k in base)
    changed = [k for k in base if not torch.equal(exported[k], base[k])]
    assert changed and not any("vqmodel" in k for k in changed)


def test_fsdp2_two_ranks_drawing_only_lora_exports_apart(tmp_path):
    """LoRA that only draws, sharded on two ranks: the gathered export keeps the adapters beside the
    base weights, and the reloaded model reads exactly as the base while it draws differently."""
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.core.lora import LORA_FILE

    _fit(tmp_path, "--trainer.max_steps=2", "--model.init_args.lora.r=4")
    export = tmp_path / "t2i" / "run" / "export"
    assert (export / LORA_FILE).is_file() and (export / "lora" / "adapter_config.json").is_file()
    trained, base = JanusAdapter(path=str(export)).eval(), JanusAdapter(path="dualfw:assets/shapes_base").eval()
    tokens = base.sample_images(["a red circle", "two squares"], 1, seed=0)[:, 0]
    pixels = base.decode_images(tokens)
    with torch.no_grad():
        reads = [m.text_logprobs(pixels, ["a red circle", "two squares"], "Describe this image.")[0] for m in (trained, base)]
        draws = [m.image_logprobs(["a red circle", "two squares"], tokens) for m in (trained, base)]
    assert torch.equal(reads[0], reads[1])
    assert not torch.allclose(draws[0], draws[1])


def test_fsdp2_two_ranks_a_lora_set_per_direction_trains_both_and_exports_apart(tmp_path):
    """Joint training with a LoRA set per direction, sharded on two ranks: the gathered export holds
    both sets apart, each moved by its direction's loss, and the base weights as they were."""
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.core.lora import LORA_FILE

    _fit(tmp_path, "--trainer.max_steps=2", "--model.init_args.lora.r=4", "--model.init_args.lora.per_direction=true",
         "--model.init_args.optimizer.init_args.lr=0.05", recipe="dual")
    export = tmp_path / "dual" / "run" / "export"
    assert set(json.loads((export / LORA_FILE).read_text())["per_direction"]) == {"t2i", "i2t"}
    weights = weights_by_base_name(JanusAdapter(path=str(export)))
    for direction in ("t2i", "i2t"):
        assert any(float(p.abs().max()) > 0 for n, p in weights.items() if f"lora_B.{direction}." in n), direction
    base = JanusAdapter(path="dualfw:assets/shapes_base")
    assert all(torch.equal(p, weights[n]) for n, p in base.named_parameters())


def test_fsdp2_two_ranks_i2t_with_descriptions_of_different_lengths(tmp_path):
    # sampled descriptions end at different steps on the two ranks; generate must keep both
    # ranks stepping (every sharded forward is a collective) or the run hangs
    _fit(tmp_path, "--trainer.max_steps=2", "--data.init_args.text_sampling.max_new_tokens=12", recipe="i2t")
    lengths = {
        rank: {len(t) for r in read_rollouts(tmp_path / "i2t" / "run" / f"rollouts.rank{rank}.jsonl") for t in r["texts"]}
        for rank in (0, 1)
    }
    assert all(lengths.values()) and len(lengths[0] | lengths[1]) > 1, lengths


def _fsdp1_wrap(adapter):
    """FSDP1 as conf/strategies/fsdp.yaml sets it up under Lightning: the adapter's declared units
    wrapped by the auto-wrap policy the config names (`fsdp_units`; a Policy has tagged them), the
    whole module in a root unit (Lightning wraps the LightningModule; here a module whose forward
    scores images, as a training step does), bf16 parameters in compute."""
    from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

    from dualfw.training.policy import fsdp_units

    bf16 = MixedPrecision(param_dtype=torch.bfloat16)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.adapter = adapter

        def forward(self, prompts, tokens):
            return self.adapter.image_logprobs(prompts, tokens)

    options = dict(device_id=torch.device("cpu"), mixed_precision=bf16, use_orig_params=True)
    return FullyShardedDataParallel(Step(), auto_wrap_policy=fsdp_units, **options)


@pytest.mark.parametrize("init_root", [True, False])
def test_fsdp1_bf16_sampling_then_a_training_step(tiny_folder, init_root):
    """Two failures of FSDP1 + bf16-mixed, first seen on a GPU at the first rollout, reproduced on
    one in-process gloo rank: (1) FSDP1 keeps a bf16 copy of each unit's shard; made under
    inference_mode it is an inference tensor, and scoring outside it fails ("Inplace update to
    inference tensor outside InferenceMode"): the adapter samples under no_grad when wrapped.
    (2) Sampling calls wrapped layers outside the root's forward, so each makes itself a root and the
    first training step fails ("Non-root FSDP instance's `_is_root` ..."), unless the Policy first
    makes the root one (`init_fsdp1_root`, at fit and test start). (3) Lightning's gradient clipping
    then refuses FSDP1: the Policy clips through the root unit."""
    import torch.distributed as dist

    from types import SimpleNamespace

    from dualfw.core.losses import SimPO
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import Policy, init_fsdp1_root

    from torch.distributed.fsdp import FullyShardedDataParallel

    adapter = JanusAdapter(path=str(tiny_folder)).eval()
    policy = Policy(adapter, loss=SimPO())  # tags the adapter's declared units for the wrap policy
    declared = adapter.sharding_units()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        root = _fsdp1_wrap(adapter)
        assert adapter._fsdp1_wrapped
        wrapped = [m.module for m in root.modules() if isinstance(m, FullyShardedDataParallel) and m is not root]
        assert len(wrapped) == len(declared) and all(any(w is d for w in wrapped) for d in declared)
        if init_root:
            init_fsdp1_root(root)
        prompts = ["a red circle"] * 2
        with torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning's bf16-mixed forward context
            tokens = adapter.sample_images(prompts[:1], k=2, seed=0).flatten(0, 1)
            with torch.no_grad():  # a reward (the scorer runs under no_grad), outside inference_mode
                scores = adapter.image_logprobs(prompts, tokens)
            if not init_root:
                with pytest.raises(AssertionError, match="_is_root"):
                    root(prompts, tokens)
                return
            logp = root(prompts, tokens)  # the training step, through the root
        logp.sum().backward()
        torch.testing.assert_close(logp.detach(), scores, atol=0.1, rtol=0.02)  # bf16 compute both times
        layer = adapter.model.model.language_model.layers[0]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
        # (3) Lightning's gradient clipping refuses FSDP1; the Policy clips through the root instead
        policy._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
        grads = lambda: [p.grad for p in root.parameters() if p.grad is not None]  # noqa: E731
        assert torch.nn.utils.get_total_norm(grads()) > 1e-3
        policy.configure_gradient_clipping(None, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
        torch.testing.assert_close(torch.nn.utils.get_total_norm(grads()), torch.tensor(1e-3), rtol=1e-3, atol=0)
    finally:
        dist.destroy_process_group()
