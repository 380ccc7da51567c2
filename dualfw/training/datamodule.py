"""The DataModule that samples on the fly: prompts and/or images in, scored groups and pairs out.

Each training batch is made when Lightning asks for it: the current policy samples K images per
prompt (t2i) and/or K descriptions per image (i2t), the DualScorer rewards them, pairs are drawn,
and every rollout is appended to `<run folder>/rollouts.jsonl` before the batch is yielded.
Lightning fetches one batch ahead, so a batch is sampled by the policy as it was one optimizer
step earlier. A checkpoint records the first round not trained; a resumed run trains the rounds
its rollouts file already holds as read back, so it continues as if never stopped.

With `from_predictions` nothing is sampled: each round reads its prompts' candidates and rewards
from a `dualfw predict` folder (keep all or pairs) and pairs them by the same rules.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from dualfw.training.images import list_images, load_image
from dualfw.training.predict import PredictionSet, read_predictions
from dualfw.training.prompts import read_prompts
from dualfw.training.rollouts import RolloutWriter, read_rollouts
from dualfw.core.errors import ConfigError, StalledRunError
from dualfw.core.interface import ImageSampling, TextSampling
from dualfw.core.selfreward import PAIRINGS, Group, Pairing, derive_seed, rollout_i2t, rollout_t2i

Schedule = Literal["t2i", "i2t", "joint", "alternate"]
SCHEDULES = ("t2i", "i2t", "joint", "alternate")


def run_folder(trainer: L.Trainer) -> Path:
    """Where this run writes its files: the logger's folder, else the trainer's root folder.

    `trainer.log_dir` is a collective under multi-process strategies (rank 0 broadcasts it), so
    the first call must happen on every rank (SelfRewardDataModule.setup makes it); later calls,
    on any rank alone, read the cached answer.
    """
    cached = getattr(trainer, "_dualfw_run_folder", None)
    if cached is None:
        cached = Path(trainer.log_dir or trainer.default_root_dir)
        trainer._dualfw_run_folder = cached
    return cached


def directions_at(schedule: str, step: int, alternate_every: int) -> tuple[str, ...]:
    """Which directions are sampled at sampling round `step`: t2i, i2t, both (joint), or
    t2i for `alternate_every` rounds then i2t for as many (alternate)."""
    if schedule == "joint":
        return ("t2i", "i2t")
    if schedule == "alternate":
        return ("t2i",) if (step // alternate_every) % 2 == 0 else ("i2t",)
    return (schedule,)


def directions_needed(schedule: str, alternate_every: int) -> set[str]:
    """Every direction a schedule samples at some round (and so the inputs it needs)."""
    return set(directions_at(schedule, 0, 1)) | set(directions_at(schedule, alternate_every, alternate_every))


def check_margin(margin: float, key: str = "data.margin") -> None:
    """A pair needs a reward difference above the margin, so a negative one is an error naming `key`."""
    if margin < 0:
        raise ConfigError(f"{key} must be >= 0 (a pair needs a reward difference above it), got {margin}")


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` in eval mode inside (sampling sees no dropout); each submodule's own mode after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


class SelfRewardStream:
    """An iterable over training batches, one per sampling round; stateful, so a resumed run
    continues where it stopped.

    Its state is the first round not yet trained (`trained` is called as each batch enters the
    training step), not the sampling position: Lightning fetches one batch ahead, so the latest
    sampled round is not trained yet when a checkpoint is written. A resumed run trains the rounds
    it finds whole in the run's rollouts file as read back (not sampled again) and samples from
    the first round the file lacks.
    """

    def __init__(self, dm: "SelfRewardDataModule") -> None:
        self.dm = dm
        self.epoch, self.position = 0, 0  # the next round to yield: its epoch and place in the epoch
        self._untrained = (0, 0)  # the first round not trained yet
        self._on_disk: dict[int, list[dict]] | None = None  # round -> its records, read once per process
        self._without_pairs = 0  # consecutive rounds without a single pair

    def state_dict(self) -> dict:
        epoch, position = self._untrained
        state = {"epoch": epoch, "position": position}
        if self.dm.predictions is not None:
            state["predictions"] = self.dm.predictions.digest
        return state

    def load_state_dict(self, state: dict) -> None:
        self.dm.check_resumed_data(state.get("predictions"))
        self.epoch, self.position = state["epoch"], state["position"]
        self._untrained = (self.epoch, self.position)

    def trained(self, epoch: int, index: int) -> None:
        """Round `index` of `epoch` has entered the training step: every rank's round of that
        optimizer step counts as trained."""
        world = self.dm.trainer.world_size if self.dm.trainer is not None else 1
        after = (index // world + 1) * world
        self._untrained = (epoch + 1, 0) if after >= self.rounds_per_epoch() else (epoch, after)

    def _chunk(self, n: int, epoch: int, index: int) -> list[int]:
        """Input indices of round `index` of an epoch (inputs cycle when a direction has fewer)."""
        size = self.dm.inputs_per_step
        order = np.random.default_rng([self.dm.seed, epoch]).permutation(n) if self.dm.shuffle else np.arange(n)
        return [int(order[(index * size + j) % n]) for j in range(min(size, n))]

    def rounds_per_epoch(self) -> int:
        dm = self.dm
        longest = max(len(dm.records) if dm.records else 0, len(dm.image_files) if dm.image_files else 0)
        return -(-longest // dm.inputs_per_step)

    def __iter__(self):
        dm, trainer = self.dm, self.dm.trainer
        policy = trainer.lightning_module
        rank, world = trainer.global_rank, trainer.world_size
        if self._on_disk is None:  # rounds read from predictions are read again, never recorded
            first = self.epoch * self.rounds_per_epoch() + self.position
            self._on_disk = dm.read_back(first) if dm.predictions is None else {}
        while self.position < self.rounds_per_epoch():
            index = self.position
            self.position += 1
            if index % world != rank:
                continue
            step = self.epoch * self.rounds_per_epoch() + index  # the round, counted over epochs
            seed = derive_seed(dm.seed, self.epoch, index)
            groups = None
            if step in self._on_disk:
                groups = dm.groups_from_records(self._on_disk.pop(step), policy, self._chunk, self.epoch, index, step)
            if groups is None and dm.predictions is not None:
                chunk = self._chunk(len(dm.records), self.epoch, index)
                groups = {"t2i": dm.predictions.group(chunk, dm.pairing, dm.margin, dm.top_k, policy.device)}
                dm.spent.append(rollout_spending(groups))
            if groups is None:
                groups = {}
                for direction in directions_at(dm.schedule, step, dm.alternate_every):
                    # the training step's precision (autocast for "bf16-mixed"): under FSDP1 mixed
                    # precision, sharded units compute in bf16 while the root's weights stay float32,
                    # so sampling without it fails ("expected scalar type BFloat16 but found Float")
                    with eval_mode(policy), trainer.precision_plugin.forward_context():
                        group = dm.sample(direction, policy, self._chunk, self.epoch, index, seed)
                    if group is not None:
                        groups[direction] = group
                if groups:
                    dm.record(groups, seed, epoch=self.epoch, round=step, step=trainer.global_step)
                dm.spent.append(rollout_spending(groups))
            self._check_pairs(groups)
            # a round without pairs still goes in: it is counted (data/skipped_inputs) and takes its
            # step, and with several ranks every rank must take a training step (its collectives)
            batch = dict(groups)
            batch["stats"] = {"unreadable_images": float(len(dm.skipped_images))}
            batch["round"] = (self.epoch, index)
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def _check_pairs(self, groups: dict[str, Group]) -> None:
        """Stop a run whose last `max_rounds_without_pairs` rounds gave no pair, naming the likely cause."""
        limit = self.dm.max_rounds_without_pairs
        if any(len(group.pairs) for group in groups.values()):
            self._without_pairs = 0
            return
        self._without_pairs += 1
        if not limit or self._without_pairs < limit:
            return
        dm = self.dm
        if not groups:
            cause = f"every image was unreadable ({len(dm.skipped_images)} skipped, see the warnings; data.images)"
        elif all(_samples_equal(group) for group in groups.values()):
            cause = ("all K samples of every input were equal: greedy or near-greedy sampling "
                     "(data.sampling / data.text_sampling temperature 0, or a tiny top_p / top_k 1)")
        else:
            cause = f"the K rewards of every input were within data.margin {dm.margin} of each other"
        raise StalledRunError(
            f"{self._without_pairs} consecutive sampling rounds gave no preference pair: {cause} "
            f"(data.max_rounds_without_pairs {limit})"
        )


SPENDING = ("sample_s", "score_s", "images", "image_tokens", "image_sample_s", "texts", "text_sample_s")


def rollout_spending(groups: dict[str, Group]) -> dict[str, float]:
    """What sampling one round cost (the keys of SPENDING): wall seconds sampling and scoring, and
    what was made, images and their tokens (t2i) or texts (i2t), with each direction's sampling
    seconds for its throughput."""
    spent = dict.fromkeys(SPENDING, 0.0)
    for group in groups.values():
        if not group.seconds:  # read back from disk: nothing spent
            continue
        spent["sample_s"] += group.seconds["sample"]
        spent["score_s"] += group.seconds["score"]
        if group.direction == "t2i":
            spent["images"] += group.image_tokens.shape[0] * group.image_tokens.shape[1]
            spent["image_tokens"] += group.image_tokens.numel()
            spent["image_sample_s"] += group.seconds["sample"]
        else:
            spent["texts"] += sum(len(texts) for texts in group.texts)
            spent["text_sample_s"] += group.seconds["sample"]
    return spent


def _samples_equal(group: Group) -> bool:
    """Whether each input's K samples are all the same."""
    if group.direction == "t2i":
        return bool((group.image_tokens == group.image_tokens[:, :1]).all())
    return all(len(set(texts)) == 1 for texts in group.texts)


class SelfRewardDataModule(L.LightningDataModule):
    """Inputs -> K samples each -> dual self-rewards -> pairs, sampled on the fly.

    Args:
        prompts: prompt file for text-to-image: JSON lines with a "prompt" field (GenEval metadata
            works as is) or plain text, one prompt a line; "dualfw:..." names a packaged file.
        balance_by: a metadata field of the prompt records (e.g. "tag"): each of its values is
            sampled equally often (GenEval scores the mean over tags; its generator's prompts are
            mostly color_attr); None samples the file's lines as they come.
        from_predictions: instead of `prompts` and sampling: a `dualfw predict` folder written with
            keep all or pairs (a self-filtered preference set, conf/t2i_offline.yaml). Its prompts
            are the inputs and their recorded candidates (image tokens) and rewards the samples,
            paired by `pairing`, `top_k` and `margin`; `k` and `sampling` are the folder's. t2i only.
        images: images for image-to-text: a folder, or a JSON-lines file with "image" / "path"
            fields. No captions needed.
        schedule: "t2i", "i2t", "joint" (both every step) or "alternate" (switch every
            `alternate_every` sampling rounds).
        alternate_every: rounds per direction for the alternate schedule.
        inputs_per_step: prompts (and images) sampled for one training batch.
        k: samples per input (>= 2).
        sampling: image sampler settings (guidance scale, temperature, top-k, top-p).
        text_sampling: description sampler settings (temperature, top-p, max new tokens).
        instruction: the user turn asking for a description in the i2t direction.
        pairing: "best_worst" (paper), "all" pairs, or "top_bottom" (top-k vs bottom-k).
        top_k: pairs per input for top_bottom.
        margin: a pair needs a reward difference above this (>= 0); inputs without a pair are
            skipped (counted in data/skipped_inputs).
        max_rounds_without_pairs: stop the run with an error naming the likely cause when this many
            consecutive sampling rounds give no pair at all (greedy sampling, every image
            unreadable); 0 never stops.
        seed: seeds the input order and every sampling round (a round's seed is in its rollout).
        shuffle: shuffle the inputs each epoch.
        progress: show a progress bar while sampling images.
        time_split: log per step the seconds spent sampling, scoring and updating and the rollout
            throughput, and print a summary at the end of fit (adds a dualfw.TimeSplit callback
            unless the trainer has one).
    """

    def __init__(
        self,
        prompts: str | None = None,
        balance_by: str | None = None,
        from_predictions: str | None = None,
        images: str | None = None,
        schedule: Schedule = "t2i",
        alternate_every: int = 1,
        inputs_per_step: int = 4,
        k: int = 8,
        sampling: ImageSampling = ImageSampling(),
        text_sampling: TextSampling = TextSampling(),
        instruction: str = "Describe this image.",
        pairing: Pairing = "best_worst",
        top_k: int = 2,
        margin: float = 0.0,
        seed: int = 0,
        shuffle: bool = True,
        progress: bool = True,
        max_rounds_without_pairs: int = 20,
        time_split: bool = True,
    ) -> None:
        super().__init__()
        check_margin(margin)
        if max_rounds_without_pairs < 0:
            raise ConfigError(f"data.max_rounds_without_pairs must be >= 0 (0: never stop), got {max_rounds_without_pairs}")
        if not isinstance(sampling, ImageSampling) or not isinstance(text_sampling, TextSampling):
            raise ConfigError("data.sampling must be an ImageSampling and data.text_sampling a TextSampling")
        if schedule not in SCHEDULES:
            raise ConfigError(f"data.schedule {schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}")
        if pairing not in PAIRINGS:
            raise ConfigError(f"data.pairing {pairing!r} is unknown: choose one of {', '.join(PAIRINGS)}")
        if k < 2:
            raise ConfigError(f"data.k must be at least 2 to form a preference pair, got {k}")
        if inputs_per_step < 1 or alternate_every < 1:
            raise ConfigError("data.inputs_per_step and data.alternate_every must be at least 1")
        needs = directions_needed(schedule, alternate_every)
        if from_predictions is not None:
            if schedule != "t2i":
                raise ConfigError(f"data.from_predictions holds text-to-image candidates: set data.schedule t2i, not {schedule!r}")
            if prompts is not None:
                raise ConfigError("data.prompts and data.from_predictions both give prompts: set data.prompts null "
                                  "(the folder holds its own)")
            if balance_by is not None:
                raise ConfigError("data.balance_by applies to data.prompts, not to data.from_predictions: set it null")
        elif "t2i" in needs and prompts is None:
            raise ConfigError(f"data.prompts is required for schedule {schedule!r}")
        if "i2t" in needs and images is None:
            raise ConfigError(f"data.images is required for schedule {schedule!r}")
        self.schedule, self.alternate_every, self.inputs_per_step, self.k = schedule, alternate_every, inputs_per_step, k
        self.sampling, self.text_sampling, self.instruction = sampling, text_sampling, instruction
        self.pairing, self.top_k, self.margin = pairing, top_k, margin
        self.seed, self.shuffle, self.progress = seed, shuffle, progress
        self.max_rounds_without_pairs = max_rounds_without_pairs
        self.time_split = time_split
        self.spent: list[dict[str, float]] = []  # per sampled round (rollout_spending), drained by TimeSplit
        # read now: a bad file fails before any model loads
        self.predictions: PredictionSet | None = read_predictions(from_predictions) if from_predictions is not None else None
        if self.predictions is not None:
            self.records: list[dict] = self.predictions.records
        else:
            self.records = read_prompts(prompts, balance_by=balance_by) if "t2i" in needs else []
        self.image_files: list[Path] = list_images(images) if "i2t" in needs else []
        self.skipped_images: set[Path] = set()
        self._writer: RolloutWriter | None = None
        self._stream: SelfRewardStream | None = None

    def setup(self, stage: str) -> None:
        run_folder(self.trainer)  # on every rank, before any rank-0-only callback asks for it
        policy = self.trainer.lightning_module
        if stage == "fit":
            self.check_prompt_lengths(getattr(policy, "model", None))
            self.check_predictions(getattr(policy, "model", None))
            if self.time_split:
                from dualfw.training.callbacks import TimeSplit  # callbacks import this module

                if not any(isinstance(cb, TimeSplit) for cb in self.trainer.callbacks):
                    # first: its batch-end hook reads the clock before image grids and checkpoints
                    self.trainer.callbacks.insert(0, TimeSplit())

    def check_prompt_lengths(self, adapter) -> None:
        """Refuse a prompt longer than the model's context holds with an image after it (when the
        adapter exposes a tokenizer and a transformers config with max_position_embeddings)."""
        tokenizer = getattr(getattr(adapter, "processor", None), "tokenizer", None)
        config = getattr(getattr(adapter, "model", None), "config", None)
        if not self.records or tokenizer is None or config is None:
            return
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text_config, "max_position_embeddings", None)
        if not limit:
            return
        room = limit - int(getattr(adapter, "num_image_tokens", 0)) - 32  # the chat template's own tokens
        prompts = [r["prompt"] for r in self.records]
        for i, ids in enumerate(tokenizer(prompts, add_special_tokens=False)["input_ids"]):
            if len(ids) > room:
                raise ConfigError(
                    f"data.prompts: prompt {i + 1} ({prompts[i][:40]!r}...) is {len(ids)} tokens; the model's context "
                    f"({limit} positions, {getattr(adapter, 'num_image_tokens', 0)} for the image) holds at most {room}"
                )

    def check_predictions(self, adapter) -> None:
        """Refuse `from_predictions` candidates whose image length is not the model's (another model drew them)."""
        n = getattr(adapter, "num_image_tokens", None)
        if self.predictions is not None and n is not None and self.predictions.tokens.shape[-1] != n:
            raise ConfigError(
                f"data.from_predictions: '{self.predictions.folder}' holds images of {self.predictions.tokens.shape[-1]} "
                f"tokens, the model draws {n}: the folder was written by another model"
            )

    def check_resumed_data(self, trained_on: str | None) -> None:
        """A checkpoint resumes only on the data it trained on: sampled on the fly (None), or the
        `from_predictions` folder whose lines file had digest `trained_on`."""
        ours = self.predictions.digest if self.predictions is not None else None
        if trained_on == ours:
            return
        if ours is None:
            raise ConfigError("the checkpoint trained on a dualfw predict folder: resume it with the same data.from_predictions")
        if trained_on is None:
            raise ConfigError("the checkpoint's run sampled its data: resume it without data.from_predictions, or start a new run")
        raise ConfigError(
            f"data.from_predictions '{self.predictions.folder}' has changed since the checkpoint trained on it: resume "
            "with the folder as it was, or start a new run"
        )

    def train_dataloader(self) -> SelfRewardStream:
        if self._stream is None:
            self._stream = SelfRewardStream(self)
        return self._stream

    def test_dataloader(self) -> list[int]:
        """One placeholder batch, so that `dualfw test` runs Lightning's test loop; the evaluation
        callbacks (dualfw.eval.callbacks) read their own prompt and question files."""
        return [0]

    def predict_dataloader(self):
        """`dualfw predict`: batches of `inputs_per_step` prompts (then images) across the whole
        input, each seeded from (seed, batch number); the BestOfKWriter callback sets K and leaves
        out the batches it has already written (dualfw.training.predict)."""
        from dualfw.training.predict import PredictBatches, find_writer

        return PredictBatches(self, find_writer(self.trainer))

    def sample(self, direction: str, policy, chunk, epoch: int, index: int, seed: int) -> Group | None:
        """One sampling round of `direction` from `policy.sampler` (the current policy unless
        `rollouts_from: initial`)."""
        if direction == "t2i":
            records = [self.records[i] for i in chunk(len(self.records), epoch, index)]
            group = rollout_t2i(
                policy.sampler, policy.scorer, [r["prompt"] for r in records], self.k, self.sampling,
                pairing=self.pairing, margin=self.margin, seed=seed, progress=self.progress, top_k=self.top_k,
            )
            group.meta = [{key: v for key, v in r.items() if key != "prompt"} for r in records]
            return group
        files = [self.image_files[i] for i in chunk(len(self.image_files), epoch, index)]
        images = []
        for file in files:
            image = load_image(file, policy.model.image_size)
            if image is None:
                self.skipped_images.add(file)
            else:
                images.append((file, image))
        if not images:
            return None
        pixels = torch.stack([image for _, image in images]).to(policy.device)
        group = rollout_i2t(
            policy.sampler, policy.scorer, pixels, self.k, self.text_sampling, self.instruction,
            pairing=self.pairing, margin=self.margin, seed=seed, top_k=self.top_k,
        )
        group.meta = [{"image": str(file)} for file, _ in images]
        return group

    @property
    def rollouts_path(self) -> Path:
        return run_folder(self.trainer) / "rollouts.jsonl"

    def rank_rollouts_path(self) -> Path:
        """This rank's rollouts file: rollouts.jsonl, or rollouts.rank{r}.jsonl with several ranks."""
        path = self.rollouts_path
        if self.trainer.world_size > 1:
            path = path.with_name(f"rollouts.rank{self.trainer.global_rank}.jsonl")
        return path

    def record(self, groups: dict[str, Group], seed: int, epoch: int, round: int, step: int) -> None:
        """Append one line per input of each group of a round to this rank's rollouts file, the
        round in one write (see dualfw.training.rollouts)."""
        path = self.rank_rollouts_path()
        if self._writer is None or self._writer.path != path:
            self._writer = RolloutWriter(path)
        lines = []
        for direction, group in groups.items():
            rewards = group.rewards.tolist()
            pairs = group.pairs.tolist()
            for i in range(len(rewards)):
                line = {"direction": direction, "round": round, "rank": self.trainer.global_rank, "item": i,
                        "items": len(rewards), "directions": list(groups), "step": step, "epoch": epoch, "seed": seed}
                if direction == "t2i":
                    line.update(prompt=group.prompts[i], image_tokens=group.image_tokens[i].tolist())
                else:
                    line.update(image_tokens=group.image_tokens[i].tolist(), texts=group.texts[i])
                line.update(
                    meta=group.meta[i], rewards=rewards[i], pairs=[[c, r] for row, c, r in pairs if row == i]
                )
                lines.append(line)
        self._writer.write_many(lines)

    def read_back(self, first_round: int) -> dict[int, list[dict]]:
        """This rank's rounds from `first_round` on that its rollouts file holds: sampled before a
        crash but not trained. A torn last line is cut first (RolloutWriter)."""
        path = self.rank_rollouts_path()
        if not path.is_file():
            return {}
        self._writer = RolloutWriter(path)  # cuts a torn tail before reading
        rounds: dict[int, list[dict]] = {}
        for record in read_rollouts(path, dedupe=True):
            if record.get("round", -1) >= first_round and record.get("rank", 0) == self.trainer.global_rank:
                rounds.setdefault(record["round"], []).append(record)
        return rounds

    def groups_from_records(self, records: list[dict], policy, chunk, epoch: int, index: int, round: int) -> dict[str, Group] | None:
        """A round's groups rebuilt from its records, as it was sampled; None when the round is
        incomplete (cut short mid-write: it is sampled again). Records from other settings (inputs,
        K) than this run's are refused: a run folder holds one run."""
        directions = records[0].get("directions", [])
        by_direction = {d: sorted((r for r in records if r["direction"] == d), key=lambda r: r["item"]) for d in directions}
        if not directions or any(
            not rs or [r["item"] for r in rs] != list(range(rs[0]["items"])) for rs in by_direction.values()
        ):
            return None
        path = self.rank_rollouts_path()
        device = policy.device
        groups = {}
        for direction, rs in by_direction.items():
            mismatch = any(len(r["rewards"]) != self.k for r in rs)
            rewards = torch.tensor([r["rewards"] for r in rs], dtype=torch.float32, device=device)
            pairs = torch.tensor([[i, c, j] for i, r in enumerate(rs) for c, j in r["pairs"]], dtype=torch.long, device=device)
            pairs = pairs.view(-1, 3)
            if direction == "t2i":
                expected = [self.records[i]["prompt"] for i in chunk(len(self.records), epoch, index)]
                mismatch = mismatch or [r["prompt"] for r in rs] != expected
                group = Group(
                    "t2i", rewards, pairs, prompts=[r["prompt"] for r in rs],
                    image_tokens=torch.tensor([r["image_tokens"] for r in rs], dtype=torch.long, device=device),
                    guidance_scale=self.sampling.guidance_scale,
                )
            else:
                files = [str(self.image_files[i]) for i in chunk(len(self.image_files), epoch, index)]
                mismatch = mismatch or not {r["meta"]["image"] for r in rs} <= set(files)
                images = [load_image(Path(r["meta"]["image"]), policy.model.image_size) for r in rs] if not mismatch else []
                if any(image is None for image in images):
                    return None
                group = Group(
                    "i2t", rewards, pairs, texts=[r["texts"] for r in rs], instruction=self.instruction,
                    image_tokens=torch.tensor([r["image_tokens"] for r in rs], dtype=torch.long, device=device),
                    pixels=torch.stack(images).to(device) if images else None,
                )
            if mismatch:
                raise ConfigError(
                    f"'{path}' round {round} was sampled with other inputs or k than this run's: resume with the "
                    "run's own config, or start a new run folder"
                )
            group.meta = [r["meta"] for r in rs]
            groups[direction] = group
        return groups

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """The batch enters the training step: its round counts as trained (the stream's state)."""
        if self._stream is not None and isinstance(batch, dict) and "round" in batch and self.trainer.training:
            self._stream.trained(*batch["round"])
        return batch

    def teardown(self, stage: str) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.skipped_images:
            rank_zero_warn(f"{len(self.skipped_images)} unreadable images were skipped (see the warnings for their paths)")
