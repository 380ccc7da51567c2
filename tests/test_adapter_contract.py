"""The contract every LMM adapter must meet. Adding an LMM: implement dualfw.core.interface.LMMAdapter
in one file and add a factory for a tiny instance of it to ADAPTERS below."""

import pytest
import torch

from dualfw.core.interface import ImageSampling, LMMAdapter, TextSampling


def _tiny_janus():
    from dualfw.adapters.janus import JanusAdapter

    return JanusAdapter()


def _tiny_emu3():
    from dualfw.adapters.emu3 import Emu3Adapter

    return Emu3Adapter()


ADAPTERS = {"janus": _tiny_janus, "emu3": _tiny_emu3}


@pytest.fixture(scope="module", params=sorted(ADAPTERS))
def adapter(request) -> LMMAdapter:
    return ADAPTERS[request.param]().eval()


PROMPTS = ["a red circle", "two blue squares left of a big green triangle"]


def test_sampling_shapes_seeds_and_no_cfg(adapter):
    tokens = adapter.sample_images(PROMPTS, k=3, sampling=ImageSampling(), seed=0)
    assert tokens.shape == (2, 3, adapter.num_image_tokens) and tokens.dtype == torch.long
    assert torch.equal(tokens, adapter.sample_images(PROMPTS, k=3, sampling=ImageSampling(), seed=0))
    plain = adapter.sample_images(PROMPTS, k=2, sampling=ImageSampling(guidance_scale=1.0), seed=0)
    assert plain.shape == (2, 2, adapter.num_image_tokens)


def test_pixels_and_tokens_round_trip_shapes(adapter):
    tokens = adapter.sample_images(PROMPTS[:1], k=2, sampling=ImageSampling(), seed=1)[0]
    pixels = adapter.decode_images(tokens)
    assert pixels.shape == (2, 3, adapter.image_size, adapter.image_size)
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert adapter.encode_images(pixels).shape == tokens.shape


def test_image_logprobs_agree_with_greedy_sampling_and_batching(adapter):
    greedy = adapter.sample_images(PROMPTS, k=1, sampling=ImageSampling(guidance_scale=1.0, temperature=0))[:, 0]
    logps = adapter.image_logprobs(PROMPTS, greedy)
    assert logps.shape == greedy.shape and logps.requires_grad and (logps <= 0).all()
    # greedy picked the most likely token: any other token at position t scores no higher there
    t = adapter.num_image_tokens // 2
    changed = greedy.clone()
    changed[:, t] = (changed[:, t] + 1) % 2  # some other code
    changed[:, t] = torch.where(changed[:, t] == greedy[:, t], changed[:, t] + 2, changed[:, t])
    with torch.no_grad():
        other = adapter.image_logprobs(PROMPTS, changed)
        assert (other[:, t] <= logps[:, t].detach() + 1e-6).all()
        torch.testing.assert_close(other[:, :t], logps[:, :t].detach(), atol=1e-5, rtol=1e-5)
        single = adapter.image_logprobs(PROMPTS[1:], greedy[1:])
    torch.testing.assert_close(single[0], logps[1].detach(), atol=1e-4, rtol=1e-4)


def test_text_logprobs_and_sampled_texts(adapter):
    pixels = torch.rand(2, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(0))
    logps, mask = adapter.text_logprobs(pixels, ["a circle", "two blue squares and a red triangle"], "Describe this image.")
    assert logps.shape == mask.shape and mask.sum(-1)[0] < mask.sum(-1)[1]
    assert (logps[mask] < 0).all() and (logps[~mask] == 0).all()
    texts = adapter.sample_texts(pixels, k=2, instruction="Describe this image.", sampling=TextSampling(max_new_tokens=5), seed=0)
    assert len(texts) == 2 and all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in texts)


def test_logprob_gradients_unchanged_under_activation_checkpointing(adapter):
    """The FSDP presets checkpoint the decoder layers (recomputed in backward): a scoring forward
    must not keep state between the two passes (a KV cache filled twice breaks FSDP1 with checkpointing)."""
    import copy

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    plain = copy.deepcopy(adapter).train()
    checkpointed = copy.deepcopy(adapter).train()
    apply_activation_checkpointing(checkpointed, check_fn=lambda m: type(m).__name__.endswith("DecoderLayer"))
    assert any("checkpoint" in type(m).__name__.lower() for m in checkpointed.modules()), "nothing was checkpointed"
    tokens = adapter.sample_images(PROMPTS, k=1, sampling=ImageSampling(), seed=0)[:, 0]
    pixels = torch.rand(2, 3, adapter.image_size, adapter.image_size, generator=torch.Generator().manual_seed(2))
    for model in (plain, checkpointed):
        image = model.image_logprobs(PROMPTS, tokens, guidance_scale=2.0).sum()
        text = model.text_logprobs(pixels, PROMPTS, "Describe this image.")[0].sum()
        (image + text).backward()
    grads = [(p.grad, q.grad) for p, q in zip(plain.parameters(), checkpointed.parameters()) if p.grad is not None]
    assert grads
    for p, q in grads:
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)
