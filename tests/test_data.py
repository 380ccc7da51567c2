"""Prompt files, rollouts, pairing and the self-reward, with their error cases."""

import json
import re
from collections import Counter

import pytest
import torch

from dualfw.training.prompts import read_prompts
from dualfw.training.rollouts import RolloutWriter, read_rollouts
from dualfw.core.errors import ConfigError, MissingFileError
from dualfw.core.selfreward import select_pairs


def test_plain_text_prompts_skip_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n  two squares  \n")
    assert [r["prompt"] for r in read_prompts(f)] == ["a red circle", "two squares"]


def test_official_geneval_metadata_reads_as_prompts_with_metadata(shared_data):
    records = read_prompts(shared_data / "geneval" / "evaluation_metadata.jsonl")
    assert len(records) == 553
    assert records[0]["prompt"].startswith("a photo of") and "include" in records[0] and "tag" in records[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no prompts"),
        ("\n  \n", "holds no prompts"),
        ('{"prompt": "a"}\n{"prompt": "b"\n', ":2: malformed JSON line"),
        ('{"prompt": "a"}\n{"text": "b"}\n', ":2: expected an object with a non-empty string 'prompt'"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "prompts.jsonl"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        read_prompts(f)
    assert str(f) in str(err.value)


def test_missing_prompt_file_names_path_and_key(tmp_path):
    with pytest.raises(MissingFileError, match="data.prompts"):
        read_prompts(tmp_path / "nope.txt")


def test_balance_by_a_field_repeats_each_value_up_to_the_largest(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": f"{tag} {i}", "tag": tag} for tag, n in (("a", 5), ("b", 2), ("c", 1)) for i in range(n)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_prompts(f, balance_by="tag")
    assert Counter(r["tag"] for r in records) == {"a": 5, "b": 5, "c": 5}
    assert {r["prompt"] for r in records} == {r["prompt"] for r in rows}  # every prompt kept
    assert Counter(r["prompt"] for r in records if r["tag"] == "b") == {"b 0": 3, "b 1": 2}  # in turn
    assert read_prompts(f) == rows  # unbalanced: the file as it is


def test_balance_by_names_the_line_without_the_field_and_rejects_plain_text(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "tag": "x"}\n\n{"prompt": "b"}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{f}:3: no 'tag' field") + ".*data.init_args.balance_by"):
        read_prompts(f, key="data.init_args.prompts", balance_by="tag")
    plain = tmp_path / "p.txt"
    plain.write_text("a red circle\n")
    with pytest.raises(ConfigError, match="plain-text prompts have no 'tag' field.*data.balance_by"):
        read_prompts(plain, balance_by="tag")
    from dualfw.training.datamodule import SelfRewardDataModule

    with pytest.raises(ConfigError, match="data.balance_by applies to data.prompts"):
        SelfRewardDataModule(from_predictions=str(tmp_path), balance_by="tag")


def test_packaged_prompt_file_resolves():
    assert len(read_prompts("dualfw:assets/shapes_prompts.txt")) >= 8


def test_rollouts_written_then_read_back(tmp_path):
    writer = RolloutWriter(tmp_path / "run" / "rollouts.jsonl")
    # the schema SelfRewardDataModule.record writes (tests/test_cli.py checks a real run's file)
    records = [
        {"direction": "t2i", "step": 0, "epoch": 0, "seed": 7, "prompt": "a", "image_tokens": [[1, 2], [3, 4]],
         "meta": {"tag": "colors"}, "rewards": [0.1, -0.2], "pairs": [[0, 1]]},
        {"direction": "i2t", "step": 0, "epoch": 0, "seed": 7, "image_tokens": [5, 6], "texts": ["x", "y"],
         "meta": {"image": "a.png"}, "rewards": [0.3, 0.3], "pairs": []},
    ]
    for r in records:
        writer.write(r)
    # flushed line by line: readable before close (a crash loses nothing)
    assert list(read_rollouts(writer.path)) == records
    writer.close()
    with open(writer.path, "a") as f:
        f.write("{broken\n")
    with pytest.raises(ValueError, match=":3: malformed"):
        list(read_rollouts(writer.path))


def test_best_vs_worst_pairs_and_margin():
    rewards = torch.tensor([[0.1, 0.5, -0.3, 0.2], [1.0, 1.0, 1.0, 1.0], [0.0, 0.05, 0.02, 0.01]])
    assert select_pairs(rewards, "best_worst", margin=0.1).tolist() == [[0, 1, 2]]
    # equal rewards never pair
    assert select_pairs(rewards, "best_worst", margin=0.0).tolist() == [[0, 1, 2], [2, 1, 0]]


def test_all_pairs_and_top_bottom_pairs():
    rewards = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    every = select_pairs(rewards, "all", margin=0.0)
    expected = {(0, i, j) for i in range(4) for j in range(4) if rewards[0, i] > rewards[0, j]}
    assert set(map(tuple, every.tolist())) == expected and len(expected) == 6
    assert set(map(tuple, select_pairs(rewards, "all", margin=0.15).tolist())) == {(0, 0, 1), (0, 0, 3), (0, 2, 1)}
    # top-2 vs bottom-2: best (0) vs worst (1), second best (2) vs second worst (3)
    assert select_pairs(rewards, "top_bottom", top_k=2).tolist() == [[0, 0, 1], [0, 2, 3]]
    with pytest.raises(ConfigError, match="unknown pairing"):
        select_pairs(rewards, "random")


def test_rollouts_pair_with_the_data_modules_top_k(tiny_adapter):
    from dualfw.core.interface import ImageSampling
    from dualfw.core.selfreward import rollout_t2i
    from dualfw.training.scorer import RandomScorer

    scorer = RandomScorer(seed=1)
    group = rollout_t2i(tiny_adapter, scorer, ["a red circle"], 6, ImageSampling(), pairing="top_bottom", seed=0, top_k=3)
    assert group.pairs.tolist() == select_pairs(group.rewards, "top_bottom", top_k=3).tolist() and len(group.pairs) == 3


def test_k_below_two_is_rejected(tmp_path):
    from dualfw.training.datamodule import SelfRewardDataModule

    f = tmp_path / "p.txt"
    f.write_text("a red circle\n")
    with pytest.raises(ConfigError, match="data.k must be at least 2"):
        SelfRewardDataModule(prompts=str(f), k=1)


def test_scorer_reward_is_mean_token_logprob_of_the_prompt(tiny_adapter):
    from dualfw.training.scorer import DualScorer

    tokens = torch.randint(0, 64, (3, tiny_adapter.num_image_tokens), generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle", "two blue squares left of a green triangle", "a dog"]
    mean_scorer, sum_scorer = DualScorer(batch_size=2), DualScorer(reduction="sum", batch_size=3)
    mean_scorer.attach(tiny_adapter)
    sum_scorer.attach(tiny_adapter)
    rewards, sums = mean_scorer.image_rewards(tokens, prompts), sum_scorer.image_rewards(tokens, prompts)
    for i in range(3):  # one at a time, straight from the adapter
        with torch.no_grad():
            logps, mask = tiny_adapter.text_logprobs(tiny_adapter.decode_images(tokens[i : i + 1]), [prompts[i]], "Describe this image.")
        assert torch.allclose(rewards[i], logps[mask].mean(), atol=1e-5)
        assert torch.allclose(sums[i], logps[mask].sum(), atol=1e-4)


def test_frozen_scorer_does_not_follow_the_policy(tiny_folder):
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.scorer import DualScorer

    policy = JanusAdapter(path=str(tiny_folder))
    live, frozen = DualScorer(), DualScorer(frozen=True)
    live.attach(policy)
    frozen.attach(policy)
    tokens = torch.randint(0, 64, (1, policy.num_image_tokens))
    before = frozen.image_rewards(tokens, ["a circle"])
    with torch.no_grad():
        policy.model.lm_head.weight.mul_(3.0)
    assert torch.equal(frozen.image_rewards(tokens, ["a circle"]), before)
    assert not torch.allclose(live.image_rewards(tokens, ["a circle"]), before)
    assert not any(p.requires_grad for p in frozen.model.parameters())


def test_bad_model_folders_are_named(tmp_path):
    from dualfw.adapters.janus import JanusAdapter

    with pytest.raises(MissingFileError, match="does not exist"):
        JanusAdapter(path=str(tmp_path / "missing"))
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"model_type 'llama', not a unified LMM"):
        JanusAdapter(path=str(llama))


@pytest.mark.parametrize("lora_r", [None, 4])
def test_reference_frozen_scorer_and_initial_sampler_share_one_initial_model(tiny_folder, lora_r):
    # three users of the initial weights, one copy in memory (or none, with LoRA: adapters off)
    from dualfw.core.losses import DPO
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import LoraSpec, Policy
    from dualfw.training.scorer import DualScorer

    base = JanusAdapter(path=str(tiny_folder))
    policy = Policy(JanusAdapter(path=str(tiny_folder)), loss=DPO(), scorer=DualScorer(frozen=True),
                    lora=LoraSpec(r=lora_r) if lora_r else None, rollouts_from="initial")
    assert policy.reference.view is policy.sampler
    assert policy.scorer.model is policy.reference.view
    assert (policy.reference.view.adapter is policy.model) == bool(lora_r)  # LoRA: the policy with adapters off
    fresh = DualScorer()
    fresh.attach(base)
    tokens = torch.randint(0, 64, (2, base.num_image_tokens))
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # training moved the policy
    assert torch.allclose(policy.scorer.image_rewards(tokens, ["a circle", "a square"]),
                          fresh.image_rewards(tokens, ["a circle", "a square"]), atol=1e-5)
    assert torch.allclose(policy.reference.view.image_logprobs(["a circle", "a square"], tokens),
                          base.image_logprobs(["a circle", "a square"], tokens), atol=1e-5)


@pytest.mark.parametrize("loss, lora_r", [("SimPO", None), ("DPO", None), ("SimPO", 4)])
def test_rollouts_from_initial_sample_the_initial_weights(tiny_folder, tmp_path, loss, lora_r):
    from dualfw.core import losses
    from dualfw.training.datamodule import SelfRewardDataModule
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import LoraSpec, Policy

    base = JanusAdapter(path=str(tiny_folder))
    lora = LoraSpec(r=lora_r) if lora_r else None
    policy = Policy(JanusAdapter(path=str(tiny_folder)), loss=getattr(losses, loss)(), lora=lora, rollouts_from="initial")
    if loss == "DPO":
        assert policy.sampler is policy.reference.view  # one frozen copy serves both
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # training moved the policy
    (tmp_path / "prompts.txt").write_text("a circle\na square\n")
    dm = SelfRewardDataModule(prompts=str(tmp_path / "prompts.txt"), k=2, inputs_per_step=2, progress=False)
    group = dm.sample("t2i", policy, lambda n, epoch, index: [0, 1], 0, 0, seed=3)
    expected = base.sample_images(["a circle", "a square"], 2, dm.sampling, seed=3)
    assert torch.equal(group.image_tokens, expected)
    assert not torch.equal(policy.model.sample_images(["a circle", "a square"], 2, dm.sampling, seed=3), expected)


def test_rollouts_from_a_bad_value_is_named(tiny_folder):
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import Policy

    with pytest.raises(ConfigError, match="model.init_args.rollouts_from must be 'policy' or 'initial', got 'reference'"):
        Policy(JanusAdapter(path=str(tiny_folder)), rollouts_from="reference")


@pytest.mark.parametrize(
    "groups, cause",
    [
        ({}, "every image was unreadable (0 skipped"),
        ({"t2i": "equal"}, "all K samples of every input were equal"),
        ({"t2i": "apart"}, "the K rewards of every input were within data.margin 0.5"),
    ],
)
def test_rounds_without_pairs_stop_the_run_naming_the_cause(tmp_path, groups, cause):
    from dualfw.core.errors import StalledRunError
    from dualfw.core.selfreward import Group
    from dualfw.training.datamodule import SelfRewardDataModule, SelfRewardStream

    (tmp_path / "p.txt").write_text("a circle\n")
    dm = SelfRewardDataModule(prompts=str(tmp_path / "p.txt"), k=2, margin=0.5, max_rounds_without_pairs=3)
    stream = SelfRewardStream(dm)
    tokens = {"equal": torch.zeros(1, 2, 4, dtype=torch.long), "apart": torch.arange(8).view(1, 2, 4)}
    made = {d: Group("t2i", torch.tensor([[0.1, 0.2]]), torch.zeros(0, 3, dtype=torch.long), prompts=["a circle"],
                     image_tokens=tokens[kind]) for d, kind in groups.items()}
    paired = Group("t2i", torch.tensor([[0.1, 0.9]]), torch.tensor([[0, 1, 0]]), prompts=["a circle"], image_tokens=tokens["apart"])
    stream._check_pairs(made)
    stream._check_pairs(made)
    stream._check_pairs({"t2i": paired})  # a pair resets the count
    stream._check_pairs(made)
    stream._check_pairs(made)
    with pytest.raises(StalledRunError, match=r"^3 consecutive sampling rounds gave no preference pair: " + re.escape(cause)):
        stream._check_pairs(made)


def test_margin_and_sampling_bounds_are_refused():
    from dualfw.core.interface import ImageSampling, TextSampling
    from dualfw.training.datamodule import SelfRewardDataModule

    with pytest.raises(ConfigError, match="data.margin must be >= 0"):
        SelfRewardDataModule(prompts="dualfw:assets/shapes_prompts.txt", margin=-0.1)
    for bad, message in [(dict(temperature=-1), "temperature must be >= 0"), (dict(top_p=0), "top_p must be in"),
                         (dict(top_k=-1), "top_k must be >= 0"), (dict(guidance_scale=0.5), "guidance_scale must be >= 1")]:
        with pytest.raises(ConfigError, match=message):
            ImageSampling(**bad)
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1"):
        TextSampling(max_new_tokens=0)
    assert ImageSampling(temperature=0, guidance_scale=1).temperature == 0  # greedy stays allowed
