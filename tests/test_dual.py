"""The understanding direction, the loss and reward family, LoRA and the diagnostics."""

import math
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from dualfw.core.errors import ConfigError, MissingFileError
from dualfw.core.losses import GRPO, group_advantages, grpo_loss, ipo_loss
from dualfw.core.interface import TextSampling
from dualfw.training.scorer import DualScorer, near_miss_prompts

PIXELS_SEED = 5


def _pixels(adapter, n=2):
    return torch.rand(n, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(PIXELS_SEED))


def test_greedy_descriptions_match_transformers_text_generate(tiny_adapter):
    pixels = _pixels(tiny_adapter)
    ours = tiny_adapter.sample_texts(pixels, k=2, instruction="Describe this image.", sampling=TextSampling(temperature=0, max_new_tokens=10))
    prompt = tiny_adapter.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        add_generation_prompt=True,
    )
    for i in range(2):
        enc = tiny_adapter.processor(text=prompt, images=(pixels[i] * 255).round().to(torch.uint8), return_tensors="pt")
        config = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=tiny_adapter.eos_id, pad_token_id=tiny_adapter.pad_id)
        out = tiny_adapter.model.generate(**enc, generation_config=config, generation_mode="text")
        text = tiny_adapter.processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert ours[i] == [text, text]


def test_text_reward_is_teacher_forced_image_likelihood(tiny_adapter, stepwise_logprobs):
    pixels = _pixels(tiny_adapter, 1)
    texts = [["a red circle", "two squares"]]
    scorer = DualScorer(i2t_reduction="mean")
    scorer.attach(tiny_adapter)
    rewards = scorer.text_rewards(tiny_adapter.encode_images(pixels), texts)
    tokens = tiny_adapter.encode_images(pixels)[0]
    for j, text in enumerate(texts[0]):
        reference = stepwise_logprobs(tiny_adapter, text, tokens).gather(-1, tokens[:, None]).mean()
        assert torch.allclose(rewards[0, j], reference, atol=1e-5)


def _plain_and_variant(adapter, n_images: int, **variant):
    """VQ tokens of n test images, a plain DualScorer and one with `variant`, both on `adapter`."""
    plain, other = DualScorer(), DualScorer(**variant)
    plain.attach(adapter)
    other.attach(adapter)
    return adapter.encode_images(_pixels(adapter, n_images)), plain, other


def test_pmi_rewards_equal_their_two_terms(tiny_adapter):
    image_tokens, plain, pmi = _plain_and_variant(tiny_adapter, 2, contrastive=True)
    texts = [["a circle", "a blue square"], ["two triangles", "a dog"]]
    unconditional = plain.image_loglik(image_tokens, ["", ""])
    assert torch.allclose(pmi.text_rewards(image_tokens, texts), plain.text_rewards(image_tokens, texts) - unconditional[:, None], atol=1e-5)
    prompts = ["a red circle", "a red circle", "two squares"]
    tokens = image_tokens[[0, 1, 1]]
    no_image = plain.prompt_loglik(None, prompts)
    assert torch.allclose(pmi.image_rewards(tokens, prompts), plain.image_rewards(tokens, prompts) - no_image, atol=1e-5)


def test_batch_contrast_rewards_subtract_the_log_mean_likelihood_of_the_other_inputs(tiny_adapter):
    from dualfw.core.errors import ConfigError

    image_tokens, plain, contrast = _plain_and_variant(tiny_adapter, 3, batch_contrast=True)
    # t2i: 2 samples for each of 3 prompts; each image against the two prompts it was not sampled for
    prompts = ["a red circle", "two squares", "a blue triangle"]
    rows = [p for p in prompts for _ in range(2)]
    tokens = image_tokens[[0, 1, 2, 0, 1, 2]]
    got = contrast.image_rewards(tokens, rows)
    for j, prompt in enumerate(rows):
        others = [plain.prompt_loglik(tokens[j : j + 1], [q])[0] for q in prompts if q != prompt]
        expected = plain.prompt_loglik(tokens[j : j + 1], [prompt])[0] - (torch.stack(others).exp().mean().log())
        # scored one at a time here, batched there: they differ by up to ~6e-4 on this model
        assert torch.allclose(got[j], expected, atol=2e-3), j
    # i2t: each description against the batch's other images
    texts = [["a circle", "a blue square"], ["two triangles", "a dog"], ["a red square", "three circles"]]
    got = contrast.text_rewards(image_tokens, texts)
    for b in range(3):
        for k, text in enumerate(texts[b]):
            own = plain.image_loglik(image_tokens[b : b + 1], [text])[0]
            others = torch.stack([plain.image_loglik(image_tokens[o : o + 1], [text])[0] for o in range(3) if o != b])
            assert torch.allclose(got[b, k], own - others.exp().mean().log(), atol=2e-3), (b, k)
    with pytest.raises(ConfigError, match="inputs_per_step"):
        contrast.image_rewards(tokens[:2], ["a red circle"] * 2)
    with pytest.raises(ConfigError, match="inputs_per_step"):
        contrast.text_rewards(image_tokens[:1], texts[:1])
    # a weight subtracts that share of the term, on both directions
    _, _, half = _plain_and_variant(tiny_adapter, 3, batch_contrast=0.5)
    full_t2i, plain_t2i = contrast.image_rewards(tokens, rows), plain.image_rewards(tokens, rows)
    assert torch.allclose(half.image_rewards(tokens, rows), plain_t2i - 0.5 * (plain_t2i - full_t2i), atol=2e-3)
    full_i2t, plain_i2t = contrast.text_rewards(image_tokens, texts), plain.text_rewards(image_tokens, texts)
    assert torch.allclose(half.text_rewards(image_tokens, texts), plain_i2t - 0.5 * (plain_i2t - full_i2t), atol=2e-3)
    with pytest.raises(ConfigError, match="batch_contrast"):
        DualScorer(batch_contrast=-1.0)


def test_near_miss_prompts_replace_one_word_or_swap_two():
    groups = [["red", "blue", "orange"], ["circle", "square"], ["left of", "above"]]
    assert near_miss_prompts("a red circle left of a square", groups) == [
        "a blue circle left of a square",
        "an orange circle left of a square",
        "a red square left of a square",
        "a red circle above a square",
        "a red circle left of a circle",
        "a red square left of a circle",  # the two shapes swapped
    ]
    # whole words only ("reddish" is not "red"), articles follow the word, nothing repeated
    assert near_miss_prompts("an orange circle and a reddish circle", groups) == [
        "a red circle and a reddish circle",
        "a blue circle and a reddish circle",
        "an orange square and a reddish circle",
        "an orange circle and a reddish square",
    ]
    assert near_miss_prompts("a dog", groups) == []


def test_near_miss_rewards_subtract_the_log_mean_likelihood_of_the_near_misses(tiny_adapter):
    groups = [["red", "blue", "green"], ["circle", "square", "triangle"]]
    image_tokens, plain, near = _plain_and_variant(tiny_adapter, 2, near_misses=groups, near_miss_limit=3)
    prompts = ["a red circle", "a red circle", "a dog", "a dog"]
    tokens = image_tokens[[0, 1, 0, 1]]
    misses = near_miss_prompts("a red circle", groups)  # 4 near misses; 3 a step, cycling
    for call, chosen in enumerate([misses[:3], [misses[3], misses[0], misses[1]]]):
        got = near.image_rewards(tokens, prompts)
        for j in range(2):
            scores = torch.stack([plain.prompt_loglik(tokens[j : j + 1], [m])[0] for m in chosen])
            expected = plain.prompt_loglik(tokens[j : j + 1], [prompts[j]])[0] - scores.exp().mean().log()
            assert torch.allclose(got[j], expected, atol=2e-3), (call, j)
        # a prompt without near misses keeps R_G
        assert torch.allclose(got[2:], plain.image_rewards(tokens[2:], prompts[2:]), atol=2e-3)
    with pytest.raises(ConfigError, match=r"near_misses\[1\]"):
        DualScorer(near_misses=[["red", "blue"], ["circle"]])
    with pytest.raises(ConfigError, match="near_miss_limit"):
        DualScorer(near_misses=groups, near_miss_limit=-1)
    # a weight subtracts that share of the term (limit 0: every near miss, the same on each call)
    _, _, full = _plain_and_variant(tiny_adapter, 2, near_misses=groups)
    _, _, part = _plain_and_variant(tiny_adapter, 2, near_misses=groups, near_miss_weight=0.25)
    plain_t2i, full_t2i = plain.image_rewards(tokens, prompts), full.image_rewards(tokens, prompts)
    assert not torch.allclose(plain_t2i[:2], full_t2i[:2], atol=1e-2)
    assert torch.allclose(part.image_rewards(tokens, prompts), plain_t2i - 0.25 * (plain_t2i - full_t2i), atol=2e-3)
    with pytest.raises(ConfigError, match="near_miss_weight"):
        DualScorer(near_misses=groups, near_miss_weight=-0.5)


def test_the_shapes_near_miss_overlay_holds_the_worlds_words():
    from omegaconf import OmegaConf

    from dualfw.shapes.text import near_miss_words

    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "shapes" / "near_misses.yaml")
    assert OmegaConf.to_container(conf.model.init_args.scorer.init_args.near_misses) == near_miss_words()


def test_ipo_and_grpo_against_hand_computed_values():
    # IPO: h = (-10 + 11) - (-12 + 11) = 2, tau 0.25 -> target 2 -> loss 0; tau 0.5 -> (2 - 1)^2 = 1
    args = torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0])
    assert ipo_loss(*args, tau=0.25).item() == pytest.approx(0.0)
    assert ipo_loss(*args, tau=0.5).item() == pytest.approx(1.0)
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 8.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv.mean(-1), torch.zeros(2), atol=1e-6)
    assert adv[0].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)  # std of (1,2,3) is 1
    # centred rows (-1, 0, 1) and (-1, -1, 2): rms over all six = sqrt(8 / 6)
    assert group_advantages(rewards, "none").tolist() == [[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]]
    batch = group_advantages(rewards, "batch")
    assert torch.allclose(batch, group_advantages(rewards, "none") / math.sqrt(8 / 6), atol=1e-5)
    # a group the reward barely separates: "group" blows it up to the size of a clear one, the others do not
    flat = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.01, 4.99]])
    assert group_advantages(flat)[1].abs().max() == pytest.approx(1.0, abs=1e-3)
    assert group_advantages(flat, "batch")[1].abs().max() < 0.02 * group_advantages(flat, "batch")[0].abs().max()
    # extremes: only the best and the worst sample, +-half the span around the midrange
    assert group_advantages(rewards, "none", extremes=True).tolist() == [[-1.0, 0.0, 1.0], [-1.5, 0.0, 1.5]]
    assert torch.allclose(group_advantages(rewards, extremes=True), torch.tensor([[-1.0, 0.0, 1.0]] * 2), atol=1e-5)
    half_rms = math.sqrt((1.0 + 1.5**2) / 2)
    assert torch.allclose(group_advantages(rewards, "batch", extremes=True),
                          group_advantages(rewards, "none", extremes=True) / half_rms, atol=1e-5)
    assert group_advantages(torch.full((1, 4), 2.0), "batch", extremes=True).abs().max() == 0  # nothing to tell apart
    with pytest.raises(ConfigError, match="scale"):
        GRPO(scale="std")
    # on-policy: ratio 1, so the loss is -A (+ KL); with ref = logp the k3 KL is 0
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    assert grpo_loss(logps, logps, adv[:1], logps, 0.2, 0.5).tolist()[0] == pytest.approx([1.0, 0.0, -1.0], abs=1e-5)
    # k3 KL with ref - logp = 1: e - 1 - 1
    kl_only = grpo_loss(logps, logps, torch.zeros(1, 3), logps + 1, 0.2, 1.0)
    assert torch.allclose(kl_only, torch.full((1, 3), math.e - 2))
    # the clip: a ratio of e^0.5 with a positive advantage is capped at 1.2
    clipped = grpo_loss(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([1.0]), None, 0.2, 0.0)
    assert clipped.item() == pytest.approx(-1.2)


def test_grpo_gradient_raises_the_best_sample(tiny_folder):
    from dualfw.core.interface import ImageSampling
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import Policy
    from dualfw.core.selfreward import Group, select_pairs, sequence_logps

    policy = Policy(JanusAdapter(path=str(tiny_folder)), loss=GRPO(kl_beta=0.0))
    prompts = ["a red circle"]
    tokens = policy.model.sample_images(prompts, k=3, sampling=ImageSampling(), seed=0)
    rewards = torch.tensor([[3.0, 1.0, 2.0]])
    group = Group("t2i", rewards, select_pairs(rewards), prompts=prompts, image_tokens=tokens)
    samples = torch.tensor([[0, 0], [0, 1], [0, 2]])
    before, _ = sequence_logps(policy.model, group, samples)
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=1e-2)
    loss, _ = policy.direction_loss(group)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = sequence_logps(policy.model, group, samples)
    change = after - before
    assert change[0] > 0 and change[1] < 0 and change[0] > change[2] > change[1]


@pytest.mark.parametrize("guided", [False, True])
def test_grpo_on_the_initial_model_samples_takes_its_ratio_against_the_initial_model(tiny_folder, guided):
    # samples drawn by the frozen initial model: the ratio pi / pi_initial is an importance weight
    # and its clip a trust region around the initial model; drawn by the policy, the ratio is 1
    from dualfw.core.interface import ImageSampling
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import Policy
    from dualfw.core.selfreward import Group, select_pairs, sequence_logps

    base = JanusAdapter(path=str(tiny_folder))
    prompts = ["a red circle", "a blue square"]
    tokens = base.sample_images(prompts, k=3, sampling=ImageSampling(), seed=0)
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 2.0, 1.0]])
    group = Group("t2i", rewards, select_pairs(rewards), prompts=prompts, image_tokens=tokens)
    samples = torch.tensor([[i, j] for i in range(2) for j in range(3)])
    with torch.no_grad():
        initial, lengths = sequence_logps(base, group, samples, guided)
    for rollouts_from in ("initial", "policy"):
        policy = Policy(JanusAdapter(path=str(tiny_folder)), loss=GRPO(clip=0.02, kl_beta=0.0, scale="none"),
                        rollouts_from=rollouts_from, guided_logps=guided)
        with torch.no_grad():
            for p in policy.model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
            moved, _ = sequence_logps(policy.model, group, samples, guided)
        loss, stats = policy.direction_loss(group)
        per_token = (moved / lengths).view(2, 3)
        old = (initial / lengths).view(2, 3) if rollouts_from == "initial" else per_token
        expected = grpo_loss(per_token, old, group_advantages(rewards, "none"), None, 0.02, 0.0).mean()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
        if rollouts_from == "initial":
            ratio = torch.exp(per_token - old)
            assert not torch.allclose(ratio, torch.ones_like(ratio), atol=1e-3)  # the policy did move
            assert stats["ratio_outside_clip"].item() == pytest.approx(((ratio - 1).abs() > 0.02).float().mean().item())
        else:
            assert loss.item() == pytest.approx(0.0, abs=1e-6) and "ratio_outside_clip" not in stats  # -mean(A) = 0


def test_lora_reference_is_the_policy_with_adapters_disabled(tiny_folder):
    from dualfw.core.losses import DPO
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import LoraSpec, Policy

    base = JanusAdapter(path=str(tiny_folder))
    policy = Policy(JanusAdapter(path=str(tiny_folder)), loss=DPO(), lora=LoraSpec(r=4, alpha=8))
    assert policy.reference.view.adapter is policy.model and not policy.reference.holds_copy
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # checkpoints hold each weight once
    assert not any(key.startswith("_peft") or "peft_model" in key for key in policy.state_dict())
    tokens = torch.randint(0, 64, (1, base.num_image_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # LoRA moved away from zero: the policy changes, the Reference must not
        expected = base.image_logprobs(["a circle"], tokens)
        torch.testing.assert_close(policy.reference.view.image_logprobs(["a circle"], tokens), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(policy.model.image_logprobs(["a circle"], tokens), expected, atol=1e-3)


def test_lora_targets_that_match_nothing_are_named(tiny_folder):
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import LoraSpec, Policy

    with pytest.raises(ConfigError, match=r"lora.target_modules \['nope_proj'\] match no layer"):
        Policy(JanusAdapter(path=str(tiny_folder)), lora=LoraSpec(target_modules=["nope_proj"]))


def test_export_loads_back_with_transformers_and_gives_the_same_logprobs(tiny_folder, tmp_path):
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import LoraSpec, Policy

    policy = Policy(JanusAdapter(path=str(tiny_folder)), lora=LoraSpec(r=4))
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    tokens = torch.randint(0, 64, (1, policy.model.num_image_tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = policy.model.image_logprobs(["a circle"], tokens)
    folder = policy.export_pretrained(tmp_path / "export")
    reloaded = JanusAdapter(path=str(folder))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.image_logprobs(["a circle"], tokens), trained, atol=1e-5, rtol=1e-5)


def test_stall_at_ln2_warns_after_patience(tiny_folder):
    from dualfw.core.losses import DPO
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.policy import Policy

    policy = Policy(JanusAdapter(path=str(tiny_folder)), loss=DPO(), stall_patience=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for loss in (math.log(2) + 0.005, math.log(2) - 0.004):
            policy._check_stall("t2i", loss)
        policy._check_stall("t2i", 0.5)  # leaves the plateau: the count restarts
        for _ in range(2):
            policy._check_stall("t2i", math.log(2))
        assert not caught
        policy._check_stall("t2i", math.log(2))
    assert any("ln 2 for 3 steps" in str(w.message) for w in caught)


def test_image_inputs_errors_and_skips(tmp_path):
    from dualfw.training.datamodule import SelfRewardDataModule
    from dualfw.training.images import list_images, load_image

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        list_images(empty)
    with pytest.raises(MissingFileError, match="data.images"):
        list_images(tmp_path / "missing")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    with pytest.warns(UserWarning, match="bad.png"):
        assert load_image(tmp_path / "bad.png", 32) is None
    with pytest.raises(ConfigError, match="schedule 'sideways' is unknown"):
        SelfRewardDataModule(images=str(tmp_path), schedule="sideways")
    with pytest.raises(ConfigError, match="data.images is required"):
        SelfRewardDataModule(prompts="dualfw:assets/shapes_prompts.txt", schedule="joint")


def test_alternate_schedule():
    from dualfw.training.datamodule import directions_at

    assert [directions_at("alternate", s, 2) for s in range(5)] == [("t2i",), ("t2i",), ("i2t",), ("i2t",), ("t2i",)]
    assert directions_at("joint", 7, 1) == ("t2i", "i2t")


def test_joint_fit_end_to_end_counts_a_corrupt_image(tmp_path, tiny_folder):
    import csv
    import shutil

    from dualfw.cli import cli_main
    from dualfw.core.files import resolve_path
    from dualfw.training.rollouts import read_rollouts

    images = tmp_path / "images"
    shutil.copytree(resolve_path("dualfw:assets/shapes_images"), images)
    (images / "aa_corrupt.png").write_bytes(b"\x89PNG broken")
    conf = Path(__file__).resolve().parents[1] / "conf" / "dual.yaml"
    with pytest.warns(UserWarning, match="aa_corrupt.png"):
        cli_main([
            "fit", "--config", str(conf),
            f"--model.init_args.model.init_args.path={tiny_folder}",
            f"--data.init_args.images={images}", "--data.init_args.shuffle=false",
            "--data.init_args.inputs_per_step=13", "--data.init_args.k=2",
            "--data.init_args.text_sampling.max_new_tokens=6", "--data.init_args.progress=false",
            "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.logger.name=dual", "--trainer.logger.version=run",
        ])
    run = tmp_path / "dual" / "run"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    columns = set(rows[0])
    for key in ("t2i/loss", "i2t/loss", "t2i/grad_norm", "i2t/grad_norm", "diagnostics/grad_norm_ratio_t2i_over_i2t", "data/unreadable_images"):
        assert key in columns, key
    assert max(float(r["data/unreadable_images"] or 0) for r in rows) == 1.0
    directions = {r["direction"] for r in read_rollouts(run / "rollouts.jsonl")}
    assert directions == {"t2i", "i2t"}
    i2t = next(r for r in read_rollouts(run / "rollouts.jsonl") if r["direction"] == "i2t")
    assert len(i2t["texts"]) == 2 and len(i2t["rewards"]) == 2 and "image" in i2t["meta"]


def test_image_list_file_resolves_paths_and_names_bad_lines(tmp_path):
    import json

    from dualfw.training.images import list_images

    listing = tmp_path / "images.jsonl"
    listing.write_text(json.dumps({"image": "a.png"}) + "\n\n" + json.dumps({"path": "sub/b.png"}) + "\n")
    assert list_images(listing) == [tmp_path / "a.png", tmp_path / "sub" / "b.png"]
    listing.write_text(json.dumps({"image": "a.png"}) + "\n{broken\n")
    with pytest.raises(ConfigError, match=r"images.jsonl:2: malformed JSON"):
        list_images(listing)
    listing.write_text(json.dumps({"caption": "no path"}) + "\n")
    with pytest.raises(ConfigError, match=r"images.jsonl:1: expected an object with an 'image' or 'path' field"):
        list_images(listing)


@pytest.mark.parametrize("schedule", ["joint", "t2i"])
def test_a_lora_set_for_each_direction_learns_from_its_own_direction_only(tmp_path, tiny_folder, schedule):
    """conf/dual.yaml with `lora.per_direction`: after a fit each set moved only if its direction
    trained (the t2i set from drawing losses, the i2t set from reading ones), no base weight moved,
    and the export holds both sets apart."""
    import json

    from conftest import fit_args, weights_by_base_name
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.cli import cli_main
    from dualfw.core.lora import LORA_FILE

    cli_main(fit_args(
        tmp_path, tiny_folder, "--model.init_args.lora.r=4", "--model.init_args.lora.per_direction=true",
        "--model.init_args.optimizer.init_args.lr=0.05", f"--data.init_args.schedule={schedule}",
        "--data.init_args.k=2", "--data.init_args.text_sampling.max_new_tokens=6", recipe="dual",
    ))
    export = tmp_path / "dual" / "run" / "export"
    assert set(json.loads((export / LORA_FILE).read_text())["per_direction"]) == {"t2i", "i2t"}
    weights = weights_by_base_name(JanusAdapter(path=str(export)))
    base = JanusAdapter(path=str(tiny_folder))
    assert all(torch.equal(p, weights[n]) for n, p in base.named_parameters())
    moved = {d: any(float(p.abs().max()) > 0 for n, p in weights.items() if f"lora_B.{d}." in n) for d in ("t2i", "i2t")}
    assert moved == {"t2i": True, "i2t": schedule == "joint"}
