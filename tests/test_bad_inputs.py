"""Bad input ends a `dualfw` command in one line, `dualfw: error: ...`, naming the key, file or
line, before any model loads where no model is needed to tell (docs/bad-inputs.md lists them)."""

import os
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
T2I, I2T = str(ROOT / "conf" / "t2i.yaml"), str(ROOT / "conf" / "i2t.yaml")


def _main(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run the `dualfw` entry point in-process; (exit code, last line of stderr)."""
    from dualfw.cli import main

    monkeypatch.setattr(sys, "argv", ["dualfw", *argv])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    return exit_.value.code, err[-1] if err else ""


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_folder) -> dict[str, Path]:
    """One of each kind of broken file."""
    d = tmp_path_factory.mktemp("bad")
    out = {}

    def write(name, data: bytes | str):
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        out[name] = path
        return path

    write("latin1.txt", "a red circle\ncaf\xe9 au lait\n".encode("latin-1"))
    write("empty.txt", "")
    write("malformed.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n')
    write("noprompt.jsonl", '{"prompt": "a"}\n{"text": "b"}\n')
    write("emptyprompt.jsonl", '{"prompt": "  "}\n')
    write("bad_key.yaml", "data:\n  init_args:\n    kk: 3\n")
    write("bad_yaml.yaml", "data: [unclosed\n")
    write("random.ckpt", os.urandom(4096))
    write("a_file", "not a folder")
    good = d / "good.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    write("truncated.ckpt", good.read_bytes()[: good.stat().st_size // 2])
    (d / "not_a_ckpt_dir").mkdir()
    out["not_a_ckpt_dir"] = d / "not_a_ckpt_dir"
    (d / "no_images").mkdir()
    write("no_images/readme.txt", "nothing here")
    out["no_images"] = d / "no_images"
    write("images.jsonl", '{"caption": "x"}\n')

    def model(name, edit):
        folder = d / name
        shutil.copytree(tiny_folder, folder)
        edit(folder)
        out[name] = folder

    model("no_config", lambda f: (f / "config.json").unlink())
    model("bad_json_config", lambda f: (f / "config.json").write_text("{not json"))
    model("latin1_config", lambda f: (f / "config.json").write_bytes(b'{"model_type": "\xe9"}'))
    model("llama_config", lambda f: (f / "config.json").write_text('{"model_type": "llama"}'))
    model("original_janus", lambda f: (f / "config.json").write_text('{"model_type": "multi_modality"}'))
    model("no_weights", lambda f: (f / "model.safetensors").unlink())
    model("truncated_weights", lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:3000]))
    model("random_weights", lambda f: (f / "model.safetensors").write_bytes(os.urandom(5000)))
    model("bad_index", lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": {"a": "shard-1.safetensors"}}'))
    return out


# (extra arguments, config, a fragment of the one-line message); "{name}" reads from `files`
CASES = {
    "temperature<0": (["--data.init_args.sampling.temperature=-1"], T2I, "data.init_args.sampling.temperature must be >= 0"),
    "temperature nan": (["--data.init_args.sampling.temperature=nan"], T2I, 'Parser key "data.sampling.temperature": Expected a <class'),
    "top_p 0": (["--data.init_args.sampling.top_p=0"], T2I, "data.init_args.sampling.top_p must be in (0, 1]"),
    "top_p>1": (["--data.init_args.sampling.top_p=1.5"], T2I, "data.init_args.sampling.top_p must be in (0, 1]"),
    "top_k<0": (["--data.init_args.sampling.top_k=-5"], T2I, "data.init_args.sampling.top_k must be >= 0"),
    "guidance 0": (["--data.init_args.sampling.guidance_scale=0"], T2I, "data.init_args.sampling.guidance_scale must be >= 1"),
    "guidance<0": (["--data.init_args.sampling.guidance_scale=-3"], T2I, "data.init_args.sampling.guidance_scale must be >= 1"),
    "text temperature<0": (["--data.init_args.text_sampling.temperature=-1"], I2T, "data.init_args.text_sampling.temperature must be >= 0"),
    "text top_p 0": (["--data.init_args.text_sampling.top_p=0"], I2T, "data.init_args.text_sampling.top_p must be in (0, 1]"),
    "text max_new_tokens 0": (["--data.init_args.text_sampling.max_new_tokens=0"], I2T, "data.init_args.text_sampling.max_new_tokens must be >= 1"),
    "margin<0": (["--data.init_args.margin=-1"], T2I, "data.init_args.margin must be >= 0"),
    "batch_contrast, 1 input": (["--data.init_args.inputs_per_step=1"], T2I, "batch_contrast scores each input against the step's other inputs"),
    "lr<0": (["--model.init_args.optimizer.init_args.lr=-1"], T2I, "model.init_args.optimizer.init_args.lr must be > 0"),
    "lr 0": (["--model.init_args.optimizer.init_args.lr=0"], T2I, "model.init_args.optimizer.init_args.lr must be > 0"),
    "lr not a number": (["--model.init_args.optimizer.init_args.lr=abc"], T2I, 'Parser key "model.optimizer.lr": Expected a <class \'float\'>'),
    "k 1": (["--data.init_args.k=1"], T2I, "data.k must be at least 2"),
    "unknown schedule": (["--data.init_args.schedule=sideways"], T2I, 'Parser key "data.schedule"'),
    "unknown pairing": (["--data.init_args.pairing=random"], T2I, 'Parser key "data.pairing"'),
    "unknown config key": (["--config", "{bad_key.yaml}"], T2I, "'kk' is not accepted"),
    "malformed yaml": (["--config", "{bad_yaml.yaml}"], T2I, "bad_yaml.yaml"),
    "missing config file": (["--config", "/nonexistent/conf.yaml"], T2I, "/nonexistent/conf.yaml"),
    "unknown loss class": (["--model.init_args.loss=dualfw.Nope"], T2I, "Parser key \"model.loss\": class_path 'dualfw.Nope' cannot be imported"),
    "unknown module": (["--model.init_args.loss=nowhere.Loss"], T2I, "class_path 'nowhere.Loss' cannot be imported (No module named 'nowhere')"),
    "unknown model class": (["--model=dualfw.Polcy"], T2I, "class_path 'dualfw.Polcy' cannot be imported"),
    "unknown callback": (["--trainer.callbacks+=nowhere.Callback"], T2I, "class_path 'nowhere.Callback' cannot be imported"),
    "missing prompt file": (["--data.init_args.prompts=/nonexistent/p.txt"], T2I, "prompt file '/nonexistent/p.txt' does not exist"),
    "empty prompt file": (["--data.init_args.prompts={empty.txt}"], T2I, "holds no prompts"),
    "non-UTF-8 prompt file": (["--data.init_args.prompts={latin1.txt}"], T2I, "latin1.txt:2: not UTF-8 text (byte 0xe9 at column 4"),
    "malformed JSON prompt": (["--data.init_args.prompts={malformed.jsonl}"], T2I, "malformed.jsonl:2: malformed JSON line"),
    "prompt field missing": (["--data.init_args.prompts={noprompt.jsonl}"], T2I, "noprompt.jsonl:2: expected an object with a non-empty string 'prompt'"),
    "blank prompt": (["--data.init_args.prompts={emptyprompt.jsonl}"], T2I, "emptyprompt.jsonl:1: expected an object with a non-empty string 'prompt'"),
    "missing image folder": (["--data.init_args.images=/nonexistent/images"], I2T, "image source '/nonexistent/images' does not exist"),
    "folder without images": (["--data.init_args.images={no_images}"], I2T, "holds no images"),
    "image list without paths": (["--data.init_args.images={images.jsonl}"], I2T, "images.jsonl:1: expected an object with an 'image' or 'path' field"),
    "missing model folder": (["--model.init_args.model.init_args.path=/nonexistent/model"], T2I, "model folder '/nonexistent/model' does not exist"),
    "model folder without config.json": (["--model.init_args.model.init_args.path={no_config}"], T2I, "has no config.json"),
    "config.json not JSON": (["--model.init_args.model.init_args.path={bad_json_config}"], T2I, "config.json' is not valid JSON"),
    "config.json not UTF-8": (["--model.init_args.model.init_args.path={latin1_config}"], T2I, "config.json' is not UTF-8 text"),
    "not a Janus": (["--model.init_args.model.init_args.path={llama_config}"], T2I, "has model_type 'llama', not a unified LMM"),
    "original Janus format": (["--model.init_args.model.init_args.path={original_janus}"], T2I, "DeepSeek's original Janus format"),
    "no weights": (["--model.init_args.model.init_args.path={no_weights}"], T2I, "has no weights (model.safetensors)"),
    "truncated safetensors": (["--model.init_args.model.init_args.path={truncated_weights}"], T2I, "model.safetensors' is not a readable safetensors file"),
    "random-bytes safetensors": (["--model.init_args.model.init_args.path={random_weights}"], T2I, "model.safetensors' is not a readable safetensors file"),
    "index names a missing shard": (["--model.init_args.model.init_args.path={bad_index}"], T2I, "lacks the weight file 'shard-1.safetensors'"),
    "missing --ckpt_path": (["--ckpt_path=/nonexistent/last.ckpt"], T2I, "--ckpt_path '/nonexistent/last.ckpt' does not exist"),
    "random-bytes --ckpt_path": (["--ckpt_path={random.ckpt}"], T2I, "random.ckpt' is not a readable checkpoint"),
    "truncated --ckpt_path": (["--ckpt_path={truncated.ckpt}"], T2I, "truncated.ckpt' is not a readable checkpoint"),
    "--ckpt_path folder without a checkpoint": (["--ckpt_path={not_a_ckpt_dir}"], T2I, "is a folder without a sharded checkpoint"),
    "run folder is a file": (["--trainer.default_root_dir={a_file}"], T2I, "trainer.default_root_dir"),
    "logger folder is a file": (["--trainer.logger.init_args.save_dir={a_file}"], T2I, "trainer.logger.init_args.save_dir"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_naming_it(name, files, capsys, monkeypatch):
    extra, config, message = CASES[name]
    for key, path in files.items():
        extra = [a.replace("{" + key + "}", str(path)) for a in extra]
    code, last = _main(["fit", "--config", config, *extra], capsys, monkeypatch)
    assert code == 2 and last.startswith("dualfw: error: ") and message in last, (name, last)


def test_test_without_an_evaluation_callback_says_so(capsys, monkeypatch):
    code, last = _main(["test", "--config", T2I], capsys, monkeypatch)
    assert code == 2 and "dualfw test evaluates in its callbacks and none is configured" in last, last


def _stall_args(tmp_path, tiny_folder, config, *extra):
    return ["fit", "--config", config, f"--model.init_args.model.init_args.path={tiny_folder}",
            "--data.init_args.inputs_per_step=2", "--data.init_args.k=2", "--trainer.max_steps=50",
            "--trainer.enable_progress_bar=false", "--data.init_args.max_rounds_without_pairs=4",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}", *extra]


def test_greedy_sampling_stops_instead_of_looping(tmp_path, tiny_folder, capsys, monkeypatch):
    # temperature 0: the K images of a prompt are equal, no pair ever forms
    args = _stall_args(tmp_path, tiny_folder, T2I, "--data.init_args.sampling.temperature=0", "--data.init_args.progress=false")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, last = _main(args, capsys, monkeypatch)
    assert code == 2 and "4 consecutive sampling rounds gave no preference pair: all K samples of every input were equal" in last, last
    # a step without pairs is skipped on purpose and counted below, and frozen parts stay in eval mode
    # on purpose: neither gets Lightning's warning
    assert not [w for w in seen if "returned `None`" in str(w.message) or "in eval mode at the start" in str(w.message)]
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    skipped = [(int(r["step"]), float(r["t2i/data/skipped_inputs"])) for r in rows if r.get("t2i/data/skipped_inputs")]
    # the rounds trained before the stop (Lightning fetches one ahead) were counted, each at its own step
    assert skipped == [(0, 2.0), (1, 2.0)], skipped


def test_every_image_unreadable_stops_naming_it(tmp_path, tiny_folder, capsys, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(os.urandom(100))
    args = _stall_args(tmp_path, tiny_folder, I2T, f"--data.init_args.images={images}")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        code, last = _main(args, capsys, monkeypatch)
    assert code == 2 and "no preference pair: every image was unreadable (4 skipped" in last, last


def test_prompt_longer_than_the_context_is_named(tmp_path, tiny_folder, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n" + "two squares " * 3000 + "\n")
    args = _stall_args(tmp_path, tiny_folder, T2I, f"--data.init_args.prompts={prompts}", "--data.init_args.progress=false")
    code, last = _main(args, capsys, monkeypatch)
    assert code == 2 and "data.prompts: prompt 2 ('two squares two squares" in last and "holds at most" in last, last
    assert not list(tmp_path.rglob("rollouts.jsonl")), "refused before sampling"
