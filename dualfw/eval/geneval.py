"""GenEval: prompt metadata, the official per-image scoring rule, aggregation and prompt generation.

Every rule here follows docs/evaluation.md (read from djghosh13/geneval, evaluation/evaluate_images.py,
evaluation/summary_scores.py and prompts/create_prompts.py) so that our numbers compare with
published GenEval numbers. Models are not part of this module: a `Detector` gives `Detection`s and a
`ColorClassifier` names colors (see `dualfw.eval.detection` and `dualfw.eval.backends`).

Layout of the module:
- constants (tags, colors, positions, thresholds, the 80 COCO class names in GenEval spelling);
- metadata: `Clause`, `GenEvalPrompt`, `parse_metadata`, `read_metadata`, `write_metadata`;
- scoring one image: `keep_detections`, `relative_position`, `score_image` -> `ImageResult`;
- aggregation: `summarize` -> `GenEvalSummary`, `overall_confidence_interval`;
- prompt generation: `generate_prompts`;
- the official folder layout: `prompt_folder`, `write_prompt_folder`, `export_geneval_folder`,
  `read_geneval_folder`, `evaluate_folder`, `write_results`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dualfw.core.files import iter_jsonl, write_jsonl
from dualfw.eval.detection import ColorClassifier, Detection, Detector
from dualfw.eval.stats import bootstrap_interval

# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

THRESHOLD = 0.3  # keep detections with score strictly greater than this
COUNTING_THRESHOLD = 0.9  # same, for prompts tagged "counting"
MAX_OBJECTS = 16  # at most this many kept detections per class
POSITION_THRESHOLD = 0.1  # shrink margin, as a fraction of the summed object sizes
NO_RELATION_EPS = 1e-3  # |revised offset| below this on both axes means "no relation"

# The 80 COCO classes in the spelling GenEval uses (note "computer mouse", "tv remote", "computer keyboard").
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


class MetadataError(ValueError):
    """A GenEval metadata line is malformed; the message names the file and the line number."""


class MissingColorError(ValueError):
    """A color clause needs the color of a detection that has none, and no color classifier is given."""


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clause:
    """One include/exclude requirement: `count` objects of class `cls`, optionally of `color`,
    optionally in relation `position = (rel, j)` to the objects found for include clause j."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The clause as it appears in GenEval JSON (keys `class`, `count`, optional `color`, `position`)."""
        out: dict[str, Any] = {"class": self.cls, "count": self.count}
        if self.color is not None:
            out["color"] = self.color
        if self.position is not None:
            out["position"] = [self.position[0], self.position[1]]
        return out


@dataclass(frozen=True)
class GenEvalPrompt:
    """One GenEval prompt. `raw` keeps the JSON object as read so that exports are faithful."""

    tag: str
    prompt: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """GenEval JSON object (the raw one when read from a file, else rebuilt in official key order)."""
        if self.raw:
            return dict(self.raw)
        out: dict[str, Any] = {"tag": self.tag, "include": [c.to_dict() for c in self.include]}
        if self.exclude:
            out["exclude"] = [c.to_dict() for c in self.exclude]
        out["prompt"] = self.prompt
        return out

    @property
    def key(self) -> str:
        """Identity of the prompt for "% correct prompts" (the official groups images by metadata)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def classes(self) -> tuple[str, ...]:
        """Classes named by include clauses, in order, without repeats."""
        return tuple(dict.fromkeys(c.cls for c in self.include))


def _parse_clause(obj: Any, index: int, kind: str, colors: Sequence[str]) -> Clause:
    """Validate one clause dict; raise ValueError (without location, the caller adds it)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{kind}[{index}] must be an object, got {type(obj).__name__}")
    if "class" not in obj or not isinstance(obj["class"], str) or not obj["class"]:
        raise ValueError(f"{kind}[{index}] needs a non-empty string 'class'")
    count = obj.get("count")
    # bool is an int in Python; a JSON true is still a malformed count
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"{kind}[{index}] needs an integer 'count' >= 1, got {count!r}")
    color = obj.get("color")
    if color is not None and color not in colors:
        raise ValueError(f"{kind}[{index}] has unknown color {color!r}; known: {', '.join(colors)}")
    position = obj.get("position")
    if position is not None:
        if kind != "include":
            raise ValueError(f"{kind}[{index}] may not have a 'position'")
        ok = (
            isinstance(position, (list, tuple))
            and len(position) == 2
            and position[0] in POSITIONS
            and isinstance(position[1], int)
            and not isinstance(position[1], bool)
            and 0 <= position[1] < index  # the target group must be an earlier include clause
        )
        if not ok:
            raise ValueError(
                f"{kind}[{index}] has invalid 'position' {position!r}; expected [relation, j] with relation "
                f"in {list(POSITIONS)} and 0 <= j < {index}"
            )
        position = (position[0], int(position[1]))
    return Clause(cls=obj["class"], count=count, color=color, position=position)


def parse_metadata(obj: Any, colors: Sequence[str] = COLORS) -> GenEvalPrompt:
    """Validate one GenEval metadata object (keys `tag`, `prompt`, `include`, optional `exclude`).

    Raises ValueError with a one-line reason: missing key, unknown tag (one of the 6 TAGS), malformed
    clause. Unknown extra keys are kept in `raw` and otherwise ignored, as the official evaluator does.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("tag", "prompt", "include"):
        if key not in obj:
            raise ValueError(f"missing key '{key}'")
    tag = obj["tag"]
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; expected one of {', '.join(TAGS)}")
    if not isinstance(obj["prompt"], str):
        raise ValueError("'prompt' must be a string")
    if not isinstance(obj["include"], list) or not obj["include"]:
        raise ValueError("'include' must be a non-empty list")
    exclude = obj.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError("'exclude' must be a list")
    include = tuple(_parse_clause(c, i, "include", colors) for i, c in enumerate(obj["include"]))
    excl = tuple(_parse_clause(c, i, "exclude", colors) for i, c in enumerate(exclude))
    return GenEvalPrompt(tag=tag, prompt=obj["prompt"], include=include, exclude=excl, raw=dict(obj))


def read_metadata(path: str | os.PathLike[str], colors: Sequence[str] = COLORS) -> list[GenEvalPrompt]:
    """Read a GenEval metadata JSON-lines file (blank lines are skipped).

    Raises MetadataError "<file>:<line>: <reason>" on malformed JSON or an invalid object.
    """
    prompts: list[GenEvalPrompt] = []
    for lineno, obj in iter_jsonl(path, MetadataError):
        try:
            prompts.append(parse_metadata(obj, colors))
        except ValueError as e:
            raise MetadataError(f"{path}:{lineno}: {e}") from None
    return prompts


def write_metadata(prompts: Iterable[GenEvalPrompt | Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write prompts as GenEval JSON lines (one object per line, official key order when rebuilt)."""
    write_jsonl((_as_dict(p) for p in prompts), path)


def _as_dict(p: GenEvalPrompt | Mapping[str, Any]) -> dict[str, Any]:
    return p.to_dict() if isinstance(p, GenEvalPrompt) else dict(p)


def _as_prompt(p: GenEvalPrompt | Mapping[str, Any]) -> GenEvalPrompt:
    return p if isinstance(p, GenEvalPrompt) else parse_metadata(dict(p))


# --------------------------------------------------------------------------------------------------
# Scoring one image
# --------------------------------------------------------------------------------------------------


def keep_detections(
    detections: Iterable[Detection],
    tag: str,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
) -> dict[str, list[Detection]]:
    """The official filter: per class keep detections with score STRICTLY above the threshold
    (`counting_threshold` when tag == "counting"), sorted by score (highest first), at most
    `max_objects` per class. No NMS (the official overlap threshold 1.0 disables it).
    Classes with no kept detection are absent from the result."""
    thr = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if det.score > thr:
            by_class.setdefault(det.label, []).append(det)
    return {
        cls: sorted(dets, key=lambda d: d.score, reverse=True)[:max_objects] for cls, dets in by_class.items()
    }


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_THRESHOLD, threshold: float = 0.5
) -> set[str]:
    """Relations of box A to box B (x1, y1, x2, y2; y grows downwards), official rule.

    offset = center_A - center_B; per axis the offset is shrunk towards 0 by
    margin * (size_A + size_B) (never past 0). If both shrunk components are below 1e-3 in
    magnitude there is no relation (empty set). Else the shrunk offset is divided by the norm of
    the ORIGINAL offset, giving (dx, dy); "left of" if dx < -0.5, "right of" if dx > 0.5,
    "above" if dy < -0.5, "below" if dy > 0.5. Several relations can hold at once. A `threshold`
    above 0.5 demands clearer relations (used to place Shapes scenes unambiguously)."""
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dim_a = np.abs(a[1] - a[0])
    dim_b = np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < NO_RELATION_EPS):
        return set()
    # Normalising by the original offset (not the revised one) is what makes the margin matter
    # for diagonal layouts: a mostly-cancelled component can no longer exceed 0.5.
    dx, dy = revised / np.linalg.norm(offset)
    relations: set[str] = set()
    if dx < -threshold:
        relations.add("left of")
    if dx > threshold:
        relations.add("right of")
    if dy < -threshold:
        relations.add("above")
    if dy > threshold:
        relations.add("below")
    return relations


@dataclass
class ImageResult:
    """Verdict on one image. `reason` is empty when correct, else one line per failure (as the
    official `reason`). `clause_ok[i]` says whether include clause i passed; `num_objects` is the
    number of kept detections over all classes; `kept` the kept count per class."""

    tag: str
    prompt: str
    correct: bool
    reason: str
    clause_ok: list[bool]
    num_objects: int
    kept: dict[str, int]
    key: str = ""
    filename: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A row like the official results.jsonl (plus our extra fields)."""
        return {
            "filename": self.filename,
            "tag": self.tag,
            "prompt": self.prompt,
            "correct": self.correct,
            "reason": self.reason,
            "metadata": self.key,
            "num_objects": self.num_objects,
            "kept": self.kept,
        }


def _detection_colors(
    found: Sequence[Detection],
    image: np.ndarray | None,
    color_classifier: ColorClassifier | None,
    colors: Sequence[str],
) -> list[str]:
    """Color of each found detection: `Detection.color` when the detector knows it, else the classifier."""
    out = []
    for det in found:
        if det.color is not None:
            out.append(det.color)
            continue
        if color_classifier is None or image is None:
            raise MissingColorError(
                f"a color clause needs the color of a '{det.label}' detection that has no Detection.color; "
                "pass both `image` and `color_classifier` to score_image"
            )
        out.append(color_classifier(image, det, colors))
    return out


def _strict_failures(prompt: GenEvalPrompt, kept: Mapping[str, list[Detection]]) -> list[str]:
    """Extra failures of the strict judge: a kept class the prompt does not include, or more kept
    objects of an included class than the sum of the include counts for that class."""
    allowed: Counter[str] = Counter()
    for clause in prompt.include:
        allowed[clause.cls] += clause.count
    reasons = []
    for cls, dets in kept.items():
        if cls not in allowed:
            reasons.append(f"strict: unexpected {cls} x{len(dets)}")
        elif len(dets) > allowed[cls]:
            reasons.append(f"strict: expected {cls}<={allowed[cls]}, found {len(dets)}")
    return reasons


def score_image(
    prompt: GenEvalPrompt | Mapping[str, Any],
    detections: Iterable[Detection],
    image: np.ndarray | None = None,
    color_classifier: ColorClassifier | None = None,
    *,
    colors: Sequence[str] = COLORS,
    strict: bool = False,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    position_margin: float = POSITION_THRESHOLD,
    filename: str | None = None,
) -> ImageResult:
    """Score one image against its prompt with the official GenEval rule.

    1. `keep_detections` (score > 0.3, > 0.9 for counting; sorted; <= 16 per class).
    2. include clauses in order, ANDed. Clause i takes the top `count` kept objects of its class and
       fails if there are fewer. With `color`: each of those objects gets a color (Detection.color,
       else `color_classifier(image, det, colors)`); fails if fewer than `count` have the target
       color. Only if not failed yet and with `position` (rel, j): fails with "no target" if clause
       j failed, else every found object must hold `rel` against every object of group j
       (`relative_position`). A passing clause records its objects as group i, a failing one none.
    3. exclude clauses, ORed: fails if a class has at least `count` kept detections.
    4. strict=True (our option, not official) also fails on any kept detection of a class the
       prompt does not include, or on more kept objects of an included class than its count (summed
       over include clauses naming it). Off by default so numbers compare with published ones.
    """
    p = _as_prompt(prompt)
    kept = keep_detections(detections, p.tag, threshold, counting_threshold, max_objects)
    reasons: list[str] = []
    groups: list[list[Detection] | None] = []
    clause_ok: list[bool] = []
    for clause in p.include:
        found = kept.get(clause.cls, [])[: clause.count]
        ok = True
        if len(found) < clause.count:
            ok = False
            reasons.append(f"expected {clause.cls}>={clause.count}, found {len(found)}")
        else:
            if clause.color is not None:
                got = _detection_colors(found, image, color_classifier, colors)
                n_target = got.count(clause.color)
                if n_target < clause.count:
                    ok = False
                    tally = ", ".join(f"{got.count(c)} {c}" for c in colors if c in got)
                    reasons.append(
                        f"expected {clause.color} {clause.cls}>={clause.count}, found {n_target} "
                        f"{clause.color}; and {tally}"
                    )
            if clause.position is not None and ok:
                rel, target = clause.position
                target_group = groups[target]
                if target_group is None:
                    ok = False
                    reasons.append(f"no target for {clause.cls} to be {rel}")
                else:
                    ok = _check_position(found, target_group, rel, clause.cls, position_margin, reasons)
        groups.append(found if ok else None)
        clause_ok.append(ok)
    for clause in p.exclude:
        n = len(kept.get(clause.cls, []))
        if n >= clause.count:
            reasons.append(f"expected {clause.cls}<{clause.count}, found {n}")
    if strict:
        reasons.extend(_strict_failures(p, kept))
    return ImageResult(
        tag=p.tag,
        prompt=p.prompt,
        correct=not reasons,
        reason="\n".join(reasons),
        clause_ok=clause_ok,
        num_objects=sum(len(d) for d in kept.values()),
        kept={cls: len(d) for cls, d in kept.items()},
        key=p.key,
        filename=filename,
    )


def _check_position(
    found: Sequence[Detection],
    targets: Sequence[Detection],
    rel: str,
    cls: str,
    margin: float,
    reasons: list[str],
) -> bool:
    """Every found object must hold `rel` against every target; stop at the first violation."""
    for obj in found:
        for tgt in targets:
            true_rels = relative_position(obj.box, tgt.box, margin)
            if rel not in true_rels:
                found_text = " and ".join(sorted(true_rels)) if true_rels else "no relation to"
                reasons.append(f"expected {cls} {rel} target, found {found_text} target")
                return False
    return True


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


@dataclass
class GenEvalSummary:
    """Aggregate scores.

    per_tag: accuracy (fraction of correct images) per tag present, in TAGS order.
    overall: unweighted mean of the per-tag accuracies over the tags PRESENT in the results (the
        official summary averages over the tags found in its results file; with the full suite
        that is all six). NaN when there are no results.
    image_accuracy: fraction of correct images. prompt_accuracy: fraction of prompts (grouped by
    metadata) with at least one correct image. mean_objects: mean kept detections per image.
    """

    per_tag: dict[str, float]
    overall: float
    image_accuracy: float
    prompt_accuracy: float
    mean_objects: float
    num_images: int
    num_prompts: int
    per_tag_counts: dict[str, tuple[int, int]]  # tag -> (correct, total)

    def as_metrics(self, prefix: str = "geneval/") -> dict[str, float]:
        """Flat dict for loggers."""
        out = {f"{prefix}{tag}": acc for tag, acc in self.per_tag.items()}
        out.update(
            {
                f"{prefix}overall": self.overall,
                f"{prefix}image_accuracy": self.image_accuracy,
                f"{prefix}prompt_accuracy": self.prompt_accuracy,
                f"{prefix}mean_objects": self.mean_objects,
            }
        )
        return out


def _tag_order(tags: Iterable[str]) -> list[str]:
    present = set(tags)
    return [t for t in TAGS if t in present] + sorted(present - set(TAGS))


def summarize(results: Sequence[ImageResult]) -> GenEvalSummary:
    """Per-tag accuracy, Overall (mean of per-tag accuracies over tags present), % correct images,
    % prompts with >= 1 correct image, mean kept objects per image."""
    if not results:
        nan = float("nan")
        return GenEvalSummary({}, nan, nan, nan, nan, 0, 0, {})
    counts: dict[str, tuple[int, int]] = {}
    for tag in _tag_order(r.tag for r in results):
        rows = [r for r in results if r.tag == tag]
        counts[tag] = (sum(r.correct for r in rows), len(rows))
    per_tag = {tag: c / n for tag, (c, n) in counts.items()}
    by_prompt: dict[str, bool] = {}
    for r in results:
        key = r.key or r.prompt
        by_prompt[key] = by_prompt.get(key, False) or r.correct
    return GenEvalSummary(
        per_tag=per_tag,
        overall=float(np.mean(list(per_tag.values()))),
        image_accuracy=sum(r.correct for r in results) / len(results),
        prompt_accuracy=sum(by_prompt.values()) / len(by_prompt),
        mean_objects=sum(r.num_objects for r in results) / len(results),
        num_images=len(results),
        num_prompts=len(by_prompt),
        per_tag_counts=counts,
    )


def common_failures(results: Sequence[ImageResult], most: int = 5) -> dict[str, list[tuple[str, int]]]:
    """Per tag, the `most` most frequent failure lines (each line of an image's `reason` once) with
    their image counts, most frequent first: what the failing images of a tag get wrong."""
    out: dict[str, list[tuple[str, int]]] = {}
    for tag in _tag_order(r.tag for r in results):
        lines = Counter(line for r in results if r.tag == tag for line in dict.fromkeys(r.reason.splitlines()))
        out[tag] = lines.most_common(most)
    return out


def overall_confidence_interval(
    results: Sequence[ImageResult], level: float = 0.95, n_boot: int = 2000, seed: int = 0,
    resample: str = "prompts",
) -> tuple[float, float]:
    """Percentile bootstrap interval for `overall`. Returns (low, high); (nan, nan) with no results.

    resample="prompts": resample PROMPTS with replacement within each tag (stratified, so every
    replicate keeps all tags; the images of a prompt stay together since they share the prompt's
    difficulty): the spread over other prompt suites like this one. A tag with a single prompt
    contributes no spread; with few prompts the interval is optimistic.
    resample="images": resample IMAGES with replacement within each tag, ignoring which prompt
    they belong to: the spread over sampling seeds, the right one when the suite is a whole finite
    population (the Shapes world's every prompt) rather than a sample of prompts. (Resampling within
    each prompt instead would be degenerate with one image per prompt; pooling a tag's prompts
    makes the interval slightly conservative.)"""
    if resample not in ("prompts", "images"):
        raise ValueError(f"resample must be 'prompts' or 'images', got {resample!r}")
    if not results:
        return (float("nan"), float("nan"))
    strata = []  # per tag: (correct images, images) of each prompt
    for tag in _tag_order(r.tag for r in results):
        per_prompt: dict[str, list[int]] = {}
        for r in results:
            if r.tag == tag:
                c_n = per_prompt.setdefault(r.key or r.prompt, [0, 0])
                c_n[0] += int(r.correct)
                c_n[1] += 1
        strata.append(np.array(list(per_prompt.values()), dtype=np.float64))

    def overall(*tags: np.ndarray) -> np.ndarray:
        return np.mean(np.stack([sums[:, 0] / sums[:, 1] for sums in tags]), axis=0)

    return bootstrap_interval(strata, overall, level, n_boot, seed, pooled=resample == "images")


# --------------------------------------------------------------------------------------------------
# Prompt generation
# --------------------------------------------------------------------------------------------------


def with_article(name: str) -> str:
    """"an" before a vowel letter (a, e, i, o, u), else "a" (GenEval's rule, letter-based)."""
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:
    """GenEval's plural: + "es" if the name ends in "s", else + "s" ("skis" -> "skises")."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _color_eligible(classes: Sequence[str]) -> list[int]:
    """Indices of classes allowed in color prompts: all but "person". The order (starting after
    "person" and wrapping around) reproduces the official draw, which offsets a draw in
    [1, n-1] by the index of "person"."""
    n = len(classes)
    if "person" not in classes:
        return list(range(n))
    p = list(classes).index("person")
    return [(p + k) % n for k in range(1, n)]


def generate_prompts(
    classes: Sequence[str] = COCO_CLASSES,
    n_per_tag: int = 100,
    seed: int = 43,
    colors: Sequence[str] = COLORS,
    positions: Sequence[str] = POSITIONS,
    max_count: int = 4,
) -> list[dict[str, Any]]:
    """GenEval-style prompt suite over any class list, as metadata dicts (official key order).

    Facts followed (docs/evaluation.md): every class once for single_object (a seeded permutation),
    then `n_per_tag` draws for each other tag from one `numpy.random.default_rng(seed)`, in the
    order two_object, counting, colors, position, color_attr; counts 2..max_count with
    exclude = count + 1 and number words; plural + "s"/"es"; "a"/"an"; never "person" with a color;
    position prompt "a photo of a {A} {rel} a {B}" with include [B, A + position (rel, 0)];
    duplicates removed keeping the first. With the 80 COCO classes and seed 43 the draws follow
    the official script's order, so the official 553-prompt suite comes out.
    """
    n = len(classes)
    if n < 2:
        raise ValueError("generate_prompts needs at least 2 classes")
    if not 2 <= max_count < len(NUMBER_WORDS):
        raise ValueError(f"max_count must be in [2, {len(NUMBER_WORDS) - 1}], got {max_count}")
    if len(colors) < 2:
        raise ValueError("generate_prompts needs at least 2 colors")
    rng = np.random.default_rng(seed)
    colorable = _color_eligible(classes)
    samples: list[dict[str, Any]] = []

    for i in rng.choice(n, size=n, replace=False):
        a = classes[i]
        samples.append(
            {"tag": "single_object", "include": [{"class": a, "count": 1}], "prompt": f"a photo of {with_article(a)}"}
        )
    for _ in range(n_per_tag):
        i, j = rng.choice(n, size=2, replace=False)
        a, b = classes[i], classes[j]
        samples.append(
            {
                "tag": "two_object",
                "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                "prompt": f"a photo of {with_article(a)} and {with_article(b)}",
            }
        )
    for _ in range(n_per_tag):
        a = classes[rng.choice(n)]
        k = int(rng.integers(2, max_count, endpoint=True))
        samples.append(
            {
                "tag": "counting",
                "include": [{"class": a, "count": k}],
                "exclude": [{"class": a, "count": k + 1}],
                "prompt": f"a photo of {NUMBER_WORDS[k]} {make_plural(a)}",
            }
        )
    for _ in range(n_per_tag):
        a = classes[colorable[rng.choice(len(colorable))]]
        c = colors[rng.choice(len(colors))]
        samples.append(
            {
                "tag": "colors",
                "include": [{"class": a, "count": 1, "color": c}],
                "prompt": f"a photo of {with_article(c)} {a}",
            }
        )
    for _ in range(n_per_tag):
        i, j = rng.choice(n, size=2, replace=False)
        a, b = classes[i], classes[j]
        rel = positions[rng.choice(len(positions))]
        samples.append(
            {
                "tag": "position",
                "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                "prompt": f"a photo of {with_article(a)} {rel} {with_article(b)}",
            }
        )
    for _ in range(n_per_tag):
        i, j = rng.choice(len(colorable), size=2, replace=False)
        a, b = classes[colorable[i]], classes[colorable[j]]
        ci, cj = rng.choice(len(colors), size=2, replace=False)
        c1, c2 = colors[ci], colors[cj]
        samples.append(
            {
                "tag": "color_attr",
                "include": [{"class": a, "count": 1, "color": c1}, {"class": b, "count": 1, "color": c2}],
                "prompt": f"a photo of {with_article(c1)} {a} and {with_article(c2)} {b}",
            }
        )
    return dedupe_records(samples)


def dedupe_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop repeated records (same JSON content), keeping first occurrences in order."""
    seen: set[str] = set()
    unique = []
    for record in records:
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(record)
    return unique


# --------------------------------------------------------------------------------------------------
# Official folder layout: <outdir>/<00000>/metadata.jsonl, <outdir>/<00000>/samples/0000.png
# --------------------------------------------------------------------------------------------------


def prompt_folder(outdir: str | os.PathLike[str], index: int) -> Path:
    """`<outdir>/<index:05d>`, the folder of prompt number `index` (0-based, metadata order)."""
    return Path(outdir) / f"{index:05d}"


def write_prompt_folder(
    outdir: str | os.PathLike[str],
    index: int,
    metadata: GenEvalPrompt | Mapping[str, Any],
    images: Sequence[Any],
) -> list[Path]:
    """Write one prompt's folder: metadata.jsonl (that prompt's JSON object) and samples/0000.png...
    `images` are PIL images or uint8 arrays (H, W, 3). Returns the sample paths."""
    from PIL import Image

    folder = prompt_folder(outdir, index)
    samples = folder / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(_as_dict(metadata)) + "\n", encoding="utf-8")
    paths = []
    for k, img in enumerate(images):
        pil = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
        path = samples / f"{k:04d}.png"
        pil.save(path)
        paths.append(path)
    return paths


def export_geneval_folder(
    outdir: str | os.PathLike[str],
    prompts: Sequence[GenEvalPrompt | Mapping[str, Any]],
    images: Sequence[Sequence[Any]],
) -> None:
    """Write the whole official layout: `images[i]` are the samples of `prompts[i]`."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    for i, (p, imgs) in enumerate(zip(prompts, images)):
        write_prompt_folder(outdir, i, p, imgs)


def read_geneval_folder(outdir: str | os.PathLike[str]) -> list[tuple[GenEvalPrompt, list[Path]]]:
    """Read the official layout back: for each all-digit subfolder (sorted), its prompt and its
    samples/<digits>.png paths (sorted by number), the files the official evaluator selects."""
    out = []
    for folder in sorted(p for p in Path(outdir).iterdir() if p.is_dir() and p.name.isdigit()):
        meta_path = folder / "metadata.jsonl"
        try:
            prompt = parse_metadata(json.loads(meta_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, ValueError) as e:
            raise MetadataError(f"{meta_path}:1: {e}") from None
        sample_dir = folder / "samples"
        found = sample_dir.glob("*.png") if sample_dir.is_dir() else []
        samples = sorted((p for p in found if p.stem.isdigit()), key=lambda p: int(p.stem))
        out.append((prompt, samples))
    return out


def evaluate_folder(
    outdir: str | os.PathLike[str],
    detector: Detector,
    color_classifier: ColorClassifier | None = None,
    classes: Sequence[str] = COCO_CLASSES,
    strict: bool = False,
) -> list[ImageResult]:
    """Score every sample of an official-layout folder: the detector looks for all `classes` (as
    the official detector reports all 80 COCO classes, which exclude clauses and the strict judge
    need), then `score_image`. Images are read as RGB uint8 arrays."""
    from PIL import Image, ImageOps

    results = []
    for prompt, samples in read_geneval_folder(outdir):
        for path in samples:
            with Image.open(path) as im:
                image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            dets = detector(image, classes)
            results.append(score_image(prompt, dets, image, color_classifier, strict=strict, filename=str(path)))
    return results


def write_results(results: Iterable[ImageResult], path: str | os.PathLike[str]) -> None:
    """Write per-image results as JSON lines (the official results.jsonl fields plus ours)."""
    write_jsonl((r.to_dict() for r in results), path)
