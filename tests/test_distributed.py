"""FSDP2 (Lightning's ModelParallelStrategy, `fully_shard` in Policy.configure_model) on CPU: two
gloo ranks fit the tiny Janus for 2 steps, save a sharded checkpoint, and resume it for 1 more; the
tiny Emu3 fits the same way.
FSDP1 (conf/strategies/fsdp.yaml; Lightning's FSDPStrategy refuses CPUs): raw FullyShardedDataParallel
on one in-process gloo rank, the two failures a GPU run met.

Each test launches `python -m dualfw.cli fit`; Lightning starts the second rank by subprocess, and
every rank imports lightning and transformers first (the slow part). Set DUALFW_DISTRIBUTED_TESTS=0
to skip them on a loaded machine.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualfw.training.rollouts import read_rollouts

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("DUALFW_DISTRIBUTED_TESTS", "1") == "0", reason="DUALFW_DISTRIBUTED_TESTS=0: 2-process CPU fit skipped"
)

def _fit(tmp_path: Path, *extra: str, recipe: str = "t2i", overlays: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
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
    from dualfw.adapters.janus import JanusAdapter

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
