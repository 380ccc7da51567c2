"""POPE (object hallucination, yes/no questions): question and answer files, the official answer
parser, metrics, and a builder of random / popular / adversarial question files.

Rules follow docs/evaluation.md (read from RUCAIBox/POPE, evaluate.py). The official parser is the
default everywhere so that numbers compare with published ones; `parse_answer_strict` is an
explicitly separate option.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from dualfw.core.files import iter_jsonl, write_jsonl

SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
LABELS: tuple[str, ...] = ("yes", "no")
UNKNOWN = "unknown"  # only the strict parser returns it


class PopeFormatError(ValueError):
    """A POPE question/answer file is malformed or does not match; the message names file and line."""


@dataclass(frozen=True)
class PopeQuestion:
    """One line of a POPE question file."""

    question_id: int
    image: str
    text: str
    label: str  # "yes" or "no"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _read_json_lines(path: str | os.PathLike[str]) -> Iterable[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; PopeFormatError on malformed JSON."""
    return iter_jsonl(path, PopeFormatError)


def read_questions(path: str | os.PathLike[str]) -> list[PopeQuestion]:
    """Read a POPE question file: JSON lines with `question_id`, `image`, `text`, `label` ("yes"/"no")."""
    questions = []
    for lineno, obj in _read_json_lines(path):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in obj]
        if missing:
            raise PopeFormatError(f"{path}:{lineno}: missing key(s) {', '.join(repr(k) for k in missing)}")
        if obj["label"] not in LABELS:
            raise PopeFormatError(f"{path}:{lineno}: label must be 'yes' or 'no', got {obj['label']!r}")
        questions.append(PopeQuestion(int(obj["question_id"]), str(obj["image"]), str(obj["text"]), obj["label"]))
    return questions


def write_questions(questions: Iterable[PopeQuestion], path: str | os.PathLike[str]) -> None:
    """Write a POPE question file (keys in official order: question_id, image, text, label)."""
    write_jsonl((q.to_dict() for q in questions), path)


def read_answers(path: str | os.PathLike[str]) -> list[str]:
    """Read a POPE answer file (JSON lines with an `answer` string), in order; returns the raw texts."""
    answers = []
    for lineno, obj in _read_json_lines(path):
        if not isinstance(obj.get("answer"), str):
            raise PopeFormatError(f"{path}:{lineno}: missing string key 'answer'")
        answers.append(obj["answer"])
    return answers


def write_answers(
    questions: Sequence[PopeQuestion], answers: Sequence[str], path: str | os.PathLike[str]
) -> None:
    """Write the POPE answer file: `{"question": <question text>, "answer": <raw model text>}` per
    line, in question order. Raw text is written so that any parser can be applied later."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    write_jsonl(({"question": q.text, "answer": a} for q, a in zip(questions, answers)), path)


# --------------------------------------------------------------------------------------------------
# Parsing answers
# --------------------------------------------------------------------------------------------------

_OFFICIAL_NEGATIVES = ("No", "not", "no")


def parse_answer_official(text: str) -> str:
    """The official POPE rule (case-sensitive): keep the text before the first "." if any, delete
    commas, split on single spaces; "no" if a word is exactly "No", "not" or "no", else "yes".
    Quirks kept on purpose: "" -> yes, "NO" -> yes, "Not sure" -> yes, "Yes, there is no dog" -> no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in _OFFICIAL_NEGATIVES for w in words) else "yes"


_WORD = re.compile(r"[a-z']+")
_UNSURE = re.compile(r"\b(not sure|unsure|unclear|(do not|don't|cannot|can't) (know|tell|say|determine))\b")
_NEGATION_CUES = {"no", "not", "none", "nothing", "nope", "cannot", "neither", "nor", "without"}


def parse_answer_strict(text: str) -> str:
    """A stricter parser (NOT the official one; numbers differ from published ones).

    Case-insensitive, on the first sentence (text before the first ".", "!" or "?"; falls back to
    the whole text if that is empty). If the first word is "yes"/"no" that decides. Otherwise
    "unknown" on an unsure phrase ("not sure", "unsure", "unclear", "can't tell", "don't know"...),
    "no" on a negation cue (no, not, none, nothing, nope, cannot, neither, nor, without, or a word
    ending in "n't"), "yes" on "yes" or on an affirmative "there is"/"there are", else "unknown"
    ("" and "maybe" are "unknown"). `pope_metrics` counts "unknown" as wrong."""
    lowered = text.strip().lower()
    first = re.split(r"[.!?]", lowered, maxsplit=1)[0]
    words = _WORD.findall(first) or _WORD.findall(lowered)
    if not words:
        return UNKNOWN
    if words[0] in ("yes", "no"):
        return words[0]
    if _UNSURE.search(first):
        return UNKNOWN
    if any(w in _NEGATION_CUES or w.endswith("n't") for w in words):
        return "no"
    if "yes" in words or re.search(r"\bthere (is|are)\b", first):
        return "yes"
    return UNKNOWN


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PopeMetrics:
    """Confusion counts with "yes" as the positive class, and the POPE metrics.

    accuracy = (TP+TN)/N, precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = harmonic mean of
    precision and recall, yes_ratio = predicted "yes" / N = (TP+FP)/N. Precision, recall and F1 are
    0.0 when their denominator is 0 (the official script would divide by zero).
    Only the strict parser can answer "unknown": such an answer is wrong for accuracy, a miss for
    recall when the label is "yes" (`unknown_yes`), and not a predicted "yes" (`unknown_no` when the
    label is "no"); N counts them. With the official parser both are 0.
    """

    tp: int
    fp: int
    tn: int
    fn: int
    unknown_yes: int = 0
    unknown_no: int = 0

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn + self.unknown_yes + self.unknown_no

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        positives = self.tp + self.fn + self.unknown_yes
        return self.tp / positives if positives else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def yes_ratio(self) -> float:
        return (self.tp + self.fp) / self.n if self.n else float("nan")

    def as_dict(self) -> dict[str, float]:
        """Metrics and counts, flat, for loggers and JSON reports."""
        return {
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "yes_ratio": self.yes_ratio,
            "tp": self.tp,
            "fp": self.fp,
            "tn": self.tn,
            "fn": self.fn,
            "unknown": self.unknown_yes + self.unknown_no,
            "n": self.n,
        }


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> PopeMetrics:
    """Metrics from parsed predictions ("yes"/"no", or "unknown" from the strict parser) and labels."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    counts: Counter[tuple[str, str]] = Counter()
    for pred, label in zip(predictions, labels):
        if label not in LABELS:
            raise ValueError(f"label must be 'yes' or 'no', got {label!r}")
        if pred not in ("yes", "no", UNKNOWN):
            raise ValueError(f"prediction must be 'yes', 'no' or {UNKNOWN!r}, got {pred!r}")
        counts[(pred, label)] += 1
    return PopeMetrics(
        tp=counts[("yes", "yes")],
        fp=counts[("yes", "no")],
        tn=counts[("no", "no")],
        fn=counts[("no", "yes")],
        unknown_yes=counts[(UNKNOWN, "yes")],
        unknown_no=counts[(UNKNOWN, "no")],
    )


def score_answers(
    questions: Sequence[PopeQuestion],
    answers: Sequence[str],
    parser: Callable[[str], str] = parse_answer_official,
    source: str = "answers",
) -> PopeMetrics:
    """Parse raw answers (in question order) and score them against the question labels.

    Raises PopeFormatError when there are fewer answers than questions (the official script would
    silently score a prefix) or more (it would count the extra answers in the yes-ratio)."""
    if len(answers) < len(questions):
        raise PopeFormatError(
            f"{source} has {len(answers)} answers but there are {len(questions)} questions: "
            "the answer file is shorter than the question file (incomplete run?)"
        )
    if len(answers) > len(questions):
        raise PopeFormatError(f"{source} has {len(answers)} answers but there are only {len(questions)} questions")
    return pope_metrics([parser(a) for a in answers], [q.label for q in questions])


def evaluate_answers(
    question_path: str | os.PathLike[str],
    answer_path: str | os.PathLike[str],
    parser: Callable[[str], str] = parse_answer_official,
) -> PopeMetrics:
    """Score an answer file against a question file (see `score_answers`; errors name both files)."""
    return score_answers(
        read_questions(question_path),
        read_answers(answer_path),
        parser,
        source=f"answer file {answer_path} (question file {question_path})",
    )


def evaluate_splits(
    question_files: Mapping[str, str | os.PathLike[str]],
    answer_files: Mapping[str, str | os.PathLike[str]],
    parser: Callable[[str], str] = parse_answer_official,
) -> dict[str, PopeMetrics]:
    """`evaluate_answers` for each split named in `question_files` (e.g. random/popular/adversarial)."""
    missing = [s for s in question_files if s not in answer_files]
    if missing:
        raise KeyError(f"no answer file for split(s): {', '.join(missing)}")
    return {s: evaluate_answers(question_files[s], answer_files[s], parser) for s in question_files}


# --------------------------------------------------------------------------------------------------
# Building question files
# --------------------------------------------------------------------------------------------------


def question_text(obj: str) -> str:
    """POPE's question: "Is there a/an {object} in the image?" ("an" before a vowel letter)."""
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {obj} in the image?"


def _object_sets(annotations: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Distinct objects per image, first-seen order (annotations list one name per instance)."""
    return {img: list(dict.fromkeys(objs)) for img, objs in annotations.items()}


def object_frequency(annotations: Mapping[str, Sequence[str]]) -> Counter[str]:
    """Number of images in which each object appears (popular negatives are the most frequent)."""
    return Counter(o for objs in _object_sets(annotations).values() for o in objs)


def co_occurrence(annotations: Mapping[str, Sequence[str]]) -> Counter[tuple[str, str]]:
    """Number of images in which each (unordered, stored both ways) pair of objects appears together."""
    counts: Counter[tuple[str, str]] = Counter()
    for objs in _object_sets(annotations).values():
        for a, b in combinations(sorted(objs), 2):
            counts[(a, b)] += 1
            counts[(b, a)] += 1
    return counts


def _ranked_negatives(
    split: str,
    present: Sequence[str],
    absent: Sequence[str],
    k: int,
    rng: np.random.Generator,
    freq: Counter[str],
    cooc: Counter[tuple[str, str]],
) -> list[str]:
    """Pick k absent objects. random: uniform without replacement. popular: the k most frequent
    (images containing them; ties by name). adversarial: the k with the largest summed
    co-occurrence with the image's present objects (ties by frequency, then name)."""
    if split == "random":
        return [absent[i] for i in rng.choice(len(absent), size=k, replace=False)]
    if split == "popular":
        return sorted(absent, key=lambda o: (-freq[o], o))[:k]
    if split == "adversarial":
        score = {o: sum(cooc[(p, o)] for p in present) for o in absent}
        return sorted(absent, key=lambda o: (-score[o], -freq[o], o))[:k]
    raise ValueError(f"unknown POPE split {split!r}; expected one of {', '.join(SPLITS)}")


def build_pope_questions(
    annotations: Mapping[str, Sequence[str]],
    split: str,
    num_images: int | None = 500,
    num_positives: int = 3,
    seed: int = 0,
    vocabulary: Sequence[str] | None = None,
) -> list[PopeQuestion]:
    """Build a POPE question list from object annotations (image name -> object names).

    Images with at least `num_positives` distinct objects are eligible; `num_images` of them are
    drawn with a seeded numpy Generator (all eligible, in sorted order, when None). Per image:
    `num_positives` present objects drawn at random, and as many absent ones chosen by `split`
    (see `_ranked_negatives`) from `vocabulary` (default: every object in `annotations`). Questions
    alternate yes, no, yes, no... per image (as the official files), so exactly half are "yes";
    question_id counts from 1. The same seed gives the same images and positives in every split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {', '.join(SPLITS)}")
    objects = _object_sets(annotations)
    if vocabulary is not None:
        vocab = list(dict.fromkeys(vocabulary))
    else:
        vocab = sorted({o for objs in objects.values() for o in objs})
    eligible = sorted(img for img, objs in objects.items() if len(objs) >= num_positives)
    # Two streams, so that random negatives do not shift the image/positive draws across splits.
    rng = np.random.default_rng(seed)
    rng_negatives = np.random.default_rng([seed, 1])
    if num_images is None:
        images = eligible
    else:
        if num_images > len(eligible):
            raise ValueError(
                f"asked for {num_images} images but only {len(eligible)} have >= {num_positives} distinct objects"
            )
        images = [eligible[i] for i in rng.choice(len(eligible), size=num_images, replace=False)]
    freq = object_frequency(annotations)
    cooc = co_occurrence(annotations) if split == "adversarial" else Counter()
    questions: list[PopeQuestion] = []
    for img in images:
        present = objects[img]
        positives = [present[i] for i in rng.choice(len(present), size=num_positives, replace=False)]
        absent = [o for o in vocab if o not in set(present)]
        if len(absent) < num_positives:
            raise ValueError(f"image {img!r}: only {len(absent)} absent objects for {num_positives} negatives")
        negatives = _ranked_negatives(split, present, absent, num_positives, rng_negatives, freq, cooc)
        for pos, neg in zip(positives, negatives):
            for obj, label in ((pos, "yes"), (neg, "no")):
                questions.append(PopeQuestion(len(questions) + 1, img, question_text(obj), label))
    return questions
