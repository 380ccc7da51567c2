"""Callbacks for what a user watches during a self-reward run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from dualfw.training.datamodule import eval_mode, run_folder
from dualfw.core.interface import ImageSampling


def log_image_grid(
    trainer: L.Trainer, tag: str, grid: torch.Tensor, step: int, caption: str,
    caption_tag: str | None = None, key: str | None = None,
) -> None:
    """Send an image grid (3, H, W) in [0, 1] and its caption to every logger that takes images:
    TensorBoard-like ones (`experiment.add_image` under `tag`, the caption through `add_text` under
    `caption_tag`, default `<tag>/captions`) and those with `log_image` (e.g. W&B, under `key`,
    default `tag`)."""
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(tag, grid, step)
            experiment.add_text(caption_tag or f"{tag}/captions", caption, step)
        elif hasattr(logger, "log_image"):
            logger.log_image(key=key or tag, images=[grid], step=step, caption=[caption])


class PairImageGrid(L.Callback):
    """After step 1 and every `every_n_steps` after it, a grid of chosen (top row) vs rejected (bottom row) images for the
    first `max_prompts` pairs of the batch: saved as `<run folder>/images/pairs_step{N}.png` and sent
    to the logger (TensorBoard `add_image`, or any logger with `log_image`).

    With `rollouts_from: initial` the pairs are the frozen initial model's samples and show nothing of
    training's progress, so a third row holds one sample of the policy itself for each prompt
    (same sampling settings, seeded by the step; single-process runs only: with several ranks the
    policy's sampling can be a collective, FSDP's, that this rank-0 callback cannot join).
    """

    def __init__(self, every_n_steps: int = 10, max_prompts: int = 4) -> None:
        self.every_n_steps, self.max_prompts = every_n_steps, max_prompts

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # already counts this batch's optimizer step: 1, 2, ...
        group = batch.get("t2i")
        if (step - 1) % self.every_n_steps != 0 or not trainer.is_global_zero or group is None or not len(group.pairs):
            return
        pairs = group.pairs[: self.max_prompts]
        n = len(pairs)
        prompts = [group.prompts[i] for i in pairs[:, 0].tolist()]
        rows = [group.image_tokens[pairs[:, 0], pairs[:, 1]], group.image_tokens[pairs[:, 0], pairs[:, 2]]]
        own_row = getattr(pl_module, "sampler", pl_module.model) is not pl_module.model and trainer.world_size == 1
        if own_row:
            with eval_mode(pl_module), trainer.precision_plugin.forward_context():  # as rollouts sample
                own = pl_module.model.sample_images(prompts, 1, self._sampling(trainer, group), seed=step)
            rows.append(own[:, 0].to(rows[0].device))
        tokens = torch.cat(rows)
        grid = make_grid(pl_module.model.decode_images(tokens).float().cpu(), nrow=n, padding=2, pad_value=1.0)
        path = Path(run_folder(trainer)) / "images" / f"pairs_step{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        caption = " | ".join(prompts)
        tag = "pairs/chosen_rejected_policy" if own_row else "pairs/chosen_top_rejected_bottom"
        log_image_grid(trainer, tag, grid, step, caption, caption_tag="pairs/prompts", key="pairs")

    @staticmethod
    def _sampling(trainer: L.Trainer, group) -> ImageSampling:
        """The run's image sampling settings (the DataModule's), else the group's CFG scale."""
        sampling = getattr(trainer.datamodule, "sampling", None)
        return sampling if isinstance(sampling, ImageSampling) else ImageSampling(guidance_scale=group.guidance_scale)


class ExportPretrained(L.Callback):
    """At the end of fit, save the trained policy (LoRA merged) to `<run folder>/<dirname>` in the
    model's own format (for Janus: a folder transformers' from_pretrained loads)."""

    def __init__(self, dirname: str = "export") -> None:
        self.dirname = dirname

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a sharded (FSDP2) model is gathered by every rank and written by rank 0
        if trainer.is_global_zero or getattr(pl_module, "_sharded", False):
            pl_module.export_pretrained(Path(run_folder(trainer)) / self.dirname)
