"""Callbacks for what a user watches during a self-reward run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import make_grid, save_image

from dualfw.training.datamodule import SPENDING, eval_mode, run_folder
from dualfw.core.interface import ImageSampling
from dualfw.core.selfreward import clock


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


class TimeSplit(L.Callback):
    """Where a fit's time goes. Every step logs the wall seconds since the previous step
    (`time/step_s`), how much of it went to sampling and scoring rollouts (`time/sample_s`,
    `time/score_s`, as SelfRewardDataModule records them) and to the training step itself
    (`time/update_s`: forward, backward, optimizer step), and the sampler's throughput
    (`time/images_per_s`, `time/image_tokens_per_s`, `time/texts_per_s`). The end of fit prints
    the totals, each phase's share and the throughput.

    Lightning fetches one batch ahead, so a step's rollout times are those of the rounds sampled
    during it (the first step's cover the first two rounds). SelfRewardDataModule(time_split=True),
    the default, adds this callback; list it in trainer.callbacks only to place it yourself.
    """

    PHASES = {"sample_s": "sampling", "score_s": "scoring", "update_s": "updating"}

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._start = self._last = self._batch_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.totals = dict.fromkeys((*SPENDING, "update_s", "steps"), 0.0)
        self._start = self._last = clock(pl_module.device)
        _drain(trainer)  # rounds of an earlier fit on this DataModule

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch_start = clock(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        now = clock(pl_module.device)
        step = {**_drain(trainer), "update_s": now - self._batch_start, "step_s": now - self._last, "steps": 1.0}
        self._last = now
        for key in self.totals:
            self.totals[key] += step[key]
        logged = {f"time/{key}": step[key] for key in ("step_s", "sample_s", "score_s", "update_s")}
        pl_module.log_dict({**logged, **_rates(step)}, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and self.totals.get("steps"):
            print(self.summary(clock(pl_module.device) - self._start), flush=True)

    def summary(self, total_s: float) -> str:
        """The end-of-fit report: each phase's seconds and share of `total_s`, and the throughput."""
        t = self.totals
        share = lambda seconds: f"{seconds:9.1f} s {100 * seconds / max(total_s, 1e-9):5.1f}%"  # noqa: E731
        lines = [f"time split: {int(t['steps'])} steps in {total_s:.1f} s"]
        lines += [f"  {name:9s}{share(t[key])}" for key, name in self.PHASES.items()]
        lines.append(f"  {'other':9s}{share(total_s - sum(t[key] for key in self.PHASES))}  (logging, checkpoints, callbacks)")
        rates = _rates(t)
        if "time/images_per_s" in rates:
            lines.append(f"  sampler: {int(t['images'])} images, {rates['time/images_per_s']:.2f} images/s, "
                         f"{rates['time/image_tokens_per_s']:.0f} image tokens/s")
        if "time/texts_per_s" in rates:
            lines.append(f"  sampler: {int(t['texts'])} texts, {rates['time/texts_per_s']:.2f} texts/s")
        return "\n".join(lines)


def _drain(trainer: L.Trainer) -> dict[str, float]:
    """The DataModule's rounds sampled since the last call, summed (zeros without such a DataModule)."""
    rounds = getattr(trainer.datamodule, "spent", None)
    total = {key: sum(r[key] for r in rounds or []) for key in SPENDING}
    if rounds:
        rounds.clear()
    return total


def _rates(spent: dict[str, float]) -> dict[str, float]:
    """Sampler throughput: images and image tokens per second of image sampling, texts per second
    of text sampling."""
    rates = {}
    if spent["images"] and spent["image_sample_s"] > 0:
        rates["time/images_per_s"] = spent["images"] / spent["image_sample_s"]
        rates["time/image_tokens_per_s"] = spent["image_tokens"] / spent["image_sample_s"]
    if spent["texts"] and spent["text_sample_s"] > 0:
        rates["time/texts_per_s"] = spent["texts"] / spent["text_sample_s"]
    return rates
