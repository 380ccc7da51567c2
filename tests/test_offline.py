"""Training on a `dualfw predict` folder (SelfRewardDataModule.from_predictions, conf/t2i_offline.yaml):
the pairs trained are the writer's, the fit trains and resumes where it stopped, a changed folder
or a bad one ends in one line."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dualfw.training.predict as predict
from dualfw.cli import cli_main, main
from dualfw.core.errors import ConfigError, find_config_error
from dualfw.core.files import read_jsonl
from dualfw.core.pixels import to_uint8
from dualfw.core.selfreward import select_pairs
from dualfw.training.datamodule import SelfRewardDataModule

ROOT = Path(__file__).resolve().parents[1]
CONF, PREDICT, OFFLINE = (str(ROOT / "conf" / name) for name in ("t2i.yaml", "predict.yaml", "t2i_offline.yaml"))
PROMPTS = ["a red circle", "two squares", "a blue triangle", "a green square"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_folder) -> Path:
    """What `dualfw predict` writes for 4 prompts, best of 3, keep pairs (plain layout)."""
    d = tmp_path_factory.mktemp("offline")
    (d / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    cli_main([
        "predict", "--config", CONF, "--config", PREDICT, f"--model.init_args.model.init_args.path={tiny_folder}",
        f"--data.init_args.prompts={d / 'prompts.txt'}", "--data.init_args.inputs_per_step=2",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={d}",
        f"--trainer.callbacks.init_args.out_dir={d / 'pred'}", "--trainer.callbacks.init_args.best_of=3",
        "--trainer.callbacks.init_args.keep=pairs",
    ])
    return d / "pred"


def _fit_args(tmp_path, tiny_folder, folder, steps, *extra):
    return [
        "fit", "--config", CONF, "--config", OFFLINE, f"--model.init_args.model.init_args.path={tiny_folder}",
        f"--data.init_args.from_predictions={folder}", "--data.init_args.inputs_per_step=2", f"--trainer.max_steps={steps}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.name=offline", "--trainer.logger.version=run", *extra,
    ]


def test_the_fit_trains_on_the_recorded_pairs_and_resumes_where_it_stopped(tmp_path, folder, tiny_folder, tiny_adapter, monkeypatch):
    lines = {line["prompt"]: line for line in read_jsonl(folder / "metadata.jsonl")}
    assert sorted(lines) == sorted(PROMPTS)
    for line in lines.values():  # the stored tokens are the written images
        assert line["candidates"] == [line["chosen"], line["rejected"]]
        images = to_uint8(tiny_adapter.decode_images(torch.tensor(line["image_tokens"])))
        for name, image in zip(line["file_names"], images):
            assert np.array_equal(np.asarray(Image.open(folder / name)), image)

    groups = []
    real = predict.PredictionSet.group
    monkeypatch.setattr(predict.PredictionSet, "group", lambda self, *a: groups.append(real(self, *a)) or groups[-1])
    cli = cli_main(_fit_args(tmp_path, tiny_folder, folder, 3))
    assert len(groups) == 4  # Lightning fetched the round of step 4 before stopping
    for group in groups:
        assert len(group.pairs) == len(group.prompts) == 2 and group.guidance_scale == 2.0
        for i, c, r in group.pairs.tolist():
            line = lines[group.prompts[i]]
            assert [line["candidates"][c], line["candidates"][r]] == [line["chosen"], line["rejected"]]
            assert group.image_tokens[i].tolist() == line["image_tokens"]
            assert group.rewards[i].tolist() == [line["rewards"][k] for k in line["candidates"]]
    assert sorted(p for g in groups[:2] for p in g.prompts) == sorted(PROMPTS)  # an epoch is every prompt once
    run = tmp_path / "offline" / "run"
    assert not (run / "rollouts.jsonl").exists()  # nothing sampled
    before = dict(tiny_adapter.named_parameters())
    changed = [n for n, p in cli.model.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all(".generation_" in n for n in changed), changed[:5]  # train: generation

    # resumed from last.ckpt: the round fetched at step 3 but not trained is step 4's
    fetched, groups[:] = groups[3], []
    cli_main(_fit_args(tmp_path, tiny_folder, folder, 4, "--ckpt_path=last"))
    assert groups[0].prompts == fetched.prompts and torch.equal(groups[0].pairs, fetched.pairs)

    # a checkpoint resumes only on the folder it trained on
    changed_folder = tmp_path / "changed"
    shutil.copytree(folder, changed_folder)
    text = (changed_folder / "metadata.jsonl").read_text().splitlines()
    text[-1] = json.dumps({**json.loads(text[-1]), "rewards": [0.0, 1.0, 2.0]})
    (changed_folder / "metadata.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(Exception) as info:
        cli_main(_fit_args(tmp_path, tiny_folder, changed_folder, 5, "--ckpt_path=last"))
    assert "has changed since the checkpoint trained on it" in str(find_config_error(info.value))
    with pytest.raises(Exception) as info:  # nor does a sampled run's checkpoint take the folder, or the reverse
        args = _fit_args(tmp_path, tiny_folder, folder, 5, "--ckpt_path=last", "--data.init_args.from_predictions=null",
                         f"--data.init_args.prompts={folder.parent / 'prompts.txt'}")
        cli_main(args)
    assert "the checkpoint trained on a dualfw predict folder" in str(find_config_error(info.value))


def _hand_made(folder: Path, lines: list[dict], keep: str = "all", best_of: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predict.json").write_text(json.dumps({"best_of": best_of, "keep": keep, "layout": "plain",
                                                     "sampling": {"guidance_scale": 3.0}}))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def _line(index: int, rewards: list[float], tokens: int = 64) -> dict:
    k = len(rewards)
    return {"index": index, "prompt": f"prompt {index}", "candidates": list(range(k)), "rewards": rewards,
            "image_tokens": [[(index + c) % 64] * tokens for c in range(k)], "meta": {"tag": "t"}}


def test_keep_all_folders_pair_by_the_modules_rules_on_the_recorded_rewards(tmp_path):
    rewards = np.random.default_rng(0).normal(size=(3, 4)).round(3).tolist()
    # lines out of order (a resumed predict run appends): read back in prompt order
    data = predict.read_predictions(_hand_made(tmp_path / "all", [_line(i, rewards[i]) for i in (2, 0, 1)]))
    assert [r["prompt"] for r in data.records] == ["prompt 0", "prompt 1", "prompt 2"] and data.records[0]["tag"] == "t"
    for pairing, margin, top_k in (("best_worst", 0.0, 2), ("all", 0.5, 2), ("top_bottom", 0.0, 1)):
        group = data.group([2, 0], pairing, margin, top_k, "cpu")
        expected = select_pairs(torch.tensor([rewards[2], rewards[0]]), pairing, margin, top_k)
        assert torch.equal(group.pairs, expected) and group.guidance_scale == 3.0
        assert group.prompts == ["prompt 2", "prompt 0"] and group.image_tokens.shape == (2, 4, 64)


def _main(argv, capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", ["dualfw", *map(str, argv)])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err and err[-1].startswith("dualfw: error: "), err[-3:]
    return err[-1]


def test_bad_folders_end_in_one_line_naming_the_file(tmp_path, folder, tiny_folder, capsys, monkeypatch):
    def bad(name, edit):
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        edit(copy)
        return copy

    torn = bad("torn", lambda f: (f / "metadata.jsonl").write_text((f / "metadata.jsonl").read_text()[:-40]))
    old = bad("old", lambda f: (f / "metadata.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in line.items() if k != "image_tokens"}) + "\n"
                for line in read_jsonl(f / "metadata.jsonl"))))
    best = bad("best", lambda f: (f / "predict.json").write_text(
        json.dumps({**json.loads((f / "predict.json").read_text()), "keep": "best"})))
    bare = tmp_path / "bare"
    bare.mkdir()
    images = bad("images", lambda f: (f / "metadata.jsonl").rename(f / "descriptions.jsonl"))
    other_model = _hand_made(tmp_path / "other_model", [_line(0, [0.0, 1.0], tokens=16), _line(1, [1.0, 0.0], tokens=16)])
    cases = [
        (tmp_path / "none", [], "data.init_args.from_predictions: folder", "does not exist"),
        (bare, [], f"'{bare}' has no predict.json", "not a folder written by dualfw predict"),
        (torn, [], f"{torn / 'metadata.jsonl'}:4: malformed JSON", "re-run its dualfw predict command"),
        (old, [], f"{old / 'metadata.jsonl'}:1: no image_tokens", "write the folder again"),
        (best, [], "keep 'best' keeps one image per prompt", "keep pairs or all"),
        (images, [], "holds descriptions of images only", "text to image"),
        (other_model, [], "holds images of 16 tokens, the model draws 64", "another model"),
        (folder, ["--data.init_args.prompts=dualfw:assets/shapes_prompts.txt"], "data.prompts and data.from_predictions", "null"),
        (folder, ["--data.init_args.schedule=i2t", "--data.init_args.images=dualfw:assets/shapes_images"],
         "data.from_predictions holds text-to-image candidates", "set data.schedule t2i"),
    ]
    for path, extra, *fragments in cases:
        line = _main(_fit_args(tmp_path, tiny_folder, path, 1, *extra), capsys, monkeypatch)
        assert all(f in line for f in fragments), line
    # a sampled run's checkpoint (no folder digest in its stream state) does not resume on a folder
    with pytest.raises(ConfigError, match="the checkpoint's run sampled its data: resume it without data.from_predictions"):
        SelfRewardDataModule(from_predictions=str(folder)).train_dataloader().load_state_dict({"epoch": 0, "position": 1})
