"""benchmarks/sampling.py's device path (Janus-Pro shapes), run here on the tiny shape."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sampling_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bandwidth_floor_counts_what_a_decode_step_reads(bench):
    from transformers import DynamicCache

    from dualfw.adapters.janus import JanusAdapter
    from dualfw.adapters.tiny import TinyJanusSpec

    adapter = JanusAdapter(tiny=TinyJanusSpec(**bench.SHAPES["tiny"][0]), dtype="bfloat16")
    janus, size = adapter.model.model, lambda params: sum(p.numel() * p.element_size() for p in params)
    # everything but what decoding never reads: text embedding and head (tied here), vision tower, VQ,
    # image-token embedding
    unread = {p for m in (janus.language_model.embed_tokens, adapter.model.lm_head, janus.vision_model, janus.aligner,
                          janus.vqmodel, janus.generation_embeddings) for p in m.parameters()}
    assert bench.decode_weight_bytes(adapter) == size(adapter.parameters()) - size(unread) > 0

    ids, _ = adapter.generation_inputs(["a red circle"])
    cache = DynamicCache(config=adapter.model.config.text_config)
    with torch.no_grad():
        janus.language_model(input_ids=ids, cache=cache, use_cache=True)
    per_position = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) / ids.shape[1]
    n, prefix, rows = adapter.num_image_tokens, 10, 3
    mean_positions = sum(prefix + step + 1 for step in range(n - 1)) / (n - 1)
    assert bench.kv_bytes_per_step(adapter, rows, prefix) == pytest.approx(rows * per_position * mean_positions)


def test_the_device_path_runs_on_the_tiny_shape(bench, capsys):
    # float32: greedy tokens equal transformers' (in bf16 they may part at near ties)
    bench.main(["--device", "cpu", "--shapes", "tiny", "--dtype", "float32", "--repeats", "1", "--bandwidth", "20", "--k", "2"])
    out = capsys.readouterr().out
    assert "greedy tokens against transformers' generate: equal" in out
    floor = float(re.search(r"floor at 20 GB/s: ([\d.]+) ms/step \(weights\)", out).group(1))
    for label in ("ours (sample_images)", "transformers generate"):
        row = re.search(rf"{re.escape(label)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+-\s+([\d.]+)", out)
        images_per_s, seconds, ms_per_step, times_floor = map(float, row.groups())
        rounding = 5e-4 / (seconds - 5e-4)  # the seconds are printed to the millisecond: the true ones may be 0.5 ms less
        assert images_per_s == pytest.approx(4 * 2 / seconds, rel=rounding)
        assert ms_per_step == pytest.approx(1e3 * seconds / 4, rel=rounding, abs=5e-3)  # 4 image tokens
        assert times_floor == pytest.approx(ms_per_step / floor, rel=5e-3 / ms_per_step + 1e-3)
    assert "speed-up ours / transformers" in out


@pytest.fixture(scope="module")
def rewards():
    spec = importlib.util.spec_from_file_location("rewards_benchmark", SCRIPT.parent / "shapes_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_yes_no_checklist_sums_each_questions_normalised_answer(tiny_adapter, rewards):
    rows = [
        {"prompt": "a photo of a red circle", "include": [{"class": "circle", "count": 1, "color": "red"}]},
        {"prompt": "a photo of a circle and a square", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]},
    ]
    shapes = ("circle", "square", "triangle")
    pixels = torch.rand(2, 3, tiny_adapter.image_size, tiny_adapter.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        asked, checklist = rewards.checklist_rewards(tiny_adapter, pixels, rows, shapes)

        def answer(i, question, want):  # one image, one question at a time
            lp = [tiny_adapter.text_logprobs(pixels[i : i + 1], [a], question)[0].sum().item() for a in ("Yes", "No")]
            return torch.log_softmax(torch.tensor(lp), 0)[0 if want else 1].item()

    expected_asked = [answer(0, "Is there a red circle in the image?", True),
                      answer(1, "Is there a circle in the image?", True) + answer(1, "Is there a square in the image?", True)]
    absent = [answer(0, "Is there a square in the image?", False) + answer(0, "Is there a triangle in the image?", False),
              answer(1, "Is there a triangle in the image?", False)]
    assert asked == pytest.approx(expected_asked, abs=1e-4)
    assert checklist == pytest.approx([a + b for a, b in zip(expected_asked, absent)], abs=1e-4)
    assert (asked < 0).all() and (checklist < asked).all()  # log-probabilities: every term below 0


def test_the_drawers_reward_is_its_prompts_likelihood_against_the_near_misses(tiny_adapter, rewards):
    import math

    groups = [["red", "blue", "green"], ["circle", "square"]]
    prompts = ["a photo of a red circle", "a photo of a square", "a photo"]  # 3 near misses, 1, none
    tokens = torch.randint(0, tiny_adapter.model.config.vq_config.num_embeddings, (3, tiny_adapter.num_image_tokens),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = rewards.drawer_rewards(tiny_adapter, tokens, prompts, groups)

        def loglik(i, text):  # one image, one prompt at a time
            return tiny_adapter.image_logprobs([text], tokens[i : i + 1]).sum().item()

    misses = [["a photo of a blue circle", "a photo of a green circle", "a photo of a red square"], ["a photo of a circle"]]
    expected = [loglik(i, prompts[i]) - math.log(sum(math.exp(loglik(i, m)) for m in ms) / len(ms)) for i, ms in enumerate(misses)]
    assert got[:2] == pytest.approx(expected, abs=1e-4)
    assert got[2] == 0.0


def test_mirrored_rewards_are_the_same_for_a_mirrored_image_and_prompt(tiny_adapter, rewards):
    from dualfw.training.scorer import DualScorer

    assert rewards.mirrored_prompt("a circle left of a square", (-1,)) == "a circle right of a square"
    assert rewards.mirrored_prompt("a circle left of a square", (-2,)) == "a circle left of a square"
    assert rewards.mirrored_prompt("a circle below a red square", (-1, -2)) == "a circle above a red square"
    scorer = DualScorer()
    scorer.attach(tiny_adapter)
    prompts = ["a photo of a circle left of a square", "a photo of a triangle above a circle"]
    size = tiny_adapter.image_size
    pixels = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tokens = torch.zeros(2, tiny_adapter.num_image_tokens, dtype=torch.long)  # unused: the pixels are read
    with torch.no_grad():
        plain = scorer.prompt_loglik(tokens, prompts, pixels).numpy()
        averaged = rewards.mirror_rewards(scorer, tokens, prompts, pixels)
        for dims in ((-1,), (-2,), (-1, -2)):  # the four views are the same four, in another order
            mirrored = rewards.mirror_rewards(scorer, tokens, [rewards.mirrored_prompt(p, dims) for p in prompts], pixels.flip(dims))
            assert mirrored == pytest.approx(averaged, abs=1e-5)
    assert abs(averaged - plain).max() > 1e-4  # the mirror images are read, not the one view four times
