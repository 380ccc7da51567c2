"""Our Emu3 adapter against transformers itself (float32, CPU): sampler tokens, image and text
log-probs, descriptions, and the VQ path."""

import pytest
import torch
from transformers import GenerationConfig

from dualfw.core.interface import Images, ImageSampling, TextSampling

MIXED = ["a red circle", "two blue squares left of a big green triangle", "a photo of a dog"]
K = 2


def _hf_generate(adapter, prompts, guidance_scale):
    """transformers' generate with Emu3's recipe: visual tokens only, an end-of-line token closing
    each row (prefix_allowed_tokens_fn), CFG against the negative prompt expanded to every row.
    Returns the image rows' ids (n, h * (w + 1)) and generate's processed scores."""
    ids, mask = adapter.generation_inputs(prompts)
    tok = adapter.processor.tokenizer
    wrapper = tok.convert_tokens_to_ids(tok.image_wrapper_token)
    width, visual = adapter.grid, adapter.visual_ids.tolist()

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - torch.nonzero(input_ids == wrapper)[0, 0]
        return [adapter.eol_id] if offset % (width + 1) == 0 else visual

    negative = {}
    if guidance_scale != 1:
        neg = torch.tensor([adapter.negative_ids()] * len(prompts))
        negative = dict(negative_prompt_ids=neg, negative_prompt_attention_mask=torch.ones_like(neg))
    config = GenerationConfig(
        do_sample=False, max_new_tokens=adapter.grid * (width + 1), guidance_scale=guidance_scale,
        pad_token_id=adapter.pad_id, eos_token_id=adapter.eos_id, bos_token_id=adapter.bos_id,
        output_scores=True, return_dict_in_generate=True,
    )
    out = adapter.model.generate(input_ids=ids, attention_mask=mask, prefix_allowed_tokens_fn=allowed,
                                 generation_config=config, **negative)
    return out.sequences[:, ids.shape[1] :], torch.stack(out.scores, 1)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_greedy_tokens_and_image_logprobs_match_generate_on_a_mixed_length_batch(tiny_emu3, guidance_scale):
    _, mask = tiny_emu3.generation_inputs(MIXED)
    assert (mask == 0).any(), "the batch must really be mixed-length (left padding)"
    ours = tiny_emu3.sample_images(MIXED, k=K, sampling=ImageSampling(guidance_scale=guidance_scale, temperature=0))
    assert ours.shape == (3, K, tiny_emu3.num_image_tokens) and int(ours.max()) < len(tiny_emu3.visual_ids)
    repeated = [p for p in MIXED for _ in range(K)]
    sequences, scores = _hf_generate(tiny_emu3, repeated, guidance_scale)
    codes = ours.flatten(0, 1)
    assert torch.equal(tiny_emu3.image_sequence(codes), sequences), "token for token, end-of-line tokens included"
    assert len(set(map(tuple, codes.tolist()))) == 3, "prompts should give different images"

    # generate's processed scores (CFG, then only visual tokens allowed), normalised: the distribution drawn from
    is_code = sequences != tiny_emu3.eol_id
    reference = scores.log_softmax(-1)[is_code].view(len(codes), -1, scores.shape[-1])
    reference = reference.gather(-1, tiny_emu3.visual_ids[codes][..., None]).squeeze(-1)
    logps = tiny_emu3.image_logprobs(repeated, codes, guidance_scale=guidance_scale)
    assert logps.requires_grad, "log-probs must carry gradients for training"
    torch.testing.assert_close(logps.detach(), reference, atol=1e-5, rtol=1e-5)


def test_dropped_prompts_are_scored_on_the_negative_prompt(tiny_emu3):
    tokens = torch.randint(0, len(tiny_emu3.visual_ids), (2, tiny_emu3.num_image_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dropped = tiny_emu3.image_logprobs(MIXED[:2], tokens, drop_prompt=torch.tensor([True, False]))
        negative = tiny_emu3.image_logprobs([tiny_emu3.negative_prompt], tokens[:1])
        kept = tiny_emu3.image_logprobs(MIXED[1:2], tokens[1:])
    torch.testing.assert_close(dropped[0], negative[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped[1], kept[0], atol=1e-5, rtol=0)


def _processor_inputs(adapter, pixels, instruction):
    prompt = adapter.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}], add_generation_prompt=True
    )
    images = list((pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())  # HWC, 8-bit
    return adapter.processor(text=[prompt] * len(pixels), images=images, return_tensors="pt")


def test_text_logprobs_read_the_images_own_tokens_as_the_processor_path_does(tiny_emu3):
    # 8-bit pixels, as the processor sees them
    pixels = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 255).round() / 255
    texts = ["a red circle", "two blue squares left of a green triangle"]
    enc = _processor_inputs(tiny_emu3, pixels, "Describe this image.")
    codes = tiny_emu3.encode_images(pixels)
    with torch.no_grad():  # the VQ path: our codes with end-of-line tokens are the processor path's image tokens
        reference_tokens = tiny_emu3.model.model.get_image_tokens(enc["pixel_values"], enc["image_sizes"])
    assert torch.equal(tiny_emu3.image_sequence(codes).flatten(), reference_tokens)

    def no_decode(tokens):
        raise AssertionError("Emu3 reads tokens: nothing may be decoded")

    logps, mask = tiny_emu3.text_logprobs(Images(tokens=codes, decode=no_decode), texts, "Describe this image.")
    from_pixels, _ = tiny_emu3.text_logprobs(pixels, texts, "Describe this image.")
    torch.testing.assert_close(from_pixels, logps, atol=1e-6, rtol=0)
    tok = tiny_emu3.processor.tokenizer
    for i, text in enumerate(texts):
        # one sample at a time, through the processor (pixels -> VQ -> tokens) and the full forward
        answer = tok(" " + text, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([enc["input_ids"][i : i + 1], answer], 1)
        with torch.no_grad():
            logits = tiny_emu3.model(input_ids=ids, pixel_values=enc["pixel_values"][i : i + 1],
                                     image_sizes=enc["image_sizes"][i : i + 1]).logits.float()
        n = answer.shape[1]
        reference = logits[0, -n - 1 : -1].log_softmax(-1).gather(-1, answer[0, :, None]).squeeze(-1)
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(logps[i, :n].detach(), reference, atol=1e-5, rtol=0)


def test_greedy_descriptions_equal_generate_and_never_hold_image_tokens(tiny_emu3):
    pixels = (torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 255).round() / 255
    ours = tiny_emu3.sample_texts(pixels, k=2, instruction="Describe this image.", sampling=TextSampling(temperature=0, max_new_tokens=8))
    enc = _processor_inputs(tiny_emu3, pixels, "Describe this image.")
    config = GenerationConfig(do_sample=False, max_new_tokens=8, suppress_tokens=tiny_emu3._suppressed,
                              pad_token_id=tiny_emu3.pad_id, eos_token_id=tiny_emu3.eos_id, bos_token_id=tiny_emu3.bos_id)
    out = tiny_emu3.model.generate(**enc, generation_config=config)
    generated = out[:, enc["input_ids"].shape[1] :]
    assert not torch.isin(generated, tiny_emu3.visual_ids).any()
    reference = [t.strip() for t in tiny_emu3.processor.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    assert ours == [[reference[0]] * 2, [reference[1]] * 2]
    sampled = tiny_emu3.sample_texts(pixels, k=2, instruction="Describe this image.", sampling=TextSampling(max_new_tokens=8), seed=0)
    assert all(len(t) == 2 for t in sampled)


def _fit(tmp_path, folder, recipe, *extra):
    from pathlib import Path

    from dualfw.cli import cli_main

    conf = Path(__file__).resolve().parents[1] / "conf"
    return cli_main([
        "fit", "--config", str(conf / f"{recipe}.yaml"), "--config", str(conf / "models" / "emu3.yaml"),
        f"--model.init_args.model.init_args.path={folder}",
        "--model.init_args.model.init_args.image_size=64",
        "--model.init_args.model.init_args.dtype=float32",
        "--data.init_args.inputs_per_step=2", "--data.init_args.k=2", "--data.init_args.progress=false",
        "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
        "--trainer.accumulate_grad_batches=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}", f"--trainer.logger.name={recipe}", "--trainer.logger.version=run",
        *extra,
    ])


@pytest.mark.parametrize("recipe", ["t2i", "dual"])
def test_fit_with_the_emu3_overlay_trains_and_exports_what_transformers_loads(tmp_path, tiny_emu3_folder, recipe):
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    cli = _fit(tmp_path, tiny_emu3_folder, recipe)
    run = tmp_path / recipe / "run"
    assert cli.trainer.global_step == 2 and (run / "checkpoints" / "last.ckpt").is_file()
    export = run / "export"
    loaded = Emu3ForConditionalGeneration.from_pretrained(export, local_files_only=True)
    Emu3Processor.from_pretrained(export, local_files_only=True)
    initial = Emu3ForConditionalGeneration.from_pretrained(tiny_emu3_folder, local_files_only=True)
    trained = cli.model.model.model.state_dict()
    name = "model.text_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.state_dict()[name], trained[name])
    assert not torch.equal(loaded.state_dict()[name], initial.state_dict()[name]), "two steps must move the weights"
    if recipe == "t2i":  # resumes from its last checkpoint
        cli = _fit(tmp_path, tiny_emu3_folder, recipe, "--trainer.max_steps=3", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
        assert cli.trainer.global_step == 3


def test_lora_adapts_the_language_model_only_and_exports_merged(tiny_emu3_folder, tmp_path):
    from dualfw.adapters.emu3 import Emu3Adapter
    from dualfw.core.errors import ConfigError
    from dualfw.training.policy import LoraSpec, Policy

    policy = Policy(Emu3Adapter(path=str(tiny_emu3_folder), image_size=64), lora=LoraSpec(r=4))
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".text_model.layers." in n for n in trainable)
    assert not any("lora" in n for n, _ in policy.model.model.model.vqmodel.named_modules()), "the VQ-VAE's q/k/v_proj stay plain"
    with torch.no_grad():
        for p in policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    tokens = torch.randint(0, len(policy.model.visual_ids), (1, policy.model.num_image_tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = policy.model.image_logprobs(["a circle"], tokens)
        text = policy.model.text_logprobs(Images(tokens=tokens), ["a circle"], "Describe this image.")[0]
    reloaded = Emu3Adapter(path=str(policy.export_pretrained(tmp_path / "export")), image_size=64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.image_logprobs(["a circle"], tokens), image, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded.text_logprobs(Images(tokens=tokens), ["a circle"], "Describe this image.")[0], text, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="no generation-only modules"):
        reloaded.generation_modules()


def test_folders_and_sizes_that_are_not_emu3_are_refused_by_name(tmp_path, tiny_emu3_folder):
    import json

    from dualfw.adapters.emu3 import Emu3Adapter
    from dualfw.core.errors import ConfigError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "janus"}))
    with pytest.raises(ConfigError, match="model_type 'janus'.*needs model_type 'emu3'"):
        Emu3Adapter(path=str(tmp_path))
    with pytest.raises(ConfigError, match="not a multiple of 8"):
        Emu3Adapter(path=str(tiny_emu3_folder), image_size=60)
