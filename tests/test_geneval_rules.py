"""GenEval rules (docs/evaluation.md) on hand-built detections, metadata I/O, aggregation, the prompt
generator and the official folder layout."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dualfw.eval.detection import Detection
from dualfw.eval.stats import bootstrap_interval
from dualfw.eval.geneval import (
    COCO_CLASSES,
    ImageResult,
    MetadataError,
    common_failures,
    evaluate_folder,
    export_geneval_folder,
    generate_prompts,
    keep_detections,
    make_plural,
    overall_confidence_interval,
    parse_metadata,
    read_geneval_folder,
    read_metadata,
    relative_position,
    score_image,
    summarize,
    with_article,
    write_metadata,
    write_results,
)



def det(label: str, box=(0, 0, 10, 10), score: float = 0.95, color: str | None = None) -> Detection:
    return Detection(label=label, box=tuple(float(v) for v in box), score=score, color=color)


def single(cls: str = "bench") -> dict:
    return {"tag": "single_object", "include": [{"class": cls, "count": 1}], "prompt": f"a photo of a {cls}"}


def counting(cls: str = "clock", n: int = 2) -> dict:
    return {
        "tag": "counting",
        "include": [{"class": cls, "count": n}],
        "exclude": [{"class": cls, "count": n + 1}],
        "prompt": f"a photo of {n} {cls}s",
    }


def position(a: str, rel: str, b: str, count_a: int = 1) -> dict:
    return {
        "tag": "position",
        "include": [{"class": b, "count": 1}, {"class": a, "count": count_a, "position": [rel, 0]}],
        "prompt": f"a photo of a {a} {rel} a {b}",
    }


# ---------------------------------------------------------------------------- thresholds


def test_confidence_exactly_threshold_is_excluded_and_just_above_is_kept():
    at = score_image(single(), [det("bench", score=0.3)])
    assert not at.correct and at.num_objects == 0
    assert "expected bench>=1, found 0" in at.reason
    above = score_image(single(), [det("bench", score=0.30001)])
    assert above.correct and above.reason == "" and above.num_objects == 1


def test_counting_uses_threshold_09_strictly():
    two_at_09 = [det("clock", score=0.9), det("clock", (20, 0, 30, 10), score=0.95)]
    res = score_image(counting(), two_at_09)
    assert not res.correct and res.kept == {"clock": 1}
    res = score_image(counting(), [det("clock", score=0.91), det("clock", (20, 0, 30, 10), score=0.95)])
    assert res.correct
    # The same 0.5-confidence objects count for a non-counting tag but not for counting.
    halves = [det("clock", score=0.5), det("clock", (20, 0, 30, 10), score=0.5)]
    assert keep_detections(halves, "two_object") and not keep_detections(halves, "counting")


def test_keep_at_most_16_per_class_sorted_by_confidence():
    scores = np.linspace(0.31, 0.99, 20)
    rng = np.random.default_rng(0)
    dets = [det("cup", score=float(s)) for s in rng.permutation(scores)] + [det("fork", score=0.2)]
    kept = keep_detections(dets, "single_object")
    assert set(kept) == {"cup"}  # fork below threshold: class absent
    got = [d.score for d in kept["cup"]]
    assert len(got) == 16 and got == sorted(scores, reverse=True)[:16]


# ---------------------------------------------------------------------------- include / exclude


def test_exclude_clause_fires_when_count_plus_one_objects_are_kept():
    three = [det("clock", (i * 20, 0, i * 20 + 10, 10), score=0.95) for i in range(3)]
    res = score_image(counting("clock", 2), three)
    assert res.clause_ok == [True] and not res.correct
    assert "expected clock<3, found 3" in res.reason
    # A third clock under the counting threshold does not fire the exclude clause.
    res = score_image(counting("clock", 2), three[:2] + [det("clock", (60, 0, 70, 10), score=0.85)])
    assert res.correct


def test_include_clauses_are_anded_and_each_reports():
    meta = {
        "tag": "two_object",
        "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
        "prompt": "a photo of a bench and a sports ball",
    }
    res = score_image(meta, [det("sports ball")])
    assert res.clause_ok == [False, True] and not res.correct
    assert score_image(meta, [det("sports ball"), det("bench", (30, 0, 40, 10))]).correct


# ---------------------------------------------------------------------------- colors


class RecordingClassifier:
    """Color by box x1 (hand-set table); records which detections it was asked about."""

    def __init__(self, table: dict[float, str]):
        self.table = table
        self.calls: list[Detection] = []

    def __call__(self, image, detection, colors):
        assert list(colors)[:2] == ["red", "orange"]
        self.calls.append(detection)
        return self.table[detection.box[0]]


def color_prompt(color: str, cls: str, count: int = 1) -> dict:
    return {"tag": "colors", "include": [{"class": cls, "count": count, "color": color}], "prompt": f"{color} {cls}"}


def test_color_counted_over_the_top_count_crops():
    # Scores order the apples A(0.99) > B(0.9) > C(0.8). Only the top 2 are classified.
    a, b, c = det("apple", (0, 0, 5, 5), 0.99), det("apple", (10, 0, 15, 5), 0.9), det("apple", (20, 0, 25, 5), 0.8)
    image = np.zeros((32, 32, 3), np.uint8)
    clf = RecordingClassifier({0.0: "red", 10.0: "green", 20.0: "red"})
    res = score_image(color_prompt("red", "apple", 2), [c, a, b], image, clf)
    assert not res.correct
    assert "expected red apple>=2, found 1 red; and 1 red, 1 green" in res.reason
    assert [d.box[0] for d in clf.calls] == [0.0, 10.0]  # C never reached the classifier
    clf = RecordingClassifier({0.0: "red", 10.0: "red", 20.0: "green"})
    assert score_image(color_prompt("red", "apple", 2), [c, a, b], image, clf).correct


def test_detection_color_skips_the_classifier_and_missing_classifier_errors():
    clf = RecordingClassifier({0.0: "blue"})
    known = det("car", color="pink")
    res = score_image(color_prompt("pink", "car"), [known], np.zeros((8, 8, 3), np.uint8), clf)
    assert res.correct and clf.calls == []
    res = score_image(color_prompt("pink", "car"), [det("car", color="blue")])
    assert not res.correct and "found 0 pink" in res.reason
    with pytest.raises(ValueError, match="color_classifier"):
        score_image(color_prompt("pink", "car"), [det("car")])


# ---------------------------------------------------------------------------- positions


def test_relation_basic_directions_with_y_down():
    b = (0, 0, 10, 10)
    assert relative_position((30, 0, 40, 10), b) == {"right of"}
    assert relative_position((-30, 0, -20, 10), b) == {"left of"}
    assert relative_position((0, -30, 10, -20), b) == {"above"}
    assert relative_position((0, 30, 10, 40), b) == {"below"}


def test_shrink_margin_cancels_a_small_offset_giving_no_relation():
    # Centers 1.5 px apart horizontally; margin 0.1 * (10 + 10) = 2 px swallows it.
    assert relative_position((1.5, 0, 11.5, 10), (0, 0, 10, 10)) == set()
    # With a 0 margin the same layout is "right of".
    assert relative_position((1.5, 0, 11.5, 10), (0, 0, 10, 10), margin=0.0) == {"right of"}
    # A 5 px offset: shrunk by 2 px (two 10 px boxes) it keeps 3/5 = 0.6 > 0.5 of its length ...
    assert relative_position((5, 0, 15, 10), (0, 0, 10, 10)) == {"right of"}
    # ... but shrunk by 4 px (a 10 px and a 30 px box) only 1/5: the margin uses both sizes.
    assert relative_position((5, 0, 15, 10), (-10, 0, 20, 10)) == set()


def test_normalisation_by_the_original_offset():
    # Offset (6, 6), 10x10 boxes: revised (4, 4). Divided by |original| = 8.49 -> (0.47, 0.47):
    # no relation holds although revised is not ~0. (Dividing by |revised| would give 0.71 each.)
    assert relative_position((6, 6, 16, 16), (0, 0, 10, 10)) == set()


def test_several_relations_can_hold():
    assert relative_position((20, 20, 30, 30), (0, 0, 10, 10)) == {"right of", "below"}
    assert relative_position((-20, -20, -10, -10), (0, 0, 10, 10)) == {"left of", "above"}


def test_position_prompt_pass_fail_and_no_relation_reason():
    meta = position("dog", "right of", "teddy bear")
    bear = det("teddy bear", (0, 0, 10, 10))
    assert score_image(meta, [bear, det("dog", (30, 0, 40, 10))]).correct
    res = score_image(meta, [bear, det("dog", (1, 0, 11, 10))])
    assert not res.correct and res.clause_ok == [True, False]
    assert "expected dog right of target, found no relation to target" in res.reason
    diag = score_image(position("dog", "below", "teddy bear"), [bear, det("dog", (20, 20, 30, 30))])
    assert diag.correct  # "below" holds together with "right of"


def test_position_clause_whose_target_clause_failed():
    res = score_image(position("dog", "right of", "teddy bear"), [det("dog", (30, 0, 40, 10))])
    assert res.clause_ok == [False, False]
    assert res.reason.splitlines() == ["expected teddy bear>=1, found 0", "no target for dog to be right of"]


def test_every_found_object_must_hold_the_relation():
    meta = position("dog", "right of", "teddy bear", count_a=2)
    bear = det("teddy bear", (50, 0, 60, 10))
    both_right = [bear, det("dog", (80, 0, 90, 10), 0.9), det("dog", (100, 0, 110, 10), 0.8)]
    assert score_image(meta, both_right).correct
    one_left = [bear, det("dog", (80, 0, 90, 10), 0.9), det("dog", (0, 0, 10, 10), 0.8)]
    assert not score_image(meta, one_left).correct


def test_color_failure_skips_the_position_check():
    meta = {
        "tag": "position",
        "include": [
            {"class": "bench", "count": 1},
            {"class": "dog", "count": 1, "color": "red", "position": ["right of", 0]},
        ],
        "prompt": "x",
    }
    res = score_image(meta, [det("bench"), det("dog", (1, 0, 11, 10), color="blue")])
    assert len(res.reason.splitlines()) == 1 and "red dog" in res.reason


# ---------------------------------------------------------------------------- strict judge


def test_strict_judge_fails_extra_classes_and_extra_instances():
    meta = {
        "tag": "two_object",
        "include": [{"class": "bench", "count": 1}, {"class": "cat", "count": 1}],
        "prompt": "a photo of a bench and a cat",
    }
    base = [det("bench"), det("cat", (20, 0, 30, 10))]
    extra_dog = base + [det("dog", (40, 0, 50, 10), score=0.5)]
    assert score_image(meta, extra_dog).correct
    res = score_image(meta, extra_dog, strict=True)
    assert not res.correct and "strict: unexpected dog x1" in res.reason
    # A dog below the 0.3 threshold is not kept, so the strict judge ignores it.
    assert score_image(meta, base + [det("dog", score=0.25)], strict=True).correct
    two_benches = base + [det("bench", (60, 0, 70, 10))]
    assert score_image(meta, two_benches).correct
    assert "expected bench<=1, found 2" in score_image(meta, two_benches, strict=True).reason


# ---------------------------------------------------------------------------- aggregation


def result(tag: str, correct: bool, key: str, n_obj: int = 1) -> ImageResult:
    return ImageResult(tag, key, correct, "" if correct else "x", [correct], n_obj, {}, key=key)


def test_summary_overall_is_mean_of_tag_accuracies_not_of_images():
    rows = (
        [result("single_object", True, "s1")] * 4  # 4/4
        + [result("counting", True, "c1"), result("counting", False, "c1")]  # c1: 1/2
        + [result("counting", False, "c2")] * 2  # c2: 0/2 -> counting 1/4
        + [result("colors", False, "k1", n_obj=3)] * 2  # 0/2
    )
    s = summarize(rows)
    assert list(s.per_tag) == ["single_object", "counting", "colors"]
    assert s.per_tag == {"single_object": 1.0, "counting": 0.25, "colors": 0.0}
    assert s.overall == pytest.approx(1.25 / 3)
    assert s.image_accuracy == pytest.approx(5 / 10)
    assert s.num_prompts == 4 and s.prompt_accuracy == pytest.approx(2 / 4)  # s1, c1
    assert s.mean_objects == pytest.approx((8 + 6) / 10)
    assert s.per_tag_counts["counting"] == (1, 4)


def test_common_failures_count_each_reason_line_once_per_image_by_tag():
    def failed(tag, reason):
        return ImageResult(tag, "p", not reason, reason, [not reason], 1, {})

    rows = (
        [failed("two_object", "expected circle>=1, found 0")] * 3
        + [failed("two_object", "expected square>=1, found 0\nexpected circle>=1, found 0")]
        + [failed("two_object", "strict: unexpected triangle x1\nstrict: unexpected triangle x1")]  # once
        + [failed("two_object", "")] * 4  # correct: no reason
        + [failed("colors", "expected blue circle, found red")] * 2
    )
    out = common_failures(rows, most=2)
    assert list(out) == ["two_object", "colors"]  # TAGS order
    assert out["two_object"] == [("expected circle>=1, found 0", 4), ("expected square>=1, found 0", 1)]
    assert common_failures(rows)["two_object"][2] == ("strict: unexpected triangle x1", 1)
    assert out["colors"] == [("expected blue circle, found red", 2)]


def test_confidence_interval_brackets_the_score_and_narrows_with_more_prompts():
    rows = []
    for i in range(10):
        rows += [result("single_object", i % 2 == 0, f"s{i}")] * 2 + [result("colors", i % 5 == 0, f"k{i}")] * 2
    overall = summarize(rows).overall
    lo, hi = overall_confidence_interval(rows, n_boot=500)
    assert lo < overall < hi
    more = [result(r.tag, r.correct, r.key + f"_{k}") for k in range(4) for r in rows]
    lo4, hi4 = overall_confidence_interval(more, n_boot=500)
    assert (hi4 - lo4) < (hi - lo)
    assert overall_confidence_interval([result("colors", True, "a"), result("colors", True, "b")]) == (1.0, 1.0)


def test_bootstrap_interval_matches_the_normal_width_and_checks_its_inputs():
    rng = np.random.default_rng(4)
    outcomes = (rng.random(600) < 0.3).astype(float)
    units = np.stack([outcomes, np.ones_like(outcomes)], axis=1)  # (correct, trials) per unit

    def accuracy(sums):
        return sums[:, 0] / sums[:, 1]

    p, sd = outcomes.mean(), np.sqrt(outcomes.mean() * (1 - outcomes.mean()) / 600)
    lo, hi = bootstrap_interval(units, accuracy, n_boot=4000)
    assert lo < p < hi and (hi - lo) / 2 == pytest.approx(1.96 * sd, rel=0.1)
    # one trial per unit: resampling the pooled trials is the same distribution
    plo, phi = bootstrap_interval(units, accuracy, n_boot=4000, pooled=True)
    assert (plo, phi) == pytest.approx((lo, hi), abs=0.01)
    # level: a 50% interval is the middle half of a normal's, about 0.674 sd each side
    mlo, mhi = bootstrap_interval(units, accuracy, level=0.5, n_boot=4000)
    assert (mhi - mlo) / 2 == pytest.approx(0.674 * sd, rel=0.15)
    # strata resample on their own: a stratum always right adds no spread to a mean over strata
    always = np.ones((50, 2))
    slo, shi = bootstrap_interval([units, always], lambda a, b: (accuracy(a) + accuracy(b)) / 2, n_boot=4000)
    assert (slo, shi) == pytest.approx(((lo + 1) / 2, (hi + 1) / 2), abs=0.005)
    # several statistics at once give one interval each; the seed fixes the draws
    both = bootstrap_interval(units, lambda sums: np.stack([accuracy(sums), 1 - accuracy(sums)]), n_boot=4000)
    assert both[0] == (lo, hi) and both[1] == pytest.approx((1 - hi, 1 - lo))
    assert bootstrap_interval(units, accuracy, n_boot=4000) == (lo, hi)
    assert bootstrap_interval(units, accuracy, n_boot=20, seed=1) != bootstrap_interval(units, accuracy, n_boot=20)
    with pytest.raises(ValueError, match="successes, trials"):
        bootstrap_interval(np.ones((5, 3)), accuracy, pooled=True)


# ---------------------------------------------------------------------------- metadata files


def test_malformed_line_error_names_file_and_line(tmp_path):
    f = tmp_path / "meta.jsonl"
    f.write_text(json.dumps(single()) + "\n\n" + '{"tag": "single_object", "include": [\n')
    with pytest.raises(MetadataError, match=r"meta\.jsonl:3: malformed JSON"):
        read_metadata(f)


@pytest.mark.parametrize(
    "obj, message",
    [
        ({**single(), "tag": "size"}, "unknown tag 'size'"),
        ({k: v for k, v in single().items() if k != "include"}, "missing key 'include'"),
        ({k: v for k, v in single().items() if k != "prompt"}, "missing key 'prompt'"),
        ({k: v for k, v in single().items() if k != "tag"}, "missing key 'tag'"),
        ({**single(), "include": [{"class": "cat", "count": 0}]}, "count"),
        ({**single(), "include": [{"class": "cat", "count": 1, "color": "teal"}]}, "unknown color 'teal'"),
        ({**position("dog", "behind", "cat")}, "invalid 'position'"),
    ],
)
def test_invalid_metadata_lines(tmp_path, obj, message):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps(single()) + "\n" + json.dumps(obj) + "\n")
    with pytest.raises(MetadataError) as info:
        read_metadata(f)
    assert "m.jsonl:2: " in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_position_must_point_to_an_earlier_clause():
    bad = {"tag": "position", "include": [{"class": "a", "count": 1, "position": ["above", 0]}], "prompt": "x"}
    with pytest.raises(ValueError, match="0 <= j < 0"):
        parse_metadata(bad)


def test_official_metadata_reads_553_prompts_with_tag_counts(shared_data):
    prompts = read_metadata(shared_data / "geneval" / "evaluation_metadata.jsonl")
    assert len(prompts) == 553
    assert Counter(p.tag for p in prompts) == {
        "single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100,
    }
    pos = next(p for p in prompts if p.tag == "position")
    assert pos.include[1].position == ("right of", 0) and pos.prompt == "a photo of a dog right of a teddy bear"
    assert all(p.exclude[0].count == p.include[0].count + 1 for p in prompts if p.tag == "counting")


def test_write_then_read_round_trip(tmp_path):
    meta = [single("cow"), counting("clock", 3), position("dog", "above", "kite")]
    write_metadata([parse_metadata(m) for m in meta], tmp_path / "out.jsonl")
    back = read_metadata(tmp_path / "out.jsonl")
    assert [p.to_dict() for p in back] == meta


# ---------------------------------------------------------------------------- generator


def test_generator_with_coco_and_seed_43_reproduces_the_official_suite(shared_data):
    lines = (shared_data / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
    generated = generate_prompts(COCO_CLASSES, seed=43)
    assert [json.dumps(g) for g in generated] == lines


def test_embedded_coco_names_match_official_object_names(shared_data):
    names = [n.strip() for n in (shared_data / "geneval" / "object_names.txt").read_text().splitlines() if n.strip()]
    assert list(COCO_CLASSES) == names


def test_generator_facts_on_a_custom_class_list(tmp_path):
    classes = ["person", "bus", "apple", "glass", "owl"]
    prompts = generate_prompts(classes, n_per_tag=40, seed=1)
    keys = [json.dumps(p, sort_keys=True) for p in prompts]
    assert len(keys) == len(set(keys)) and len(prompts) < 5 + 5 * 40  # duplicates were removed
    tags = Counter(p["tag"] for p in prompts)
    assert tags["single_object"] == 5
    for p in prompts:
        parse_metadata(p)  # valid GenEval metadata
        if p["tag"] in ("colors", "color_attr"):
            assert all(c["class"] != "person" for c in p["include"])
        if p["tag"] == "counting":
            n = p["include"][0]["count"]
            assert 2 <= n <= 4 and p["exclude"] == [{"class": p["include"][0]["class"], "count": n + 1}]
            word = ["two", "three", "four"][n - 2]
            assert p["prompt"] == f"a photo of {word} {make_plural(p['include'][0]['class'])}"
        if p["tag"] == "position":
            b, a = p["include"]
            assert a["position"][1] == 0 and p["prompt"] == (
                f"a photo of {with_article(a['class'])} {a['position'][0]} {with_article(b['class'])}"
            )
    assert "a photo of an apple" in {p["prompt"] for p in prompts}
    assert make_plural("bus") == "buses" and make_plural("glass") == "glasses" and make_plural("owl") == "owls"
    assert with_article("orange") == "an orange" and with_article("red") == "a red"
    assert generate_prompts(classes, n_per_tag=40, seed=1) == prompts
    assert generate_prompts(classes, n_per_tag=40, seed=2) != prompts


# ---------------------------------------------------------------------------- folder layout


def test_export_official_folder_layout(tmp_path):
    meta = [single("cow"), counting("clock", 2)]
    images = [[np.full((8, 8, 3), k, np.uint8) for k in range(2)], [np.zeros((8, 8, 3), np.uint8)]]
    export_geneval_folder(tmp_path, meta, images)
    assert (tmp_path / "00000" / "samples" / "0000.png").is_file()
    assert (tmp_path / "00000" / "samples" / "0001.png").is_file()
    assert not (tmp_path / "00001" / "samples" / "0001.png").exists()
    # The official evaluator reads each folder's metadata.jsonl with json.load.
    with open(tmp_path / "00001" / "metadata.jsonl") as fp:
        assert json.load(fp) == meta[1]
    back = read_geneval_folder(tmp_path)
    assert [p.to_dict() for p, _ in back] == meta and [len(s) for _, s in back] == [2, 1]
    from PIL import Image

    assert np.asarray(Image.open(back[0][1][1]))[0, 0, 0] == 1


def test_evaluate_folder_runs_detector_on_every_sample(tmp_path):
    class BrightnessDetector:
        """Finds one cow in a bright image, nothing in a dark one; records the classes asked for."""

        def __init__(self):
            self.asked: list[tuple[str, ...]] = []

        def __call__(self, image, classes):
            self.asked.append(tuple(classes))
            return [det("cow", score=0.8)] if image.mean() > 100 else []

    bright, dark = np.full((8, 8, 3), 200, np.uint8), np.zeros((8, 8, 3), np.uint8)
    export_geneval_folder(tmp_path / "gen", [single("cow"), single("bench")], [[bright, dark], [bright]])
    detector = BrightnessDetector()
    results = evaluate_folder(tmp_path / "gen", detector, classes=("cow", "bench"))
    assert [r.correct for r in results] == [True, False, False]
    assert results[2].reason == "expected bench>=1, found 0"
    assert detector.asked == [("cow", "bench")] * 3
    assert results[1].filename.endswith("00000/samples/0001.png")
    summary = summarize(results)
    assert summary.prompt_accuracy == 0.5 and summary.image_accuracy == pytest.approx(1 / 3)
    write_results(results, tmp_path / "results.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False]
    assert json.loads(rows[0]["metadata"])["tag"] == "single_object"
