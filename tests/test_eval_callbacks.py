"""GenEval / POPE callbacks during fit and at test time, `dualfw test`, reports and their errors."""

import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from dualfw.cli import cli_main, main
from dualfw.core.errors import ConfigError, MissingFileError
from dualfw.core.files import read_jsonl
from dualfw.core.interface import ImageSampling
from dualfw.eval.backends import OpenClipScore
from dualfw.eval.callbacks import GenEvalCallback, PopeCallback
from dualfw.eval.geneval import evaluate_folder, read_geneval_folder, read_metadata, summarize
from dualfw.eval.pope import evaluate_answers, read_questions
from dualfw.eval.runners import run_geneval, sample_batches
from dualfw.shapes import ShapesDetector, scene_for_record
from dualfw.shapes.pope_set import ShapesPopeSet, build_shapes_pope_set
from dualfw.shapes.text import generate_geneval_prompts
from dualfw.shapes.world import render

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf" / "t2i.yaml")
SHAPES_EVAL = ROOT / "conf" / "eval" / "shapes.yaml"
SHAPES_META = ROOT / "dualfw" / "assets" / "shapes_geneval.jsonl"
SHAPE_CLASSES = ["circle", "square", "triangle"]


def _small_shapes_eval(tmp_path: Path, geneval: dict, pope: dict | None, pope_shapes: dict | None = None) -> str:
    """conf/eval/shapes.yaml with smaller sizes (its lists cannot be edited from the command line)."""
    config = yaml.safe_load(SHAPES_EVAL.read_text())
    callbacks = config["trainer"]["callbacks+"]
    callbacks[0]["init_args"].update({"best_of": 1, **geneval})  # best-of-K has its own test
    if pope is None:
        del callbacks[1]
    else:
        callbacks[1]["init_args"].update(pope)
        callbacks[1]["init_args"]["source"]["init_args"].update(pope_shapes or {})
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _logger_args(tmp_path):
    return [
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=eval",
        "--trainer.logger.version=run",
    ]


def _rescored(folder: Path, strict: bool = False):
    return summarize(evaluate_folder(folder, ShapesDetector(), classes=SHAPE_CLASSES, strict=strict))


# --------------------------------------------------------------------------------------------------
# `dualfw test` on the tiny Janus
# --------------------------------------------------------------------------------------------------


def test_dualfw_test_writes_report_official_layout_and_answer_files(tmp_path, tiny_folder):
    overlay = _small_shapes_eval(
        tmp_path,
        {"max_prompts": 3, "images_per_prompt": 2},
        {"max_questions": 4},
        {"num_images": 3},
    )
    args = ["test", "--config", CONF, "--config", overlay, f"--model.init_args.model.init_args.path={tiny_folder}"]
    cli = cli_main(args + _logger_args(tmp_path))
    run = tmp_path / "eval" / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["command"].startswith("dualfw test --config ") and overlay in report["command"]
    assert report["model"] == "Policy(JanusAdapter)"

    # GenEval: 3 prompts, round-robin over tags, 2 images each, official layout
    g = report["geneval"]
    assert (g["num_prompts"], g["images_per_prompt"], g["num_images"]) == (3, 2, 6)
    assert list(g["per_tag"]) == ["single_object", "two_object", "counting"]
    for scores in (g["overall"], *g["per_tag"].values(), g["strict"]["overall"]):
        low, high = scores["ci95"]
        assert 0.0 <= low <= scores["score"] <= high <= 1.0
    folder = run / g["folder"]
    assert folder == run / "geneval" / "test"
    prompts = read_metadata(SHAPES_META)
    first_of_tag = {}
    for p in prompts:
        first_of_tag.setdefault(p.tag, p)
    for i, tag in enumerate(g["per_tag"]):
        assert json.loads((folder / f"{i:05d}" / "metadata.jsonl").read_text()) == first_of_tag[tag].to_dict()
        for j in range(2):
            with Image.open(folder / f"{i:05d}" / "samples" / f"{j:04d}.png") as im:
                assert im.size == (32, 32) and im.mode == "RGB"
    assert sorted(p.name for p in folder.iterdir()) == ["00000", "00001", "00002"]

    # the report's numbers are those of the official rule rerun on the exported PNGs
    again, strict = _rescored(folder), _rescored(folder, strict=True)
    assert g["overall"]["score"] == again.overall and g["strict"]["overall"]["score"] == strict.overall
    assert {t: s["score"] for t, s in g["per_tag"].items()} == again.per_tag
    assert (g["image_accuracy"], g["prompt_accuracy"], g["mean_objects"]) == (
        again.image_accuracy, again.prompt_accuracy, again.mean_objects)
    assert len((run / g["results"]).read_text().splitlines()) == 6
    # failures: each tag's reasons as counted from the per-image results file
    rows = [json.loads(line) for line in (run / g["results"]).read_text().splitlines()]
    for tag in g["per_tag"]:
        counted = Counter(line for r in rows if r["tag"] == tag for line in set(r["reason"].splitlines()))
        listed = g["failures"][tag]
        assert all(counted[reason] == n for reason, n in listed)
        assert [n for _, n in listed] == sorted(counted.values(), reverse=True)[:5]  # the most common, in order
    assert any(g["failures"].values())  # a tiny random model fails images

    # POPE: one answer line per question asked, scored as the answer file rescores
    assert list(report["pope"]["splits"]) == ["random", "popular", "adversarial"]
    for split, m in report["pope"]["splits"].items():
        questions = run / "pope" / "test" / f"{split}_questions.jsonl"
        answers = run / m["answer_file"]
        assert len(read_questions(questions)) == m["n"] == 4
        assert len(answers.read_text().splitlines()) == 4
        assert evaluate_answers(questions, answers).as_dict() == {k: m[k] for k in evaluate_answers(questions, answers).as_dict()}
        assert Path(m["question_file"]) == run / "pope_shapes" / f"shapes_pope_{split}.jsonl"

    md = (run / "report.md").read_text()
    assert "## GenEval" in md and "## POPE" in md and "| **overall** |" in md and report["command"] in md
    for tag, reasons in g["failures"].items():
        for reason, n in reasons:
            assert f"{reason} ({n})" in md
    assert (run / "images" / "geneval_test.png").is_file()
    logged = cli.trainer.callback_metrics
    for key in ("geneval/overall", "geneval/strict/overall", "geneval/mean_objects", "pope/random/f1", "pope/adversarial/yes_ratio"):
        assert key in logged, key


# --------------------------------------------------------------------------------------------------
# A stand-in model with known answers: the Shapes scene a prompt asks for, or POPE answers by looking
# --------------------------------------------------------------------------------------------------


class ShapesOracle(torch.nn.Module):
    """Draws exactly what a Shapes prompt says (or a blank image) and answers POPE questions by
    looking at the image with the exact detector (or always with `answer`)."""

    image_size = 32

    def __init__(self, draw: bool = True, answer: str | None = None) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.records = {r["prompt"]: r for r in read_jsonl(SHAPES_META)}
        self.prompts = list(self.records)
        self.draw, self.answer = draw, answer
        self.calls: list[tuple[bool, bool]] = []  # (training, grad enabled) at each generation call
        self.detector = ShapesDetector()

    @property
    def device(self):
        return self.anchor.device

    def sample_images(self, prompts, k, sampling=None, seed=None, progress=False):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return torch.tensor([[[self.prompts.index(p), j] for j in range(k)] for p in prompts])

    def decode_images(self, tokens):
        images = []
        for index, j in tokens.tolist():
            if self.draw:
                scene = scene_for_record(self.records[self.prompts[index]], np.random.default_rng([index, j]))
                images.append(render(scene))
            else:
                images.append(np.full((32, 32, 3), 128, dtype=np.uint8))
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255

    def sample_texts(self, pixels, k, instruction, sampling=None, seed=None):
        self.calls.append((self.training, torch.is_grad_enabled()))
        color, shape = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", instruction).groups()
        out = []
        for px in pixels:
            image = (px.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            present = any(d.label == shape and d.color == color for d in self.detector(image))
            out.append([self.answer or ("Yes, there is." if present else "No, there is not.")] * k)
        return out


class Holder(L.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.modes: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.modes.append(self.training)
        return (self.model.anchor * batch).sum() ** 2

    def test_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, callbacks, **kwargs):
    return L.Trainer(
        accelerator="cpu", logger=CSVLogger(tmp_path, name="r", version="v"), callbacks=callbacks,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        default_root_dir=tmp_path, **kwargs,
    )


@pytest.fixture(scope="module")
def pope_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pope_shapes")
    build_shapes_pope_set(folder, num_images=6, seed=3)
    return folder


def test_a_perfect_model_scores_one_and_a_blank_one_zero(tmp_path, pope_set):
    geneval = GenEvalCallback(metadata="dualfw:assets/shapes_geneval.jsonl", images_per_prompt=2, max_prompts=12, detector=ShapesDetector())
    pope = PopeCallback(source=ShapesPopeSet(folder=str(pope_set), num_images=6, seed=3))
    oracle = ShapesOracle()
    results = _trainer(tmp_path / "perfect", [geneval, pope]).test(Holder(oracle), dataloaders=[0], verbose=False)[0]
    run = tmp_path / "perfect" / "r" / "v"
    report = json.loads((run / "report.json").read_text())
    g = report["geneval"]
    # 12 prompts in round-robin tag order: two of each of the six tags; every drawn scene is correct
    assert list(g["per_tag"]) == ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    assert all(t["correct"] == t["total"] == 4 for t in g["per_tag"].values())
    assert g["overall"] == {"score": 1.0, "ci95": [1.0, 1.0]} and g["strict"]["overall"]["score"] == 1.0
    assert results["geneval/overall"] == 1.0 and results["geneval/color_attr"] == 1.0
    again = _rescored(run / "geneval" / "test")
    assert again.overall == 1.0 and again.num_images == 24 and g["mean_objects"] == again.mean_objects > 1.0
    for split, m in report["pope"]["splits"].items():
        questions = read_questions(pope_set / f"shapes_pope_{split}.jsonl")
        assert m["n"] == len(questions) and (m["accuracy"], m["f1"], m["yes_ratio"]) == (1.0, 1.0, 0.5)
        assert len((run / m["answer_file"]).read_text().splitlines()) == len(questions)
        assert results[f"pope/{split}/accuracy"] == 1.0
    assert report["pope"]["average"]["accuracy_ci95"] == [1.0, 1.0]

    blank = GenEvalCallback(metadata="dualfw:assets/shapes_geneval.jsonl", images_per_prompt=1, max_prompts=6, detector=ShapesDetector())
    yes = PopeCallback(source=ShapesPopeSet(folder=str(pope_set), num_images=6, seed=3), max_questions=10)
    results = _trainer(tmp_path / "blank", [blank, yes]).test(
        Holder(ShapesOracle(draw=False, answer="Yes")), dataloaders=[0], verbose=False
    )[0]
    report = json.loads((tmp_path / "blank" / "r" / "v" / "report.json").read_text())
    assert report["geneval"]["overall"]["score"] == 0.0 and report["geneval"]["mean_objects"] == 0.0
    for split in ("random", "popular", "adversarial"):
        m = report["pope"]["splits"][split]
        assert (m["n"], m["accuracy"], m["precision"], m["recall"], m["yes_ratio"]) == (10, 0.5, 0.5, 1.0, 1.0)
    assert results["pope/average/accuracy"] == 0.5


def test_callbacks_run_every_n_steps_during_fit_in_eval_mode_without_grad(tmp_path, pope_set):
    geneval = GenEvalCallback(
        metadata="dualfw:assets/shapes_geneval.jsonl", images_per_prompt=1, fit_max_prompts=2, every_n_steps=1,
        detector=ShapesDetector(),
    )
    pope = PopeCallback(
        source=ShapesPopeSet(folder=str(pope_set), num_images=6, seed=3), fit_max_questions=3, every_n_steps=2
    )
    oracle = ShapesOracle()
    holder = Holder(oracle)
    trainer = _trainer(tmp_path, [geneval, pope], max_steps=2, log_every_n_steps=1)
    trainer.fit(holder, train_dataloaders=torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=1))
    run = tmp_path / "r" / "v"
    assert oracle.calls and all(call == (False, False) for call in oracle.calls)  # eval mode, no grad
    assert holder.modes == [True, True]  # training mode restored after each evaluation
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    evaluated = {int(r["step"]): float(r["geneval/overall"]) for r in rows if r.get("geneval/overall")}
    assert evaluated == {1: 1.0, 2: 1.0}
    assert [int(r["step"]) for r in rows if r.get("pope/random/accuracy")] == [2]
    assert float(trainer.callback_metrics["geneval/overall"]) == 1.0
    for step in (1, 2):
        assert sorted(p.name for p in (run / "geneval" / f"step{step:06d}").iterdir()) == ["00000", "00001"]
        assert (run / "images" / f"geneval_step{step:06d}.png").is_file()
    assert len((run / "pope" / "step000002" / "popular_answers.jsonl").read_text().splitlines()) == 3
    assert not (run / "report.json").exists()  # reports are for test runs


# --------------------------------------------------------------------------------------------------
# The GenEval runner: best-of-K by a reward; CLIPScore and FID of the callback's images
# --------------------------------------------------------------------------------------------------


class HalfBlank(ShapesOracle):
    """Draws the prompt's scene for even samples and a blank image for odd ones."""

    def decode_images(self, tokens):
        images = super().decode_images(tokens)
        images[tokens[:, 1] % 2 == 1] = 128 / 255
        return images


class ParityScorer:
    """Rewards a sample by the parity of its index: even ones (drawn) or odd ones (blank)."""

    def __init__(self, prefer_even: bool) -> None:
        self.prefer_even = prefer_even

    def image_rewards(self, tokens, prompts):
        even = (tokens[:, 1] % 2 == 0).float()
        return even if self.prefer_even else 1 - even


def test_best_of_k_keeps_the_rewarded_sample_and_knows_the_oracle_and_auc():
    prompts = read_metadata(SHAPES_META)[:5]
    batches = sample_batches(prompts, k=2, prompts_per_batch=2, seed=0)
    assert [len(b.prompts) for b in batches] == [2, 2, 1] and len({b.seed for b in batches}) == 3
    for prefer_even, right in ((True, True), (False, False)):
        run = run_geneval(HalfBlank(), batches, ImageSampling(), ShapesDetector(), best_of=2, scorer=ParityScorer(prefer_even))
        assert [p.prompt for p in run.prompts] == [p.prompt for p in prompts]
        assert len(run.lenient) == len(run.strict) == 10 and all(r.correct is right for r in run.lenient)
        # the judged images are the rewarded ones: drawn scenes or plain grey
        assert all(images.shape == (2, 32, 32, 3) for images in run.images)
        assert all((images.reshape(2, -1) != 128).any(1).all() == right for images in run.images)
        # every slot had one drawn and one blank candidate
        assert run.candidates_correct("lenient").tolist() == [[True, False]] * 10
        assert all(r.correct for r in run.oracle("lenient"))
        assert run.reward_auc("lenient") == (1.0 if prefer_even else 0.0)
        assert run.reward_auc("strict", tag="single_object") == (1.0 if prefer_even else 0.0)
    with pytest.raises(ValueError, match="needs a scorer"):
        run_geneval(HalfBlank(), batches, ImageSampling(), ShapesDetector(), best_of=2)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random tiny open_clip model (no weights file, nothing downloaded)."""
    import open_clip

    config = tmp_path_factory.mktemp("clip") / "DualfwTinyEvalCLIP.json"
    config.write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("DualfwTinyEvalCLIP", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("DualfwTinyEvalCLIP")


def test_geneval_callback_reports_the_clip_score_of_its_images(tmp_path, tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    geneval = GenEvalCallback(
        metadata=str(SHAPES_META), images_per_prompt=2, max_prompts=3, detector=ShapesDetector(),
        clip_score=OpenClipScore.from_model(model, preprocess, tokenizer),
    )
    results = _trainer(tmp_path, [geneval]).test(Holder(ShapesOracle()), dataloaders=[0], verbose=False)[0]
    run = tmp_path / "r" / "v"
    report = json.loads((run / "report.json").read_text())
    # the same value by hand from the exported PNGs: 100 * max(cos(image, prompt), 0), averaged
    cosines = []
    with torch.no_grad():
        for prompt, files in read_geneval_folder(run / "geneval" / "test"):
            text = model.encode_text(tokenizer([prompt.prompt]))[0]
            for f in files:
                with Image.open(f) as im:
                    image = model.encode_image(preprocess(im.convert("RGB"))[None])[0]
                cosines.append(float(image @ text / (image.norm() * text.norm())))
    assert len(cosines) == 6 and min(cosines) < 0 < max(cosines)  # the clipping at 0 matters
    scores = [max(100 * c, 0.0) for c in cosines]
    assert report["geneval"]["clip_score"] == pytest.approx(np.mean(scores), rel=1e-5)
    assert results["geneval/clip_score"] == pytest.approx(np.mean(scores), rel=1e-5)
    assert "CLIPScore (mean over images)" in (run / "report.md").read_text()


class ChannelMeans(torch.nn.Module):
    """FID features: the mean of each color channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two Gaussians fitted to feature rows: |mu_a - mu_b|^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * root)


def test_geneval_callback_reports_fid_against_a_reference_folder(tmp_path):
    def evaluate(folder: Path, **kwargs) -> dict:
        geneval = GenEvalCallback(metadata=str(SHAPES_META), images_per_prompt=2, max_prompts=12, detector=ShapesDetector(), **kwargs)
        _trainer(folder, [geneval]).test(Holder(ShapesOracle()), dataloaders=[0], verbose=False)
        return json.loads((folder / "r" / "v" / "report.json").read_text())["geneval"]

    exported = tmp_path / "plain" / "r" / "v" / "geneval" / "test"
    evaluate(tmp_path / "plain")
    pngs = sorted(exported.rglob("*.png"))
    images = [np.asarray(Image.open(f).convert("RGB")) for f in pngs]
    assert len(images) == 24
    # against the very images it draws: ~0
    same = evaluate(tmp_path / "same", fid_reference=str(exported), fid_features=ChannelMeans())
    assert same["fid"]["score"] == pytest.approx(0.0, abs=1e-4) and same["fid"]["reference_images"] == 24
    assert same["fid"]["features"] == "ChannelMeans"
    # against the same scenes darkened: the Frechet distance of the channel means
    shifted = tmp_path / "shifted"
    shifted.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image // 2).save(shifted / f"{i:03d}.png")
    far = evaluate(tmp_path / "far", fid_reference=str(shifted), fid_features=ChannelMeans())
    features = np.stack([im.reshape(-1, 3).mean(0) / 255 for im in images])
    darker = np.stack([(im // 2).reshape(-1, 3).mean(0) / 255 for im in images])
    assert far["fid"]["score"] > 0.01
    assert far["fid"]["score"] == pytest.approx(_frechet(features, darker), rel=1e-4)


# --------------------------------------------------------------------------------------------------
# Inputs: shipped Shapes suite, Shapes POPE set, bad configs
# --------------------------------------------------------------------------------------------------


def test_shipped_shapes_suite_is_the_generator_output():
    assert read_jsonl(SHAPES_META) == generate_geneval_prompts(n_per_tag=8, seed=43)


def test_shapes_pope_set_is_reused_and_never_silently_rebuilt(tmp_path, pope_set):
    files = build_shapes_pope_set(pope_set, num_images=6, seed=3)
    before = files["random"].read_text()
    assert build_shapes_pope_set(pope_set, num_images=6, seed=3)["random"].read_text() == before
    for q in read_questions(files["adversarial"]):
        with Image.open(pope_set / "images" / q.image) as im:
            assert im.size == (32, 32)
    with pytest.raises(ConfigError, match=r"manifest\.json: this Shapes POPE folder was built with other parameters"):
        build_shapes_pope_set(pope_set, num_images=7, seed=3)


def test_bad_callback_inputs_name_the_file_key_or_line(tmp_path, pope_set):
    bad = tmp_path / "meta.jsonl"
    bad.write_text(SHAPES_META.read_text().splitlines()[0] + "\n" + '{"tag": "counting", "prompt": \n')
    with pytest.raises(ConfigError, match=r"meta\.jsonl:2: malformed JSON"):
        GenEvalCallback(metadata=str(bad))
    with pytest.raises(MissingFileError, match=r"GenEvalCallback\.metadata: .* does not exist"):
        GenEvalCallback(metadata=str(tmp_path / "none.jsonl"))
    with pytest.raises(ConfigError, match=r"GenEvalCallback\.metadata is not set"):
        GenEvalCallback()
    with pytest.raises(ConfigError, match=r"GenEvalCallback\.detector is not set"):
        GenEvalCallback(metadata=str(SHAPES_META))
    with pytest.raises(MissingFileError, match=r"set GenEvalCallback\.fid_reference"):
        GenEvalCallback(metadata=str(SHAPES_META), detector=ShapesDetector(), fid_reference=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match=r"GenEvalCallback\.fid_reference is not set"):
        GenEvalCallback(metadata=str(SHAPES_META), detector=ShapesDetector(), fid_features=torch.nn.Identity())
    with pytest.raises(ConfigError, match=r"GenEvalCallback\.fid_inception_weights is not set"):
        GenEvalCallback(metadata=str(SHAPES_META), detector=ShapesDetector(), fid_reference=str(pope_set / "images"))

    questions = {"random": str(pope_set / "shapes_pope_random.jsonl")}
    with pytest.raises(ConfigError, match=r"PopeCallback\.image_folder is not set"):
        PopeCallback(questions=questions)
    empty = tmp_path / "images"
    empty.mkdir()
    with pytest.raises(MissingFileError, match=r"shapes_pope_random\.jsonl: question_id 1 names image '00000\.png'"):
        PopeCallback(questions=questions, image_folder=str(empty))
    with pytest.raises(ConfigError, match=r"PopeCallback\.questions\.popular is not set"):
        PopeCallback(questions={**questions, "popular": None}, image_folder=str(pope_set / "images"))


@pytest.mark.parametrize(
    "overlay, fragments",
    [
        ("geneval.yaml", ["trainer.callbacks[GenEvalCallback].init_args.detector.init_args.path is not set", "never downloads"]),
        ("pope.yaml", ["PopeCallback.questions.random is not set"]),
    ],
)
def test_official_eval_configs_without_local_paths_fail_in_one_line(overlay, fragments, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dualfw", "test", "--config", CONF, "--config", str(ROOT / "conf" / "eval" / overlay)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dualfw: error:") and all(f in last for f in fragments), last
