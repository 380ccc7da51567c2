"""Our Janus adapter against transformers itself: sampler tokens and log-probs."""

import torch
from transformers import GenerationConfig

from dualfw.core.interface import ImageSampling

MIXED = ["a red circle", "two blue squares left of a big green triangle", "a photo of a dog"]


def _hf_generate(adapter, prompts, guidance_scale=5.0):
    ids, mask = adapter.generation_inputs(prompts)
    config = GenerationConfig(
        bos_token_id=adapter.bos_id,
        pad_token_id=adapter.pad_id,
        do_sample=False,
        guidance_scale=guidance_scale,
        generation_kwargs={"boi_token_id": adapter.boi_id},
    )
    return adapter.model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", generation_config=config)


def test_greedy_cfg_matches_transformers_generate_on_mixed_length_batch(tiny_adapter):
    ids, mask = tiny_adapter.generation_inputs(MIXED)
    assert (mask == 0).any(), "the batch must really be mixed-length (left padding)"
    ours = tiny_adapter.sample_images(MIXED, k=2, sampling=ImageSampling(guidance_scale=5.0, temperature=0))
    reference = _hf_generate(tiny_adapter, [p for p in MIXED for _ in range(2)])
    assert ours.shape == (3, 2, tiny_adapter.num_image_tokens)
    assert torch.equal(ours.flatten(0, 1), reference)
    assert len(set(map(tuple, reference.tolist()))) == 3, "prompts should give different images"


def test_each_prompt_alone_gives_the_same_tokens_as_in_the_batch(tiny_adapter):
    greedy = ImageSampling(temperature=0)
    batch = tiny_adapter.sample_images(MIXED, k=1, sampling=greedy)
    for i, prompt in enumerate(MIXED):
        assert torch.equal(tiny_adapter.sample_images([prompt], k=1, sampling=greedy)[0], batch[i])


def test_guidance_scale_one_means_no_cfg(tiny_adapter, stepwise_logprobs):
    tokens = tiny_adapter.sample_images(MIXED[:2], k=2, sampling=ImageSampling(guidance_scale=1.0, temperature=0))
    # without CFG greedy decoding is the argmax of the conditional log-probs at every step
    logps = tiny_adapter.image_logprobs([MIXED[0], MIXED[1]], tokens[:, 0])
    ids, mask = tiny_adapter.generation_inputs([MIXED[0]])
    assert tokens.shape == (2, 2, tiny_adapter.num_image_tokens)
    full = stepwise_logprobs(tiny_adapter, MIXED[0], tokens[0, 0])
    assert torch.equal(full.argmax(-1), tokens[0, 0])
    assert torch.allclose(logps[0], full.gather(-1, tokens[0, 0, :, None]).squeeze(-1), atol=1e-5)


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_adapter):
    s = ImageSampling(temperature=1.0, top_k=20, top_p=0.9)
    a = tiny_adapter.sample_images(MIXED[:2], k=3, sampling=s, seed=7)
    b = tiny_adapter.sample_images(MIXED[:2], k=3, sampling=s, seed=7)
    c = tiny_adapter.sample_images(MIXED[:2], k=3, sampling=s, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0, 0], a[0, 1]), "the K samples of one prompt should differ"


def test_the_token_sampler_draws_the_tokens_torch_multinomial_draws():
    from dualfw.adapters.decoding import token_sampler

    logits = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 3
    for temperature in (1.0, 0.7):
        sample = token_sampler(ImageSampling(temperature=temperature), seed=11, device=torch.device("cpu"))
        generator = torch.Generator().manual_seed(11)
        draws = [sample(logits) for _ in range(20)]
        reference = [torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator).squeeze(-1) for _ in range(20)]
        assert all(torch.equal(d, r) for d, r in zip(draws, reference))
        assert len({tuple(d.tolist()) for d in draws}) > 1


def test_image_logprobs_match_stepwise_forward_in_a_padded_batch(tiny_adapter, stepwise_logprobs):
    tokens = torch.randint(0, 64, (2, tiny_adapter.num_image_tokens), generator=torch.Generator().manual_seed(0))
    batched = tiny_adapter.image_logprobs([MIXED[0], MIXED[1]], tokens)
    for i in range(2):
        reference = stepwise_logprobs(tiny_adapter, MIXED[i], tokens[i]).gather(-1, tokens[i, :, None]).squeeze(-1)
        # left padding shifts RoPE positions (relative distances are unchanged): equal to float32 rounding
        torch.testing.assert_close(batched[i], reference, atol=1e-5, rtol=1e-5)
    assert batched.requires_grad, "log-probs must carry gradients for training"


def test_text_logprobs_equal_log_softmax_of_transformers_forward(tiny_adapter):
    pixels = torch.rand(2, 3, tiny_adapter.image_size, tiny_adapter.image_size, generator=torch.Generator().manual_seed(1))
    texts = ["a red circle", "two blue squares left of a green triangle"]
    logps, mask = tiny_adapter.text_logprobs(pixels, texts, "Describe this image.")
    tok = tiny_adapter.processor.tokenizer
    for i, text in enumerate(texts):
        # one sample at a time, through the processor and the full model forward (lm_head on all positions)
        prompt = tiny_adapter.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
            add_generation_prompt=True,
        )
        image = (pixels[i] * 255).round().to(torch.uint8)
        enc = tiny_adapter.processor(text=prompt, images=image, return_tensors="pt")
        answer = tok(" " + text, add_special_tokens=False, return_tensors="pt").input_ids
        ids = torch.cat([enc["input_ids"], answer], 1)
        with torch.no_grad():
            logits = tiny_adapter.model(input_ids=ids, pixel_values=enc["pixel_values"]).logits.float()
        n = answer.shape[1]
        reference = logits[0, -n - 1 : -1].log_softmax(-1).gather(-1, answer[0, :, None]).squeeze(-1)
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(logps[i, :n], reference, atol=1e-5, rtol=0)


def test_an_image_read_with_several_texts_is_read_once_with_the_same_logprobs(tiny_adapter, monkeypatch):
    from dualfw.core.interface import Images

    tokens = torch.randint(0, 64, (3, tiny_adapter.num_image_tokens), generator=torch.Generator().manual_seed(2))
    rows = [0, 1, 2, 0, 1, 2, 0, 2]  # each image with several texts, of different lengths (right padding)
    texts = ["a red circle", "two blue squares left of a green triangle", "a dog", "a cat", "x",
             "three yellow triangles above one purple square", "one small white triangle", "a"]
    vision, seen = tiny_adapter.model.model.vision_model, []
    forward = vision.forward
    monkeypatch.setattr(vision, "forward", lambda pixel_values, *a, **k: seen.append(len(pixel_values)) or forward(pixel_values, *a, **k))
    with torch.no_grad():  # scoring: each distinct image's prefix runs once
        shared, mask = tiny_adapter.text_logprobs(Images(tokens[rows], None, tiny_adapter.decode_images), texts, "Describe this image.", eos=True)
    assert seen == [3]
    # with gradients (training) every row is read on its own: the reference
    full, full_mask = tiny_adapter.text_logprobs(Images(tokens[rows], None, tiny_adapter.decode_images), texts, "Describe this image.", eos=True)
    assert seen == [3, len(rows)] and full.requires_grad
    assert torch.equal(mask, full_mask) and mask.sum(1).min() < mask.sum(1).max()
    torch.testing.assert_close(shared, full.detach(), atol=1e-5, rtol=0)


def test_decode_then_encode_round_trip_shapes(tiny_adapter):
    tokens = tiny_adapter.sample_images(["a red circle"], k=2, sampling=ImageSampling(), seed=0)[0]
    pixels = tiny_adapter.decode_images(tokens)
    assert pixels.shape == (2, 3, tiny_adapter.image_size, tiny_adapter.image_size)
    assert 0 <= pixels.min() and pixels.max() <= 1
    codes = tiny_adapter.encode_images(pixels)
    assert codes.shape == tokens.shape and codes.dtype == torch.long


def test_guided_image_logprobs_are_the_cfg_samplers_distribution(tiny_adapter, stepwise_logprobs):
    """image_logprobs(guidance_scale=s) = log softmax(uncond + s (cond - uncond)), with the unconditional
    prompt transformers' CFG uses; its argmax is what transformers' greedy CFG generation picks."""
    s = 5.0
    tokens = torch.stack([_hf_generate(tiny_adapter, [p], guidance_scale=s)[0] for p in MIXED[:2]])
    guided = tiny_adapter.image_logprobs(MIXED[:2], tokens, guidance_scale=s)  # a left-padded batch
    assert guided.requires_grad
    for i, prompt in enumerate(MIXED[:2]):
        ids, _ = tiny_adapter.generation_inputs([prompt])
        keep = (ids == tiny_adapter.bos_id) | (ids == tiny_adapter.boi_id)
        cond = stepwise_logprobs(tiny_adapter, prompt, tokens[i])
        uncond = stepwise_logprobs(tiny_adapter, prompt, tokens[i], ids=ids.masked_fill(~keep, tiny_adapter.pad_id))
        reference = (uncond + s * (cond - uncond)).log_softmax(-1)
        assert torch.equal(reference.argmax(-1), tokens[i]), "greedy CFG picks the guided argmax"
        torch.testing.assert_close(guided[i], reference.gather(-1, tokens[i, :, None]).squeeze(-1), atol=1e-4, rtol=1e-4)
        plain = cond.gather(-1, tokens[i, :, None]).squeeze(-1)
        assert (guided[i] - plain).abs().max() > 0.01, "guidance must change the log-probs"
    torch.testing.assert_close(tiny_adapter.image_logprobs(MIXED[:2], tokens, guidance_scale=1.0),
                               tiny_adapter.image_logprobs(MIXED[:2], tokens))
