"""The contract every LMM adapter must meet. Adding an LMM: implement dualfw.core.interface.LMMAdapter
in one file and add a factory for a tiny instance of it to ADAPTERS below (built from a saved folder
when given `path`)."""

import pytest
import torch

from dualfw.core.interface import ImageSampling, LMMAdapter, TextSampling


def _tiny_janus(path=None):
    from dualfw.adapters.janus import JanusAdapter

    return JanusAdapter(path=path)


def _tiny_emu3(path=None):
    from dualfw.adapters.emu3 import Emu3Adapter
    from dualfw.adapters.tiny_emu3 import TinyEmu3Spec

    return Emu3Adapter(path=path, image_size=TinyEmu3Spec().image_size)


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


def _direction_calls(base):
    """model -> {"t2i": its image log-probs, "i2t": its text log-probs} on fixed inputs drawn by `base`."""
    tokens = base.sample_images(PROMPTS, k=1, seed=0)[:, 0]
    pixels = torch.rand(2, 3, base.image_size, base.image_size, generator=torch.Generator().manual_seed(3))

    def calls(model):
        with torch.no_grad():
            return {"t2i": model.image_logprobs(PROMPTS, tokens, guidance_scale=2.0),
                    "i2t": model.text_logprobs(pixels, PROMPTS, "Describe this image.")[0]}

    return calls


@pytest.mark.parametrize("family", sorted(ADAPTERS))
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_lora_for_one_direction_is_off_in_the_other_and_exports_apart(family, direction, tmp_path):
    """LoRA for one direction changes that direction's calls only (the other's equal the base bit
    for bit), and its export loads back, through the family's own constructor, to the same model;
    so does the reloaded model's own export (`save_model`), its adapters still apart."""
    from dualfw.core.lora import LORA_FILE, LoraSpec, apply_lora, save_model, save_split

    base = ADAPTERS[family]().eval()
    adapter = ADAPTERS[family]().eval()
    adapter.load_state_dict(base.state_dict())
    apply_lora(adapter, LoraSpec(r=4), for_direction=direction)
    with torch.no_grad():
        for p in adapter.parameters():
            if p.requires_grad:
                p.add_(0.1)  # LoRA away from zero
    calls = _direction_calls(base)

    trainable = [p.requires_grad for p in adapter.parameters()]
    before, trained = calls(base), calls(adapter)
    assert [p.requires_grad for p in adapter.parameters()] == trainable  # switching layers off and on keeps them
    other = {"t2i": "i2t", "i2t": "t2i"}[direction]
    assert torch.equal(trained[other], before[other])
    assert not torch.allclose(trained[direction], before[direction], atol=1e-4)
    assert torch.equal(adapter.sample_images(PROMPTS, k=2, seed=1), base.sample_images(PROMPTS, k=2, seed=1)) == (direction == "i2t")

    folder = save_split(adapter, tmp_path / "export")
    assert calls(adapter)[direction].equal(trained[direction]), "exporting changed the model"
    reloaded = ADAPTERS[family](path=str(folder)).eval()
    again = calls(reloaded)
    torch.testing.assert_close(again[direction], trained[direction], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again[other], before[other], atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)

    second = save_model(reloaded, tmp_path / "again")
    assert (second / LORA_FILE).is_file()
    twice = calls(ADAPTERS[family](path=str(second)).eval())
    torch.testing.assert_close(twice[direction], trained[direction], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(twice[other], before[other], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(ADAPTERS))
def test_a_lora_set_for_each_direction_draws_and_reads_as_each_set_alone(family, tmp_path):
    """With a set for each direction, drawing calls equal a model holding the t2i set alone (as
    LoRA for drawing) and reading calls one holding the i2t set alone; the export loads back the
    same, its sets frozen; a set for each needs train: all."""
    from dualfw.core.errors import ConfigError
    from dualfw.core.lora import LoraSpec, apply_lora, save_model

    base = ADAPTERS[family]().eval()

    def with_lora(spec, direction=None):
        model = ADAPTERS[family]().eval()
        model.load_state_dict(base.state_dict())
        apply_lora(model, spec, for_direction=direction)
        return model

    both = with_lora(LoraSpec(r=4, per_direction=True))
    trainable = {n for n, p in both.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in both.named_parameters() if "lora_" in n}
    assert any(".t2i." in n for n in trainable) and any(".i2t." in n for n in trainable)
    with torch.no_grad():
        for name, p in both.named_parameters():
            if p.requires_grad:
                p.add_(0.1 if ".t2i." in name else -0.2)
    alone = {}
    for direction in ("t2i", "i2t"):
        alone[direction] = with_lora(LoraSpec(r=4), direction)
        mine = {n.replace(f".{direction}.", ".default."): p for n, p in both.named_parameters() if f".{direction}." in n}
        with torch.no_grad():
            for name, p in alone[direction].named_parameters():
                if "lora_" in name:
                    p.copy_(mine[name])
    calls = _direction_calls(base)

    got, before = calls(both), calls(base)
    for direction in ("t2i", "i2t"):
        assert torch.equal(got[direction], calls(alone[direction])[direction])
        assert not torch.allclose(got[direction], before[direction], atol=1e-4)
    assert {n for n, p in both.named_parameters() if p.requires_grad} == trainable  # switching sets keeps them

    reloaded = ADAPTERS[family](path=str(save_model(both, tmp_path / "export"))).eval()
    again = calls(reloaded)
    for direction in ("t2i", "i2t"):
        torch.testing.assert_close(again[direction], got[direction], atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)
    with pytest.raises(ConfigError, match="per_direction"):
        with_lora(LoraSpec(r=4, per_direction=True), "t2i")


def test_greedy_samples_equal_the_model_librarys_generate(adapter):
    """`sample_images` draws what the family's own library draws (`library_generate`): greedy
    tokens equal on a mixed-length batch with CFG; sampled ones have the same shape."""
    guidance_scale = 3.0
    greedy = ImageSampling(guidance_scale=guidance_scale, temperature=0)
    ours = adapter.sample_images(PROMPTS, k=2, sampling=greedy)
    theirs = adapter.library_generate(PROMPTS, k=2, sampling=greedy)
    assert torch.equal(ours, theirs)
    torch.manual_seed(0)
    sampled = adapter.library_generate(PROMPTS, k=3, sampling=ImageSampling(guidance_scale=guidance_scale))
    assert sampled.shape == (2, 3, adapter.num_image_tokens) and 0 <= int(sampled.min())
