"""The Policy: the trainable model, its optimizer and scheduler, the loss, and the diagnostics."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import grad_norm, rank_zero_warn

from dualfw.core.errors import ConfigError
from dualfw.core.losses import PairLogps, PreferenceLoss, SimPO, chosen_nll
from dualfw.core.interface import FrozenView, LMMAdapter
from dualfw.core.lora import LoraSpec, adapters_off, apply_lora, is_split, save_model
from dualfw.training.reference import Reference
from dualfw.training.scorer import DualScorer
from dualfw.core.selfreward import Group, sequence_logps


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class Policy(L.LightningModule):
    """Trains a unified LMM on the samples its own DualScorer rewarded, in one or both directions.

    Args:
        model: the LMM adapter (e.g. dualfw.JanusAdapter).
        loss: dualfw.SimPO (default), dualfw.DPO, dualfw.IPO (pairs) or dualfw.GRPO (groups).
        scorer: how samples are self-rewarded.
        optimizer: optimizer factory over the trainable parameters (default AdamW, lr 1e-5).
        scheduler: optional learning-rate scheduler factory (stepped every optimizer step).
        lora: train LoRA adapters instead of all weights (`lora.per_direction`: a set for each
            direction, each trained by its own direction's loss).
        direction_weights: weight of each direction's loss when both are in a batch (joint).
        grad_norm_every_n_steps: log each direction's gradient norm every n steps (an extra
            backward per direction; image sequences are far longer than text, so the two can be
            an order of magnitude apart); 0 disables.
        stall_patience: warn when a pair loss has stayed within `stall_tolerance` of ln 2 (the
            policy does not separate chosen from rejected) for this many steps; 0 disables.
        stall_tolerance: see stall_patience.
        chosen_nll_weight: weight w of a likelihood term on each pair's chosen sample,
            L = L_pref + w * mean(-log pi(y_w|x) / |y_w|) (see dualfw.core.losses.chosen_nll); 0 = off.
        guided_logps: t2i log-probs (the policy's and the Reference's) under the classifier-free
            guidance the images were sampled with, log softmax(uncond + s * (cond - uncond)): the
            loss then trains the distribution the sampler draws from, through the conditional and
            the unconditional (prompt-less) rows. False: the conditional model alone (the paper);
            with CFG sampling that trains a distribution other than the sampled one, and CFG applied
            again at sampling time compounds the change.
        rollouts_from: what the candidates are sampled from. "policy" (the paper): re-drawn from the
            current policy every step. "initial": from the frozen initial model, so the chosen
            samples are a fixed target, like supervised data (rollouts.jsonl and the pairs in the
            image grids are then the initial model's samples; the grids add a row of the policy's).
            Learning the policy's own samples feeds back (each step sharpens the distribution the
            next samples come from); fixed samples do not, which matters at large learning rates.
            GRPO then takes its ratio against the initial model, which drew the samples.
        train: which weights learn. "all": every trainable weight (or the LoRA adapters).
            "generation": only what draws: without `lora`, the modules the model draws with and
            never reads with (`LMMAdapter.generation_modules`); with `lora`, LoRA adapters on the
            language model that are active only while it draws (`dualfw.core.lora`). Either way
            understanding, and so the live scorer's R_G, stays exactly the initial model's, and t2i
            training cannot co-degrade its own judge. "understanding": LoRA adapters active only
            while the model reads (needs `lora`); drawing stays the initial model's.
    """

    def __init__(
        self,
        model: LMMAdapter,
        loss: PreferenceLoss | None = None,
        scorer: DualScorer | None = None,
        optimizer: OptimizerCallable = _adamw,
        scheduler: LRSchedulerCallable | None = None,
        lora: LoraSpec | None = None,
        direction_weights: dict[str, float] | None = None,
        grad_norm_every_n_steps: int = 10,
        stall_patience: int = 20,
        stall_tolerance: float = 0.01,
        chosen_nll_weight: float = 0.0,
        guided_logps: bool = False,
        rollouts_from: Literal["policy", "initial"] = "policy",
        train: Literal["all", "generation", "understanding"] = "all",
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss if loss is not None else SimPO()
        self.scorer = scorer if scorer is not None else DualScorer()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.direction_weights = {"t2i": 1.0, "i2t": 1.0, **(direction_weights or {})}
        self.grad_norm_every_n_steps, self.stall_patience, self.stall_tolerance = (
            grad_norm_every_n_steps, stall_patience, stall_tolerance,
        )
        if chosen_nll_weight < 0:
            raise ConfigError(f"model.init_args.chosen_nll_weight must be >= 0, got {chosen_nll_weight}")
        self.chosen_nll_weight, self.guided_logps = chosen_nll_weight, guided_logps
        self._stalled_steps = {"t2i": 0, "i2t": 0}
        self._peft = []  # the PeftModel wraps self.model's weights; a list keeps them from being saved twice
        if rollouts_from not in ("policy", "initial"):
            raise ConfigError(f"model.init_args.rollouts_from must be 'policy' or 'initial', got {rollouts_from!r}")
        if train not in ("all", "generation", "understanding"):
            raise ConfigError(f"model.init_args.train must be 'all', 'generation' or 'understanding', got {train!r}")
        if train == "understanding" and lora is None:
            raise ConfigError("model.init_args.train 'understanding' trains LoRA adapters used while reading: set model.init_args.lora")
        if train == "generation" and lora is None:
            model.requires_grad_(False)
            for module in model.generation_modules():
                module.requires_grad_(True)
        self.train_parts = train
        _mark_units(model)
        if lora is not None:
            for_direction = {"all": None, "generation": "t2i", "understanding": "i2t"}[train]
            self._peft = [apply_lora(model, lora, for_direction)]
        # The initial model, wherever something needs it (the loss's KL anchor, a frozen scorer,
        # rollouts_from initial): one frozen copy serves all three, or with LoRA the policy itself
        # with adapters off. Lists keep it out of checkpoints: it is rebuilt from the config on resume.
        self._initial: list[Reference] = []
        if self.loss.needs_reference or self.scorer.frozen or rollouts_from == "initial":
            initial_view = functools.partial(adapters_off, self.model.lora_module()) if self._peft else None
            self._initial = [Reference(self.model, initial_view)]
        initial = self._initial[0] if self._initial else None
        self.scorer.attach(initial.view if self.scorer.frozen else self.model)
        self._reference = self._initial if self.loss.needs_reference else []
        self._sampler = self._initial if rollouts_from == "initial" else []  # what DataModule rollouts sample from

    def configure_model(self) -> None:
        """Shard the model with FSDP2 under Lightning's ModelParallelStrategy (which sets
        `device_mesh`); nothing otherwise (one device, DDP, FSDPStrategy wraps by its own policy).

        Lightning calls this at every fit / test start; the model is sharded once. The frozen initial
        copy (the Reference, a frozen scorer's model, the initial sampler) is kept outside the module
        tree: it stays whole on every rank, so with FSDP2 prefer SimPO with the live scorer, or LoRA
        (the adapters-off policy is then the initial model).
        """
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ConfigError("tensor parallelism is not supported: set ModelParallelStrategy tensor_parallel_size: 1")
        self.model.fully_shard(mesh["data_parallel"] if "data_parallel" in names else mesh)
        self._sharded = True
        if self._initial and self._initial[0].holds_copy:
            rank_zero_warn(
                "FSDP2 shards the policy only: the Reference / frozen scorer copy stays whole on every rank. "
                "Prefer SimPO with the live scorer, or LoRA (no second copy)."
            )

    @property
    def reference(self) -> Reference | None:
        return self._reference[0] if self._reference else None

    @property
    def sampler(self) -> LMMAdapter | FrozenView:
        """What rollouts sample candidates from (`rollouts_from`)."""
        return self._sampler[0].view if self._sampler else self.model

    def _on_stage_start(self) -> None:
        """Every stage (fit, test, predict) samples: make FSDP1's root the root first, and move the
        frozen initial copy, which lives outside the module tree, to the policy's device."""
        init_fsdp1_root(self.trainer.strategy.model)
        for initial in self._initial:
            initial.move_frozen_to(self.device)

    def on_fit_start(self) -> None:
        self._on_stage_start()
        self.model.train()  # checkpoints load in eval mode; the adapter keeps its frozen parts in eval
        # both deliberate: the parts the adapter, scorer and reference keep frozen stay in eval mode,
        # and a step whose inputs all lack a pair returns None (counted as data/skipped_inputs)
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
        warnings.filterwarnings("ignore", message="`training_step` returned `None`")

    # ---- the loss of one direction -----------------------------------------------------------------
    def direction_loss(self, group: Group) -> tuple[torch.Tensor | None, dict]:
        """Loss and statistics of one direction's group of samples."""
        fixed = {"generation": "i2t", "understanding": "t2i"}.get(self.train_parts)
        if group.direction == fixed:
            only = {"i2t": "t2i", "t2i": "i2t"}[fixed]
            raise ConfigError(
                f"model.init_args.train {self.train_parts!r} trains the {only} direction only: the {fixed} "
                f"direction has nothing to train (set model.init_args.train: all, or data.init_args.schedule: {only})"
            )
        kept = group.kept
        stats = {
            "reward/mean": group.rewards.float().mean(),
            "reward/std": group.rewards.float().std(),
            "data/skipped_inputs": float((~kept).sum()),
            "data/pairs": float(len(group.pairs)),
        }
        if len(group.pairs):
            p = group.pairs
            stats["reward/margin"] = (group.rewards[p[:, 0], p[:, 1]] - group.rewards[p[:, 0], p[:, 2]]).mean()
        if self.loss.over_groups:
            return self._group_loss(group, kept, stats)
        if not len(group.pairs):
            return self._idle_loss(group), stats
        n = len(group.pairs)
        samples = torch.cat([group.pairs[:, [0, 1]], group.pairs[:, [0, 2]]])
        logps, lengths = sequence_logps(self.model, group, samples, self.guided_logps)
        pairs = PairLogps(logps[:n], logps[n:], lengths[:n], lengths[n:])
        if self.reference is not None:
            ref, _ = self.reference.sequence_logps(group, samples, self.guided_logps)
            pairs.ref_chosen, pairs.ref_rejected = ref[:n], ref[n:]
        loss = self.loss(pairs).mean()
        stats.update(
            {
                "loss": loss.detach(),  # the preference loss alone (the ln 2 stall check reads it)
                "pair_accuracy": self.loss.prefers_chosen(pairs).float().mean(),
                "logp_chosen": (pairs.chosen / pairs.chosen_len).mean().detach(),
                "logp_rejected": (pairs.rejected / pairs.rejected_len).mean().detach(),
            }
        )
        if self.chosen_nll_weight:
            nll = chosen_nll(pairs.chosen, pairs.chosen_len).mean()
            stats["chosen_nll"] = nll.detach()
            loss = loss + self.chosen_nll_weight * nll
        return loss, stats

    def _group_loss(self, group: Group, kept: torch.Tensor, stats: dict):
        rows = kept.nonzero().squeeze(-1)
        if not len(rows):
            return self._idle_loss(group), stats
        k = group.rewards.shape[1]
        samples = torch.stack([rows.repeat_interleave(k), torch.arange(k, device=rows.device).repeat(len(rows))], 1)
        logps, lengths = sequence_logps(self.model, group, samples, self.guided_logps)
        per_token = (logps / lengths).view(len(rows), k)
        initial = None
        if self.reference is not None or self._sampler:
            initial_logps, _ = self._initial[0].sequence_logps(group, samples, self.guided_logps)
            initial = (initial_logps / lengths).view(len(rows), k)
        ref = initial if self.reference is not None else None
        old = initial if self._sampler else None  # drawn by the initial model: the ratio is taken against it
        loss = self.loss.group_loss(per_token, group.rewards[rows].float(), ref, old).mean()
        stats.update({"loss": loss.detach(), "logp_mean": per_token.mean().detach()})
        if old is not None:
            ratio = torch.exp(per_token.detach() - old)
            stats["ratio_outside_clip"] = ((ratio - 1).abs() > getattr(self.loss, "clip", math.inf)).float().mean()
        return loss, stats

    def _idle_loss(self, group: Group) -> torch.Tensor | None:
        """Nothing to learn from `group` (every input skipped). Alone: None (no backward). With
        several ranks: a zero-weighted loss through the same forward, since every rank must run the
        same forward/backward collectives (FSDP all-gathers, DDP all-reduces) or they wait forever."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        logps, _ = sequence_logps(self.model, group, torch.zeros(1, 2, dtype=torch.long, device=self.device), self.guided_logps)
        return 0.0 * logps.sum()

    # ---- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        losses = {}
        for direction in ("t2i", "i2t"):
            if direction not in batch:
                continue
            loss, stats = self.direction_loss(batch[direction])
            n = max(1, int(stats["data/pairs"]))
            self.log_dict({f"{direction}/{key}": value for key, value in stats.items()}, batch_size=n)
            if loss is not None:
                losses[direction] = loss
                if "loss" in stats:  # absent for an idle (zero-weighted) loss
                    self._check_stall(direction, float(stats["loss"]))
        self.log_dict({f"data/{key}": value for key, value in batch.get("stats", {}).items()})
        if not losses:
            return None  # nothing to learn from in this batch (every input skipped)
        self._log_direction_grad_norms(losses)
        total = sum(self.direction_weights[d] * loss for d, loss in losses.items())
        self.log("train/loss", total, prog_bar=True)
        return total

    def _log_direction_grad_norms(self, losses: dict[str, torch.Tensor]) -> None:
        if not self.grad_norm_every_n_steps or self.global_step % self.grad_norm_every_n_steps:
            return
        if getattr(self, "_sharded", False):
            # FSDP2 computes with all-gathered copies: the sharded parameters are not in the graph,
            # and an extra autograd.grad would not run FSDP's gradient reduction
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        norms = {}
        for direction, loss in losses.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            norms[direction] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            self.log(f"{direction}/grad_norm", norms[direction])
        if len(norms) == 2:
            self.log("diagnostics/grad_norm_ratio_t2i_over_i2t", norms["t2i"] / norms["i2t"].clamp(min=1e-12))

    def _check_stall(self, direction: str, loss: float) -> None:
        if not self.stall_patience or self.loss.over_groups:
            return
        near = abs(loss - math.log(2)) < self.stall_tolerance
        self._stalled_steps[direction] = self._stalled_steps[direction] + 1 if near else 0
        if self._stalled_steps[direction] == self.stall_patience:
            rank_zero_warn(
                f"the {direction} preference loss has stayed within {self.stall_tolerance} of ln 2 for "
                f"{self.stall_patience} steps: the policy does not separate chosen from rejected. Compare the "
                f"per-direction grad norms; try the sum reduction, a larger beta or learning rate."
            )

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self, "_sharded", False):  # FSDP2: gradients are DTensor shards; the norm is a collective
            # A sharded checkpoint must hold optimizer state for every trainable weight, else resuming
            # fails ("Missing key in checkpoint state_dict: optimizer_0.state..."); weights without a
            # gradient yet (e.g. the vision tower in t2i) get a zero one, once: Adam's update is then
            # zero (with weight_decay > 0 they decay by one step).
            state = getattr(optimizer, "_optimizer", optimizer).state
            for p in self.model.parameters():
                if p.requires_grad and p.grad is None and p not in state:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                total = torch.nn.utils.get_total_norm(grads, 2.0)
                self.log("train/grad_norm", total.full_tensor() if hasattr(total, "full_tensor") else total)
            return
        norms = grad_norm(self.model, norm_type=2)
        if norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Under FSDP1 (Lightning's FSDPStrategy) clip by norm through the root unit, which takes the
        norm over every rank's shard: Lightning's own clipping refuses FSDP1 ("`gradient_clip_algorithm=
        'norm'` is currently not supported for `FSDPPrecision`")."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self._trainer.strategy.model if self._trainer is not None else None
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(root, FullyShardedDataParallel):
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    # ---- test stage (`dualfw test`) ---------------------------------------------------------------
    def on_test_start(self) -> None:
        self._on_stage_start()

    def test_step(self, batch, batch_idx: int) -> None:
        """Nothing per batch: `dualfw test` evaluates in the callbacks (dualfw.eval.callbacks), at
        the end of the test epoch. Present so Lightning runs the test loop."""
        return None

    # ---- predict stage (`dualfw predict`) ----------------------------------------------------------
    def on_predict_start(self) -> None:
        self._on_stage_start()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """K samples per input of a predict batch (SelfRewardDataModule.predict_dataloader) from
        the model, rewarded by the scorer; the BestOfKWriter callback keeps the best and writes it."""
        from dualfw.training.predict import predict_group

        return predict_group(self, batch)

    # ---- export -----------------------------------------------------------------------------------
    def export_pretrained(self, folder: str | Path) -> Path:
        """Save the trained policy where transformers loads it (`from_pretrained(folder)`). LoRA
        adapters shared by both directions are merged into the weights first; adapters for one
        direction, or a set for each, are saved beside the base weights (`dualfw.core.lora.save_split`),
        whether trained here or loaded with the initial model. The policy stays usable."""
        if self._peft and not is_split(self.model):
            self._peft.pop().merge_and_unload()  # in place: the adapter's model now holds merged weights
        return save_model(self.model, folder)


def _mark_units(model: LMMAdapter) -> None:
    """Tag the adapter's declared FSDP and checkpointing units for `fsdp_units` / `checkpointed_units`."""
    for unit in model.sharding_units():
        unit._dualfw_fsdp_unit = True
    for unit in model.checkpointing_units():
        unit._dualfw_checkpoint_unit = True


def fsdp_units(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP1 auto-wrap policy (`conf/strategies/fsdp.yaml`): wrap the units the Policy's adapter
    declares (`LMMAdapter.sharding_units`), so the strategy names no model classes."""
    return recurse or getattr(module, "_dualfw_fsdp_unit", False)


def checkpointed_units(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP1 activation-checkpointing policy: the adapter's `LMMAdapter.checkpointing_units`."""
    return recurse or getattr(module, "_dualfw_checkpoint_unit", False)


def init_fsdp1_root(root: torch.nn.Module | None) -> None:
    """Make FSDP1's outermost unit (Lightning's FSDPStrategy wraps the LightningModule in it) the
    root before anything samples. FSDP1 picks its root at the first forward it sees; sampling and
    scoring call the wrapped layers directly, so each would crown itself root and the first training
    step then fails ("Non-root FSDP instance's `_is_root` should not have been set yet", seen on an
    GPU run). No-op for anything else. FSDP1 offers no public call for this one step."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel):
        from torch.distributed.fsdp._runtime_utils import _lazy_init

        _lazy_init(root, root)
