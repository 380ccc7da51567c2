"""How fast does the Shapes base's generator learn to draw the asked colour, and from what data?

    python benchmarks/shapes_color_learning.py --data truth --lr 1e-3       # rendered ground truth
    python benchmarks/shapes_color_learning.py --data oracle --sampler policy --lr 1e-3
    python benchmarks/shapes_color_learning.py --data oracle --sampler initial --lr 1e-3
    python benchmarks/shapes_color_learning.py --data self --sampler initial --lr 1e-3

A copy of the base is trained on the world's 18 colors prompts ("a photo of a red circle") by the
per-token likelihood of one image per prompt and step:
  truth    a rendered scene that satisfies the prompt (supervised; no self-reward involved);
  oracle   the best of K samples by the exact detector's verdict (ties broken at random);
  self     the best of K samples by R_G, scored by the frozen base (DualScorer(frozen=True)).
Samples come from the model being trained (`--sampler policy`, the paper's on-line sampling) or
from the frozen base (`--sampler initial`, `Policy(rollouts_from="initial")`). Sampled images
are learned under the CFG they were drawn with (`guided_logps`; `--unguided`: by the conditional
likelihood alone, as rendered ones always are).

Every `--every` steps it prints the colors accuracy of 4 CFG-2 samples per prompt (exact detector,
GenEval rules), the colour-conditioning probe of `shapes_rewards.py` (own colour's prompt, nats
per image above the six colours' mean), and the mean training loss. No evaluation of the other
tags: this measures only how fast colour conditioning can be learned.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dualfw.core.interface import ImageSampling
from dualfw.adapters.janus import JanusAdapter
from dualfw.training.reference import Reference
from dualfw.training.scorer import DualScorer
from dualfw.shapes.detector import ShapesDetector
from dualfw.shapes.evaluate import judge_images
from dualfw.shapes.oracle import OracleScorer
from dualfw.shapes.sft import to_pixels, to_uint8
from dualfw.shapes.text import enumerate_geneval_prompts
from dualfw.shapes.world import WorldConfig, render, scene_for_record
from shapes_rewards import color_conditioning

SAMPLING = ImageSampling(guidance_scale=2.0, temperature=1.0)  # the evaluation's and the recipes'


@torch.no_grad()
def colors_accuracy(adapter, records, detector, per_prompt: int = 4, seed: int = 7) -> float:
    tokens = adapter.sample_images([r["prompt"] for r in records], per_prompt, SAMPLING, seed=seed)
    images = to_uint8(adapter.decode_images(tokens.flatten(0, 1)))
    lenient, _ = judge_images([r for r in records for _ in range(per_prompt)], images, detector)
    return float(np.mean([x.correct for x in lenient]))


@torch.no_grad()
def training_images(args, step, batch, sampler, scorer, world, rng):
    """VQ tokens of one image per record, and the CFG scale to learn them under."""
    if args.data == "truth":
        return sampler.encode_images(to_pixels([render(scene_for_record(r, rng, world)) for r in batch])), 1.0
    prompts = [r["prompt"] for r in batch]
    candidates = sampler.sample_images(prompts, args.k, SAMPLING, seed=step)  # (B, K, N)
    reward = scorer.image_rewards(candidates.flatten(0, 1), [p for p in prompts for _ in range(args.k)]).float().cpu()
    if args.data == "oracle":  # a 0/1 verdict: break ties at random
        reward += 1e-3 * torch.rand(len(reward), generator=torch.Generator().manual_seed(step))
    best = reward.view(len(batch), args.k).argmax(1)
    return candidates[torch.arange(len(batch)), best], 1.0 if args.unguided else SAMPLING.guidance_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dualfw:assets/shapes_base")
    ap.add_argument("--data", choices=["truth", "oracle", "self"], default="truth")
    ap.add_argument("--sampler", choices=["policy", "initial"], default="initial", help="sampled data: from the trained model or the frozen base")
    ap.add_argument("--unguided", action="store_true", help="learn sampled images by the conditional likelihood, not under their CFG")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8, help="prompts (so images learned) per step")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt to pick the best of")
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    adapter = JanusAdapter(path=args.model)
    world = WorldConfig(resolution=adapter.image_size)
    detector = ShapesDetector(world)
    records = [r for r in enumerate_geneval_prompts(world) if r["tag"] == "colors"]
    sampler = Reference(adapter) if args.sampler == "initial" and args.data != "truth" else adapter
    # the detector's GenEval verdict (dualfw.shapes.oracle), or R_G of the frozen base
    scorer = OracleScorer(judge="lenient") if args.data == "oracle" else DualScorer(frozen=args.data == "self")
    scorer.attach(adapter)
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)

    def report(step: int, losses: list[float]) -> None:
        adapter.eval()
        accuracy = colors_accuracy(adapter, records, detector)
        gain, top = color_conditioning(adapter, seed=args.seed)
        adapter.train()
        loss = f"{np.mean(losses):.3f}" if losses else "-"
        print(f"| {step} | {accuracy:.2f} | {gain:+.3f} | {top:.2f} | {loss} | {time.time() - start:.0f} |", flush=True)

    sampled = "" if args.data == "truth" else f" --sampler {args.sampler} --k {args.k}" + " --unguided" * args.unguided
    print(f"{args.model}: --data {args.data}{sampled} --lr {args.lr} --batch {args.batch}")
    print("| step | colors accuracy | probe: own colour, nats / image | own colour most likely | loss | s |")
    print("|---|---|---|---|---|---|")
    start, losses = time.time(), []
    report(0, losses)
    for step in range(1, args.steps + 1):
        batch = [records[int(i)] for i in rng.integers(len(records), size=args.batch)]
        tokens, scale = training_images(args, step, batch, sampler, scorer, world, rng)
        loss = -adapter.image_logprobs([r["prompt"] for r in batch], tokens, scale).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % args.every == 0:
            report(step, losses)
            losses = []


if __name__ == "__main__":
    main()
