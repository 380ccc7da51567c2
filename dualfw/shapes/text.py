"""Text of the Shapes world: GenEval-style prompts, scene captions, POPE-style questions.

GenEval prompts follow the official generator (djghosh13/geneval prompts/create_prompts.py) with
the world's shapes as classes and its colors as the color vocabulary: same templates, articles,
plurals, number words, draw order and de-duplication; see docs/evaluation.md.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import numpy as np

from dualfw.eval.geneval import dedupe_records, make_plural, with_article
from dualfw.shapes.world import DEFAULT_WORLD, RELATIONS, Scene, ShapeObject, WorldConfig, relations

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COUNTS: tuple[int, ...] = (2, 3, 4)  # the numbers counting prompts ask for (the official generator's)
PREFIX = "a photo of "


# ---------------------------------------------------------------------------------------------
# GenEval metadata records (key order as the official generator writes them)
# ---------------------------------------------------------------------------------------------


def single_object_record(a: str) -> dict[str, Any]:
    """"a photo of a {A}"."""
    return {"tag": "single_object", "include": [{"class": a, "count": 1}], "prompt": f"{PREFIX}{with_article(a)}"}


def two_object_record(a: str, b: str) -> dict[str, Any]:
    """"a photo of a {A} and a {B}"."""
    return {
        "tag": "two_object",
        "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
        "prompt": f"{PREFIX}{with_article(a)} and {with_article(b)}",
    }


def counting_record(a: str, n: int) -> dict[str, Any]:
    """"a photo of {n} {As}" with exclude count n+1."""
    return {
        "tag": "counting",
        "include": [{"class": a, "count": n}],
        "exclude": [{"class": a, "count": n + 1}],
        "prompt": f"{PREFIX}{NUMBERS[n]} {make_plural(a)}",
    }


def color_record(a: str, color: str) -> dict[str, Any]:
    """"a photo of a {color} {A}"."""
    return {
        "tag": "colors",
        "include": [{"class": a, "count": 1, "color": color}],
        "prompt": f"{PREFIX}{with_article(color)} {a}",
    }


def position_record(a: str, rel: str, b: str) -> dict[str, Any]:
    """"a photo of a {A} {rel} a {B}" with include [B, A + position (rel, 0)]."""
    return {
        "tag": "position",
        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
        "prompt": f"{PREFIX}{with_article(a)} {rel} {with_article(b)}",
    }


def color_attr_record(a: str, ca: str, b: str, cb: str) -> dict[str, Any]:
    """"a photo of a {c1} {A} and a {c2} {B}"."""
    return {
        "tag": "color_attr",
        "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
        "prompt": f"{PREFIX}{with_article(ca)} {a} and {with_article(cb)} {b}",
    }


def _draw(tag: str, rng: np.random.Generator, shapes: Sequence[str], colors: Sequence[str]) -> dict[str, Any]:
    """One random record of a tag, drawn the way the official generator draws it."""
    if tag == "two_object":
        ia, ib = rng.choice(len(shapes), size=2, replace=False)
        return two_object_record(shapes[ia], shapes[ib])
    if tag == "counting":
        ia = rng.choice(len(shapes))
        n = int(rng.integers(COUNTS[0], COUNTS[-1], endpoint=True))
        return counting_record(shapes[ia], n)
    if tag == "colors":
        ia = rng.choice(len(shapes))
        return color_record(shapes[ia], colors[rng.choice(len(colors))])
    if tag == "position":
        ia, ib = rng.choice(len(shapes), size=2, replace=False)
        rel = RELATIONS[rng.choice(len(RELATIONS))]
        return position_record(shapes[ia], rel, shapes[ib])
    if tag == "color_attr":
        ia, ib = rng.choice(len(shapes), size=2, replace=False)
        ca, cb = rng.choice(len(colors), size=2, replace=False)
        return color_attr_record(shapes[ia], colors[ca], shapes[ib], colors[cb])
    raise ValueError(f"unknown tag {tag!r}")


def generate_geneval_prompts(
    n_per_tag: int = 100,
    seed: int = 43,
    world: WorldConfig = DEFAULT_WORLD,
    tags: Sequence[str] = TAGS,
) -> list[dict[str, Any]]:
    """A GenEval-style suite over the world's shapes and colors, as the official generator makes it.

    single_object lists every class once (random order); every other tag gets `n_per_tag` draws;
    duplicates are removed. The shapes world has few distinct prompts (3 shapes: 3 + 6 + 9 + 18 +
    24 + 180 with 6 colors), so most draws of the small tags are duplicates; use
    `enumerate_geneval_prompts` for the complete set.
    """
    rng = np.random.default_rng(seed)
    shapes, colors = list(world.shapes), list(world.colors)
    records: list[dict[str, Any]] = []
    for tag in TAGS:  # fixed order keeps the random stream identical whatever `tags` selects
        if tag == "single_object":
            drawn = [single_object_record(shapes[i]) for i in rng.choice(len(shapes), size=len(shapes), replace=False)]
        else:
            drawn = [_draw(tag, rng, shapes, colors) for _ in range(n_per_tag)]
        if tag in tags:
            records.extend(drawn)
    return dedupe_records(records)


def enumerate_geneval_prompts(world: WorldConfig = DEFAULT_WORLD, tags: Sequence[str] = TAGS) -> list[dict[str, Any]]:
    """Every distinct GenEval-style record of the world, per tag, in a fixed order."""
    s, c = world.shapes, world.colors
    pairs = [(a, b) for a in s for b in s if a != b]
    by_tag = {
        "single_object": [single_object_record(a) for a in s],
        "two_object": [two_object_record(a, b) for a, b in pairs],
        "counting": [counting_record(a, n) for a in s for n in COUNTS],
        "colors": [color_record(a, col) for a in s for col in c],
        "position": [position_record(a, rel, b) for a, b in pairs for rel in RELATIONS],
        "color_attr": [
            color_attr_record(a, ca, b, cb) for a, b in pairs for ca in c for cb in c if ca != cb
        ],
    }
    return [r for tag in TAGS if tag in tags for r in by_tag[tag]]


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def near_miss_words(world: WorldConfig = DEFAULT_WORLD) -> list[list[str]]:
    """The world's interchangeable words, for `DualScorer(near_misses=...)`: its colours, shapes,
    plural shapes, the counting prompts' numbers and the relations (conf/shapes/near_misses.yaml)."""
    return [list(world.colors), list(world.shapes), [make_plural(s) for s in world.shapes], [NUMBERS[n] for n in COUNTS], list(RELATIONS)]


def location_phrase(obj: ShapeObject, resolution: int) -> str:
    """Where an object sits in the image, by thirds: "at the top left", "on the right", "in the center"."""
    cx, cy = obj.center
    col = ("left", "center", "right")[min(int(3 * cx / resolution), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * cy / resolution), 2)]
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    return f"at the {row}" if col == "center" else f"at the {row} {col}"


def describe_scene(scene: Scene, prefix: str = PREFIX) -> str:
    """Full description, objects left to right: "a photo of two objects: a red circle on the left
    and a blue square on the right"."""
    objs = sorted(scene.objects, key=lambda o: (o.center[0], o.center[1]))
    parts = [f"{with_article(o.color)} {o.shape} {location_phrase(o, scene.resolution)}" for o in objs]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    noun = "object" if len(objs) == 1 else "objects"
    return f"{prefix}{NUMBERS[len(objs)]} {noun}: {listed}"


def true_statements(scene: Scene, prefix: str = PREFIX) -> dict[str, list[str]]:
    """Short statements true of the scene, grouped by the GenEval tag whose template they use.

    Every mention is exact: "a circle" only if there is exactly one circle, "a red circle" only if
    exactly one red circle, "two squares" only if exactly two squares. Relations use GenEval's
    rule between objects whose classes are unique in the scene. Training on these (not only full
    descriptions) keeps short GenEval prompts in distribution for the understanding direction.
    """
    counts = Counter(o.shape for o in scene.objects)
    pair_counts = Counter((o.color, o.shape) for o in scene.objects)
    singles = [o for o in scene.objects if counts[o.shape] == 1]
    colored = [o for o in scene.objects if pair_counts[(o.color, o.shape)] == 1]
    out: dict[str, list[str]] = {tag: [] for tag in TAGS}
    for shape, k in sorted(counts.items()):
        if k == 1:
            out["single_object"].append(f"{prefix}{with_article(shape)}")
        else:
            out["counting"].append(f"{prefix}{NUMBERS[k]} {make_plural(shape)}")
    for o in colored:
        out["colors"].append(f"{prefix}{with_article(o.color)} {o.shape}")
    for a in singles:
        for b in singles:
            if a is b:
                continue
            out["two_object"].append(f"{prefix}{with_article(a.shape)} and {with_article(b.shape)}")
            for rel in RELATIONS:  # fixed order, deterministic output
                if rel in relations(a.box, b.box):
                    out["position"].append(f"{prefix}{with_article(a.shape)} {rel} {with_article(b.shape)}")
    for a in colored:
        for b in colored:
            if a is not b and a.shape != b.shape:
                out["color_attr"].append(
                    f"{prefix}{with_article(a.color)} {a.shape} and {with_article(b.color)} {b.shape}"
                )
    return out


def sample_caption(scene: Scene, rng: np.random.Generator, full_prob: float = 0.5, prefix: str = PREFIX) -> str:
    """A training caption: the full description with probability `full_prob`, else a short true
    statement from a uniformly chosen tag that has one (so no tag dominates by sheer number)."""
    if rng.random() < full_prob:
        return describe_scene(scene, prefix)
    groups = [g for g in true_statements(scene, prefix).values() if g]
    group = groups[int(rng.integers(len(groups)))]
    return group[int(rng.integers(len(group)))]


# ---------------------------------------------------------------------------------------------
# POPE-style questions
# ---------------------------------------------------------------------------------------------

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
Entity = tuple[str, str]  # (color, shape); color "" for shape-only questions


def entity_text(entity: Entity) -> str:
    """"red circle" or "circle"."""
    color, shape = entity
    return f"{color} {shape}" if color else shape


def pope_question_text(entity: Entity) -> str:
    """"Is there a red circle in the image?"."""
    return f"Is there {with_article(entity_text(entity))} in the image?"


def scene_entities(scene: Scene, colored: bool = True) -> set[Entity]:
    """The entities present in a scene."""
    return {(o.color if colored else "", o.shape) for o in scene.objects}


def pope_questions(
    scenes: Sequence[Scene],
    split: str,
    seed: int = 0,
    image_names: Sequence[str] | None = None,
    n_pos: int = 3,
    colored: bool = True,
    world: WorldConfig = DEFAULT_WORLD,
) -> list[dict[str, Any]]:
    """POPE-format questions ({"question_id", "image", "text", "label"}), exactly half yes.

    Per image, up to `n_pos` present entities (colored shapes by default) are asked about, each
    paired with one absent entity:
    - random: a uniformly drawn absent entity;
    - popular: the absent entities most frequent over `scenes`, in order;
    - adversarial: POPE picks objects that co-occur with present ones; in this world co-occurrence
      is nearly uniform, so the hard negatives are absent entities sharing the shape or the color of
      the paired positive (an attribute-binding trap), ties broken by co-occurrence over `scenes`.
    If a scene has fewer absent than present entities, fewer pairs are asked, keeping the balance.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"split must be one of {POPE_SPLITS}")
    rng = np.random.default_rng(seed)
    colors = world.colors if colored else ("",)
    vocab: list[Entity] = [(c, s) for c in colors for s in world.shapes]
    present = [scene_entities(sc, colored) for sc in scenes]
    freq = Counter(e for p in present for e in p)
    cooc = Counter((a, b) for p in present for a in p for b in p if a != b)
    names = list(image_names) if image_names is not None else [f"{i:05d}.png" for i in range(len(scenes))]
    out: list[dict[str, Any]] = []
    for name, pres in zip(names, present):
        positives = sorted(pres)
        positives = [positives[i] for i in rng.permutation(len(positives))]
        absent = [e for e in vocab if e not in pres]
        k = min(n_pos, len(positives), len(absent))
        if split == "random":
            negatives = [absent[i] for i in rng.choice(len(absent), size=k, replace=False)] if k else []
        elif split == "popular":
            negatives = sorted(absent, key=lambda e: (-freq[e], vocab.index(e)))[:k]
        else:
            negatives = []
            for pos in positives[:k]:
                jitter = rng.random(len(absent))  # random tie-break, drawn for every pair
                pool = [(e, j) for e, j in zip(absent, jitter) if e not in negatives]
                shared = lambda e: int(e[0] == pos[0] and e[0] != "") + int(e[1] == pos[1])  # noqa: E731
                negatives.append(max(pool, key=lambda ej: (shared(ej[0]), cooc[(pos, ej[0])], ej[1]))[0])
        for pos, neg in zip(positives[:k], negatives):
            for entity, label in ((pos, "yes"), (neg, "no")):
                out.append(
                    {"question_id": len(out) + 1, "image": name, "text": pope_question_text(entity), "label": label}
                )
    return out
