"""The DataModule that samples on the fly: prompts in, preference pairs out.

Each training batch is made when Lightning asks for it: the current policy samples K images per
prompt, the DualScorer rewards them, best and worst form a pair, and every rollout is appended to
`<run folder>/rollouts.jsonl` before the batch is yielded. Lightning fetches one batch ahead, so a
batch is sampled by the policy as it was one optimizer step earlier.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np

from dualfw.data.prompts import read_prompts
from dualfw.errors import ConfigError
from dualfw.data.rollouts import RolloutWriter
from dualfw.models.base import ImageSampling
from dualfw.selfreward import Rollout, rollout_t2i


def run_folder(trainer: L.Trainer) -> Path:
    """Where this run writes its files: the logger's folder, else the trainer's root folder."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class SelfRewardStream:
    """An iterable over training batches; stateful, so a resumed run continues where it stopped."""

    def __init__(self, dm: "SelfRewardDataModule") -> None:
        self.dm = dm
        self.epoch, self.position = 0, 0  # position: index of the next prompt chunk in this epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def _order(self, epoch: int) -> list[int]:
        n = len(self.dm.records)
        if not self.dm.shuffle:
            return list(range(n))
        return np.random.default_rng([self.dm.seed, epoch]).permutation(n).tolist()

    def __iter__(self):
        dm, trainer = self.dm, self.dm.trainer
        policy = trainer.lightning_module
        order = self._order(self.epoch)
        size = dm.prompts_per_step
        chunks = [order[i : i + size] for i in range(0, len(order), size)]
        rank, world = trainer.global_rank, trainer.world_size
        while self.position < len(chunks):
            index = self.position
            self.position += 1
            if index % world != rank:
                continue
            records = [dm.records[i] for i in chunks[index]]
            seed = int(np.random.SeedSequence([dm.seed, self.epoch, index]).generate_state(1)[0])
            was_training = policy.training
            policy.eval()
            rollout = rollout_t2i(
                policy.model, policy.scorer, [r["prompt"] for r in records], dm.k, dm.sampling,
                margin=dm.margin, seed=seed, progress=dm.progress,
            )
            policy.train(was_training)
            dm.record(rollout, records, seed, epoch=self.epoch, step=trainer.global_step)
            batch = rollout.pairs()
            if not batch["prompts"]:
                continue
            rewards = rollout.rewards.float()
            batch.update(
                reward_mean=rewards.mean(), reward_std=rewards.std(), skipped=float((~rollout.keep).sum())
            )
            yield batch
        self.epoch, self.position = self.epoch + 1, 0


class SelfRewardDataModule(L.LightningDataModule):
    """Prompts -> K sampled images each -> self-rewards -> best-vs-worst pairs, sampled on the fly.

    Args:
        prompts: prompt file: JSON lines with a "prompt" field (GenEval metadata works as is) or
            plain text, one prompt a line; "dualfw:..." names a file shipped in the package.
        prompts_per_step: prompts sampled for one training batch.
        k: images sampled per prompt (>= 2).
        sampling: guidance scale, temperature, top-k, top-p of the sampler.
        margin: inputs whose reward spread (best - worst) is not above this are skipped.
        seed: seeds the prompt order and every sampling round (a round's seed is in its rollout).
        shuffle: shuffle the prompts each epoch.
        progress: show a progress bar while sampling.
    """

    def __init__(
        self,
        prompts: str,
        prompts_per_step: int = 4,
        k: int = 8,
        sampling: ImageSampling = ImageSampling(),
        margin: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if k < 2:
            raise ConfigError(f"data.k must be at least 2 to form a preference pair, got {k}")
        if prompts_per_step < 1:
            raise ConfigError(f"data.prompts_per_step must be at least 1, got {prompts_per_step}")
        self.prompts, self.prompts_per_step, self.k = prompts, prompts_per_step, k
        self.sampling, self.margin, self.seed, self.shuffle, self.progress = sampling, margin, seed, shuffle, progress
        self.records: list[dict] = read_prompts(prompts)  # read now: a bad file fails before any model loads
        self._writer: RolloutWriter | None = None
        self._stream: SelfRewardStream | None = None

    def train_dataloader(self) -> SelfRewardStream:
        if self._stream is None:
            self._stream = SelfRewardStream(self)
        return self._stream

    @property
    def rollouts_path(self) -> Path:
        return run_folder(self.trainer) / "rollouts.jsonl"

    def record(self, rollout: Rollout, records: list[dict], seed: int, epoch: int, step: int) -> None:
        """Append one line per input of `rollout` to the run's rollouts file (see dualfw.data.rollouts)."""
        if self.trainer.global_rank != 0 and self.trainer.world_size > 1:
            path = self.rollouts_path.with_name(f"rollouts.rank{self.trainer.global_rank}.jsonl")
        else:
            path = self.rollouts_path
        if self._writer is None or self._writer.path != path:
            self._writer = RolloutWriter(path)
        tokens, rewards = rollout.tokens.tolist(), rollout.rewards.tolist()
        for i, rec in enumerate(records):
            kept = bool(rollout.keep[i])
            self._writer.write(
                {
                    "direction": "t2i",
                    "step": step,
                    "epoch": epoch,
                    "seed": seed,
                    "prompt": rec["prompt"],
                    "meta": {key: value for key, value in rec.items() if key != "prompt"},
                    "image_tokens": tokens[i],
                    "rewards": rewards[i],
                    "chosen": int(rollout.chosen[i]) if kept else None,
                    "rejected": int(rollout.rejected[i]) if kept else None,
                }
            )

    def teardown(self, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

