"""Shapes world: renderer, GenEval-style prompts, captions, POPE questions and the exact detector."""

from __future__ import annotations

import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from dualfw.eval.detection import Detection, Detector
from dualfw.shapes.detector import ShapesDetector, scene_detections
from dualfw.shapes.detector import detection_rates as shapes_detection_rates
from dualfw.shapes.text import (
    POPE_SPLITS,
    TAGS,
    describe_scene,
    enumerate_geneval_prompts,
    generate_geneval_prompts,
    pope_questions,
    sample_caption,
    scene_entities,
    true_statements,
)
from dualfw.shapes.world import (
    BACKGROUND,
    PALETTE,
    WorldConfig,
    relations,
    render,
    render_pil,
    sample_scene,
    satisfies_record,
    scene_for_record,
    shape_mask,
)

WORLD = WorldConfig()
DETECTOR = ShapesDetector(WORLD)


def _scenes(seed: int, n: int, world: WorldConfig = WORLD):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, world) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# An independent implementation of the GenEval scoring rules (evaluation.md) on detections, so the
# scene sampler is checked against the detector rather than against its own bookkeeping.
# --------------------------------------------------------------------------------------------


def geneval_correct(record: dict, detections: list[Detection]) -> bool:
    thr = 0.9 if record["tag"] == "counting" else 0.3
    kept: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score > thr and len(kept.setdefault(d.label, [])) < 16:
            kept[d.label].append(d)
    groups: list[list[Detection] | None] = []
    correct = True
    for clause in record["include"]:
        found = kept.get(clause["class"], [])[: clause["count"]]
        ok = len(found) >= clause["count"]
        if ok and "color" in clause:
            ok = sum(d.color == clause["color"] for d in found) >= clause["count"]
        if ok and "position" in clause:
            rel, j = clause["position"]
            ok = groups[j] is not None and all(rel in relations(a.box, b.box) for a in found for b in groups[j])
        groups.append(found if ok else None)
        correct &= ok
    for clause in record.get("exclude", []):
        if len(kept.get(clause["class"], [])) >= clause["count"]:
            correct = False
    return correct


def detection_rates(scenes, images, detector=DETECTOR, threshold: float = 0.9) -> tuple[float, float]:
    return shapes_detection_rates(scenes, images, detector, threshold)


# --------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------


def test_renderer_is_deterministic_per_seed():
    a = [render(s).tobytes() for s in _scenes(7, 20)]
    b = [render(s).tobytes() for s in _scenes(7, 20)]
    c = [render(s).tobytes() for s in _scenes(8, 20)]
    assert a == b
    assert a != c
    image = render(_scenes(7, 1)[0])
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert render_pil(_scenes(7, 1)[0]).size == (32, 32)


@pytest.mark.parametrize("resolution", [32, 64])
def test_scenes_are_well_formed(resolution):
    world = WorldConfig(resolution=resolution)
    assert BACKGROUND not in [PALETTE[c] for c in world.colors]
    counts = Counter()
    for scene in _scenes(3, 200, world):
        n = len(scene.objects)
        counts[n] += 1
        assert 1 <= n <= 4
        for i, a in enumerate(scene.objects):
            assert world.min_size <= a.size <= world.max_size
            assert a.left >= world.margin and a.left + a.size <= resolution - world.margin
            assert a.top >= world.margin and a.top + a.size <= resolution - world.margin
            for b in scene.objects[i + 1 :]:  # boxes separated by at least `gap` empty pixels
                sep_x = max(b.left - (a.left + a.size), a.left - (b.left + b.size))
                sep_y = max(b.top - (a.top + a.size), a.top - (b.top + b.size))
                assert max(sep_x, sep_y) >= world.gap
        image = render(scene)
        assert image.shape == (resolution, resolution, 3)
    assert set(counts) == {1, 2, 3, 4}


# --------------------------------------------------------------------------------------------
# GenEval-style prompts
# --------------------------------------------------------------------------------------------

_TEMPLATES = {
    "single_object": re.compile(r"^a photo of an? (\w+)$"),
    "two_object": re.compile(r"^a photo of an? (\w+) and an? (\w+)$"),
    "counting": re.compile(r"^a photo of (two|three|four) (\w+)s$"),
    "colors": re.compile(r"^a photo of an? (\w+) (\w+)$"),
    "position": re.compile(r"^a photo of an? (\w+) (left of|right of|above|below) an? (\w+)$"),
    "color_attr": re.compile(r"^a photo of an? (\w+) (\w+) and an? (\w+) (\w+)$"),
}


def _check_record(r: dict) -> None:
    assert list(r)[0] == "tag" and r["tag"] in TAGS
    assert set(r) <= {"tag", "include", "exclude", "prompt"}
    m = _TEMPLATES[r["tag"]].match(r["prompt"])
    assert m, r["prompt"]
    inc = r["include"]
    for clause in inc:
        assert clause["class"] in WORLD.shapes and clause["count"] >= 1
        assert clause.get("color", WORLD.colors[0]) in WORLD.colors
    if r["tag"] == "single_object":
        assert inc == [{"class": m[1], "count": 1}]
    elif r["tag"] == "two_object":
        assert inc == [{"class": m[1], "count": 1}, {"class": m[2], "count": 1}] and m[1] != m[2]
    elif r["tag"] == "counting":
        n = ["two", "three", "four"].index(m[1]) + 2
        assert inc == [{"class": m[2], "count": n}]
        assert r["exclude"] == [{"class": m[2], "count": n + 1}]
    elif r["tag"] == "colors":
        assert inc == [{"class": m[2], "count": 1, "color": m[1]}]
    elif r["tag"] == "position":
        # include order is [B, A + position(rel, 0)] for "a photo of a A rel a B"
        assert inc == [{"class": m[3], "count": 1}, {"class": m[1], "count": 1, "position": [m[2], 0]}]
    else:
        assert inc == [{"class": m[2], "count": 1, "color": m[1]}, {"class": m[4], "count": 1, "color": m[3]}]
        assert m[2] != m[4] and m[1] != m[3]
    if r["tag"] != "counting":
        assert "exclude" not in r


def test_geneval_prompts_format_and_determinism(tmp_path):
    a = generate_geneval_prompts(n_per_tag=100, seed=43)
    assert a == generate_geneval_prompts(n_per_tag=100, seed=43)
    assert a != generate_geneval_prompts(n_per_tag=100, seed=44)
    assert {r["tag"] for r in a} == set(TAGS)
    keys = [json.dumps(r, sort_keys=True) for r in a]
    assert len(keys) == len(set(keys))  # de-duplicated
    everything = {json.dumps(r, sort_keys=True) for r in enumerate_geneval_prompts()}
    assert set(keys) <= everything
    for r in enumerate_geneval_prompts():
        _check_record(r)
    # JSON lines round trip keeps the official shape (position as a JSON list)
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in a))
    assert [json.loads(line) for line in path.read_text().splitlines()] == a
    only_counting = generate_geneval_prompts(n_per_tag=20, seed=43, tags=["counting"])
    assert only_counting and all(r["tag"] == "counting" for r in only_counting)


def test_geneval_articles_and_plurals_follow_the_rules():
    world = WorldConfig(colors=("orange", "red"))
    prompts = {r["prompt"] for r in enumerate_geneval_prompts(world)}
    assert "a photo of an orange circle" in prompts
    assert "a photo of a red circle and an orange square" in prompts
    assert "a photo of three triangles" in prompts


# --------------------------------------------------------------------------------------------
# Scenes for prompts
# --------------------------------------------------------------------------------------------


def test_scenes_for_every_prompt_satisfy_it_under_the_detector():
    rng = np.random.default_rng(0)
    records = enumerate_geneval_prompts()
    for r in records:
        scene = scene_for_record(r, rng)
        assert satisfies_record(scene, r)
        image = render(scene)
        assert geneval_correct(r, DETECTOR(image)), (r["prompt"], scene)
        # the strict reading holds too: no object the prompt does not ask for
        assert len(scene.objects) == sum(c["count"] for c in r["include"])
    # with distractors, the verdict is unchanged and extra objects of unmentioned classes appear
    extra = 0
    for r in records[::4]:
        scene = scene_for_record(r, rng, distractor_prob=1.0)
        extra += len(scene.objects) - sum(c["count"] for c in r["include"])
        assert geneval_correct(r, DETECTOR(render(scene))), (r["prompt"], scene)
    assert extra > 0


def test_scene_for_record_is_deterministic():
    r = enumerate_geneval_prompts(tags=["position"])[0]
    a = scene_for_record(r, np.random.default_rng(5))
    assert a == scene_for_record(r, np.random.default_rng(5))


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------


def test_detector_matches_ground_truth_exactly():
    assert isinstance(DETECTOR, Detector)
    for scene in _scenes(11, 50):
        dets = DETECTOR(render(scene))
        truth = scene_detections(scene)
        key = lambda d: d.box  # noqa: E731
        assert len(dets) == len(truth)
        for d, t in zip(sorted(dets, key=key), sorted(truth, key=key)):
            assert (d.label, d.color, d.box, d.score) == (t.label, t.color, t.box, 1.0)
            assert np.array_equal(d.mask, t.mask)
    scene = _scenes(12, 1)[0]
    only = DETECTOR(render(scene), ["circle"])
    assert all(d.label == "circle" for d in only) and len(only) == scene.count("circle")


@pytest.mark.parametrize("resolution,n", [(32, 300), (64, 100)])
def test_detector_accuracy_on_rendered_scenes(resolution, n):
    world = WorldConfig(resolution=resolution)
    scenes = _scenes(100 + resolution, n, world)
    found, exact = detection_rates(scenes, [render(s) for s in scenes], ShapesDetector(world))
    assert found >= 0.99 and exact >= 0.99, (found, exact)


def _noise(img, rng):
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def _drift(img, rng):  # a model's colors off by up to ~70 RGB units
    return np.clip(img.astype(int) + rng.integers(-40, 41, 3), 0, 255).astype(np.uint8)


def _flips(img, rng):  # 2% of pixels set to random colors
    out = img.copy()
    n = int(0.02 * img.shape[0] * img.shape[1])
    ys, xs = rng.integers(0, img.shape[0], n), rng.integers(0, img.shape[1], n)
    out[ys, xs] = rng.integers(0, 256, (n, 3))
    return out


def _blur(img, rng):
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(0.6)))


def _jpeg(img, rng):  # full-resolution chroma: 4:2:0 halves color resolution (see report)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=75, subsampling=0)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("perturb", [_noise, _drift, _flips, _blur, _jpeg])
def test_detector_is_robust_to_imperfect_images(perturb):
    rng = np.random.default_rng(21)
    scenes = _scenes(200, 200)
    images = [perturb(render(s), rng) for s in scenes]
    found, exact = detection_rates(scenes, images)
    assert found >= 0.99 and exact >= 0.98, (perturb.__name__, found, exact)


def test_detector_confidence_tracks_shape_quality():
    canvas = lambda: np.full((32, 32, 3), 128, np.uint8)  # noqa: E731
    bar = canvas()
    bar[5:11, 3:29] = PALETTE["red"]  # a stretched rectangle is no square
    assert all(d.score < 0.3 for d in DETECTOR(bar))
    flipped = canvas()
    flipped[4:16, 4:16][shape_mask("triangle", 12, 12)[::-1]] = PALETTE["yellow"]  # apex down
    assert all(d.score < 0.3 for d in DETECTOR(flipped))
    # ragged blobs may be detected (lenient threshold) but are never counted (0.9)
    speckle = canvas()
    speckle[4:18, 4:18][np.random.default_rng(0).random((14, 14)) < 0.6] = PALETTE["blue"]
    plus = canvas()
    plus[4:16, 9:13] = plus[8:12, 5:17] = PALETTE["green"]
    for blob in (speckle, plus):
        assert all(d.score < 0.6 for d in DETECTOR(blob))
    rounded = canvas()
    m = np.ones((12, 12), bool)
    m[0, 0] = m[0, -1] = m[-1, 0] = m[-1, -1] = False  # corners clipped by one pixel: still a square
    rounded[4:16, 4:16][m] = PALETTE["black"]
    (d,) = DETECTOR(rounded)
    assert d.label == "square" and d.color == "black" and d.score > 0.9
    tiny = canvas()
    tiny[3:5, 3:5] = PALETTE["green"]  # below min_area: noise
    assert DETECTOR(tiny) == []


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def test_captions_are_true_and_deterministic():
    prompts = {r["prompt"]: r for r in enumerate_geneval_prompts()}
    rng = np.random.default_rng(1)
    for scene in _scenes(31, 100):
        desc = describe_scene(scene)
        assert desc.startswith("a photo of ") and all(f"{o.color} {o.shape}" in desc for o in scene.objects)
        statements = true_statements(scene)
        for tag, texts in statements.items():
            for text in texts:
                if tag in ("single_object", "two_object", "counting", "position"):
                    assert satisfies_record(scene, prompts[text]), text  # exact counts, GenEval relations
                else:  # each named (color, shape) occurs exactly once
                    for clause in prompts.get(text, {"include": []})["include"]:
                        assert scene.count(clause["class"], clause["color"]) == 1, text
        assert sample_caption(scene, np.random.default_rng(2)) == sample_caption(scene, np.random.default_rng(2))
        sample_caption(scene, rng)


# --------------------------------------------------------------------------------------------
# POPE-style questions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_pope_questions_balanced_and_true(split):
    scenes = _scenes(41, 100)
    qs = pope_questions(scenes, split, seed=0)
    assert qs == pope_questions(scenes, split, seed=0)
    assert [q["question_id"] for q in qs] == list(range(1, len(qs) + 1))
    assert all(set(q) == {"question_id", "image", "text", "label"} for q in qs)
    labels = Counter(q["label"] for q in qs)
    assert labels["yes"] == labels["no"] > 0
    by_name = {f"{i:05d}.png": s for i, s in enumerate(scenes)}
    for q in qs:
        m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", q["text"])
        assert m, q["text"]
        present = (m[1], m[2]) in scene_entities(by_name[q["image"]])
        assert present == (q["label"] == "yes")
    if split == "adversarial":  # hard negatives share the shape or the color of their positive
        pairs = list(zip(qs[::2], qs[1::2]))
        shares = [
            len(set(p["text"].split()[3:5]) & set(n["text"].split()[3:5])) > 0 for p, n in pairs
        ]
        assert np.mean(shares) > 0.9
