"""The evaluation pipelines as plain functions, usable without a Trainer.

- GenEval-style: `run_geneval` samples each `SampleBatch`, decodes to 8-bit images, detects once
  per image and judges it leniently (the official rule) and strictly (`judge_images`), optionally
  keeping the best of K samples by a reward; `geneval_scores` summarises one judge's verdicts with
  bootstrap intervals. `mean_clip_score` and `fid_of` add CLIPScore and FID of the same images.
- POPE-style: `answer_pope` asks the model (greedy), `answer_pope_best_of` keeps the best of K
  answers by the model's own R_U, `score_pope` parses the answers and gives the metrics per split
  with intervals that resample images.

The Lightning callbacks (`dualfw.eval.callbacks`) and the Shapes study's evaluator
(`dualfw.shapes.evaluate`) are these functions with their own prompts, seeds, detector and
questions passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from dualfw.core.interface import ImageSampling, TextSampling
from dualfw.core.selfreward import derive_seed
from dualfw.eval.detection import Detection
from dualfw.eval.geneval import (
    GenEvalPrompt,
    GenEvalSummary,
    ImageResult,
    overall_confidence_interval,
    prompt_folder,
    score_image,
    summarize,
)
from dualfw.core.pixels import to_pixels, to_uint8
from dualfw.eval.pope import PopeMetrics, PopeQuestion, parse_answer_official, parse_answer_strict, pope_metrics
from dualfw.eval.stats import bootstrap_interval
from dualfw.training.images import load_image
from dualfw.training.predict import chunks

PARSERS: dict[str, Callable[[str], str]] = {"official": parse_answer_official, "strict": parse_answer_strict}
JUDGES = ("lenient", "strict")

# --------------------------------------------------------------------------------------------------
# GenEval-style: generate -> detect -> judge -> summarise
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleBatch:
    """Prompts sampled together in one `sample_images` call, `k` judged images each, from one seed."""

    prompts: Sequence[GenEvalPrompt]
    k: int
    seed: int


def sample_batches(prompts: Sequence[GenEvalPrompt], k: int, prompts_per_batch: int, seed: int) -> list[SampleBatch]:
    """Consecutive chunks of `prompts_per_batch` prompts; chunk b is seeded from (seed, b), so the
    samples depend on the seed, the batch size and the prompt order only."""
    batches = []
    for b, start in enumerate(range(0, len(prompts), prompts_per_batch)):
        batches.append(SampleBatch(list(prompts[start : start + prompts_per_batch]), k, derive_seed(seed, b)))
    return batches


def _memo(classifier: Callable | None) -> Callable | None:
    """Cache a color classifier per detection, so the lenient and the strict judge share its calls."""
    if classifier is None:
        return None
    cache: dict[int, str] = {}

    def classify(image: np.ndarray, detection: Detection, colors: Sequence[str]) -> str:
        key = id(detection)
        if key not in cache:
            cache[key] = classifier(image, detection, colors)
        return cache[key]

    return classify


def judge_images(
    prompts: Sequence[GenEvalPrompt | Mapping[str, Any]],
    images: Sequence[np.ndarray],
    detector: Callable[..., list[Detection]],
    classes: Sequence[str] | None = None,
    color_classifier: Callable | None = None,
    filenames: Sequence[str | None] | None = None,
) -> tuple[list[ImageResult], list[ImageResult]]:
    """Detect once per image and judge it against its prompt by GenEval's rules: (lenient, strict)
    verdicts, the strict judge also failing any object the prompt does not ask for.

    prompts: one per image (GenEvalPrompt or metadata dict). classes: what the detector looks for
    (None: the detector's own default). color_classifier: names the color of a detection that has
    none (once per detection). filenames: recorded in the verdicts.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    lenient, strict = [], []
    for i, (prompt, image) in enumerate(zip(prompts, images)):
        detections = detector(image) if classes is None else detector(image, classes)
        classify = _memo(color_classifier)
        filename = filenames[i] if filenames is not None else None
        lenient.append(score_image(prompt, detections, image, classify, filename=filename))
        strict.append(score_image(prompt, detections, image, classify, strict=True, filename=filename))
    return lenient, strict


def within_group_auc(rewards: np.ndarray, correct: np.ndarray) -> float:
    """How often the reward ranks a correct sample above an incorrect one of the SAME group:
    over every (correct, incorrect) pair inside each row of `rewards` / `correct` ((groups, K)),
    the fraction with the higher reward on the correct one (ties count 1/2). NaN with no such pair."""
    wins, pairs = 0.0, 0
    for r, c in zip(rewards, correct.astype(bool)):
        good, bad = r[c], r[~c]
        if len(good) and len(bad):
            diff = good[:, None] - bad[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return wins / pairs if pairs else float("nan")


@dataclass
class GenEvalRun:
    """What one GenEval-style evaluation sampled and how the judges saw it.

    prompts: in sampling order; images[i]: the judged images of prompts[i], (k, H, W, 3) uint8;
    lenient / strict: the verdicts on the judged images, prompt after prompt.
    With best_of > 1 each judged image (a slot) is the best of `best_of` candidates by a reward:
    `rewards` (slots, best_of) and `candidates[judge]`, every candidate's verdict, slot after slot.
    """

    prompts: list[GenEvalPrompt] = field(default_factory=list)
    images: list[np.ndarray] = field(default_factory=list)
    lenient: list[ImageResult] = field(default_factory=list)
    strict: list[ImageResult] = field(default_factory=list)
    best_of: int = 1
    rewards: np.ndarray | None = None
    candidates: dict[str, list[ImageResult]] = field(default_factory=dict)

    def candidates_correct(self, judge: str) -> np.ndarray:
        """(slots, best_of): which candidates `judge` ("lenient" or "strict") finds correct."""
        if self.best_of == 1:
            raise ValueError("candidates are kept only with best_of > 1")
        if judge not in JUDGES:
            raise ValueError(f"judge must be one of {JUDGES}, got {judge!r}")
        return np.array([r.correct for r in self.candidates[judge]]).reshape(-1, self.best_of)

    def oracle(self, judge: str) -> list[ImageResult]:
        """Best-of-K by the judge itself, the ceiling of any reranking: per slot the first candidate
        `judge` finds correct (the first candidate when none is)."""
        ok = self.candidates_correct(judge)
        return [self.candidates[judge][slot * self.best_of + int(ok[slot].argmax())] for slot in range(len(ok))]

    def reward_auc(self, judge: str, tag: str | None = None) -> float:
        """Within-prompt AUC of the reward against `judge`'s verdicts (see `within_group_auc`), over
        every slot or the slots of one tag."""
        ok, rewards = self.candidates_correct(judge), self.rewards
        if tag is not None:
            keep = np.array([r.tag for r in self.lenient]) == tag
            ok, rewards = ok[keep], rewards[keep]
        return within_group_auc(rewards, ok)


@torch.no_grad()
def run_geneval(
    model: Any,
    batches: Sequence[SampleBatch],
    sampling: ImageSampling,
    detector: Callable[..., list[Detection]],
    classes: Sequence[str] | None = None,
    color_classifier: Callable | None = None,
    best_of: int = 1,
    scorer: Any = None,
    folder: str | Path | None = None,
) -> GenEvalRun:
    """Sample every batch (`model.sample_images`, `decode_images`), judge the 8-bit images
    (`judge_images`) and collect the verdicts.

    best_of > 1: each judged image is the best of `best_of` samples by `scorer.image_rewards`
    (e.g. a DualScorer attached to `model`: best-of-K reranking by self-reward); the run then
    also holds every candidate's verdict and reward. folder: the official layout folder the
    judged images are exported to (`export_geneval_folder`); the verdicts name their files.
    """
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    if best_of > 1 and scorer is None:
        raise ValueError("best_of > 1 needs a scorer (e.g. DualScorer attached to the adapter)")
    run = GenEvalRun(best_of=best_of, candidates={"lenient": [], "strict": []} if best_of > 1 else {})
    rewards = []
    for batch in batches:
        n = batch.k * best_of
        tokens = model.sample_images([p.prompt for p in batch.prompts], n, sampling, seed=batch.seed)
        flat = tokens.flatten(0, 1)
        images = to_uint8(model.decode_images(flat))
        rows = [p for p in batch.prompts for _ in range(n)]
        lenient, strict = judge_images(rows, images, detector, classes, color_classifier)
        if best_of == 1:
            picks = np.arange(len(images))
        else:
            scores = scorer.image_rewards(flat, [p.prompt for p in rows]).float().cpu().numpy().reshape(-1, best_of)
            picks = np.arange(len(scores)) * best_of + scores.argmax(1)
            rewards.append(scores)
            run.candidates["lenient"] += lenient
            run.candidates["strict"] += strict
        for i, prompt in enumerate(batch.prompts):
            chosen = picks[i * batch.k : (i + 1) * batch.k]
            index = len(run.prompts)
            run.prompts.append(prompt)
            run.images.append(images[chosen])
            for j, c in enumerate(chosen):
                picked = (lenient[c], strict[c])
                if folder is not None:
                    name = str(prompt_folder(folder, index) / "samples" / f"{j:04d}.png")
                    picked = tuple(replace(r, filename=name) for r in picked)
                run.lenient.append(picked[0])
                run.strict.append(picked[1])
    if best_of > 1:
        run.rewards = np.concatenate(rewards) if rewards else np.zeros((0, best_of), np.float32)
    return run


@dataclass
class GenEvalScores:
    """One judge's verdicts summarised: the official summary, the overall score's 95% interval
    resampling prompts and resampling images, and each tag's interval resampling `resample`."""

    summary: GenEvalSummary
    overall_ci95: dict[str, tuple[float, float]]
    per_tag_ci95: dict[str, tuple[float, float]]
    resample: str

    @property
    def ci95(self) -> tuple[float, float]:
        """The overall score's interval resampling `resample`."""
        return self.overall_ci95[self.resample]


def geneval_scores(results: Sequence[ImageResult], resample: str = "prompts") -> GenEvalScores:
    """Summarise verdicts (`summarize`) with percentile-bootstrap intervals
    (`overall_confidence_interval`): resample "prompts" for a suite sampled from a larger one,
    "images" for a suite that is a whole population (the Shapes world's every prompt)."""
    summary = summarize(results)
    return GenEvalScores(
        summary=summary,
        overall_ci95={how: overall_confidence_interval(results, resample=how) for how in ("prompts", "images")},
        per_tag_ci95={
            tag: overall_confidence_interval([r for r in results if r.tag == tag], resample=resample)
            for tag in summary.per_tag
        },
        resample=resample,
    )


def mean_clip_score(
    clip_score: Callable[[Sequence[np.ndarray], Sequence[str]], torch.Tensor],
    images: Sequence[np.ndarray],
    prompts: Sequence[str],
    batch_size: int = 32,
) -> float:
    """Mean CLIPScore of images against their prompts; `clip_score(images, prompts)` gives one score
    per image (e.g. `dualfw.eval.backends.OpenClipScore`). NaN without images."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scores = [
        clip_score(list(images[i : i + batch_size]), list(prompts[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return float(torch.cat(scores).double().mean()) if scores else float("nan")


def add_fid_reference(fid: Any, files: Sequence[Path], size: int, batch_size: int = 64) -> int:
    """Feed reference images (read from `files`, resized to size x size; unreadable ones are
    skipped with a warning) to a torchmetrics FrechetInceptionDistance made with `normalize=True`
    as its real set. Returns how many were read."""
    read = 0
    for start in range(0, len(files), batch_size):
        pixels = [p for p in (load_image(f, size) for f in files[start : start + batch_size]) if p is not None]
        if pixels:
            fid.update(torch.stack(pixels), real=True)
            read += len(pixels)
    return read


@torch.no_grad()
def fid_of(fid: Any, images: Sequence[np.ndarray], batch_size: int = 64) -> float:
    """FID of uint8 images (H, W, 3) against the reference `fid` holds (a FrechetInceptionDistance
    made with `normalize=True, reset_real_features=False`, so every call compares with the same
    reference). NaN with fewer than two images, where no covariance exists."""
    if len(images) < 2:
        return float("nan")
    fid.reset()
    for start in range(0, len(images), batch_size):
        fid.update(to_pixels(images[start : start + batch_size]), real=False)
    return float(fid.compute())


# --------------------------------------------------------------------------------------------------
# POPE-style: answer -> parse -> metrics
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def answer_pope(
    model: Any,
    questions: Sequence[PopeQuestion],
    image: Callable[[str], torch.Tensor],
    instruction: str = "{question}",
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers (`model.sample_texts`), in question order. Questions sharing a text are asked
    together, `batch_size` images at a time; `image(name)` gives an image's pixels (3, H, W) in
    [0, 1]; `{question}` in `instruction` is replaced by the question text."""
    sampling = TextSampling(temperature=0.0, max_new_tokens=max_new_tokens)
    by_text: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_text.setdefault(q.text, []).append(i)
    answers = [""] * len(questions)
    for text, idx in by_text.items():
        prompt = instruction.format(question=text)
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            pixels = torch.stack([image(questions[i].image) for i in chunk]).to(model.device)
            for i, texts in zip(chunk, model.sample_texts(pixels, 1, prompt, sampling)):
                answers[i] = texts[0]
    return answers


@dataclass
class PopeBestOf:
    """Best-of-K answers to POPE questions: per question its K candidates (the plain answer first,
    then K-1 sampled), each one's reward and the chosen one, the reward's argmax (the plain answer
    on a tie)."""

    candidates: list[list[str]]
    rewards: np.ndarray  # (questions, K)
    chosen: list[int]

    @property
    def answers(self) -> list[str]:
        """The chosen answer of each question."""
        return [c[i] for c, i in zip(self.candidates, self.chosen)]

    def correct(self, questions: Sequence[PopeQuestion], parser: str | Callable[[str], str] = "official") -> np.ndarray:
        """(questions, K): which candidates parse to the question's label."""
        parse = PARSERS[parser] if isinstance(parser, str) else parser
        return np.array([[parse(a) == q.label for a in c] for q, c in zip(questions, self.candidates)], dtype=bool)


@torch.no_grad()
def answer_pope_best_of(
    model: Any,
    scorer: Any,
    questions: Sequence[PopeQuestion],
    image: Callable[[str], torch.Tensor],
    best_of: int,
    plain: Sequence[str] | None = None,
    instruction: str = "{question}",
    max_new_tokens: int = 16,
    batch_size: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    reward_text: str = "{question} {answer}",
) -> PopeBestOf:
    """Best of `best_of` answers per question by the model's own understanding-side reward:
    candidates are the plain answer (`plain`, else greedy as `answer_pope` gives it) and
    best_of - 1 answers sampled at `temperature`; each is rewarded by `scorer.text_rewards`
    (R_U = log p(image tokens | text), the text `reward_text` with the question and the answer).
    Questions sharing a text are sampled together as `answer_pope` asks them, chunk c of text t
    seeded from (seed, t, c); rewards are taken in that order, `batch_size` questions at a time (a
    batch-contrasted reward compares each image with the other images asked the same question)."""
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    if plain is None:
        plain = answer_pope(model, questions, image, instruction, max_new_tokens, batch_size)
    candidates = [[a] for a in plain]
    sampling = TextSampling(temperature=temperature, max_new_tokens=max_new_tokens)
    by_text: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_text.setdefault(q.text, []).append(i)
    order = [i for idx in by_text.values() for i in idx]
    if best_of > 1:
        for t, (text, idx) in enumerate(by_text.items()):
            prompt = instruction.format(question=text)
            for c, start in enumerate(range(0, len(idx), batch_size)):
                chunk = idx[start : start + batch_size]
                pixels = torch.stack([image(questions[i].image) for i in chunk]).to(model.device)
                for i, texts in zip(chunk, model.sample_texts(pixels, best_of - 1, prompt, sampling, seed=derive_seed(seed, t, c))):
                    candidates[i] += texts
    rewards = np.zeros((len(questions), best_of), dtype=np.float32)
    for part in chunks(len(order), batch_size):
        rows = [order[j] for j in part]
        pixels = torch.stack([image(questions[i].image) for i in rows]).to(model.device)
        texts = [[reward_text.format(question=questions[i].text, answer=a) for a in candidates[i]] for i in rows]
        rewards[rows] = scorer.text_rewards(model.encode_images(pixels), texts).float().cpu().numpy()
    return PopeBestOf(candidates, rewards, [int(r.argmax()) for r in rewards])


def image_counts(
    questions: Sequence[PopeQuestion], predictions: Sequence[str], images: Sequence[str] | None = None
) -> np.ndarray:
    """Per image, the counts POPE's metrics add up: (true positives, false positives, right answers,
    questions labelled yes, questions). Rows follow `images` (an image without questions gets a row
    of zeros), else the order images first appear in."""
    order = list(images) if images is not None else list(dict.fromkeys(q.image for q in questions))
    row = {name: i for i, name in enumerate(order)}
    counts = np.zeros((len(order), 5), dtype=np.float64)
    for q, p in zip(questions, predictions):
        if q.image not in row:
            raise ValueError(f"question {q.question_id} is about image {q.image!r}, which is not among `images`")
        yes = p == "yes"
        counts[row[q.image]] += (yes and q.label == "yes", yes and q.label == "no", p == q.label, q.label == "yes", 1)
    return counts


def _accuracy_f1(sums: np.ndarray) -> np.ndarray:
    """(2, n_boot): accuracy and F1 of replicated image counts (n_boot, 5), as `PopeMetrics` defines them."""
    tp, fp, correct, positives, n = sums.T
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(positives > 0, tp / positives, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return np.stack([correct / n, f1])


@dataclass
class PopeSplitScores:
    """One split's parsed answers, POPE metrics and 95% intervals (resampling images)."""

    predictions: list[str]
    metrics: PopeMetrics
    accuracy_ci95: tuple[float, float]
    f1_ci95: tuple[float, float]


@dataclass
class PopeScores:
    """POPE scores per split and their means over splits; `mean_accuracy_ci95` resamples images
    jointly over the splits, None when the splits ask about different images."""

    splits: dict[str, PopeSplitScores]
    mean_accuracy: float
    mean_f1: float
    mean_accuracy_ci95: tuple[float, float] | None


def score_pope(
    questions: Mapping[str, Sequence[PopeQuestion]],
    answers: Mapping[str, Sequence[str]],
    parser: str | Callable[[str], str] = "official",
    images: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> PopeScores:
    """Parse each split's answers (`parser`: "official", "strict" or a function) and score them.

    Intervals are percentile bootstraps over IMAGES (an image's questions stay together: they share
    its difficulty): per split, its images resampled; for the mean accuracy, the images resampled
    once for every split. images: the images to resample, in order (default: those the questions
    name, in order of appearance)."""
    parse = PARSERS[parser] if isinstance(parser, str) else parser
    splits: dict[str, PopeSplitScores] = {}
    for split, qs in questions.items():
        if len(answers[split]) != len(qs):
            raise ValueError(f"split {split}: {len(qs)} questions but {len(answers[split])} answers")
        predictions = [parse(a) for a in answers[split]]
        metrics = pope_metrics(predictions, [q.label for q in qs])
        accuracy_ci, f1_ci = bootstrap_interval(image_counts(qs, predictions, images), _accuracy_f1, n_boot=n_boot, seed=seed)
        splits[split] = PopeSplitScores(predictions, metrics, accuracy_ci, f1_ci)
    shared = images
    if shared is None:
        seen = [list(dict.fromkeys(q.image for q in qs)) for qs in questions.values()]
        shared = seen[0] if seen and all(set(s) == set(seen[0]) for s in seen) else None
    mean_ci = None
    if shared is not None and splits:
        joint = np.concatenate(
            [image_counts(questions[s], splits[s].predictions, shared) for s in splits], axis=1
        )  # (images, 5 * splits)

        def mean_accuracy(sums: np.ndarray) -> np.ndarray:
            return np.stack([sums[:, 5 * i + 2] / sums[:, 5 * i + 4] for i in range(len(splits))]).mean(0)

        mean_ci = bootstrap_interval(joint, mean_accuracy, n_boot=n_boot, seed=seed)
    return PopeScores(
        splits=splits,
        mean_accuracy=float(np.mean([s.metrics.accuracy for s in splits.values()])) if splits else math.nan,
        mean_f1=float(np.mean([s.metrics.f1 for s in splits.values()])) if splits else math.nan,
        mean_accuracy_ci95=mean_ci,
    )
