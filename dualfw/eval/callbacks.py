"""GenEval-style and POPE-style evaluation as Lightning callbacks, during fit and at test time.

- During fit, every `every_n_steps` optimizer steps (0: never), on global rank 0 only: the model is
  put in eval mode, generates / answers under `torch.no_grad()`, and its train/eval mode is
  restored. Scalars go to every logger at the current step (and into `trainer.callback_metrics`,
  so `ModelCheckpoint(monitor="geneval/overall")` works); `fit_max_prompts` /
  `fit_max_questions` keep these evaluations quick.
- At test time (`dualfw test --config conf/t2i.yaml --config conf/eval/shapes.yaml`), at the end
  of the test epoch: scalars through `LightningModule.log` (Lightning prints them as the test
  table and sends them to the loggers), and `report.json` / `report.md` in the run folder.

Files written into the run folder (`dualfw.training.datamodule.run_folder`), `<label>` being `test` or
`step000100`:

    geneval/<label>/00000/metadata.jsonl, geneval/<label>/00000/samples/0000.png ...
                                      the official GenEval layout (rescore with the official
                                      evaluator, or `dualfw.eval.geneval.evaluate_folder`)
    geneval/<label>_results.jsonl     per-image verdicts (official results.jsonl fields)
    images/geneval_<label>.png        grid of samples, one row per prompt
    pope/<label>/<split>_questions.jsonl, pope/<label>/<split>_answers.jsonl
                                      the questions asked and POPE's answer file, line for line
    report.json, report.md            (test only) scores, 95% intervals, the command line

The model is the LightningModule's `.model` (a `dualfw.core.interface.LMMAdapter`): GenEval uses
`sample_images` + `decode_images`, POPE uses `sample_texts` (greedy) and `image_size`. The work
itself is `dualfw.eval.runners` (usable without a Trainer); these callbacks schedule it, write the
files and log the scores.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
import weakref
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Protocol, Sequence

import lightning as L
import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from dualfw.core.errors import ConfigError, MissingFileError
from dualfw.core.files import resolve_path, write_jsonl
from dualfw.core.interface import ImageSampling
from dualfw.core.selfreward import derive_seed
from dualfw.training.callbacks import log_image_grid
from dualfw.training.datamodule import eval_mode, run_folder
from dualfw.training.images import list_images, load_image
from dualfw.eval.backends import OpenClipScore, make_fid
from dualfw.eval.detection import ColorClassifier, Detection, Detector
from dualfw.eval.geneval import (
    TAGS,
    GenEvalPrompt,
    ImageResult,
    MetadataError,
    MissingColorError,
    common_failures,
    export_geneval_folder,
    read_metadata,
    summarize,
    write_results,
)
from dualfw.core.pixels import to_pixels
from dualfw.eval.pope import PopeFormatError, PopeQuestion, read_questions, write_answers, write_questions
from dualfw.eval.runners import (
    PARSERS,
    GenEvalScores,
    PopeScores,
    add_fid_reference,
    answer_pope,
    answer_pope_best_of,
    fid_of,
    geneval_scores,
    mean_clip_score,
    run_geneval,
    sample_batches,
    score_pope,
    within_group_auc,
)

# Any callable with the protocols' call signature is accepted too (jsonargparse checks protocols by
# exact signature, and e.g. ShapesDetector's `classes` is optional).
DetectorLike = Callable[[np.ndarray, Sequence[str]], list[Detection]]
ColorClassifierLike = Callable[[np.ndarray, Detection, Sequence[str]], str]


# --------------------------------------------------------------------------------------------------
# Helpers shared by both callbacks
# --------------------------------------------------------------------------------------------------


def command_line() -> str:
    """The command that started this process: `dualfw ...` when it came through `dualfw.cli`."""
    # `python -m dualfw.cli` runs the module as __main__, a second copy beside dualfw.cli
    for module in (sys.modules.get("__main__"), sys.modules.get("dualfw.cli")):
        argv = getattr(module, "COMMAND", None)
        if argv:
            return shlex.join(argv)
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def _selection(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


# Reports: one per Trainer, so that GenEval and POPE sections of one `dualfw test` land in the same
# files, while a new run into the same folder starts a fresh report instead of merging stale ones.
_REPORTS: "weakref.WeakKeyDictionary[L.Trainer, dict[str, Any]]" = weakref.WeakKeyDictionary()


def add_to_report(trainer: L.Trainer, pl_module: L.LightningModule, section: str, data: Mapping[str, Any]) -> Path:
    """Add `section` to this trainer's report and (re)write `<run folder>/report.json` and
    `report.md`. Returns the JSON path."""
    folder = run_folder(trainer)
    report = _REPORTS.get(trainer)
    if report is None:
        report = {
            "command": command_line(),
            "checkpoint": getattr(trainer, "ckpt_path", None),
            "model": f"{type(pl_module).__name__}({type(getattr(pl_module, 'model', pl_module)).__name__})",
            "run_folder": str(folder),
            "config": "config.yaml" if (folder / "config.yaml").is_file() else None,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        _REPORTS[trainer] = report
    report[section] = dict(data)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(report_markdown(report), encoding="utf-8")
    return path


def _fmt(value: float) -> str:
    return "nan" if value != value else f"{100 * value:.1f}"


def _fmt_ci(ci: Sequence[float]) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def report_markdown(report: Mapping[str, Any]) -> str:
    """The Markdown twin of report.json (scores in %, 95% bootstrap intervals in brackets)."""
    lines = ["# dualfw evaluation report", ""]
    lines.append(f"- command: `{report['command']}`")
    for key in ("checkpoint", "model", "run_folder", "config", "created"):
        if report.get(key):
            lines.append(f"- {key.replace('_', ' ')}: `{report[key]}`")
    g = report.get("geneval")
    if g:
        lines += [
            "",
            "## GenEval",
            "",
            f"{g['num_prompts']} prompts x {g['images_per_prompt']} images from `{g['metadata']}`; detector "
            f"`{g['detector']}`, color classifier `{g['color_classifier']}`; seed {g['seed']}; "
            f"images in `{g['folder']}` (official layout).",
            "",
            "| tag | score (%) | 95% CI | correct / images | strict (%) |",
            "|---|---|---|---|---|",
            f"| **overall** | **{_fmt(g['overall']['score'])}** | {_fmt_ci(g['overall']['ci95'])} | "
            f"{g['num_correct']} / {g['num_images']} | {_fmt(g['strict']['overall']['score'])} |",
        ]
        for tag, t in g["per_tag"].items():
            strict = g["strict"]["per_tag"][tag]["score"]
            lines.append(
                f"| {tag} | {_fmt(t['score'])} | {_fmt_ci(t['ci95'])} | {t['correct']} / {t['total']} | {_fmt(strict)} |"
            )
        lines += [
            "",
            f"Correct images: {_fmt(g['image_accuracy'])}%; prompts with a correct image: "
            f"{_fmt(g['prompt_accuracy'])}%; mean detected objects per image: {g['mean_objects']:.2f}. "
            "Overall is the mean of the per-tag scores (official rule); strict also fails extra objects.",
        ]
        failing = {tag: reasons for tag, reasons in g.get("failures", {}).items() if reasons}
        if failing:
            lines += ["", "Most common failures (images):"]
            lines += [f"- {tag}: " + "; ".join(f"{reason} ({n})" for reason, n in reasons) for tag, reasons in failing.items()]
        if g.get("best_of"):
            b = g["best_of"]
            lines += [
                "",
                f"Best of {b['k']} by the model's own reward ({b['scorer']}), same seed: overall "
                f"{_fmt(b['overall']['score'])} {_fmt_ci(b['overall']['ci95'])}, strict {_fmt(b['strict']['overall'])} "
                f"(plain: {_fmt(g['overall']['score'])}, {_fmt(g['strict']['overall']['score'])}); the judges' own "
                f"best of {b['k']}: {_fmt(b['oracle']['lenient'])}, {_fmt(b['oracle']['strict'])}; reward AUC within "
                f"prompts {b['reward_auc']['lenient']:.2f}" + (f"; images in `{b['folder']}`." if b["folder"] else "."),
            ]
        if g.get("clip_score") is not None:
            lines += ["", f"CLIPScore (mean over images): {g['clip_score']:.2f}."]
        if g.get("fid"):
            f = g["fid"]
            lines += [
                "",
                f"FID against `{f['reference']}` ({f['reference_images']} images, {f['features']} features): {f['score']:.3f}.",
            ]
    p = report.get("pope")
    if p:
        lines += [
            "",
            "## POPE",
            "",
            f"Parser: {p['parser']}; answers in `{p['folder']}`.",
            "",
            "| split | accuracy (%) | 95% CI | precision | recall | F1 | F1 95% CI | yes-ratio | questions |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for split, m in p["splits"].items():
            lines.append(
                f"| {split} | {_fmt(m['accuracy'])} | {_fmt_ci(m['accuracy_ci95'])} | {_fmt(m['precision'])} | "
                f"{_fmt(m['recall'])} | {_fmt(m['f1'])} | {_fmt_ci(m['f1_ci95'])} | {_fmt(m['yes_ratio'])} | {m['n']} |"
            )
        if len(p["splits"]) > 1:
            ci = _fmt_ci(p["average"]["accuracy_ci95"]) if p["average"].get("accuracy_ci95") else ""
            lines.append(f"| **average** | {_fmt(p['average']['accuracy'])} | {ci} | | | {_fmt(p['average']['f1'])} | | | |")
        if p.get("best_of"):
            b = p["best_of"]
            per_split = "; ".join(
                f"{split} {_fmt(m['accuracy'])} {_fmt_ci(m['accuracy_ci95'])} (plain {_fmt(p['splits'][split]['accuracy'])}, "
                f"the judge's own best {_fmt(m['oracle_accuracy'])}, reward AUC {m['reward_auc']:.2f}, "
                f"{_fmt(m['changed'])}% changed)"
                for split, m in b["splits"].items()
            )
            lines += [
                "",
                f"Best of {b['k']} answers by the model's own reward ({b['scorer']}: the image's likelihood given "
                f"`{b['reward_text']}`; the plain answer and {b['k'] - 1} sampled at temperature {b['temperature']}), "
                f"accuracy: {per_split}; answers in `{b['folder']}`.",
            ]
    return "\n".join(lines) + "\n"


class _EvalCallback(L.Callback):
    """Scheduling shared by the evaluation callbacks: every `every_n_steps` during fit, and at the
    end of the test epoch; rank 0 only; model in eval mode without gradients, then restored."""

    name = "eval"

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 0:
            raise ConfigError(f"{type(self).__name__}.every_n_steps must be >= 0 (0: only at test), got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.last: dict[str, float] = {}  # the metrics of the latest evaluation
        self._evaluated_step = -1  # with gradient accumulation several batches end on one step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # counts this batch's optimizer step: 1, 2, ...
        if not self.every_n_steps or step == 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if getattr(trainer, "sanity_checking", False) or step == self._evaluated_step:
            return
        self._evaluated_step = step
        with self._evaluating(trainer, pl_module):
            metrics = self.evaluate(trainer, pl_module, label=f"step{step:06d}", fit=True)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        with self._evaluating(trainer, pl_module):
            metrics = self.evaluate(trainer, pl_module, label="test", fit=False)
        pl_module.log_dict(metrics, rank_zero_only=True)

    @staticmethod
    @contextmanager
    def _evaluating(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
        """Eval mode, no gradients and the training step's precision, as the rollouts sample."""
        with eval_mode(pl_module), torch.no_grad(), trainer.precision_plugin.forward_context():
            yield

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, label: str, fit: bool) -> dict[str, float]:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# GenEval
# --------------------------------------------------------------------------------------------------


def interleave_tags(prompts: Sequence[GenEvalPrompt]) -> list[int]:
    """Prompt indices in round-robin tag order (first of each tag, then second of each...), so that
    any prefix is a tag-balanced subset; file order within a tag."""
    by_tag: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_tag.setdefault(p.tag, []).append(i)
    order: list[int] = []
    queues = [list(v) for v in by_tag.values()]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


class GenEvalCallback(_EvalCallback):
    """Generate images for GenEval prompts and score them with the official GenEval rules.

    Args:
        metadata: GenEval metadata file (JSON lines; `dualfw:assets/shapes_geneval.jsonl` is the
            Shapes world suite; the official suite is the user's evaluation_metadata.jsonl).
        images_per_prompt: samples per prompt (the official protocol uses 4).
        sampling: image sampling (guidance scale, temperature, top-k, top-p).
        seed: seeds sampling; batch b of prompts uses a seed derived from (seed, b), so samples
            depend on the seed, `prompts_per_batch` and the prompt order only.
        prompts_per_batch: prompts sampled together in one `sample_images` call.
        detector: a `dualfw.eval.detection.Detector` (class_path + init_args in a config), e.g.
            `dualfw.eval.backends.HFZeroShotDetector` or the Shapes world's exact `dualfw.shapes.ShapesDetector`.
        color_classifier: a `ColorClassifier` for color clauses when the detector does not give
            colors (e.g. `dualfw.eval.backends.OpenClipColorClassifier`); the Shapes detector does.
        classes: classes the detector looks for; default every class the metadata names (for the
            official suite, the 80 COCO classes), which exclude clauses and the strict judge need.
        max_prompts: evaluate only this many prompts (a tag-balanced subset: round-robin over tags
            in file order); None: all.
        fit_max_prompts: the same limit for the evaluations during fit (applied after max_prompts).
        every_n_steps: evaluate during fit every N optimizer steps; 0: only at test time.
        export: write the official folder layout (and per-image results) into the run folder.
        grid_prompts: prompts shown in the logged image grid (one row each).
        name: prefix of the logged metrics and of the folders written.
        clip_score: also report the mean CLIPScore of the generated images against their prompts
            (`<name>/clip_score`), e.g. `dualfw.eval.backends.OpenClipScore` with local weights.
        fid_reference: also report the FID of the generated images against these reference images
            (`<name>/fid`): a folder of images (or a JSON-lines list of them), read at the size
            of the generated images. Features: `fid_features`, else InceptionV3 from
            `fid_inception_weights`.
        fid_features: the FID feature extractor, a module mapping images (n, 3, H, W) in [0, 1]
            to features (n, d).
        fid_inception_weights: local torch-fidelity InceptionV3 weights file
            (pt_inception-2015-12-05), the standard FID features, when `fid_features` is not set.
        best_of: at test time also judge, beside plain sampling with the same seed, each image as
            the best of this many samples by the LightningModule's own `scorer` (R_G: self-reward
            reranking, no training): `<name>/best_of_<K>/...` metrics, the `<label>_best_of_<K>`
            folder and a report entry; 1: plain sampling only.
    """

    def __init__(
        self,
        metadata: str | None = None,
        images_per_prompt: int = 4,
        sampling: ImageSampling = ImageSampling(),
        seed: int = 0,
        prompts_per_batch: int = 8,
        detector: Detector | DetectorLike | None = None,
        color_classifier: ColorClassifier | ColorClassifierLike | None = None,
        classes: list[str] | None = None,
        max_prompts: int | None = None,
        fit_max_prompts: int | None = 12,
        every_n_steps: int = 0,
        export: bool = True,
        grid_prompts: int = 8,
        name: str = "geneval",
        clip_score: OpenClipScore | None = None,
        fid_reference: str | None = None,
        fid_features: torch.nn.Module | None = None,
        fid_inception_weights: str | None = None,
        best_of: int = 1,
    ) -> None:
        super().__init__(every_n_steps)
        where = "GenEvalCallback"
        if best_of < 1:
            raise ConfigError(f"{where}.best_of must be at least 1, got {best_of}")
        self.best_of = best_of
        if metadata is None or str(metadata) == "":
            raise ConfigError(f"{where}.metadata is not set: give a GenEval metadata file (JSON lines)")
        for key, value in (("images_per_prompt", images_per_prompt), ("prompts_per_batch", prompts_per_batch)):
            if value < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {value}")
        for key, value in (("max_prompts", max_prompts), ("fit_max_prompts", fit_max_prompts)):
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{key} must be at least 1 or null, got {value}")
        path = resolve_path(metadata)
        if not path.is_file():
            raise MissingFileError(f"{where}.metadata: GenEval metadata file '{path}' does not exist")
        try:
            self.prompts = read_metadata(path)
        except MetadataError as err:
            raise ConfigError(str(err)) from None
        if not self.prompts:
            raise ConfigError(f"{where}.metadata: '{path}' holds no prompts")
        if detector is None:
            raise ConfigError(
                f"{where}.detector is not set: give an open-vocabulary detector (conf/eval/geneval.yaml) or "
                "dualfw.shapes.ShapesDetector for the Shapes world"
            )
        self.metadata, self.images_per_prompt, self.sampling, self.seed = str(metadata), images_per_prompt, sampling, seed
        self.prompts_per_batch, self.detector, self.color_classifier = prompts_per_batch, detector, color_classifier
        named = {c.cls for p in self.prompts for c in (*p.include, *p.exclude)}
        self.classes = list(classes) if classes is not None else sorted(named)
        self.max_prompts, self.fit_max_prompts = max_prompts, fit_max_prompts
        self.export, self.grid_prompts, self.name = export, grid_prompts, name
        self.order = interleave_tags(self.prompts)
        self.results: list[ImageResult] = []  # latest per-image verdicts (official judge)
        self.clip_score, self.fid_reference = clip_score, fid_reference
        self._fid, self._fid_files, self._fid_read = None, [], 0
        if fid_reference is not None:  # check now: a bad path fails before any model loads
            self._fid_files = list_images(fid_reference, key=f"{where}.fid_reference")
            self._fid = make_fid(
                feature_extractor=fid_features,
                feature_extractor_weights_path=fid_inception_weights,
                normalize=True,
                reset_real_features=False,
                config_key=f"{where}.fid_inception_weights",
            )
            self._fid_features = type(fid_features).__name__ if fid_features is not None else "InceptionV3"
        elif fid_features is not None or fid_inception_weights is not None:
            raise ConfigError(f"{where}.fid_reference is not set: FID needs a folder of reference images")

    def selected(self, fit: bool) -> list[GenEvalPrompt]:
        """The prompts an evaluation uses (in evaluation order)."""
        n = _selection(len(self.order), self.max_prompts)
        if fit:
            n = _selection(n, self.fit_max_prompts)
        return [self.prompts[i] for i in self.order[:n]]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, label: str, fit: bool) -> dict[str, float]:
        prompts = self.selected(fit)
        root = run_folder(trainer) / self.name
        folder = root / label if self.export else None
        run = self._run(pl_module, prompts, folder, root, label)
        self.results = run.lenient
        official, strict = geneval_scores(run.lenient), geneval_scores(run.strict)
        metrics = official.summary.as_metrics(f"{self.name}/")
        metrics.update({f"{self.name}/strict/{t}": v for t, v in strict.summary.per_tag.items()})
        metrics[f"{self.name}/strict/overall"] = strict.summary.overall
        extra = self._image_metrics(run.prompts, run.images)
        metrics.update({f"{self.name}/{k}": v for k, v in extra.items()})
        self.last = metrics
        self._log_grid(trainer, run.prompts, run.images, label)
        if not fit:
            section = self._section(run.prompts, run.lenient, official, strict, folder, trainer)
            if self.best_of > 1:
                best_metrics, section["best_of"] = self._evaluate_best_of(trainer, pl_module, prompts, root, label)
                metrics.update(best_metrics)
                self.last = metrics
            add_to_report(trainer, pl_module, self.name, {**section, **self._image_report(extra)})
        return metrics

    def _run(self, pl_module: L.LightningModule, prompts: Sequence[GenEvalPrompt], folder: Path | None, root: Path,
             label: str, best_of: int = 1):
        """Sample and judge `prompts` (each image the best of `best_of` by the module's scorer),
        exporting the official layout to `folder` and the verdicts beside it."""
        batches = sample_batches(prompts, self.images_per_prompt, self.prompts_per_batch, self.seed)
        scorer = None
        if best_of > 1:
            scorer = getattr(pl_module, "scorer", None)
            if scorer is None:
                raise ConfigError(f"GenEvalCallback.best_of {best_of} needs a LightningModule with a `scorer` (dualfw.Policy)")
        try:
            run = run_geneval(
                pl_module.model, batches, self.sampling, self.detector, self.classes, self.color_classifier,
                best_of=best_of, scorer=scorer, folder=folder,
            )
        except MissingColorError as err:
            raise ConfigError(f"GenEvalCallback: {err} (set GenEvalCallback.color_classifier)") from None
        if folder is not None:
            if folder.exists():
                shutil.rmtree(folder)  # a stale export would add prompts to a rescoring
            export_geneval_folder(folder, run.prompts, run.images)
            write_results(run.lenient, root / f"{folder.name}_results.jsonl")
        return run

    def _evaluate_best_of(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prompts: Sequence[GenEvalPrompt], root: Path, label: str
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """The best-of-K evaluation (same prompts, seed and batches as plain sampling): its
        metrics and its report entry (scores, the judges' own best-of-K ceiling, the reward's
        within-prompt AUC)."""
        key = f"best_of_{self.best_of}"
        folder = root / f"{label}_{key}" if self.export else None
        run = self._run(pl_module, prompts, folder, root, label, best_of=self.best_of)
        official, strict = geneval_scores(run.lenient), geneval_scores(run.strict)
        metrics = official.summary.as_metrics(f"{self.name}/{key}/")
        metrics.update({f"{self.name}/{key}/strict/{t}": v for t, v in strict.summary.per_tag.items()})
        metrics[f"{self.name}/{key}/strict/overall"] = strict.summary.overall
        auc = {judge: run.reward_auc(judge) for judge in ("lenient", "strict")}
        metrics[f"{self.name}/{key}/reward_auc"] = auc["lenient"]
        base = run_folder(trainer)
        entry = {
            "k": self.best_of,
            "scorer": type(pl_module.scorer).__name__,
            "folder": str(folder.relative_to(base)) if folder is not None else None,
            "overall": {"score": official.summary.overall, "ci95": list(official.ci95)},
            "per_tag": dict(official.summary.per_tag),
            "strict": {"overall": strict.summary.overall, "per_tag": dict(strict.summary.per_tag)},
            "oracle": {judge: summarize(run.oracle(judge)).overall for judge in ("lenient", "strict")},
            "reward_auc": auc,
        }
        return metrics, entry

    def _image_metrics(self, prompts: Sequence[GenEvalPrompt], images: Sequence[np.ndarray]) -> dict[str, float]:
        """CLIPScore and FID of the generated images, those configured."""
        out: dict[str, float] = {}
        if not images or (self.clip_score is None and self._fid is None):
            return out
        flat = np.concatenate(images)
        if self.clip_score is not None:
            texts = [p.prompt for p, samples in zip(prompts, images) for _ in range(len(samples))]
            out["clip_score"] = mean_clip_score(self.clip_score, flat, texts)
        if self._fid is not None:
            if not self._fid_read:
                self._fid_read = add_fid_reference(self._fid, self._fid_files, int(flat.shape[1]))
                if self._fid_read < 2:
                    raise ConfigError(
                        f"GenEvalCallback.fid_reference: '{self.fid_reference}' holds {self._fid_read} readable "
                        "image(s); FID needs at least 2"
                    )
            out["fid"] = fid_of(self._fid, flat)
        return out

    def _image_report(self, extra: Mapping[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "clip_score" in extra:
            out["clip_score"] = extra["clip_score"]
        if "fid" in extra:
            out["fid"] = {
                "score": extra["fid"],
                "reference": self.fid_reference,
                "reference_images": self._fid_read,
                "features": self._fid_features,
            }
        return out

    def _log_grid(self, trainer: L.Trainer, prompts: Sequence[GenEvalPrompt], images: Sequence[np.ndarray], label: str) -> None:
        n = min(self.grid_prompts, len(prompts))
        if n == 0:
            return
        grid = make_grid(to_pixels(np.concatenate(images[:n])), nrow=self.images_per_prompt, padding=2, pad_value=1.0)
        path = run_folder(trainer) / "images" / f"{self.name}_{label}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        log_image_grid(trainer, f"{self.name}/samples", grid, trainer.global_step, " | ".join(p.prompt for p in prompts[:n]))

    def _section(
        self,
        prompts: Sequence[GenEvalPrompt],
        official_results: Sequence[ImageResult],
        official: GenEvalScores,
        strict: GenEvalScores,
        folder: Path | None,
        trainer: L.Trainer,
    ) -> dict[str, Any]:
        def scores(s: GenEvalScores) -> dict[str, Any]:
            per_tag = {
                tag: {"score": s.summary.per_tag[tag], "ci95": list(s.per_tag_ci95[tag]), "correct": correct, "total": total}
                for tag, (correct, total) in s.summary.per_tag_counts.items()
            }
            return {"overall": {"score": s.summary.overall, "ci95": list(s.ci95)}, "per_tag": per_tag}

        main, summary = scores(official), official.summary
        base = run_folder(trainer)
        return {
            "metadata": self.metadata,
            "num_prompts": len(prompts),
            "prompts_in_file": len(self.prompts),
            "images_per_prompt": self.images_per_prompt,
            "num_images": summary.num_images,
            "num_correct": sum(r.correct for r in official_results),
            "seed": self.seed,
            "prompts_per_batch": self.prompts_per_batch,
            "sampling": asdict(self.sampling),
            "detector": type(self.detector).__name__,
            "color_classifier": type(self.color_classifier).__name__ if self.color_classifier is not None else None,
            "folder": str(folder.relative_to(base)) if folder is not None else None,
            "results": str(Path(self.name) / f"{folder.name}_results.jsonl") if folder is not None else None,
            **main,
            "image_accuracy": summary.image_accuracy,
            "prompt_accuracy": summary.prompt_accuracy,
            "mean_objects": summary.mean_objects,
            "failures": common_failures(official_results),
            "strict": scores(strict),
            "tags": [t for t in TAGS if t in main["per_tag"]],
        }


# --------------------------------------------------------------------------------------------------
# POPE
# --------------------------------------------------------------------------------------------------


class PopeSource(Protocol):
    """Where POPE questions come from when they are made rather than read: `build(run_folder)`
    writes (or finds) the question files and images and returns (question file per split, image
    folder). E.g. `dualfw.shapes.pope_set.ShapesPopeSet`, rendered scenes of the Shapes world."""

    def build(self, run_folder: Path) -> tuple[dict[str, Path], Path]: ...


class PopeCallback(_EvalCallback):
    """Answer POPE yes/no questions with the model (greedy) and score them with POPE's rules;
    optionally also as the best of K answers by the model's own understanding-side reward.

    Args:
        questions: question file per split, e.g. {random: .../coco_pope_random.json, ...}
            (POPE JSON lines: question_id, image, text, label).
        image_folder: folder holding the images the question files name (read with PIL, resized
            to the model's `image_size`).
        source: instead of `questions` + `image_folder`: a `PopeSource` that builds the question
            files and images on first use (e.g. `dualfw.shapes.pope_set.ShapesPopeSet`).
        instruction: the user turn; `{question}` is replaced by the question text.
        max_new_tokens: answer length limit.
        batch_size: images answered together (questions with the same text are batched).
        parser: "official" (POPE's rule, comparable with published numbers) or "strict".
        max_questions: evaluate only the first N questions of each split; None: all.
        fit_max_questions: the same limit for evaluations during fit (applied after max_questions).
        every_n_steps: evaluate during fit every N optimizer steps; 0: only at test time.
        name: prefix of the logged metrics and of the folders written.
        best_of: at test time also judge, beside the plain answers, each question's best of this
            many answers (the plain one and best_of - 1 sampled at `best_of_temperature`) by the
            LightningModule's own `scorer`: R_U, the likelihood of the image given `reward_text`
            (`dualfw.eval.runners.answer_pope_best_of`). `<name>/best_of_<K>/...` metrics, the
            `<label>_best_of_<K>` folder (answers and every candidate's reward) and a report
            entry; 1: plain answers only.
        best_of_temperature: sampling temperature of the extra candidates.
        seed: seeds the sampled candidates.
        reward_text: the text R_U conditions the image on, from `{question}` and `{answer}`.
            The reward sees an answer only through this text, and a model's drawing side may not
            read a "no"; the report's within-question `reward_auc` says whether it ranks right
            answers above wrong ones (0.5: it does not).
    """

    def __init__(
        self,
        questions: dict[str, str | None] | None = None,
        image_folder: str | None = None,
        source: PopeSource | None = None,
        instruction: str = "{question}",
        max_new_tokens: int = 16,
        batch_size: int = 16,
        parser: Literal["official", "strict"] = "official",
        max_questions: int | None = None,
        fit_max_questions: int | None = 60,
        every_n_steps: int = 0,
        name: str = "pope",
        best_of: int = 1,
        best_of_temperature: float = 1.0,
        seed: int = 0,
        reward_text: str = "{question} {answer}",
    ) -> None:
        super().__init__(every_n_steps)
        where = "PopeCallback"
        if best_of < 1:
            raise ConfigError(f"{where}.best_of must be at least 1, got {best_of}")
        if not best_of_temperature > 0:
            raise ConfigError(f"{where}.best_of_temperature must be > 0 (0 samples the greedy answer again), got {best_of_temperature}")
        if "{answer}" not in reward_text:
            raise ConfigError(f"{where}.reward_text must contain '{{answer}}', got {reward_text!r}")
        self.best_of, self.best_of_temperature, self.seed, self.reward_text = best_of, best_of_temperature, seed, reward_text
        if (questions is None) == (source is None):
            raise ConfigError(f"{where}: set either `questions` (with `image_folder`) or `source`, not both or neither")
        if parser not in PARSERS:
            raise ConfigError(f"{where}.parser must be one of {', '.join(PARSERS)}, got {parser!r}")
        if "{question}" not in instruction:
            raise ConfigError(f"{where}.instruction must contain '{{question}}', got {instruction!r}")
        for key, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value < 1:
                raise ConfigError(f"{where}.{key} must be at least 1, got {value}")
        for key, value in (("max_questions", max_questions), ("fit_max_questions", fit_max_questions)):
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{key} must be at least 1 or null, got {value}")
        self.source, self.instruction, self.max_new_tokens, self.batch_size = source, instruction, max_new_tokens, batch_size
        self.parser, self.max_questions, self.fit_max_questions, self.name = parser, max_questions, fit_max_questions, name
        self.question_files: dict[str, Path] = {}
        self.questions: dict[str, list[PopeQuestion]] = {}
        self.image_folder: Path | None = None
        if questions is not None:  # check now: a bad file fails before any model loads
            if not questions:
                raise ConfigError(f"{where}.questions is empty: give one question file per split")
            unset = [split for split, path in questions.items() if not path]
            if unset:
                raise ConfigError(f"{where}.questions.{unset[0]} is not set: give the path of its POPE question file")
            if image_folder is None:
                raise ConfigError(f"{where}.image_folder is not set: the folder of the images the questions name")
            self._load({s: resolve_path(p) for s, p in questions.items()}, resolve_path(image_folder))
        self.answers: dict[str, list[str]] = {}  # latest raw answers per split

    def _load(self, files: Mapping[str, Path], image_folder: Path) -> None:
        where = "PopeCallback"
        if not image_folder.is_dir():
            raise MissingFileError(f"{where}.image_folder: '{image_folder}' is not a folder")
        for split, path in files.items():
            if not path.is_file():
                raise MissingFileError(f"{where}.questions.{split}: question file '{path}' does not exist")
            try:
                qs = read_questions(path)
            except PopeFormatError as err:
                raise ConfigError(str(err)) from None
            if not qs:
                raise ConfigError(f"{where}.questions.{split}: '{path}' holds no questions")
            for q in qs:
                if not (image_folder / q.image).is_file():
                    raise MissingFileError(
                        f"{path}: question_id {q.question_id} names image '{q.image}', which is not in "
                        f"{where}.image_folder '{image_folder}'"
                    )
            self.questions[split] = qs
        self.question_files = dict(files)
        self.image_folder = image_folder

    def prepare(self, trainer: L.Trainer) -> None:
        """Build (or find) the questions of `source` when configured and not loaded yet."""
        if self.questions:
            return
        files, image_folder = self.source.build(run_folder(trainer))
        self._load(files, image_folder)

    def selected(self, fit: bool) -> dict[str, list[PopeQuestion]]:
        out = {}
        for split, qs in self.questions.items():
            n = _selection(len(qs), self.max_questions)
            if fit:
                n = _selection(n, self.fit_max_questions)
            out[split] = qs[:n]
        return out

    def _images(self, model: Any) -> Callable[[str], torch.Tensor]:
        """An image's pixels by name, read from `image_folder` at the model's `image_size` once."""
        size = int(model.image_size)
        cache: dict[str, torch.Tensor] = {}

        def image(name: str) -> torch.Tensor:
            if name not in cache:
                pixels = load_image(self.image_folder / name, size)
                if pixels is None:  # every question needs its answer: unlike training, no skipping
                    raise ConfigError(f"PopeCallback: cannot read image '{self.image_folder / name}'")
                cache[name] = pixels
            return cache[name]

        return image

    def answer(self, model: Any, questions: Sequence[PopeQuestion]) -> list[str]:
        """Greedy answers, in question order (`dualfw.eval.runners.answer_pope`), the images read
        from `image_folder` at the model's `image_size`."""
        return answer_pope(model, questions, self._images(model), self.instruction, self.max_new_tokens, self.batch_size)

    def _metrics(self, scores: PopeScores, prefix: str) -> dict[str, float]:
        """The logged scalars of one set of answers: per split and, with several, their average."""
        metrics: dict[str, float] = {}
        for split, s in scores.splits.items():
            for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
                metrics[f"{prefix}{split}/{key}"] = float(getattr(s.metrics, key))
        if len(scores.splits) > 1:
            metrics[f"{prefix}average/accuracy"] = scores.mean_accuracy
            metrics[f"{prefix}average/f1"] = scores.mean_f1
        return metrics

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, label: str, fit: bool) -> dict[str, float]:
        self.prepare(trainer)
        folder = run_folder(trainer) / self.name / label
        questions = self.selected(fit)
        for split, qs in questions.items():
            answers = self.answer(pl_module.model, qs)
            self.answers[split] = answers
            write_questions(qs, folder / f"{split}_questions.jsonl")
            write_answers(qs, answers, folder / f"{split}_answers.jsonl")
        scores = score_pope(questions, self.answers, self.parser)
        metrics = self._metrics(scores, f"{self.name}/")
        splits: dict[str, dict[str, Any]] = {}
        for split, s in scores.splits.items():
            splits[split] = {
                **s.metrics.as_dict(),
                "accuracy_ci95": list(s.accuracy_ci95),
                "f1_ci95": list(s.f1_ci95),
                "question_file": str(self.question_files[split]),
                "questions_in_file": len(self.questions[split]),
                "answer_file": str(Path(self.name) / label / f"{split}_answers.jsonl"),
            }
        self.last = metrics
        if not fit:
            average = {k: metrics.get(f"{self.name}/average/{k}") for k in ("accuracy", "f1")}
            if len(splits) > 1 and scores.mean_accuracy_ci95 is not None:
                average["accuracy_ci95"] = list(scores.mean_accuracy_ci95)
            section = {
                "parser": self.parser,
                "instruction": self.instruction,
                "image_folder": str(self.image_folder),
                "folder": str(Path(self.name) / label),
                "splits": splits,
                "average": average,
            }
            if self.best_of > 1:
                best_metrics, section["best_of"] = self._evaluate_best_of(pl_module, questions, label, folder.parent)
                metrics.update(best_metrics)
            add_to_report(trainer, pl_module, self.name, section)
        return metrics

    def _evaluate_best_of(
        self, pl_module: L.LightningModule, questions: Mapping[str, Sequence[PopeQuestion]], label: str, root: Path
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """The best-of-K evaluation (same questions; the plain answers are candidate 0): its metrics
        and its report entry (scores, the judge's own best of K, the reward's within-question AUC),
        with the chosen answers and every candidate's reward in `<label>_best_of_<K>/`."""
        key = f"best_of_{self.best_of}"
        scorer = getattr(pl_module, "scorer", None)
        if scorer is None:
            raise ConfigError(f"PopeCallback.best_of {self.best_of} needs a LightningModule with a `scorer` (dualfw.Policy)")
        folder = root / f"{label}_{key}"
        answers, entry_splits = {}, {}
        image = self._images(pl_module.model)  # one cache for every split: they ask about the same images
        for s, (split, qs) in enumerate(questions.items()):
            run = answer_pope_best_of(
                pl_module.model, scorer, qs, image, self.best_of, self.answers[split],
                self.instruction, self.max_new_tokens, self.batch_size, self.best_of_temperature,
                derive_seed(self.seed, s), self.reward_text,
            )
            answers[split] = run.answers
            write_answers(qs, run.answers, folder / f"{split}_answers.jsonl")
            write_jsonl(({"question_id": q.question_id, "answers": c, "rewards": r.tolist(), "chosen": i}
                         for q, c, r, i in zip(qs, run.candidates, run.rewards, run.chosen)),
                        folder / f"{split}_candidates.jsonl")
            correct = run.correct(qs, self.parser)
            entry_splits[split] = {
                "oracle_accuracy": float(correct.any(1).mean()) if len(qs) else float("nan"),
                "reward_auc": within_group_auc(run.rewards, correct),
                "changed": float(np.mean([i != 0 for i in run.chosen])) if len(qs) else float("nan"),
            }
        scores = score_pope(questions, answers, self.parser)
        metrics = self._metrics(scores, f"{self.name}/{key}/")
        for split, s in scores.splits.items():
            metrics[f"{self.name}/{key}/{split}/reward_auc"] = entry_splits[split]["reward_auc"]
            entry_splits[split] = {**s.metrics.as_dict(), "accuracy_ci95": list(s.accuracy_ci95), **entry_splits[split]}
        entry = {
            "k": self.best_of,
            "scorer": type(scorer).__name__,
            "temperature": self.best_of_temperature,
            "reward_text": self.reward_text,
            "folder": str(Path(self.name) / folder.name),
            "splits": entry_splits,
            "average": {k: metrics.get(f"{self.name}/{key}/average/{k}") for k in ("accuracy", "f1")},
        }
        return metrics, entry
