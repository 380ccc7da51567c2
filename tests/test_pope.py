"""POPE: official answer parsing and its quirks, the strict parser, metrics against hand-computed
confusion counts, files (official ones when present) and the question builder."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from dualfw.eval.pope import (
    PopeFormatError,
    PopeQuestion,
    build_pope_questions,
    evaluate_answers,
    evaluate_splits,
    parse_answer_official,
    parse_answer_strict,
    pope_metrics,
    question_text,
    read_answers,
    read_questions,
    score_answers,
    write_answers,
    write_questions,
)
from dualfw.eval.runners import answer_pope, image_counts, score_pope



# ---------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No.", "no"),
        ("no, there is not", "no"),
        ("Not sure", "yes"),  # "Not" is not one of the official negative words
        ("Yes, there is no dog", "no"),  # "no" anywhere in the first sentence wins
        ("", "yes"),
        ("NO", "yes"),  # case-sensitive
        ("Yes. There is no dog.", "yes"),  # only the first sentence counts
        ("There is not.", "no"),
        ("no", "no"),
        ("No,", "no"),  # commas are deleted before splitting
        ("Nope", "yes"),
        ("No\tdog", "yes"),  # split on single spaces only
    ],
)
def test_official_parser_and_its_quirks(text, expected):
    assert parse_answer_official(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("No.", "no"),
        ("no, there is not", "no"),
        ("Not sure", "unknown"),
        ("Yes, there is no dog", "yes"),
        ("", "unknown"),
        ("NO", "no"),
        ("There isn't a dog.", "no"),
        ("There is a dog in the image.", "yes"),
        ("maybe", "unknown"),
    ],
)
def test_strict_parser(text, expected):
    assert parse_answer_strict(text) == expected


# ---------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_confusion():
    # TP=3, FN=4, FP=1, TN=2 (N=10).
    labels = ["yes"] * 7 + ["no"] * 3
    preds = ["yes", "yes", "yes", "no", "no", "no", "no", "yes", "no", "no"]
    m = pope_metrics(preds, labels)
    assert (m.tp, m.fn, m.fp, m.tn) == (3, 4, 1, 2)
    assert m.accuracy == pytest.approx(0.5)
    assert m.precision == pytest.approx(0.75)
    assert m.recall == pytest.approx(3 / 7)
    assert m.f1 == pytest.approx(2 * 0.75 * (3 / 7) / (0.75 + 3 / 7))
    assert m.yes_ratio == pytest.approx(0.4)


def test_metrics_without_predicted_yes_do_not_divide_by_zero():
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert (m.precision, m.recall, m.f1, m.accuracy, m.yes_ratio) == (0.0, 0.0, 0.0, 0.5, 0.0)


def test_unknown_predictions_are_wrong_but_not_yes():
    m = pope_metrics(["unknown", "unknown", "yes", "no"], ["yes", "no", "yes", "no"])
    assert m.accuracy == pytest.approx(0.5)
    assert m.precision == pytest.approx(1.0)
    assert m.recall == pytest.approx(0.5)  # the unknown on a "yes" is a miss
    assert m.yes_ratio == pytest.approx(0.25)
    assert m.as_dict()["unknown"] == 2
    with pytest.raises(ValueError, match="prediction"):
        pope_metrics(["maybe"], ["yes"])


# ---------------------------------------------------------------------------- files


def questions(n_pairs: int = 3) -> list[PopeQuestion]:
    out = []
    for i in range(n_pairs):
        out.append(PopeQuestion(2 * i + 1, f"img{i}.jpg", question_text("dog"), "yes"))
        out.append(PopeQuestion(2 * i + 2, f"img{i}.jpg", question_text("apple"), "no"))
    return out


def test_image_counts_and_score_pope_against_hand_counts():
    qs = [
        PopeQuestion(1, "b.png", "Is there a cat in the image?", "yes"),
        PopeQuestion(2, "a.png", "Is there a cat in the image?", "no"),
        PopeQuestion(3, "b.png", "Is there a dog in the image?", "no"),
        PopeQuestion(4, "a.png", "Is there a dog in the image?", "yes"),
    ]
    answers = ["Yes, there is.", "Yes.", "No", "no, none"]
    predictions = ["yes", "yes", "no", "no"]
    # rows in order of first appearance: b (tp, tn), a (fp, fn)
    assert image_counts(qs, predictions).tolist() == [[1, 0, 2, 1, 2], [0, 1, 0, 1, 2]]
    assert image_counts(qs, predictions, images=["a.png", "c.png", "b.png"]).tolist() == [
        [0, 1, 0, 1, 2], [0, 0, 0, 0, 0], [1, 0, 2, 1, 2]]
    with pytest.raises(ValueError, match="'b.png', which is not among"):
        image_counts(qs, predictions, images=["a.png"])
    scores = score_pope({"x": qs, "y": qs[:2]}, {"x": answers, "y": answers[:2]})
    x = scores.splits["x"]
    assert x.predictions == predictions and x.metrics == pope_metrics(predictions, [q.label for q in qs])
    assert (x.metrics.accuracy, x.metrics.f1) == (0.5, 0.5)
    # two images: a replicate draws (b, b), (a, a) or one of each, so accuracy is 1, 0 or 1/2
    assert x.accuracy_ci95 == (0.0, 1.0) and x.f1_ci95 == (0.0, 1.0)
    assert scores.mean_accuracy == pytest.approx((0.5 + 0.5) / 2) and scores.mean_f1 == pytest.approx((0.5 + 2 / 3) / 2)
    assert scores.mean_accuracy_ci95 is not None  # both splits ask about a and b
    only_b = score_pope({"x": qs, "y": [qs[0]]}, {"x": answers, "y": answers[:1]})
    assert only_b.mean_accuracy_ci95 is None  # y asks about b only: no joint resampling
    assert score_pope({"x": qs}, {"x": ["unsure"] * 4}, parser="strict").splits["x"].metrics.accuracy == 0.0
    with pytest.raises(ValueError, match="4 questions but 3 answers"):
        score_pope({"x": qs}, {"x": answers[:3]})


def test_answer_pope_asks_each_text_once_per_batch_in_question_order():
    import torch

    class Model:
        device = torch.device("cpu")

        def __init__(self):
            self.calls = []

        def sample_texts(self, pixels, k, instruction, sampling):
            self.calls.append((instruction, pixels[:, 0, 0, 0].tolist(), sampling.temperature, sampling.max_new_tokens))
            return [[f"{instruction} {int(v)}"] for v in pixels[:, 0, 0, 0].tolist()]

    images = {name: torch.full((3, 2, 2), float(i)) for i, name in enumerate(["a", "b", "c"])}
    qs = [PopeQuestion(i + 1, name, text, "yes") for i, (name, text) in enumerate(
        [("a", "cat?"), ("b", "dog?"), ("b", "cat?"), ("c", "cat?"), ("a", "dog?")])]
    model = Model()
    out = answer_pope(model, qs, images.__getitem__, instruction="Q: {question}", max_new_tokens=3, batch_size=2)
    assert out == ["Q: cat? 0", "Q: dog? 1", "Q: cat? 1", "Q: cat? 2", "Q: dog? 0"]
    assert model.calls == [("Q: cat?", [0, 1], 0.0, 3), ("Q: cat?", [2], 0.0, 3), ("Q: dog?", [1, 0], 0.0, 3)]


def test_write_and_score_answer_file(tmp_path):
    qs = questions()
    write_questions(qs, tmp_path / "q.json")
    assert read_questions(tmp_path / "q.json") == qs
    raw = ["Yes", "No.", "Yes, there is a dog", "Yes", "NO", "no"]
    write_answers(qs, raw, tmp_path / "a.json")
    first = json.loads((tmp_path / "a.json").read_text().splitlines()[0])
    assert first == {"question": "Is there a dog in the image?", "answer": "Yes"}
    assert read_answers(tmp_path / "a.json") == raw
    m = evaluate_answers(tmp_path / "q.json", tmp_path / "a.json")
    # Official predictions yes no yes yes yes no ("NO" parses as yes) vs labels yes no yes no yes no.
    assert (m.tp, m.fp, m.tn, m.fn) == (3, 1, 2, 0)
    # Strict: "NO" is no, so the fifth answer becomes a miss.
    strict = evaluate_answers(tmp_path / "q.json", tmp_path / "a.json", parser=parse_answer_strict)
    assert (strict.tp, strict.fp, strict.tn, strict.fn) == (2, 1, 2, 1)


def test_answer_file_shorter_than_question_file(tmp_path):
    qs = questions()
    write_questions(qs, tmp_path / "q.json")
    write_answers(qs[:4], ["yes"] * 4, tmp_path / "a.json")
    with pytest.raises(PopeFormatError, match=r"has 4 answers but there are 6 questions.*shorter"):
        evaluate_answers(tmp_path / "q.json", tmp_path / "a.json")
    with pytest.raises(PopeFormatError, match="only 6 questions"):
        score_answers(qs, ["yes"] * 7)


def test_malformed_question_lines_name_the_line(tmp_path):
    f = tmp_path / "q.json"
    good = json.dumps(questions()[0].to_dict())
    f.write_text(good + "\n" + good[:-3] + "\n")
    with pytest.raises(PopeFormatError, match=r"q\.json:2: malformed JSON"):
        read_questions(f)
    f.write_text(good + "\n" + json.dumps({**questions()[0].to_dict(), "label": "Yes"}) + "\n")
    with pytest.raises(PopeFormatError, match=r"q\.json:2: label must be"):
        read_questions(f)
    f.write_text(json.dumps({"question_id": 1, "image": "x"}) + "\n")
    with pytest.raises(PopeFormatError, match=r"q\.json:1: missing key\(s\) 'text', 'label'"):
        read_questions(f)


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_official_question_files(split, shared_data):
    qs = read_questions(shared_data / "pope" / f"coco_pope_{split}.json")
    assert len(qs) == 3000
    assert Counter(q.label for q in qs) == {"yes": 1500, "no": 1500}
    assert len({q.image for q in qs}) == 500
    assert [q.question_id for q in qs] == list(range(1, 3001))
    assert all(q.text.startswith("Is there a") and q.text.endswith(" in the image?") for q in qs)


def test_official_example_answers_and_splits(shared_data):
    answers = read_answers(shared_data / "pope" / "example_answers.json")
    assert answers == ["yes"]
    with pytest.raises(PopeFormatError, match="shorter"):
        evaluate_answers(shared_data / "pope" / "coco_pope_random.json", shared_data / "pope" / "example_answers.json")


def test_official_splits_with_generated_answers(tmp_path, shared_data):
    files = {s: shared_data / "pope" / f"coco_pope_{s}.json" for s in ("random", "popular", "adversarial")}
    answer_files = {}
    for split, path in files.items():
        qs = read_questions(path)
        # An always-"Yes" model on the first 2000 questions, then always "No, ...".
        raw = ["Yes, there is." if i < 2000 else "No, there is not." for i in range(len(qs))]
        write_answers(qs, raw, tmp_path / f"{split}.json")
        answer_files[split] = tmp_path / f"{split}.json"
    results = evaluate_splits(files, answer_files)
    for split, m in results.items():
        qs = read_questions(files[split])
        yes_first = sum(q.label == "yes" for q in qs[:2000])
        assert m.tp == yes_first and m.fp == 2000 - yes_first
        assert m.yes_ratio == pytest.approx(2000 / 3000)
    with pytest.raises(KeyError, match="adversarial"):
        evaluate_splits(files, {k: v for k, v in answer_files.items() if k != "adversarial"})


# ---------------------------------------------------------------------------- builder


ANNOTATIONS = {
    "a.jpg": ["dog", "dog", "person", "frisbee", "car"],
    "b.jpg": ["person", "car", "bus", "traffic light"],
    "c.jpg": ["apple", "banana", "knife", "person"],
    "d.jpg": ["cat", "couch", "tv", "remote", "person"],
    "e.jpg": ["person", "car", "umbrella"],
    "f.jpg": ["bird", "tree"],  # too few distinct objects to be eligible
    "g.jpg": ["car", "truck", "bus", "person"],
}


def test_builder_half_yes_three_positives_and_valid_answers():
    for split in ("random", "popular", "adversarial"):
        qs = build_pope_questions(ANNOTATIONS, split, num_images=5, seed=3)
        assert len(qs) == 5 * 6 and [q.question_id for q in qs] == list(range(1, 31))
        assert [q.label for q in qs[:6]] == ["yes", "no"] * 3
        per_image = Counter(q.image for q in qs)
        assert set(per_image.values()) == {6} and "f.jpg" not in per_image
        for q in qs:
            match = re.fullmatch(r"Is there an? (.+) in the image\?", q.text)
            assert match and q.text == question_text(match.group(1))
            assert (match.group(1) in ANNOTATIONS[q.image]) == (q.label == "yes"), (split, q)
        # Positives of one image are distinct objects, as are its negatives.
        for img in per_image:
            yes = [q.text for q in qs if q.image == img and q.label == "yes"]
            no = [q.text for q in qs if q.image == img and q.label == "no"]
            assert len(set(yes)) == 3 and len(set(no)) == 3


def test_builder_negative_strategies():
    ann = {
        "x.jpg": ["car", "bus", "truck"],
        "y.jpg": ["car", "person", "bus", "traffic light"],
        "z.jpg": ["person", "dog", "frisbee"],
        "w.jpg": ["person", "dog", "frisbee", "car"],
    }
    # popular: absent objects ranked by number of images containing them (ties by name).
    pop = build_pope_questions(ann, "popular", num_images=None, seed=0)
    neg_z = {q.text for q in pop if q.image == "z.jpg" and q.label == "no"}
    # z lacks car (3 images), bus (2), then truck/traffic light (1 each, "traffic light" < "truck").
    assert neg_z == {question_text("car"), question_text("bus"), question_text("traffic light")}
    # adversarial: absent objects co-occurring most with the present ones.
    adv = build_pope_questions(ann, "adversarial", num_images=None, seed=0)
    neg_x = [q.text for q in adv if q.image == "x.jpg" and q.label == "no"]
    # For x (car, bus, truck): person co-occurs with car 2x and bus 1x -> 3; traffic light 2; dog 1; frisbee 1.
    assert neg_x[:2] == [question_text("person"), question_text("traffic light")]


def test_builder_is_seeded_and_checks_inputs():
    a = build_pope_questions(ANNOTATIONS, "random", num_images=4, seed=7)
    assert a == build_pope_questions(ANNOTATIONS, "random", num_images=4, seed=7)
    assert any(a != build_pope_questions(ANNOTATIONS, "random", num_images=4, seed=s) for s in range(8, 12))
    # Same seed: the same images and positives in every split.
    pos = [q for q in a if q.label == "yes"]
    assert pos == [q for q in build_pope_questions(ANNOTATIONS, "popular", num_images=4, seed=7) if q.label == "yes"]
    with pytest.raises(ValueError, match="only 6 have"):
        build_pope_questions(ANNOTATIONS, "random", num_images=7)
    with pytest.raises(ValueError, match="unknown POPE split"):
        build_pope_questions(ANNOTATIONS, "hard")
    assert question_text("apple") == "Is there an apple in the image?"
    assert question_text("dog") == "Is there a dog in the image?"
