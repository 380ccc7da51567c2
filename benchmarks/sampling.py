"""Image sampling and scoring throughput.

(a) Images/s of our sampler (`JanusAdapter.sample_images`) against transformers'
    `model.generate(generation_mode="image")` at identical settings: the same prompt batch (mixed
    lengths, so left padding), K samples per prompt (num_return_sequences), CFG 5, temperature 1,
    no top-k / top-p, float32. Both start from the prompt strings (tokenizing is timed for both).
    Runs alternate (ours, transformers, ours, ...) so that load from other processes hits both
    alike; the figures are medians over the repeats, with the best run beside them. Before timing,
    a greedy parity check: our tokens must equal transformers' (do_sample=False, the same batch
    repeated K times, since greedy generate refuses num_return_sequences > 1).
    Models: the default tiny Janus (TinyJanusSpec(), 0.96 M parameters, 64 tokens at 32 px) and a
    3.8 M-parameter one (hidden 256, 4 layers, 256 tokens at 64 px).
(b) Scoring throughput of the K x B candidates of one rollout (DualScorer.image_rewards): one
    batch of K*B against one candidate at a time (batch_size=1).

    python benchmarks/sampling.py
    python benchmarks/sampling.py --repeats 9 --k 8 --prompts 4 --models tiny

--threads defaults to 1: on a small shared machine OpenMP with more threads than free cores makes
every op wait on descheduled threads (timings 5-10x slower and erratic); 0 keeps torch's default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

PROMPTS = [
    "a red circle",
    "two blue squares left of a big green triangle",
    "a photo of a dog",
    "three yellow triangles above one purple square",
    "a green circle below a red square",
    "one small white triangle",
    "four black circles and a big orange square on the right",
    "a purple square",
]

MODELS = {
    "tiny": {},
    "4m": dict(hidden_size=256, intermediate_size=512, num_layers=4, image_size=64, patch_size=4, vq_channel_multiplier=(1, 1, 2)),
}


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def hf_generate(adapter, prompts: list[str], k: int, guidance: float, greedy: bool):
    """transformers' image generation from prompt strings, K images per prompt, prompt-major."""
    from transformers import GenerationConfig

    ids, mask = adapter.generation_inputs(prompts)
    sampling = {} if greedy else dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=k)
    config = GenerationConfig(
        bos_token_id=adapter.bos_id,
        pad_token_id=adapter.pad_id,
        generation_kwargs={"boi_token_id": adapter.boi_id},
        guidance_scale=guidance,
        **sampling,  # top_k=0: GenerationConfig's default is 50
    )
    if greedy:  # greedy generate refuses num_return_sequences > 1: repeat the inputs instead
        ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    return adapter.model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", generation_config=config)


def bench_sampling(name: str, adapter, prompts: list[str], k: int, repeats: int) -> None:
    import torch

    from dualfw.core.interface import ImageSampling

    n_params = sum(p.numel() for p in adapter.parameters()) / 1e6
    print(f"\n[{name}] {n_params:.2f} M parameters, {adapter.num_image_tokens} image tokens at {adapter.image_size} px; "
          f"{len(prompts)} prompts x K={k}, CFG 5, temperature 1, float32")
    lengths = adapter.generation_inputs(prompts)[1].sum(1).tolist()
    ours = adapter.sample_images(prompts, k, ImageSampling(guidance_scale=5.0, temperature=0))
    theirs = hf_generate(adapter, prompts, k, 5.0, greedy=True)
    same = torch.equal(ours.flatten(0, 1), theirs)
    print(f"  greedy parity (prompt lengths {lengths}): tokens equal to transformers' generate: {same}"
          + ("" if same else f" ({int((ours.flatten(0, 1) != theirs).sum())} tokens differ)"))

    sampling = ImageSampling(guidance_scale=5.0, temperature=1.0)
    runs = {
        "ours (sample_images)": lambda r: adapter.sample_images(prompts, k, sampling, seed=r),
        "transformers generate": lambda r: (torch.manual_seed(r), hf_generate(adapter, prompts, k, 5.0, greedy=False)),
    }
    for run in runs.values():  # warm-up
        run(0)
    wall: dict[str, list[float]] = {label: [] for label in runs}
    cpu: dict[str, list[float]] = {label: [] for label in runs}
    for r in range(repeats):
        for label, run in runs.items():
            w, c = timed(lambda: run(r))
            wall[label].append(w)
            cpu[label].append(c)
    n_images = len(prompts) * k
    print(f"  {'':24s} {'images/s (median)':>18s} {'images/s (best)':>16s} {'median s':>9s} {'CPU s (median)':>15s}")
    for label in runs:
        med, best = statistics.median(wall[label]), min(wall[label])
        print(f"  {label:24s} {n_images / med:18.1f} {n_images / best:16.1f} {med:9.3f} {statistics.median(cpu[label]):15.3f}")
    (ours_label, hf_label) = runs
    print(f"  speed-up ours / transformers: {statistics.median(wall[hf_label]) / statistics.median(wall[ours_label]):.2f}x (median wall), "
          f"{min(wall[hf_label]) / min(wall[ours_label]):.2f}x (best wall), "
          f"{statistics.median(cpu[hf_label]) / statistics.median(cpu[ours_label]):.2f}x (median CPU time)")


def bench_scoring(name: str, adapter, prompts: list[str], k: int, repeats: int) -> None:
    from dualfw.core.interface import ImageSampling
    from dualfw.training.scorer import DualScorer

    tokens = adapter.sample_images(prompts, k, ImageSampling(), seed=0).flatten(0, 1)
    texts = [p for p in prompts for _ in range(k)]
    scorers = {f"batched (batch_size={len(texts)})": DualScorer(batch_size=len(texts)), "one at a time (batch_size=1)": DualScorer(batch_size=1)}
    for scorer in scorers.values():
        scorer.attach(adapter)
        scorer.image_rewards(tokens, texts)  # warm-up
    wall: dict[str, list[float]] = {label: [] for label in scorers}
    for _ in range(repeats):
        for label, scorer in scorers.items():
            wall[label].append(timed(lambda: scorer.image_rewards(tokens, texts))[0])
    print(f"\n[{name}] scoring K x B = {k} x {len(prompts)} = {len(texts)} candidates (DualScorer.image_rewards: decode + log p(prompt | image))")
    for label in scorers:
        med = statistics.median(wall[label])
        print(f"  {label:32s} {len(texts) / med:9.1f} candidates/s   median {med:.3f} s, best {min(wall[label]):.3f} s")
    (batched, single) = scorers
    print(f"  speed-up batched / one at a time: {statistics.median(wall[single]) / statistics.median(wall[batched]):.2f}x (median wall)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=4, help=f"prompts in the batch (1-{len(PROMPTS)}, mixed lengths)")
    parser.add_argument("--models", default="tiny,4m", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-scoring", action="store_true")
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))

    import torch
    import transformers

    from dualfw.adapters.janus import JanusAdapter
    from dualfw.adapters.tiny import TinyJanusSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in 1..{len(PROMPTS)}")
    prompts = PROMPTS[: args.prompts]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.repeats} repeats (alternating), CPU")
    for name in args.models.split(","):
        adapter = JanusAdapter(tiny=TinyJanusSpec(**MODELS[name])).eval()
        bench_sampling(name, adapter, prompts, args.k, args.repeats)
        if not args.skip_scoring:
            bench_scoring(name, adapter, prompts, args.k, args.repeats)


if __name__ == "__main__":
    main()
