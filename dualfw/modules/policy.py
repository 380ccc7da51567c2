"""The Policy: the trainable model, its optimizer and scheduler, and the preference loss."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import grad_norm

from dualfw.losses import PairLogps, PreferenceLoss, SimPO
from dualfw.models.base import LMMAdapter
from dualfw.modules.reference import Reference
from dualfw.modules.scorer import DualScorer


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class Policy(L.LightningModule):
    """Trains a unified LMM on the preference pairs its own DualScorer picked.

    Args:
        model: the LMM adapter (e.g. dualfw.models.JanusAdapter).
        loss: the preference loss (dualfw.losses.SimPO, dualfw.losses.DPO).
        scorer: how samples are self-rewarded.
        optimizer: optimizer factory over the trainable parameters (default AdamW, lr 1e-5).
        scheduler: optional learning-rate scheduler factory.
    """

    def __init__(
        self,
        model: LMMAdapter,
        loss: PreferenceLoss | None = None,
        scorer: DualScorer | None = None,
        optimizer: OptimizerCallable = _adamw,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss = loss if loss is not None else SimPO()
        self.scorer = scorer if scorer is not None else DualScorer()
        self.scorer.attach(self.model)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        # a list keeps the frozen copy out of checkpoints; it is the initial model, rebuilt on resume
        self._reference = [Reference(self.model)] if self.loss.needs_reference else []

    @property
    def reference(self) -> Reference | None:
        return self._reference[0] if self._reference else None

    def on_fit_start(self) -> None:
        # frozen copies live outside the module tree, so Lightning does not move them
        for frozen in (self.reference, self.scorer.model if self.scorer.frozen else None):
            if frozen is not None:
                frozen.to(self.device)

    def pair_logps(self, batch: dict) -> PairLogps:
        """Summed log pi(image | prompt) of the chosen and rejected images (and the Reference's)."""
        n = len(batch["prompts"])
        prompts = batch["prompts"] * 2
        tokens = torch.cat([batch["chosen"], batch["rejected"]])
        logps = self.model.image_logprobs(prompts, tokens).sum(-1)
        length = torch.full((n,), float(tokens.shape[1]), device=logps.device)
        pairs = PairLogps(logps[:n], logps[n:], length, length)
        if self.reference is not None:
            ref = self.reference.image_logprobs(prompts, tokens).sum(-1)
            pairs.ref_chosen, pairs.ref_rejected = ref[:n], ref[n:]
        return pairs

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pairs = self.pair_logps(batch)
        loss = self.loss(pairs).mean()
        n = len(batch["prompts"])
        stats = {
            "train/loss": loss,
            "train/pair_accuracy": (self.loss.implicit_margin(pairs) > 0).float().mean(),
            "train/logp_chosen": (pairs.chosen / pairs.chosen_len).mean(),
            "train/logp_rejected": (pairs.rejected / pairs.rejected_len).mean(),
            "reward/margin": (batch["chosen_reward"] - batch["rejected_reward"]).mean(),
            "reward/mean": batch["reward_mean"],
            "reward/std": batch["reward_std"],
            "data/skipped_inputs": batch["skipped"],
            "data/pairs": float(n),
        }
        self.log_dict(stats, batch_size=n, prog_bar=False)
        self.log("loss", loss, batch_size=n, prog_bar=True, logger=False)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = grad_norm(self.model, norm_type=2)
        if norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}
