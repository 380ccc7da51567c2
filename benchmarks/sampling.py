"""Image sampling and scoring throughput.

CPU comparison (the default, float32):
(a) Images/s of our sampler (`sample_images`) against the family's own transformers `generate`
    (`library_generate`: Janus' `generation_mode="image"`, Emu3's constrained recipe) at identical
    settings: the same prompt batch (mixed lengths, so left padding), K samples per prompt
    (num_return_sequences), CFG 5, temperature 1, no top-k / top-p. Both start from the prompt strings (tokenizing is timed for both). Runs
    alternate (ours, transformers, ours, ...) so that load from other processes hits both alike;
    the figures are medians over the repeats, with the best run beside them. Before timing, a
    greedy parity check: our tokens must equal transformers' (do_sample=False, the same batch
    repeated K times, since greedy generate refuses num_return_sequences > 1).
    Models: the default tiny Janus (TinyJanusSpec(), 0.96 M parameters, 64 tokens at 32 px), a
    3.8 M-parameter one (hidden 256, 4 layers, 256 tokens at 64 px), and Emu3 at the same two
    sizes (the default tiny Emu3, 64 codes at 64 px; hidden 256, 4 layers, 256 codes at 128 px).
(b) Scoring the K x B candidates of one rollout (DualScorer.image_rewards, decode included): the
    paper's R_G and the recipe's batch-contrasted R_G (each image also read with the batch's other
    prompts), each at several scorer batch sizes (--score-batch-sizes, candidates per forward
    pass), against one candidate at a time (batch size 1).

Janus-Pro shapes (--shapes, or --device cuda): random-weight models with Janus-Pro-1B's or -7B's
language model (1b: hidden 2048, 24 layers, 16 heads, intermediate 5632; 7b: 4096, 30, 32,
11008; both vocabulary 102400, 576 image tokens at 384 px, codebook 16384; the vision tower and
the VQ tokenizer, which sampling does not run, are smaller than Janus-Pro's), in --dtype
(bfloat16), K=8 with CFG 5 at the recipe's prompts per step (1b: 4, 7b: 2): our sampler against
transformers' generate in the same run: images/s, ms per decode step (wall time / image tokens,
the prompt's forward included), peak device memory, and with --bandwidth (GB/s) the ratio to the
bandwidth floor of a decode step: reading once the weights it uses (decoder layers, final norm,
generation head and aligner) and the KV cache of every row (CFG rows included). The tiny shape
(4 image tokens at 8 px) runs that code path on a CPU in seconds.

    python benchmarks/sampling.py
    python benchmarks/sampling.py --repeats 9 --k 8 --prompts 4 --models tiny
    python benchmarks/sampling.py --device cuda --bandwidth 4800          # 1b and 7b shapes
    python benchmarks/sampling.py --device cpu --shapes tiny --repeats 1 --bandwidth 20

--threads defaults to 1: on a small shared machine OpenMP with more threads than free cores makes
every op wait on descheduled threads (slow, erratic timings); 0 keeps torch's default.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

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

# name: (family, its tiny builder's sizes)
MODELS = {
    "tiny": ("janus", {}),
    "4m": ("janus", dict(hidden_size=256, intermediate_size=512, num_layers=4, image_size=64, patch_size=4, vq_channel_multiplier=(1, 1, 2))),
    "emu3-tiny": ("emu3", {}),
    "emu3-4m": ("emu3", dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=4, image_size=128)),
}


def build(name: str):
    """The CPU comparison's model `name` (random weights, float32)."""
    family, sizes = MODELS[name]
    if family == "emu3":
        from dualfw.adapters.emu3 import Emu3Adapter
        from dualfw.adapters.tiny_emu3 import TinyEmu3Spec

        return Emu3Adapter(tiny=TinyEmu3Spec(**sizes)).eval()
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.adapters.tiny import TinyJanusSpec

    return JanusAdapter(tiny=TinyJanusSpec(**sizes)).eval()

# Janus-Pro's image side (384 px, 16 px patches: 576 tokens; VQ 16x downsampling, codebook 16384) and
# text vocabulary; the vision tower and VQ tokenizer at reduced widths (sampling never runs them)
JANUS_PRO = dict(
    image_size=384, patch_size=16, codebook_size=16384, vq_channel_multiplier=(1, 1, 2, 2, 4), text_vocab_size=102400,
    vision_hidden_size=1024, vision_num_layers=24, vision_num_heads=16, init_std=0.02,
)
# name: (TinyJanusSpec arguments, prompts per step of the recipe)
SHAPES = {
    "tiny": (dict(image_size=8, patch_size=4, init_std=0.02), 4),
    "1b": (dict(JANUS_PRO, hidden_size=2048, intermediate_size=5632, num_layers=24, num_heads=16), 4),
    "7b": (dict(JANUS_PRO, hidden_size=4096, intermediate_size=11008, num_layers=30, num_heads=32), 2),
}


def timed(fn, device=None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call, the device's queued work included."""
    from dualfw.core.selfreward import clock

    wall, cpu = clock(device), time.process_time()
    fn()
    return clock(device) - wall, time.process_time() - cpu


def greedy_parity(adapter, prompts: list[str], k: int) -> str:
    """Our greedy CFG tokens against transformers' generate: equal, or how many images differ."""
    import torch

    from dualfw.core.interface import ImageSampling

    greedy = ImageSampling(guidance_scale=5.0, temperature=0)
    ours = adapter.sample_images(prompts, k, greedy).flatten(0, 1)
    theirs = adapter.library_generate(prompts, k, greedy).flatten(0, 1).to(ours.device)
    if torch.equal(ours, theirs):
        return "equal"
    differ = (ours != theirs).any(1)
    first = int((ours != theirs).float().argmax(1)[differ].min())
    return f"{int(differ.sum())} of {len(ours)} images differ (first at token {first})"


def sampling_runs(adapter, prompts: list[str], k: int):
    """Ours and transformers' generate at identical settings (CFG 5, temperature 1), seeded by the run."""
    import torch

    from dualfw.core.interface import ImageSampling

    sampling = ImageSampling(guidance_scale=5.0, temperature=1.0)
    return {
        "ours (sample_images)": lambda r: adapter.sample_images(prompts, k, sampling, seed=r),
        "transformers generate": lambda r: (torch.manual_seed(r), adapter.library_generate(prompts, k, sampling)),
    }


def bench_sampling(name: str, adapter, prompts: list[str], k: int, repeats: int) -> None:
    n_params = sum(p.numel() for p in adapter.parameters()) / 1e6
    print(f"\n[{name}] {n_params:.2f} M parameters, {adapter.num_image_tokens} image tokens at {adapter.image_size} px; "
          f"{len(prompts)} prompts x K={k}, CFG 5, temperature 1, float32")
    lengths = adapter.generation_inputs(prompts)[1].sum(1).tolist()
    print(f"  greedy parity (prompt lengths {lengths}): tokens against transformers' generate: {greedy_parity(adapter, prompts, k)}")

    runs = sampling_runs(adapter, prompts, k)
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
    print(f"  {'':24s} {'images/s (median)':>18s} {'images/s (best)':>16s} {'median s':>9s} {'ms/step':>8s} {'CPU s (median)':>15s}")
    for label in runs:
        med, best = statistics.median(wall[label]), min(wall[label])
        print(f"  {label:24s} {n_images / med:18.1f} {n_images / best:16.1f} {med:9.3f} "
              f"{1e3 * med / adapter.num_image_tokens:8.2f} {statistics.median(cpu[label]):15.3f}")
    (ours_label, hf_label) = runs
    print(f"  speed-up ours / transformers: {statistics.median(wall[hf_label]) / statistics.median(wall[ours_label]):.2f}x (median wall), "
          f"{min(wall[hf_label]) / min(wall[ours_label]):.2f}x (best wall), "
          f"{statistics.median(cpu[hf_label]) / statistics.median(cpu[ours_label]):.2f}x (median CPU time)")


def bench_scoring(name: str, adapter, prompts: list[str], k: int, repeats: int, batch_sizes: list[int]) -> None:
    from dualfw.core.interface import ImageSampling
    from dualfw.training.scorer import DualScorer

    tokens = adapter.sample_images(prompts, k, ImageSampling(), seed=0).flatten(0, 1)
    texts = [p for p in prompts for _ in range(k)]
    variants = {"R_G": {}, "batch-contrasted R_G": {"batch_contrast": True}}
    scorers = {(variant, size): DualScorer(batch_size=size, **options) for variant, options in variants.items() for size in batch_sizes}
    for scorer in scorers.values():
        scorer.attach(adapter)
        scorer.image_rewards(tokens, texts)  # warm-up
    wall: dict[tuple, list[float]] = {key: [] for key in scorers}
    for _ in range(repeats):
        for key, scorer in scorers.items():
            wall[key].append(timed(lambda: scorer.image_rewards(tokens, texts))[0])
    print(f"\n[{name}] scoring K x B = {k} x {len(prompts)} = {len(texts)} candidates (DualScorer.image_rewards: "
          "decode + log p(prompt | image))")
    for variant in variants:
        one = statistics.median(wall[(variant, 1)]) if 1 in batch_sizes else None
        for size in batch_sizes:
            med = statistics.median(wall[(variant, size)])
            versus = f"   {one / med:.2f}x one at a time" if one is not None and size != 1 else ""
            print(f"  {variant:21s} batch_size={size:<3d} {len(texts) / med:9.1f} candidates/s   median {med:.3f} s, "
                  f"best {min(wall[(variant, size)]):.3f} s{versus}")


# ---- Janus-Pro shapes on a device ---------------------------------------------------------------------
def decode_weight_bytes(adapter) -> int:
    """Bytes of the weights one decode step reads: the decoder layers, the final norm, the generation
    head and the generation aligner (the image-token embedding is one row per token)."""
    janus = adapter.model.model
    modules = [janus.language_model.layers, janus.language_model.norm, janus.generation_head, janus.generation_aligner]
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def kv_bytes_per_step(adapter, rows: int, prefix: int) -> float:
    """Mean bytes of keys and values one decode step reads: `rows` sequences; the N - 1 steps of an
    N-token image attend over prefix + 1, ..., prefix + N - 1 positions (the new token's included)."""
    config = adapter.model.config.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(adapter.model.model.language_model.parameters()).element_size()
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
    return rows * per_position * (prefix + adapter.num_image_tokens / 2)


def floor_ms(adapter, rows: int, prefix: int, bandwidth_gb_s: float) -> tuple[float, float]:
    """Milliseconds per decode step at `bandwidth_gb_s`: (weights only, weights + KV cache)."""
    weights = decode_weight_bytes(adapter)
    kv = kv_bytes_per_step(adapter, rows, prefix)
    return 1e3 * weights / (bandwidth_gb_s * 1e9), 1e3 * (weights + kv) / (bandwidth_gb_s * 1e9)


def bench_shape(name: str, args) -> None:
    import torch

    from dualfw.adapters.janus import JanusAdapter
    from dualfw.adapters.tiny import TinyJanusSpec

    spec, recipe_prompts = SHAPES[name]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    start = time.perf_counter()
    with torch.device(device):  # built where it runs: a 1B model is never materialised on the host
        adapter = JanusAdapter(tiny=TinyJanusSpec(**spec), dtype=args.dtype).to(device).eval()
    built = time.perf_counter() - start
    prompts = PROMPTS[: args.prompts or recipe_prompts]
    k, n_tokens = args.k, adapter.num_image_tokens
    ids, _ = adapter.generation_inputs(prompts)
    rows = 2 * len(prompts) * k  # CFG: a conditional and an unconditional row per image
    params = sum(p.numel() for p in adapter.parameters())
    print(f"\n[{name}] {params / 1e6:.1f} M parameters ({args.dtype}, built on {device} in {built:.1f} s), decoding "
          f"weights {decode_weight_bytes(adapter) / 1e6:.1f} MB; {n_tokens} image tokens at {adapter.image_size} px; "
          f"{len(prompts)} prompts x K={k} with CFG 5 = {rows} rows, prompt {ids.shape[1]} tokens", flush=True)
    print(f"  greedy tokens against transformers' generate: {greedy_parity(adapter, prompts, k)}", flush=True)

    runs = sampling_runs(adapter, prompts, k)
    for run in runs.values():  # warm-up
        run(0)
    wall: dict[str, list[float]] = {label: [] for label in runs}
    peak: dict[str, float] = {}
    for r in range(args.repeats):
        for label, run in runs.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            wall[label].append(timed(lambda: run(r), device)[0])
            if cuda:
                peak[label] = max(peak.get(label, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            print(f"  run {r}: {label} {wall[label][-1]:.3f} s", flush=True)
    floors = floor_ms(adapter, rows, ids.shape[1], args.bandwidth) if args.bandwidth else None
    n_images = len(prompts) * k
    print(f"  {'':24s} {'images/s':>9s} {'median s':>9s} {'ms/step':>8s} {'peak GiB':>9s}"
          + (f" {'x floor (weights)':>18s} {'x floor (+KV)':>14s}" if floors else ""))
    for label in runs:
        med = statistics.median(wall[label])
        step_ms = 1e3 * med / n_tokens
        memory = f"{peak[label]:9.2f}" if cuda else f"{'-':>9s}"
        line = f"  {label:24s} {n_images / med:9.2f} {med:9.3f} {step_ms:8.2f} {memory}"
        if floors:
            line += f" {step_ms / floors[0]:18.2f} {step_ms / floors[1]:14.2f}"
        print(line)
    if floors:
        print(f"  bandwidth floor at {args.bandwidth:g} GB/s: {floors[0]:.4g} ms/step (weights), {floors[1]:.4g} ms/step (+ mean KV cache)")
    (ours_label, hf_label) = runs
    print(f"  speed-up ours / transformers: {statistics.median(wall[hf_label]) / statistics.median(wall[ours_label]):.2f}x (median wall)", flush=True)
    del adapter, runs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def _script() -> str:
    """This file's path as typed from the current folder (the project root: benchmarks/sampling.py)."""
    path = Path(__file__).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (after one warm-up)")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompts", type=int, default=None,
                        help=f"prompts in the batch (1-{len(PROMPTS)}, mixed lengths; default 4, or the shape's recipe)")
    parser.add_argument("--models", default="tiny,4m,emu3-tiny,emu3-4m", help=f"CPU comparison: comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--shapes", default=None,
                        help=f"Janus-Pro shapes instead: comma-separated, from {sorted(SHAPES)} (default with --device cuda: 1b,7b)")
    parser.add_argument("--device", default="cpu", help="where the shapes run (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"], help="the shapes' weights")
    parser.add_argument("--bandwidth", type=float, default=None, help="the device's memory bandwidth in GB/s, for the floor")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--score-batch-sizes", default="32,8,1", help="scorer batch sizes compared (candidates per pass)")
    args = parser.parse_args(argv)
    print("command: python", " ".join([_script(), *(sys.argv[1:] if argv is None else argv)]))

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompts is not None and not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in 1..{len(PROMPTS)}")
    shapes = args.shapes or ("1b,7b" if args.device != "cpu" else None)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s), "
          f"{args.repeats} repeats (alternating), {where}")
    if shapes:
        for name in shapes.split(","):
            if name not in SHAPES:
                parser.error(f"--shapes: unknown shape {name!r} (choose from {sorted(SHAPES)})")
            bench_shape(name, args)
        return
    prompts = PROMPTS[: args.prompts or 4]
    sizes = [int(s) for s in args.score_batch_sizes.split(",")]
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r} (choose from {sorted(MODELS)})")
        adapter = build(name)
        bench_sampling(name, adapter, prompts, args.k, args.repeats)
        if not args.skip_scoring:
            bench_scoring(name, adapter, prompts, args.k, args.repeats, sizes)


if __name__ == "__main__":
    main()
