"""Measure a Janus adapter on the Shapes world: GenEval-style (lenient and strict judges, with a
bootstrap 95% CI) and POPE-style yes/no accuracy.

    python -m dualfw.shapes.evaluate --model dualfw:assets/shapes_base --seed 0

Prompts: every distinct GenEval-style record of the world (`enumerate_geneval_prompts`), with
enough images per prompt that each tag gets about `images_per_tag` images. POPE: seeded random
scenes, the three splits of `pope_questions`, greedy answers parsed with the official rule.
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

from dualfw.eval.geneval import overall_confidence_interval, score_image, summarize
from dualfw.eval.pope import parse_answer_official, pope_metrics
from dualfw.models.base import ImageSampling, TextSampling
from dualfw.shapes.detector import ShapesDetector
from dualfw.shapes.sft import to_pixels, to_uint8
from dualfw.shapes.text import POPE_SPLITS, TAGS, enumerate_geneval_prompts, pope_questions
from dualfw.shapes.world import WorldConfig, render, sample_scene


@torch.no_grad()
def evaluate_geneval(
    adapter,
    images_per_tag: int = 96,
    guidance_scale: float = 2.0,
    temperature: float = 1.0,
    seed: int = 0,
    prompts_per_batch: int = 16,
) -> dict[str, Any]:
    """Sample, detect and judge; returns lenient and strict summaries, CIs and per-image rows."""
    world = WorldConfig(resolution=adapter.image_size)
    detector = ShapesDetector(world)
    records = enumerate_geneval_prompts(world)
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_tag[r["tag"]].append(r)
    sampling = ImageSampling(guidance_scale=guidance_scale, temperature=temperature)
    lenient, strict = [], []
    for t, tag in enumerate(TAGS):
        recs = by_tag[tag]
        k = max(1, math.ceil(images_per_tag / len(recs)))
        for b in range(0, len(recs), prompts_per_batch):
            chunk = recs[b : b + prompts_per_batch]
            tokens = adapter.sample_images([r["prompt"] for r in chunk], k, sampling, seed=seed * 1000 + t * 100 + b)
            images = to_uint8(adapter.decode_images(tokens.flatten(0, 1)))
            for i, image in enumerate(images):
                record = chunk[i // k]
                dets = detector(image)
                lenient.append(score_image(record, dets, image))
                strict.append(score_image(record, dets, image, strict=True))
    out: dict[str, Any] = {}
    for name, results in (("lenient", lenient), ("strict", strict)):
        s = summarize(results)
        out[name] = {
            "overall": s.overall,
            "ci95": overall_confidence_interval(results),
            "per_tag": s.per_tag,
            "mean_objects": s.mean_objects,
            "num_images": s.num_images,
        }
    return out


@torch.no_grad()
def evaluate_pope(adapter, n_images: int = 200, seed: int = 0, batch: int = 50) -> dict[str, Any]:
    """POPE-style accuracy per split on `n_images` seeded scenes; greedy answers, official parser."""
    world = WorldConfig(resolution=adapter.image_size)
    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng, world) for _ in range(n_images)]
    names = [f"{i:05d}.png" for i in range(n_images)]
    pixels = {name: to_pixels([render(s)]) for name, s in zip(names, scenes)}
    greedy = TextSampling(temperature=0.0, max_new_tokens=4)
    out: dict[str, Any] = {}
    for split in POPE_SPLITS:
        questions = pope_questions(scenes, split, seed=seed, image_names=names, world=world)
        by_text: dict[str, list[dict]] = defaultdict(list)
        for q in questions:
            by_text[q["text"]].append(q)
        answers: dict[int, str] = {}
        for text, qs in by_text.items():  # one instruction per call, images batched
            for b in range(0, len(qs), batch):
                chunk = qs[b : b + batch]
                px = torch.cat([pixels[q["image"]] for q in chunk])
                for q, texts in zip(chunk, adapter.sample_texts(px, 1, text, greedy)):
                    answers[q["question_id"]] = texts[0]
        preds = [parse_answer_official(answers[q["question_id"]]) for q in questions]
        m = pope_metrics(preds, [q["label"] for q in questions])
        out[split] = {"accuracy": m.accuracy, "f1": m.f1, "yes_ratio": m.yes_ratio, "n": m.n}
    out["mean_accuracy"] = float(np.mean([out[s]["accuracy"] for s in POPE_SPLITS]))
    return out


def main(argv: list[str] | None = None) -> None:
    from dualfw.models.janus import JanusAdapter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dualfw:assets/shapes_base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images-per-tag", type=int, default=96)
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--pope-images", type=int, default=200)
    ap.add_argument("--skip-pope", action="store_true")
    ap.add_argument("--skip-geneval", action="store_true")
    ap.add_argument("--out", default=None, help="also write the report (JSON) to this file")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    adapter = JanusAdapter(path=args.model).eval()
    report: dict[str, Any] = {"args": vars(args)}
    if not args.skip_geneval:
        t = time.time()
        report["geneval"] = evaluate_geneval(
            adapter, args.images_per_tag, args.guidance_scale, args.temperature, args.seed
        )
        report["geneval_seconds"] = round(time.time() - t, 1)
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
