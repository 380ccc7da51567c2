"""`dualfw predict`: the model's own best of K samples per input, ranked by its dual self-rewards.

Text to image: for each prompt, K images are sampled (the DataModule's `sampling`, each batch of
`inputs_per_step` prompts seeded from (seed, batch number)), rewarded by the Policy's DualScorer
(R_G; `batch_contrast` and the other reward options apply) and the best is kept; `keep: all` keeps
every candidate and `keep: pairs` the best and the worst, so the folder is a self-filtered SFT or
preference data set. Image to text: for each image, K descriptions ranked by R_U.

    dualfw predict --config conf/t2i.yaml --config conf/predict.yaml --data.init_args.prompts P.jsonl

What `BestOfKWriter` writes into `out_dir`:

    GenEval metadata prompts (every line has "tag" and "include"): the official GenEval layout,
        00000/metadata.jsonl, 00000/samples/0000.png   the chosen image (rescore with the official
                                                       evaluator or dualfw.eval.geneval.evaluate_folder)
        00000/candidates/03.png ...                    keep all / pairs: the other kept candidates
        predictions.jsonl                              one line per prompt
    other prompts: images/00000_03.png ... and metadata.jsonl, one line per prompt whose
        `file_name` is the chosen image (Hugging Face's imagefolder loader reads the folder)
    images (i2t): descriptions.jsonl, one line per image
    predict.json: the settings; a re-run into the folder must use the same ones

A prompt line: {"index", "prompt", "file_name", "file_names", "candidates" (the candidate number of
each file), "rewards" (every candidate's), "chosen", "rejected", "seed", "meta"}, and with keep all or
pairs "image_tokens" (each kept candidate's, in `candidates` order): such a folder is training data
for `dualfw fit` (`read_predictions`; SelfRewardDataModule's `from_predictions`). An image line:
{"index", "image", "description", "descriptions", "rewards", "chosen", "rejected", "seed"}.
A re-run of the same command skips the inputs whose line is written (a batch is sampled again only
when one of its inputs is missing, from its own seed) and so writes the same files.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from dualfw.core.errors import ConfigError, MissingFileError
from dualfw.core.files import iter_jsonl, resolve_path
from dualfw.core.interface import ImageSampling, TextSampling
from dualfw.core.pixels import to_uint8
from dualfw.core.selfreward import Group, derive_seed, rollout_i2t, rollout_t2i, select_pairs

Keep = Literal["best", "all", "pairs"]
KEEPS = ("best", "all", "pairs")
Layout = Literal["auto", "geneval", "plain"]
# the batches carry their own input indices; Lightning's look for a DataLoader's sampler is moot
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices fetched from your dataloader: `PredictBatches`")
def lines_file(folder: Path, direction: str, layout: str) -> Path:
    """The JSON-lines file of `direction` in a predict folder (one line per input written): t2i's
    name follows the layout (GenEval's predictions.jsonl, or metadata.jsonl), i2t's is fixed."""
    if direction == "i2t":
        return folder / "descriptions.jsonl"
    return folder / ("predictions.jsonl" if layout == "geneval" else "metadata.jsonl")


def batch_seed(seed: int, direction: str, batch: int) -> int:
    """The sampling seed of predict batch `batch`: t2i as `dualfw.eval.runners.sample_batches`
    derives it (the same seed and batch size give `dualfw test`'s samples), i2t apart."""
    return derive_seed(seed, batch) if direction == "t2i" else derive_seed(seed, batch, 1)


def chunks(n: int, size: int) -> list[list[int]]:
    """Consecutive chunks of `size` input indices; a last chunk of one joins the one before, since
    `batch_contrast` needs two inputs per batch."""
    out = [list(range(start, min(start + size, n))) for start in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()
        out[-1] += last
    return out


def is_geneval(records: Sequence[dict]) -> bool:
    """Whether every prompt record is GenEval metadata (the official layout can then hold it)."""
    return bool(records) and all("tag" in r and isinstance(r.get("include"), list) for r in records)


class PredictBatches:
    """The predict batches of a SelfRewardDataModule: t2i over its prompts, then i2t over its images,
    `inputs_per_step` inputs each, leaving out batches whose every input `writer` has written.
    Image batches read their pixels when iterated; an unreadable image is an error."""

    def __init__(self, dm: Any, writer: "BestOfKWriter") -> None:
        self.dm, self.writer = dm, writer
        self.plan: list[tuple[str, int, list[int]]] = []
        self.skipped = 0
        for direction, n in (("t2i", len(dm.records)), ("i2t", len(dm.image_files))):
            done = writer.done(direction) if n else set()
            for b, indices in enumerate(chunks(n, dm.inputs_per_step)):
                if all(i in done for i in indices):
                    self.skipped += len(indices)
                else:
                    self.plan.append((direction, b, indices))
            if n:
                what = "prompts" if direction == "t2i" else "images"
                rank_zero_info(f"BestOfKWriter: {len(done)} of {n} {what} already in {writer.out_dir}, "
                               f"{n - len(done)} to do (best of {writer.best_of})")

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        from dualfw.training.images import load_image

        dm = self.dm
        for direction, b, indices in self.plan:
            batch = {"direction": direction, "batch": b, "indices": indices, "seed": batch_seed(dm.seed, direction, b),
                     "best_of": self.writer.best_of}
            if direction == "t2i":
                batch["prompts"] = [dm.records[i]["prompt"] for i in indices]
                batch["sampling"] = asdict(dm.sampling)
            else:
                size = int(dm.trainer.lightning_module.model.image_size)
                pixels = []
                for i in indices:
                    image = load_image(dm.image_files[i], size)
                    if image is None:
                        raise ConfigError(f"cannot read image '{dm.image_files[i]}' (data.images)")
                    pixels.append(image)
                batch.update(images=[str(dm.image_files[i]) for i in indices], pixels=torch.stack(pixels),
                             text_sampling=asdict(dm.text_sampling), instruction=dm.instruction)
            yield batch


@torch.no_grad()
def predict_group(policy: Any, batch: dict) -> dict:
    """K samples per input of a predict batch from the policy's model, rewarded by its scorer:
    {"rewards": (B, K), "tokens": (B, K, N) image tokens (t2i) | "texts": B lists of K (i2t)}."""
    k = int(batch["best_of"])
    if batch["direction"] == "t2i":
        group = rollout_t2i(policy.model, policy.scorer, batch["prompts"], k, ImageSampling(**batch["sampling"]),
                            seed=batch["seed"])
        return {"rewards": group.rewards.float(), "tokens": group.image_tokens}
    group = rollout_i2t(policy.model, policy.scorer, batch["pixels"], k, TextSampling(**batch["text_sampling"]),
                        batch["instruction"], seed=batch["seed"])
    return {"rewards": group.rewards.float(), "texts": group.texts}


def find_writer(trainer: L.Trainer) -> "BestOfKWriter":
    """The trainer's BestOfKWriter; `dualfw predict` needs one to know K and where to write."""
    writers = [c for c in trainer.callbacks if isinstance(c, BestOfKWriter)]
    if len(writers) != 1:
        raise ConfigError(
            f"dualfw predict needs exactly one dualfw.BestOfKWriter callback, found {len(writers)} "
            "(add --config conf/predict.yaml)"
        )
    return writers[0]


class BestOfKWriter(BasePredictionWriter):
    """Writes the best of K self-rewarded samples per input (and with `keep` all or pairs, the
    others) as PNGs and JSON lines, resuming where an earlier run into `out_dir` stopped.

    Args:
        out_dir: the output folder; None: `<run folder>/predictions`.
        best_of: K, candidates sampled per input (1: plain sampling).
        keep: "best" (the chosen sample), "all" (every candidate, with its reward: an SFT or
            reward data set) or "pairs" (the chosen and the rejected: a preference data set). With
            all or pairs the lines also hold the kept candidates' image tokens, so `dualfw fit`
            trains on the folder (SelfRewardDataModule's `from_predictions`).
        layout: "auto" (GenEval's official layout when every prompt is GenEval metadata, else
            plain), "geneval" or "plain".
    """

    def __init__(self, out_dir: str | None = None, best_of: int = 8, keep: Keep = "best", layout: Layout = "auto") -> None:
        super().__init__(write_interval="batch")
        if best_of < 1:
            raise ConfigError(f"BestOfKWriter.best_of must be at least 1, got {best_of}")
        if keep not in KEEPS:
            raise ConfigError(f"BestOfKWriter.keep must be one of {', '.join(KEEPS)}, got {keep!r}")
        if layout not in ("auto", "geneval", "plain"):
            raise ConfigError(f"BestOfKWriter.layout must be auto, geneval or plain, got {layout!r}")
        self.out_dir_option, self.best_of, self.keep, self.layout_option = out_dir, best_of, keep, layout
        self.out_dir: Path | None = None
        self.layout = "plain"
        self.written = {"t2i": 0, "i2t": 0}
        self._done: dict[str, set[int]] = {}

    # ---- the folder -------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        from dualfw.training.datamodule import run_folder

        if trainer.world_size > 1:
            raise ConfigError("dualfw predict writes from one process: set --trainer.devices 1")
        dm = trainer.datamodule
        if not hasattr(dm, "records"):
            raise ConfigError("BestOfKWriter needs a dualfw.SelfRewardDataModule (data.class_path)")
        self.out_dir = Path(self.out_dir_option) if self.out_dir_option else run_folder(trainer) / "predictions"
        if self.layout_option == "auto":
            self.layout = "geneval" if is_geneval(dm.records) else "plain"
        else:
            self.layout = self.layout_option
            if self.layout == "geneval" and dm.records and not is_geneval(dm.records):
                raise ConfigError("BestOfKWriter.layout geneval needs GenEval metadata prompts (tag, include, prompt)")
        self._check_settings(self._settings(dm))
        self._done = {}
        self.written = {"t2i": 0, "i2t": 0}

    def _settings(self, dm: Any) -> dict:
        digest = hashlib.sha256()
        for r in dm.records:
            digest.update(json.dumps(r, sort_keys=True).encode())
        for f in dm.image_files:
            digest.update(str(f).encode())
        return {
            "best_of": self.best_of, "keep": self.keep, "layout": self.layout, "seed": dm.seed,
            "inputs_per_step": dm.inputs_per_step, "sampling": asdict(dm.sampling),
            "text_sampling": asdict(dm.text_sampling), "instruction": dm.instruction,
            "inputs": digest.hexdigest()[:16],
            **({"image_tokens": True} if self.keep != "best" else {}),  # lines of keep all / pairs carry them
        }

    def _check_settings(self, settings: dict) -> None:
        path = self.out_dir / "predict.json"
        if path.is_file():
            old = json.loads(path.read_text(encoding="utf-8"))
            changed = [k for k in settings if old.get(k) != settings[k]]
            if changed:
                k = changed[0]
                raise ConfigError(
                    f"out_dir '{self.out_dir}' holds predictions made with other settings ({k}: {old.get(k)!r}, "
                    f"now {settings[k]!r}): use another BestOfKWriter.out_dir or delete it"
                )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")

    def lines_path(self, direction: str) -> Path:
        """The JSON-lines file of `direction`: one line per input written."""
        return lines_file(self.out_dir, direction, self.layout)

    def done(self, direction: str) -> set[int]:
        """Input indices of `direction` whose line is written and whose files are all there; other
        lines (cut short by an interrupt, or naming a deleted file) are dropped from the file."""
        if direction not in self._done:
            path, found = self.lines_path(direction), set()
            if path.is_file():
                text = path.read_text(encoding="utf-8")
                lines = text.splitlines(keepends=True)
                kept = [line for line in lines if line.endswith("\n") and self._complete(json.loads(line))]
                if len(kept) != len(lines):
                    path.write_text("".join(kept), encoding="utf-8")
                found = {json.loads(line)["index"] for line in kept}
            self._done[direction] = found
        return self._done[direction]

    def _complete(self, line: dict) -> bool:
        return all((self.out_dir / name).is_file() for name in line.get("file_names", []))

    def _sort_lines(self, direction: str) -> None:
        """Lines in input order, as one uninterrupted run writes them (a resumed run appends the
        inputs it redid after the others)."""
        path = self.lines_path(direction)
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            ordered = sorted(lines, key=lambda line: json.loads(line)["index"])
            if ordered != lines:
                path.write_text("".join(ordered), encoding="utf-8")

    # ---- writing ----------------------------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0) -> None:
        direction, done = batch["direction"], self.done(batch["direction"])
        rewards = prediction["rewards"].float().cpu()
        chosen, rejected = rewards.argmax(-1).tolist(), rewards.argmin(-1).tolist()
        kept = [self._kept(rewards.shape[1], c, r) for c, r in zip(chosen, rejected)]
        if direction == "t2i":
            # every row's kept candidates in one decode, whichever rows are missing: the pixels
            # then never depend on what an earlier run wrote
            rows = torch.tensor([row for row, ks in enumerate(kept) for _ in ks])
            cols = torch.tensor([c for ks in kept for c in ks])
            with trainer.precision_plugin.forward_context():
                images = to_uint8(pl_module.model.decode_images(prediction["tokens"][rows, cols]))
            starts = np.cumsum([0] + [len(ks) for ks in kept])
        lines = []
        for row, index in enumerate(batch["indices"]):
            if index in done:
                continue
            line = {"index": index}
            if direction == "t2i":
                files = self._write_images(index, trainer.datamodule.records[index], images[starts[row] : starts[row + 1]],
                                           kept[row], chosen[row])
                record = trainer.datamodule.records[index]
                line.update(prompt=record["prompt"], file_name=files[kept[row].index(chosen[row])], file_names=files,
                            candidates=kept[row])
            else:
                texts = prediction["texts"][row]
                line.update(image=batch["images"][row], description=texts[chosen[row]], descriptions=texts)
            line.update(rewards=rewards[row].tolist(), chosen=chosen[row], rejected=rejected[row], seed=batch["seed"])
            if direction == "t2i":
                line["meta"] = {k: v for k, v in trainer.datamodule.records[index].items() if k != "prompt"}
                if self.keep != "best":  # the exact samples, for training on the folder
                    line["image_tokens"] = prediction["tokens"][row, kept[row]].tolist()
            lines.append(line)
            done.add(index)
        with open(self.lines_path(direction), "a", encoding="utf-8") as fp:
            for line in lines:
                fp.write(json.dumps(line) + "\n")
        self.written[direction] += len(lines)

    def _kept(self, k: int, chosen: int, rejected: int) -> list[int]:
        """The candidates written: the chosen one, every one, or the chosen and the rejected."""
        if self.keep == "all":
            return list(range(k))
        if self.keep == "pairs":
            return [chosen, rejected]
        return [chosen]

    def _write_images(self, index: int, record: dict, images: np.ndarray, kept: list[int], chosen: int) -> list[str]:
        """Write the kept candidates' PNGs of prompt `index`; their paths relative to out_dir."""
        from PIL import Image

        files = []
        if self.layout == "geneval":
            folder = self.out_dir / f"{index:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
            Image.fromarray(images[kept.index(chosen)]).save(folder / "samples" / "0000.png")
            if self.keep == "best":
                return [f"{index:05d}/samples/0000.png"]
            (folder / "candidates").mkdir(exist_ok=True)
            for c, image in zip(kept, images):  # the chosen one is samples/0000.png
                if c != chosen:
                    Image.fromarray(image).save(folder / "candidates" / f"{c:02d}.png")
                files.append(f"{index:05d}/samples/0000.png" if c == chosen else f"{index:05d}/candidates/{c:02d}.png")
            return files
        (self.out_dir / "images").mkdir(parents=True, exist_ok=True)
        for c, image in zip(kept, images):
            name = f"images/{index:05d}_{c:02d}.png"
            Image.fromarray(image).save(self.out_dir / name)
            files.append(name)
        return files

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        for direction, what, n in (("t2i", "prompts", len(dm.records)), ("i2t", "images", len(dm.image_files))):
            if n:
                self._sort_lines(direction)
                rank_zero_info(f"BestOfKWriter: {self.written[direction]} {what} written, {n} of {n} in "
                               f"{self.lines_path(direction)}")


# ---- reading a folder back as training data ---------------------------------------------------------
PAIRED_KEEPS = ("all", "pairs")


class _DamagedLine(ConfigError):
    """A lines-file line that is not a JSON object."""


def _predictions_files(folder: str | Path, key: str = "data.init_args.from_predictions") -> tuple[Path, dict, Path]:
    """(folder, its predict.json settings, its prompt lines file) of a `dualfw predict` folder that
    holds pairs (keep all or pairs, best_of >= 2); anything else is refused naming `key` or the file."""
    path = resolve_path(folder)
    if not path.is_dir():
        raise MissingFileError(f"{key}: folder '{path}' does not exist")
    settings_file = path / "predict.json"
    if not settings_file.is_file():
        raise MissingFileError(f"{key}: '{path}' has no predict.json: not a folder written by dualfw predict")
    try:
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"'{settings_file}' is not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"'{settings_file}' is not a JSON object")
    if settings.get("keep") not in PAIRED_KEEPS:
        raise ConfigError(
            f"'{settings_file}': keep {settings.get('keep')!r} keeps one image per prompt, no pairs to train on: "
            "write the folder with BestOfKWriter keep pairs or all"
        )
    if not isinstance(settings.get("best_of"), int) or settings["best_of"] < 2:
        raise ConfigError(f"'{settings_file}': best_of {settings.get('best_of')!r} gives no pairs: write it with best_of >= 2")
    lines = lines_file(path, "t2i", settings.get("layout"))
    if not lines.is_file():
        if lines_file(path, "i2t", settings.get("layout")).is_file():
            raise ConfigError(f"{key}: '{path}' holds descriptions of images only; training on a folder is text to image")
        raise MissingFileError(f"{key}: '{lines}' does not exist: the predict run has written no prompt yet")
    return path, settings, lines


@dataclass
class PredictionSet:
    """A `dualfw predict` folder read as preference data: per prompt, its kept candidates' image
    tokens and recorded rewards, in prompt order; `group` pairs them as a sampled round would be."""

    folder: Path
    records: list[dict]  # per prompt: {"prompt", **prompt-file fields}
    tokens: np.ndarray  # (prompts, kept, N) int64
    rewards: np.ndarray  # (prompts, kept) float32: each kept candidate's recorded reward
    candidates: np.ndarray  # (prompts, kept): the candidate number of each kept sample
    guidance_scale: float  # the CFG scale the candidates were sampled with
    digest: str  # of the lines file: a resumed run checks it trains on the same folder

    def group(self, indices: Sequence[int], pairing: str, margin: float, top_k: int, device: Any) -> Group:
        """The t2i Group of prompts `indices`: their kept candidates and rewards, pairs chosen by
        `select_pairs(rewards, pairing, margin, top_k)`; nothing sampled or scored."""
        rewards = torch.as_tensor(self.rewards[list(indices)], device=device)
        group = Group(
            "t2i", rewards, select_pairs(rewards, pairing, margin, top_k),
            prompts=[self.records[i]["prompt"] for i in indices],
            image_tokens=torch.as_tensor(self.tokens[list(indices)], device=device),
            guidance_scale=self.guidance_scale,
        )
        group.meta = [{k: v for k, v in self.records[i].items() if k != "prompt"} for i in indices]
        return group


def read_predictions(folder: str | Path, key: str = "data.init_args.from_predictions") -> PredictionSet:
    """Read a `dualfw predict` folder written with keep all or pairs (`_predictions_files`);
    a malformed or torn line, or one without what training needs, is refused naming file and line."""
    path, settings, lines_file = _predictions_files(folder, key)
    by_index: dict[int, tuple[dict, list, list, list]] = {}
    shape = None
    try:
        for lineno, line in iter_jsonl(lines_file, _DamagedLine):
            where = f"{lines_file}:{lineno}"
            if "image_tokens" not in line:
                raise ConfigError(f"{where}: no image_tokens (a dualfw predict that did not keep them): write the folder "
                                  "again, keep pairs or all")
            missing = [k for k in ("index", "prompt", "rewards", "candidates") if k not in line]
            if missing:
                raise ConfigError(f"{where}: no {missing[0]!r}: not a line dualfw predict wrote")
            tokens, candidates, rewards = line["image_tokens"], line["candidates"], line["rewards"]
            try:
                kept_rewards = [float(rewards[c]) for c in candidates]
                array = np.asarray(tokens, dtype=np.int64)
            except (TypeError, ValueError, IndexError) as err:
                raise ConfigError(f"{where}: rewards, candidates or image_tokens malformed ({err})") from None
            if array.ndim != 2 or len(array) != len(candidates):
                raise ConfigError(f"{where}: image_tokens must hold one token list per candidate ({len(candidates)})")
            if shape is not None and array.shape != shape:
                raise ConfigError(f"{where}: {array.shape[0]} candidates of {array.shape[1]} tokens, earlier lines "
                                  f"{shape[0]} of {shape[1]}")
            shape = array.shape
            meta = line.get("meta") if isinstance(line.get("meta"), dict) else {}
            by_index[int(line["index"])] = ({"prompt": line["prompt"], **meta}, array, kept_rewards, candidates)
    except _DamagedLine as err:  # e.g. a predict run cut short mid-line: re-running it finishes the file
        raise ConfigError(f"{err}: re-run its dualfw predict command to finish '{path}'") from None
    if not by_index:
        raise ConfigError(f"{key}: '{lines_file}' holds no prompts")
    order = sorted(by_index)
    sampling = settings.get("sampling") if isinstance(settings.get("sampling"), dict) else {}
    return PredictionSet(
        folder=path,
        records=[by_index[i][0] for i in order],
        tokens=np.stack([by_index[i][1] for i in order]),
        rewards=np.asarray([by_index[i][2] for i in order], dtype=np.float32),
        candidates=np.asarray([by_index[i][3] for i in order], dtype=np.int64),
        guidance_scale=float(sampling.get("guidance_scale", 1.0)),
        digest=hashlib.sha256(lines_file.read_bytes()).hexdigest()[:16],
    )
