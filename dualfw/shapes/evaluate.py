"""Measure a Janus adapter on the Shapes world: GenEval-style (lenient and strict judges, with a
bootstrap 95% CI) and POPE-style yes/no accuracy.

    python -m dualfw.shapes.evaluate --model dualfw:assets/shapes_base --seed 0

Prompts: every distinct GenEval-style record of the world (`enumerate_geneval_prompts`), with
enough images per prompt that each tag gets about `images_per_tag` images. POPE: seeded random
scenes, the three splits of `pope_questions`, greedy answers parsed with the official rule.
Both are the evaluation runners of `dualfw.eval.runners` with the Shapes detector, prompts and
questions passed in.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from typing import Any

import numpy as np
import torch

from dualfw.core.interface import ImageSampling
from dualfw.eval.geneval import ImageResult, common_failures, parse_metadata
from dualfw.core.pixels import to_pixels, to_uint8
from dualfw.eval.pope import PopeQuestion
from dualfw.eval.runners import (
    GenEvalRun,
    SampleBatch,
    answer_pope,
    geneval_scores,
    run_geneval,
    score_pope,
)
from dualfw.shapes.detector import ShapesDetector
from dualfw.shapes.sft import background_patches
from dualfw.shapes.text import POPE_SPLITS, TAGS, enumerate_geneval_prompts, pope_questions
from dualfw.shapes.world import WorldConfig, render, sample_scene


def _summary(results: list[ImageResult]) -> dict[str, Any]:
    # every prompt of the world is evaluated, so the noise is the images' (see the CI's docstring)
    scores = geneval_scores(results, resample="images")
    s = scores.summary
    return {
        "overall": s.overall,
        "ci95": scores.ci95,
        "ci95_over_prompts": scores.overall_ci95["prompts"],
        "per_tag": s.per_tag,
        "per_tag_ci95": scores.per_tag_ci95,
        "mean_objects": s.mean_objects,
        "num_images": s.num_images,
        "failures": common_failures(results),
    }


def shapes_batches(world: WorldConfig, images_per_tag: int, seed: int, prompts_per_batch: int = 16) -> list[SampleBatch]:
    """The world's every GenEval-style prompt, tag after tag, `prompts_per_batch` per batch; a tag's
    prompts get enough images each for about `images_per_tag` per tag; the batch starting at prompt
    b of the t-th tag is seeded by seed * 1000 + t * 100 + b."""
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for r in enumerate_geneval_prompts(world):
        by_tag[r["tag"]].append(r)
    batches = []
    for t, tag in enumerate(TAGS):
        recs = by_tag[tag]
        k = max(1, math.ceil(images_per_tag / len(recs)))
        for b in range(0, len(recs), prompts_per_batch):
            chunk = [parse_metadata(r) for r in recs[b : b + prompts_per_batch]]
            batches.append(SampleBatch(chunk, k, seed * 1000 + t * 100 + b))
    return batches


@torch.no_grad()
def evaluate_geneval(
    adapter,
    images_per_tag: int = 96,
    guidance_scale: float = 2.0,
    temperature: float = 1.0,
    seed: int = 0,
    prompts_per_batch: int = 16,
    best_of: int = 1,
    scorer=None,
) -> dict[str, Any]:
    """Sample, detect and judge every GenEval-style prompt of the world; returns lenient and strict
    summaries (overall, per tag, 95% CIs, objects per image).

    best_of > 1: each judged image is the best of `best_of` samples by `scorer` (a DualScorer
    attached to `adapter`: best-of-K reranking by self-reward, no training). The report then also
    holds the oracle's best-of-K (an image counts as correct when any candidate is), the
    self-reward's within-prompt AUC against the judges, and objects per image of all candidates.
    """
    world = WorldConfig(resolution=adapter.image_size)
    run: GenEvalRun = run_geneval(
        adapter,
        shapes_batches(world, images_per_tag, seed, prompts_per_batch),
        ImageSampling(guidance_scale=guidance_scale, temperature=temperature),
        ShapesDetector(world),
        best_of=best_of,
        scorer=scorer,
    )
    out: dict[str, Any] = {"lenient": _summary(run.lenient), "strict": _summary(run.strict), "best_of": best_of}
    if best_of > 1:
        out["oracle_best_of"] = {judge: _summary(run.oracle(judge)) for judge in ("lenient", "strict")}
        out["reward_auc"] = {judge: run.reward_auc(judge) for judge in ("lenient", "strict")}
        out["reward_auc_per_tag"] = {t: run.reward_auc("lenient", tag=t) for t in TAGS}
        out["candidates_mean_objects"] = float(np.mean([r.num_objects for r in run.candidates["lenient"]]))
    return out


@torch.no_grad()
def background_token_stats(
    adapter, prompts_stride: int = 6, max_prompts: int = 40, k: int = 8, guidance_scale: float = 2.0, seed: int = 0
) -> dict[str, float]:
    """Where the likelihood of a sampled image sits: the share of its tokens whose 4x4-pixel patch
    (as decoded) is plain background, how many distinct codes spell those patches, and the share of
    log pi(image | prompt) they carry. A preference loss over whole-image likelihoods weighs every
    token alike, so when background codes are many and interchangeable their choice dominates it."""
    world = WorldConfig(resolution=adapter.image_size)
    prompts = [r["prompt"] for r in enumerate_geneval_prompts(world)][::prompts_stride][:max_prompts]
    tokens = adapter.sample_images(prompts, k, ImageSampling(guidance_scale=guidance_scale), seed=seed).flatten(0, 1)
    pixels = to_pixels(to_uint8(adapter.decode_images(tokens)))  # 8-bit levels, as saved
    n, side = len(pixels), int(round(tokens.shape[1] ** 0.5))
    # a decoded background patch is plain grey up to the decoder's noise: within 24 levels
    background = background_patches(pixels, (side, side), world.background, tolerance=24.5).reshape(n, -1).numpy()
    rows = [p for p in prompts for _ in range(k)]
    logps = torch.cat([adapter.image_logprobs(rows[i : i + 64], tokens[i : i + 64]) for i in range(0, n, 64)]).cpu().numpy()
    codes = tokens.cpu().numpy()
    return {
        "background_token_share": float(background.mean()),
        "background_codes": len(set(codes[background].tolist())),
        "object_codes": len(set(codes[~background].tolist())),
        "background_logp_per_token": float(logps[background].mean()),
        "object_logp_per_token": float(logps[~background].mean()),
        "background_share_of_image_logp": float(logps[background].sum() / logps.sum()),
    }


@torch.no_grad()
def evaluate_pope(adapter, n_images: int = 200, seed: int = 0, batch: int = 50) -> dict[str, Any]:
    """POPE-style accuracy per split on `n_images` seeded scenes; greedy answers, official parser;
    95% intervals resample the scenes (jointly over the splits for the mean)."""
    world = WorldConfig(resolution=adapter.image_size)
    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng, world) for _ in range(n_images)]
    names = [f"{i:05d}.png" for i in range(n_images)]
    pixels = dict(zip(names, to_pixels([render(s) for s in scenes])))
    questions, answers = {}, {}
    for split in POPE_SPLITS:
        questions[split] = [
            PopeQuestion(**q) for q in pope_questions(scenes, split, seed=seed, image_names=names, world=world)
        ]
        answers[split] = answer_pope(adapter, questions[split], pixels.__getitem__, max_new_tokens=4, batch_size=batch)
    scores = score_pope(questions, answers, "official", images=names)
    out: dict[str, Any] = {}
    for split, s in scores.splits.items():
        m = s.metrics
        out[split] = {"accuracy": m.accuracy, "ci95": s.accuracy_ci95, "f1": m.f1, "yes_ratio": m.yes_ratio, "n": m.n}
    out["mean_accuracy"] = scores.mean_accuracy
    out["mean_accuracy_ci95"] = scores.mean_accuracy_ci95
    return out


def main(argv: list[str] | None = None) -> None:
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.training.scorer import DualScorer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dualfw:assets/shapes_base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-tag", type=int, default=96)
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--best-of", type=int, default=1,
                    help="judge the best of this many samples by the model's own R_G (no training)")
    ap.add_argument("--pope-images", type=int, default=200)
    ap.add_argument("--skip-pope", action="store_true")
    ap.add_argument("--skip-geneval", action="store_true")
    ap.add_argument("--tokens", action="store_true", help="also measure where sampled images' likelihood sits (background_token_stats)")
    ap.add_argument("--out", default=None, help="also write the report (JSON) to this file")
    ap.add_argument("--device", default="cpu", help='where the model runs: "cpu", "cuda", "cuda:1", ...')
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    adapter = JanusAdapter(path=args.model).to(args.device).eval()
    report: dict[str, Any] = {"args": vars(args)}
    if not args.skip_geneval:
        t = time.time()
        scorer = None
        if args.best_of > 1:
            scorer = DualScorer()
            scorer.attach(adapter)
        report["geneval"] = evaluate_geneval(
            adapter, args.images_per_tag, args.guidance_scale, args.temperature, args.seed,
            best_of=args.best_of, scorer=scorer,
        )
        report["geneval_seconds"] = round(time.time() - t, 1)
    if args.tokens:
        report["tokens"] = background_token_stats(adapter, guidance_scale=args.guidance_scale, seed=args.seed)
    if not args.skip_pope:
        t = time.time()
        report["pope"] = evaluate_pope(adapter, args.pope_images, args.seed)
        report["pope_seconds"] = round(time.time() - t, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fp:
            fp.write(text + "\n")


if __name__ == "__main__":
    main()
