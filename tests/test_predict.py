"""`dualfw predict` (best of K by self-reward, dualfw.training.predict) and `dualfw test` with
GenEvalCallback.best_of and PopeCallback.best_of, end to end on the tiny Janus."""

import hashlib
import re
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import dualfw.training.predict as predict
from dualfw.cli import cli_main, main
from dualfw.core.interface import ImageSampling
from dualfw.eval.geneval import evaluate_folder, read_geneval_folder, read_metadata, summarize
from dualfw.shapes import ShapesDetector

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf" / "t2i.yaml")
PREDICT = str(ROOT / "conf" / "predict.yaml")
SHAPES_META = ROOT / "dualfw" / "assets" / "shapes_geneval.jsonl"
SHAPE_CLASSES = ["circle", "square", "triangle"]


def _predict(tmp_path, tiny_folder, inputs, out, *extra):
    return cli_main([
        "predict", "--config", CONF, "--config", PREDICT,
        f"--model.init_args.model.init_args.path={tiny_folder}",
        f"--data.init_args.prompts={inputs}",
        "--data.init_args.inputs_per_step=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks.init_args.out_dir={out}",
        *extra,
    ])


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_best_of_k_keeps_the_argmax_of_the_recorded_rewards(tmp_path, tiny_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo squares\na blue triangle\n")
    out = tmp_path / "out"
    _predict(tmp_path, tiny_folder, prompts, out, "--trainer.callbacks.init_args.best_of=3",
             "--trainer.callbacks.init_args.keep=all")
    lines = _lines(out / "metadata.jsonl")  # plain layout: not GenEval metadata
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [line["prompt"] for line in lines] == ["a red circle", "two squares", "a blue triangle"]
    for line in lines:
        rewards = line["rewards"]
        assert len(rewards) == 3 and len(set(rewards)) == 3
        assert line["chosen"] == int(np.argmax(rewards)) and line["rejected"] == int(np.argmin(rewards))
        assert line["candidates"] == [0, 1, 2] and len(line["file_names"]) == 3
        assert line["file_name"] == line["file_names"][line["chosen"]] == f"images/{line['index']:05d}_{line['chosen']:02d}.png"
        for name in line["file_names"]:
            with Image.open(out / name) as im:
                assert im.size == (32, 32) and im.mode == "RGB"
    # the last prompt would be a batch of one: it joins the batch before (batch_contrast needs two)
    assert lines[0]["seed"] == lines[1]["seed"] == lines[2]["seed"] == predict.batch_seed(0, "t2i", 0)


def test_rerun_skips_finished_prompts_and_leaves_identical_files(tmp_path, tiny_folder, monkeypatch):
    metadata = tmp_path / "meta.jsonl"  # GenEval metadata: the official layout
    metadata.write_text("".join(line + "\n" for line in SHAPES_META.read_text().splitlines()[::7]))
    out = tmp_path / "out"
    options = ("--trainer.callbacks.init_args.best_of=2", "--trainer.callbacks.init_args.keep=pairs")
    _predict(tmp_path, tiny_folder, metadata, out, *options)
    first = _hashes(out)
    assert {"predictions.jsonl", "predict.json", "00004/metadata.jsonl", "00004/samples/0000.png"} <= set(first)

    # the folder is read back by the project's GenEval scorer: one sample per prompt, the chosen
    prompts = read_metadata(metadata)
    assert [p for p, _ in read_geneval_folder(out)] == prompts
    results = evaluate_folder(out, ShapesDetector(), classes=SHAPE_CLASSES)
    assert [r.filename for r in results] == [str(out / f"{i:05d}" / "samples" / "0000.png") for i in range(5)]
    for line in _lines(out / "predictions.jsonl"):  # pairs: the chosen in samples/, the rejected beside
        assert line["file_name"] == f"{line['index']:05d}/samples/0000.png" and line["meta"]["tag"] == prompts[line["index"]].tag
        assert line["candidates"] == [line["chosen"], line["rejected"]] and all((out / f).is_file() for f in line["file_names"])

    sampled = []
    real = predict.predict_group
    monkeypatch.setattr(predict, "predict_group", lambda policy, batch: sampled.append(batch["indices"]) or real(policy, batch))
    _predict(tmp_path, tiny_folder, metadata, out, *options)
    assert sampled == [] and _hashes(out) == first  # nothing recomputed, nothing changed

    # an interrupt: the last line cut short, a written image lost
    lines = (out / "predictions.jsonl").read_text()
    (out / "predictions.jsonl").write_text(lines[: len(lines) - 20])
    (out / "00000" / "samples" / "0000.png").unlink()
    _predict(tmp_path, tiny_folder, metadata, out, *options)
    assert sampled == [[0, 1], [2, 3, 4]]  # only the batches of the missing prompts
    assert _hashes(out) == first


def test_best_of_1_is_plain_sampling_with_the_same_seed(tmp_path, tiny_folder, tiny_adapter):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo squares\na blue triangle\na green square\n")
    out = tmp_path / "out"
    _predict(tmp_path, tiny_folder, prompts, out, "--trainer.callbacks.init_args.best_of=1")
    lines = _lines(out / "metadata.jsonl")
    sampling = ImageSampling(guidance_scale=2.0)  # conf/t2i.yaml's
    for b, batch in enumerate([lines[:2], lines[2:]]):
        seed = predict.batch_seed(0, "t2i", b)
        tokens = tiny_adapter.sample_images([line["prompt"] for line in batch], 1, sampling, seed=seed)
        plain = predict.to_uint8(tiny_adapter.decode_images(tokens.flatten(0, 1)))
        for line, image in zip(batch, plain):
            assert line["seed"] == seed and line["chosen"] == 0 and len(line["rewards"]) == 1
            assert np.array_equal(np.asarray(Image.open(out / line["file_name"])), image)


def test_understanding_direction_ranks_descriptions_by_r_u(tmp_path, tiny_folder):
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (32, 32), color).save(images / f"{i}.png")
    out = tmp_path / "out"
    _predict(tmp_path, tiny_folder, "dualfw:assets/shapes_prompts.txt", out, "--data.init_args.schedule=i2t",
             f"--data.init_args.images={images}", "--data.init_args.text_sampling.max_new_tokens=6",
             "--trainer.callbacks.init_args.best_of=3")
    lines = _lines(out / "descriptions.jsonl")
    assert [Path(line["image"]).name for line in lines] == ["0.png", "1.png"]
    for line in lines:
        assert len(line["descriptions"]) == 3 and line["chosen"] == int(np.argmax(line["rewards"]))
        assert line["description"] == line["descriptions"][line["chosen"]]


def _error_line(monkeypatch, capsys, *args) -> str:
    monkeypatch.setattr(sys, "argv", ["dualfw", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dualfw: error:"), err[-5:]
    return err[-1]


def test_bad_inputs_end_in_one_line(tmp_path, tiny_folder, monkeypatch, capsys):
    base = ["predict", "--config", CONF, "--config", PREDICT, f"--model.init_args.model.init_args.path={tiny_folder}",
            "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks.init_args.out_dir={tmp_path / 'out'}"]
    line = _error_line(monkeypatch, capsys, *base, f"--data.init_args.prompts={tmp_path / 'none.jsonl'}")
    assert "prompt file" in line and "none.jsonl" in line and "does not exist" in line
    line = _error_line(monkeypatch, capsys, *base, "--trainer.callbacks.init_args.best_of=0")
    assert "BestOfKWriter.best_of must be at least 1, got 0" in line
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "predict.json").write_text(json.dumps({"best_of": 2}))
    # a re-run must keep the settings of the folder
    line = _error_line(monkeypatch, capsys, *base, f"--trainer.callbacks.init_args.out_dir={tmp_path / 'used'}")
    assert "holds predictions made with other settings (best_of: 2, now 8)" in line
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "0.png")
    (images / "1.png").write_bytes(b"not a png")
    line = _error_line(monkeypatch, capsys, *base, "--data.init_args.schedule=i2t", f"--data.init_args.images={images}")
    assert "cannot read image" in line and "1.png" in line


def _test_with(tmp_path, tiny_folder, config: dict):
    """`dualfw test` of the tiny Janus with `config` (an edited conf/eval/shapes.yaml) as overlay."""
    overlay = tmp_path / "eval.yaml"
    overlay.write_text(yaml.safe_dump(config, sort_keys=False))
    return cli_main([
        "test", "--config", CONF, "--config", str(overlay), f"--model.init_args.model.init_args.path={tiny_folder}",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=eval", "--trainer.logger.version=run",
    ])


def test_dualfw_test_reports_best_of_k_beside_plain_sampling(tmp_path, tiny_folder):
    config = yaml.safe_load((ROOT / "conf" / "eval" / "shapes.yaml").read_text())
    callbacks = config["trainer"]["callbacks+"]
    callbacks[0]["init_args"].update(max_prompts=3, images_per_prompt=2, best_of=3)
    del callbacks[1]
    cli = _test_with(tmp_path, tiny_folder, config)
    run = tmp_path / "eval" / "run"
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    b = json.loads((run / "report.json").read_text())["geneval"]["best_of"]
    assert b["k"] == 3 and b["folder"] == "geneval/test_best_of_3"
    assert metrics["geneval/best_of_3/overall"] == b["overall"]["score"] and "geneval/overall" in metrics
    assert metrics["geneval/best_of_3/strict/overall"] == b["strict"]["overall"]
    # the best-of folder is read back by the project's own GenEval scorer to the same figures
    again = summarize(evaluate_folder(run / b["folder"], ShapesDetector(), classes=SHAPE_CLASSES))
    strict = summarize(evaluate_folder(run / b["folder"], ShapesDetector(), classes=SHAPE_CLASSES, strict=True))
    assert again.num_images == 6 and again.overall == b["overall"]["score"] and strict.overall == b["strict"]["overall"]
    assert "Best of 3 by the model's own reward" in (run / "report.md").read_text()


def test_dualfw_test_reports_pope_best_of_k_beside_the_plain_answers(tmp_path, tiny_folder, tiny_adapter):
    from dualfw.core.files import read_jsonl
    from dualfw.eval.pope import read_questions
    from dualfw.eval.runners import answer_pope, answer_pope_best_of
    from dualfw.shapes.pope_set import build_shapes_pope_set
    from dualfw.training.images import load_image
    from dualfw.training.scorer import DualScorer

    pope = tmp_path / "pope"
    build_shapes_pope_set(pope, num_images=3, seed=3)
    config = yaml.safe_load((ROOT / "conf" / "eval" / "shapes.yaml").read_text())
    callbacks = config["trainer"]["callbacks+"]
    callbacks[1]["init_args"].update(max_questions=4, max_new_tokens=3, best_of=3)
    callbacks[1]["init_args"]["source"]["init_args"].update(folder=str(pope), num_images=3, seed=3)
    del callbacks[0]
    cli = _test_with(tmp_path, tiny_folder, config)
    run = tmp_path / "eval" / "run"
    b = json.loads((run / "report.json").read_text())["pope"]["best_of"]
    assert b["k"] == 3 and b["folder"] == "pope/test_best_of_3" and b["scorer"] == "DualScorer"
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert metrics["pope/best_of_3/random/accuracy"] == b["splits"]["random"]["accuracy"] and "pope/random/accuracy" in metrics
    plain = [line["answer"] for line in read_jsonl(run / "pope" / "test" / "random_answers.jsonl")]
    chosen = [line["answer"] for line in read_jsonl(run / b["folder"] / "random_answers.jsonl")]
    candidates = read_jsonl(run / b["folder"] / "random_candidates.jsonl")
    assert len(candidates) == len(plain) == 4
    for line, answer, greedy in zip(candidates, chosen, plain):  # the reported answer: the argmax of the rewards
        assert len(line["answers"]) == len(line["rewards"]) == 3 and line["answers"][0] == greedy
        assert line["chosen"] == int(np.argmax(line["rewards"])) and answer == line["answers"][line["chosen"]]
    assert "Best of 3 answers by the model's own reward" in (run / "report.md").read_text()

    # best of 1 is the plain (greedy) answer
    questions = read_questions(pope / "shapes_pope_random.jsonl")[:8]
    scorer = DualScorer()
    scorer.attach(tiny_adapter)
    image = lambda name: load_image(pope / "images" / name, tiny_adapter.image_size)  # noqa: E731
    one = answer_pope_best_of(tiny_adapter, scorer, questions, image, best_of=1, max_new_tokens=3)
    assert one.answers == answer_pope(tiny_adapter, questions, image, max_new_tokens=3) and one.rewards.shape == (8, 1)
    from dualfw.core.errors import ConfigError
    from dualfw.eval.callbacks import PopeCallback
    from dualfw.shapes.pope_set import ShapesPopeSet

    for bad, message in ((dict(best_of=0), "PopeCallback.best_of must be at least 1"),
                         (dict(best_of_temperature=0.0), "PopeCallback.best_of_temperature must be > 0"),
                         (dict(reward_text="{question}"), "PopeCallback.reward_text must contain '{answer}'")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            PopeCallback(source=ShapesPopeSet(folder=str(pope)), **bad)
