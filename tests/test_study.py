"""The pieces of the Shapes self-reward study: the control and oracle rewards, the evaluation's
intervals and the reward-vs-judge agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dualfw.core.errors import ConfigError
from dualfw.eval.geneval import ImageResult, overall_confidence_interval
from dualfw.adapters.janus import JanusAdapter
from dualfw.training.scorer import RandomScorer
from dualfw.core.pixels import to_pixels
from dualfw.eval.pope import PopeQuestion
from dualfw.eval.runners import score_pope, within_group_auc
from dualfw.shapes.oracle import OracleScorer
from dualfw.shapes.text import enumerate_geneval_prompts
from dualfw.shapes.world import WorldConfig, render, scene_for_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    return JanusAdapter(path="dualfw:assets/shapes_base").eval()


def test_oracle_rewards_a_rendered_match_and_fails_another_prompts_scene(base):
    world = WorldConfig(resolution=32)
    records = {r["prompt"]: r for r in enumerate_geneval_prompts(world)}
    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle"]
    rng = np.random.default_rng(0)
    scenes = [scene_for_record(records[p], rng, world) for p in prompts]
    tokens = base.encode_images(to_pixels([render(s) for s in scenes]))
    oracle = OracleScorer(judge="both")
    oracle.attach(base)
    # rendered exactly for their prompts (and nothing else): right under both judges
    assert oracle.image_rewards(tokens, prompts).tolist() == [2.0, 2.0, 2.0]
    # the same images under the wrong prompts: wrong under both
    assert oracle.image_rewards(tokens, prompts[1:] + prompts[:1]).tolist() == [0.0, 0.0, 0.0]
    lenient = OracleScorer(judge="lenient")
    lenient.attach(base)
    assert lenient.image_rewards(tokens[:1], prompts[:1]).tolist() == [1.0]


def test_oracle_names_an_unknown_prompt_and_refuses_texts(base):
    oracle = OracleScorer()
    oracle.attach(base)
    tokens = torch.zeros(1, base.num_image_tokens, dtype=torch.long)
    with pytest.raises(ConfigError, match="'a photo of a dragon'"):
        oracle.image_rewards(tokens, ["a photo of a dragon"])
    with pytest.raises(ConfigError, match="images only"):
        oracle.text_rewards(tokens, [["a circle"]])
    with pytest.raises(ConfigError, match="scorer.judge"):
        OracleScorer(judge="kind")


def test_random_scorer_is_seeded_uniform_and_ignores_the_samples(tiny_adapter):
    a, b = RandomScorer(seed=3), RandomScorer(seed=3)
    for s in (a, b):
        s.attach(tiny_adapter)
    tokens = torch.zeros(400, tiny_adapter.num_image_tokens, dtype=torch.long)
    ra = a.image_rewards(tokens, ["x"] * 400)
    assert torch.equal(ra, b.image_rewards(tokens, ["x"] * 400))  # same seed, same stream
    assert not torch.equal(ra, a.image_rewards(tokens, ["x"] * 400))  # the stream moves on
    assert 0.0 <= ra.min() and ra.max() < 1.0 and abs(ra.mean().item() - 0.5) < 0.05
    assert a.text_rewards(tokens[:3], [["p", "q"]] * 3).shape == (3, 2)


def test_random_scorer_stream_resumes_from_a_state_dict(tiny_adapter):
    """A checkpoint holds the stream's position: a resumed run continues it, not replays it."""
    run = RandomScorer(seed=3)
    run.attach(tiny_adapter)
    tokens = torch.zeros(5, tiny_adapter.num_image_tokens, dtype=torch.long)
    run.image_rewards(tokens, ["x"] * 5)
    saved = {k: v for k, v in run.state_dict().items()}
    next_rewards = run.image_rewards(tokens, ["x"] * 5)
    resumed = RandomScorer(seed=3)
    resumed.attach(tiny_adapter)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed.image_rewards(tokens, ["x"] * 5), next_rewards)


def test_within_group_auc_against_pairwise_counting_across_groups():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(30, 6)).round(1)  # rounding makes ties
    correct = rng.random((30, 6)) < 0.4
    wins = pairs = 0.0
    for g in range(30):
        for i in range(6):
            for j in range(6):
                if correct[g, i] and not correct[g, j]:
                    pairs += 1
                    wins += 1.0 if rewards[g, i] > rewards[g, j] else 0.5 if rewards[g, i] == rewards[g, j] else 0.0
    assert within_group_auc(rewards, correct) == pytest.approx(wins / pairs)
    # a reward equal to the verdict ranks perfectly; groups all right or all wrong count for nothing
    assert within_group_auc(correct.astype(float), correct) == 1.0
    assert np.isnan(within_group_auc(np.ones((2, 3)), np.array([[1, 1, 1], [0, 0, 0]])))


def _rows(tag: str, correct: list[bool]) -> list[ImageResult]:
    return [ImageResult(tag, f"{tag} {i % 3}", c, "", [c], 1, {}) for i, c in enumerate(correct)]


def test_image_resampling_interval_matches_the_binomial_width():
    rng = np.random.default_rng(1)
    p = {"colors": 0.6, "counting": 0.1, "position": 0.3}
    n = 400
    rows = [r for tag, q in p.items() for r in _rows(tag, list(rng.random(n) < q))]
    acc = {tag: np.mean([r.correct for r in rows if r.tag == tag]) for tag in p}
    sd = np.sqrt(sum(a * (1 - a) / n for a in acc.values())) / len(p)
    lo, hi = overall_confidence_interval(rows, n_boot=4000, resample="images")
    assert (hi - lo) / 2 == pytest.approx(1.96 * sd, rel=0.1)
    # one image per prompt: resampling over images still has width (within prompts it would not)
    single = [ImageResult("colors", f"p{i}", i % 2 == 0, "", [True], 1, {}) for i in range(100)]
    lo, hi = overall_confidence_interval(single, resample="images")
    assert hi - lo > 0.1
    with pytest.raises(ValueError, match="resample"):
        overall_confidence_interval(rows, resample="tags")


def test_pope_interval_resamples_images_and_averages_splits():
    # 50 images, 4 questions each; split A: every answer right; split B: right on half of the images
    names = [f"{i:05d}.png" for i in range(50)]
    questions = {
        split: [PopeQuestion(4 * i + j + 1, name, f"q{j}", "yes" if j % 2 else "no") for i, name in enumerate(names) for j in range(4)]
        for split in ("a", "b")
    }
    right = {"a": lambda i: True, "b": lambda i: i % 2 == 1}
    answers = {
        split: [q.label if right[split](int(q.image[:5])) else {"yes": "no", "no": "yes"}[q.label] for q in qs]
        for split, qs in questions.items()
    }
    scores = score_pope(questions, answers, images=names)
    assert scores.splits["a"].accuracy_ci95 == (1.0, 1.0)
    assert (scores.splits["b"].metrics.accuracy, scores.mean_accuracy) == (0.5, 0.75)
    lo, hi = scores.mean_accuracy_ci95
    assert lo < 0.75 < hi and hi - lo < 0.2
    # the mean resamples images jointly: its replicates are (1 + b's) / 2, so its interval is half b's
    b_lo, b_hi = scores.splits["b"].accuracy_ci95
    assert (lo, hi) == pytest.approx(((1 + b_lo) / 2, (1 + b_hi) / 2))
    # b's accuracy interval: the binomial spread of 25 right images out of 50, resampled
    sd = np.sqrt(0.25 / 50)
    assert (b_hi - b_lo) / 2 == pytest.approx(1.96 * sd, rel=0.15)


def test_shapes_batches_cover_every_prompt_with_the_documented_seeds():
    from dualfw.shapes.evaluate import shapes_batches
    from dualfw.shapes.text import TAGS

    world = WorldConfig(resolution=32)
    records = enumerate_geneval_prompts(world)
    batches = shapes_batches(world, images_per_tag=30, seed=2, prompts_per_batch=16)
    assert [p.prompt for b in batches for p in b.prompts] == [r["prompt"] for r in records]  # tag after tag
    for t, tag in enumerate(TAGS):
        mine = [b for b in batches if b.prompts[0].tag == tag]
        n = sum(r["tag"] == tag for r in records)
        assert [b.seed for b in mine] == [2000 + 100 * t + start for start in range(0, n, 16)]
        assert {b.k for b in mine} == {-(-30 // n)} and all(p.tag == tag for b in mine for p in b.prompts)


def _fit(tmp_path, *extra):
    from dualfw.cli import cli_main

    return cli_main([
        "fit", "--config", str(ROOT / "conf" / "t2i.yaml"),
        "--data.init_args.inputs_per_step=2", "--data.init_args.k=4", "--data.init_args.progress=false",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=t2i", "--trainer.logger.version=run", *extra,
    ])


def test_default_recipe_trains_the_shipped_base_and_exports_it(tmp_path, base):
    from dualfw.training.rollouts import read_rollouts

    cli = _fit(tmp_path)
    assert cli.trainer.global_step == 2
    run = tmp_path / "t2i" / "run"
    trained = JanusAdapter(path=str(run / "export"))
    before, after = base.model.state_dict(), trained.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and not any("vqmodel" in k for k in changed)  # trained; the VQ stays frozen
    prompts = {r["prompt"] for r in read_rollouts(run / "rollouts.jsonl")}
    world_prompts = {r["prompt"] for r in enumerate_geneval_prompts(WorldConfig(resolution=32))}
    assert prompts and prompts <= world_prompts  # the default prompts are the world's


def test_oracle_and_random_scorers_swap_in_by_config(tmp_path):
    from dualfw.training.rollouts import read_rollouts

    for name, scorer in (("oracle", "dualfw.shapes.oracle.OracleScorer"), ("random", "dualfw.RandomScorer")):
        _fit(tmp_path / name, f"--model.init_args.scorer={scorer}", "--trainer.max_steps=1")
        rewards = [x for r in read_rollouts(tmp_path / name / "t2i" / "run" / "rollouts.jsonl") for x in r["rewards"]]
        if name == "oracle":
            assert set(rewards) <= {0.0, 1.0, 2.0}
        else:
            assert all(0.0 <= x < 1.0 for x in rewards) and len(set(rewards)) == len(rewards)


def test_background_token_stats_on_known_scenes(base, monkeypatch):
    from dualfw.shapes.evaluate import background_token_stats
    from dualfw.shapes.world import sample_scene

    world = WorldConfig(resolution=32)
    rng = np.random.default_rng(5)
    images = [render(sample_scene(rng, world)) for _ in range(6)]
    tokens = base.encode_images(to_pixels(images))
    monkeypatch.setattr(base, "sample_images", lambda prompts, k, sampling, seed=None: tokens[: len(prompts) * k].view(len(prompts), k, -1))
    stats = background_token_stats(base, prompts_stride=40, max_prompts=3, k=2)
    # reference from the renders themselves (the tokenizer reconstructs them exactly at this size)
    cells = np.stack(images).reshape(6, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(6, 64, 16, 3)
    mask = (cells == np.array(world.background)).all(-1).all(-1)
    assert stats["background_token_share"] == pytest.approx(mask.mean(), abs=0.02)
    codes = tokens.numpy()
    assert stats["background_codes"] == pytest.approx(len(set(codes[mask].tolist())), abs=3)
    assert 0.0 < stats["background_share_of_image_logp"] < 1.0
