"""`dualfw fit` end to end, in-process: run folder contents, resume, config handling, bad input."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dualfw.cli import cli_main
from dualfw.training.rollouts import read_rollouts
from conftest import fit_args as _fit_args, weights_by_base_name

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf" / "t2i.yaml")


def test_fit_writes_checkpoint_rollouts_metrics_images_and_resumes(tmp_path, tiny_folder):
    cli = cli_main(_fit_args(tmp_path, tiny_folder))
    run = tmp_path / "t2i" / "run"
    assert cli.trainer.global_step == 2
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    assert list((run / "images").glob("pairs_step*.png"))

    rollouts = list(read_rollouts(run / "rollouts.jsonl"))
    assert len(rollouts) >= 4  # 2 steps x 2 prompts (plus Lightning's one-batch prefetch)
    first = rollouts[0]
    assert len(first["image_tokens"]) == 3 and len(first["rewards"]) == 3
    for chosen, rejected in first["pairs"]:  # best vs worst
        assert first["rewards"][chosen] == max(first["rewards"])
        assert first["rewards"][rejected] == min(first["rewards"])

    # the rollout's reward is the one a fresh scorer on the initial model computes for those tokens
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.scorer import DualScorer

    # (the recipe's batch_contrast: relative to the round's other prompt, so the whole round is rescored)
    round_ = [r for r in rollouts if r["seed"] == first["seed"]]
    assert len(round_) == 2
    scorer = DualScorer(batch_contrast=True)
    scorer.attach(JanusAdapter(path=str(tiny_folder)))
    tokens = torch.tensor([t for r in round_ for t in r["image_tokens"]])
    recomputed = scorer.image_rewards(tokens, [r["prompt"] for r in round_ for _ in range(3)])
    assert torch.allclose(recomputed, torch.tensor([x for r in round_ for x in r["rewards"]]), atol=1e-4)

    with open(run / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    for key in ("train/loss", "t2i/pair_accuracy", "t2i/reward/margin", "t2i/reward/mean", "t2i/reward/std",
                "t2i/logp_chosen", "t2i/logp_rejected", "train/grad_norm", "t2i/grad_norm", "t2i/data/skipped_inputs"):
        assert key in columns, key

    # re-run into the same folder from the last checkpoint: no abort on the saved config, continues
    cli = cli_main(_fit_args(tmp_path, tiny_folder, "--trainer.max_steps=4", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"))
    assert cli.trainer.global_step == 4
    assert len(list(read_rollouts(run / "rollouts.jsonl"))) > len(rollouts)  # appended, nothing lost


@pytest.mark.parametrize("precision, autocast", [("bf16-mixed", True), ("32-true", False)])
def test_rollouts_are_sampled_under_the_training_precision(tmp_path, tiny_folder, monkeypatch, precision, autocast):
    # FSDP1 with bf16-mixed fails on a GPU when sampling runs outside autocast
    from dualfw.training.datamodule import SelfRewardDataModule

    seen, sample = [], SelfRewardDataModule.sample

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(SelfRewardDataModule, "sample", spy)
    cli = cli_main(_fit_args(tmp_path, tiny_folder, "--trainer.max_steps=1", "--trainer.accelerator=cpu",
                             f"--trainer.precision={precision}"))
    assert cli.trainer.global_step == 1
    assert seen and all(s is autocast for s in seen)


def test_configs_compose_and_interpolate(tmp_path, tiny_folder, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("data:\n  init_args:\n    k: 5\n    inputs_per_step: ${data.init_args.k}\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", CONF, "--config", str(overlay), "--print_config"])
    printed = capsys.readouterr().out
    assert "k: 5" in printed and "inputs_per_step: 5" in printed


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "dualfw.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_bad_input_gives_one_line_errors(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("data:\n  init_args:\n    kk: 3\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = {
        ("--config", str(bad_key)): "'kk' is not accepted",
        ("--data.init_args.k=1",): "data.k must be at least 2",
        ("--data.init_args.prompts=" + str(empty),): "holds no prompts",
        ("--model.init_args.model.init_args.path=" + str(tmp_path / "nope"),): "does not exist",
    }
    for extra, message in cases.items():
        result = _run("fit", "--config", CONF, *extra)
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("dualfw: error:") and message in last, (extra, last)


def test_wrong_typed_nested_values_name_their_key_path(capsys):
    """A bad value inside a nested class (loss, optimizer, SFT option) is reported with the path
    of keys down to it, not jsonargparse's outer 'Parser key "model":' alone."""
    cases = {
        (CONF, "--model.init_args.loss.init_args.beta=abc"): 'Parser key "model.loss.beta": Expected a <class \'float\'>',
        (CONF, "--model.init_args.optimizer.init_args.lr=abc"): 'Parser key "model.optimizer.lr": Expected a <class \'float\'>',
        (str(ROOT / "conf/shapes/base.yaml"), "--model.init_args.understanding_mean=sentence"):
            'Parser key "model.understanding_mean": Expected a typing.Literal',
    }
    for (config, bad), message in cases.items():
        with pytest.raises(SystemExit) as exit_:
            cli_main(["fit", "--config", config, bad, "--print_config"])
        assert exit_.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("dualfw: error:") and message in last, (bad, last)


@pytest.mark.parametrize("rollouts_from", ["policy", "initial"])
def test_pair_grid_shows_the_pairs_and_with_initial_rollouts_the_policy_own_samples(tmp_path, tiny_folder, rollouts_from):
    # the grid is rebuilt from what was written elsewhere: rollouts.jsonl's chosen / rejected tokens
    # and, for rollouts_from initial, a fresh sample of the trained policy with the step's seed
    from torchvision.io import read_image
    from torchvision.utils import make_grid

    from dualfw.core.interface import ImageSampling

    cli = cli_main(_fit_args(tmp_path, tiny_folder, "--trainer.max_steps=1", f"--model.init_args.rollouts_from={rollouts_from}"))
    run = tmp_path / "t2i" / "run"
    rollouts = list(read_rollouts(run / "rollouts.jsonl"))  # the first round, and the prefetched second
    first_round = [r for r in rollouts if r["seed"] == rollouts[0]["seed"] and r["pairs"]]
    assert first_round
    rows = [torch.tensor([r["image_tokens"][r["pairs"][0][j]] for r in first_round]) for j in (0, 1)]
    if rollouts_from == "initial":
        sampling = ImageSampling(**{k: cli.config.fit.data.init_args.sampling[k] for k in ("guidance_scale", "temperature", "top_k", "top_p")})
        rows.append(cli.model.model.sample_images([r["prompt"] for r in first_round], 1, sampling, seed=1)[:, 0])
    expected = make_grid(cli.model.model.decode_images(torch.cat(rows)).float(), nrow=len(first_round), padding=2, pad_value=1.0)
    saved = read_image(str(run / "images" / "pairs_step000001.png"))[:3]
    assert saved.shape == expected.shape  # 3 rows with initial rollouts, 2 without
    assert (saved.int() - (expected * 255 + 0.5).clamp(0, 255).int()).abs().max() <= 1


@pytest.mark.parametrize("lora", ["none", "drawing", "reading_carried"])
def test_generation_only_training_leaves_reading_bit_identical(tmp_path, tiny_folder, tiny_adapter, lora):
    """train: generation moves only what draws: after a fit at a large learning rate the exported
    model's R_G and greedy answers equal the initial model's exactly, while its image log-probs
    changed. Without LoRA only the generation modules' weights changed; with LoRA no base weight
    did (the adapters, active only while drawing, are exported beside them). A model that carries
    reading-only LoRA from an earlier stage keeps it, apart, through training and export."""
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.core.interface import TextSampling
    from dualfw.core.lora import LORA_FILE, LoraSpec, apply_lora, save_split
    from dualfw.training.scorer import DualScorer

    start, initial = tiny_folder, tiny_adapter
    if lora == "reading_carried":
        initial = JanusAdapter(path=str(tiny_folder)).eval()
        apply_lora(initial, LoraSpec(r=4), for_direction="i2t")
        with torch.no_grad():
            for p in initial.parameters():
                if p.requires_grad:
                    p.add_(0.1)  # LoRA away from zero: reading differs from tiny_adapter's
        start = save_split(initial, tmp_path / "reader")
    extra = ["--model.init_args.lora.r=4"] if lora == "drawing" else []
    cli_main(_fit_args(tmp_path, start, "--model.init_args.train=generation",
                       "--model.init_args.optimizer.init_args.lr=0.05", *extra))
    export = tmp_path / "t2i" / "run" / "export"
    assert (export / LORA_FILE).exists() == (lora != "none")
    trained = JanusAdapter(path=str(export)).eval()
    drawing = {id(p) for m in initial.generation_modules() for p in m.parameters()}
    before, after = weights_by_base_name(initial), weights_by_base_name(trained)
    assert before.keys() <= after.keys()
    changed = {name for name, p in before.items() if not torch.equal(p, after[name])}
    if lora == "drawing":
        assert not changed and any("lora_" in name for name, _ in trained.named_parameters())
    else:
        assert changed, "nothing trained"
        assert all(id(before[name]) in drawing for name in changed), sorted(changed)

    tokens = tiny_adapter.sample_images(["a red circle", "two squares"], k=2, seed=0).flatten(0, 1)
    prompts = ["a red circle"] * 2 + ["two squares"] * 2
    rewards = []
    for model in (initial, trained, tiny_adapter):
        scorer = DualScorer()
        scorer.attach(model)
        rewards.append(scorer.image_rewards(tokens, prompts))
    assert torch.equal(rewards[0], rewards[1])
    assert torch.equal(rewards[0], rewards[2]) == (lora != "reading_carried")
    pixels = tiny_adapter.decode_images(tokens)
    greedy = TextSampling(temperature=0.0, max_new_tokens=6)
    answers = [m.sample_texts(pixels, 1, "Is there a circle?", greedy) for m in (initial, trained)]
    assert answers[0] == answers[1]
    with torch.no_grad():
        assert not torch.equal(initial.image_logprobs(prompts, tokens), trained.image_logprobs(prompts, tokens))


def test_one_direction_training_refuses_what_it_cannot_train(tiny_folder):
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.core.errors import ConfigError
    from dualfw.core.selfreward import Group
    from dualfw.training.policy import LoraSpec, Policy

    with pytest.raises(ConfigError, match="model.init_args.train must be 'all', 'generation' or 'understanding', got 'reading'"):
        Policy(JanusAdapter(path=str(tiny_folder)), train="reading")
    with pytest.raises(ConfigError, match="'understanding' trains LoRA adapters used while reading: set model.init_args.lora"):
        Policy(JanusAdapter(path=str(tiny_folder)), train="understanding")
    i2t = Group("i2t", torch.zeros(1, 2), torch.tensor([[0, 0, 1]]), texts=[["a", "b"]])
    for lora in (None, LoraSpec(r=4)):
        policy = Policy(JanusAdapter(path=str(tiny_folder)), train="generation", lora=lora)
        with pytest.raises(ConfigError, match="'generation' trains the t2i direction only: the i2t direction"):
            policy.direction_loss(i2t)
    policy = Policy(JanusAdapter(path=str(tiny_folder)), train="understanding", lora=LoraSpec(r=4))
    t2i = Group("t2i", torch.zeros(1, 2), torch.tensor([[0, 0, 1]]), prompts=["a"], image_tokens=torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(ConfigError, match="'understanding' trains the i2t direction only: the t2i direction"):
        policy.direction_loss(t2i)
