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
from dualfw.core.interface import ImageSampling, TextSampling
from dualfw.shapes.detector import ShapesDetector
from dualfw.shapes.sft import background_patches, to_pixels, to_uint8
from dualfw.shapes.text import POPE_SPLITS, TAGS, enumerate_geneval_prompts, pope_questions
from dualfw.shapes.world import WorldConfig, render, sample_scene


def within_group_auc(rewards: np.ndarray, correct: np.ndarray) -> float:
    """How often the reward ranks a correct sample above an incorrect one of the SAME group:
    over every (correct, incorrect) pair inside each row of `rewards` / `correct` ((groups, K)),
    the fraction with the higher reward on the correct one (ties count 1/2). NaN with no such pair."""
    wins, pairs = 0.0, 0
    for r, c in zip(rewards, correct.astype(bool)):
        good, bad = r[c], r[~c]
        if len(good) and len(bad):
            diff = good[:, None] - bad[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return wins / pairs if pairs else float("nan")


def judge_images(records: list[dict], images: list[np.ndarray], detector) -> tuple[list, list]:
    """Detect once per image and judge it against its record by GenEval's rules: (lenient, strict)
    lists of ImageResult, the strict judge also failing any object the prompt does not ask for."""
    lenient, strict = [], []
    for record, image in zip(records, images):
        dets = detector(image)
        lenient.append(score_image(record, dets, image))
        strict.append(score_image(record, dets, image, strict=True))
    return lenient, strict


def _summary(results: list) -> dict[str, Any]:
    s = summarize(results)
    return {
        "overall": s.overall,
        # every prompt of the world is evaluated, so the noise is the images' (see the CI's docstring)
        "ci95": overall_confidence_interval(results, resample="images"),
        "ci95_over_prompts": overall_confidence_interval(results, resample="prompts"),
        "per_tag": s.per_tag,
        "per_tag_ci95": {
            tag: overall_confidence_interval([r for r in results if r.tag == tag], resample="images")
            for tag in s.per_tag
        },
        "mean_objects": s.mean_objects,
        "num_images": s.num_images,
    }


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
    if best_of < 1:
        raise ValueError(f"best_of must be >= 1, got {best_of}")
    if best_of > 1 and scorer is None:
        raise ValueError("best_of > 1 needs a scorer (e.g. DualScorer attached to the adapter)")
    world = WorldConfig(resolution=adapter.image_size)
    detector = ShapesDetector(world)
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for r in enumerate_geneval_prompts(world):
        by_tag[r["tag"]].append(r)
    sampling = ImageSampling(guidance_scale=guidance_scale, temperature=temperature)
    lenient, strict, oracle_lenient, oracle_strict = [], [], [], []
    all_rewards, all_ok, all_strict_ok, all_objects, all_tags = [], [], [], [], []
    for t, tag in enumerate(TAGS):
        recs = by_tag[tag]
        k = max(1, math.ceil(images_per_tag / len(recs)))
        for b in range(0, len(recs), prompts_per_batch):
            chunk = recs[b : b + prompts_per_batch]
            prompts = [r["prompt"] for r in chunk]
            tokens = adapter.sample_images(prompts, k * best_of, sampling, seed=seed * 1000 + t * 100 + b)
            images = to_uint8(adapter.decode_images(tokens.flatten(0, 1)))
            rows = [r for r in chunk for _ in range(k * best_of)]
            len_c, str_c = judge_images(rows, images, detector)
            if best_of == 1:
                lenient += len_c
                strict += str_c
                continue
            rewards = scorer.image_rewards(tokens.flatten(0, 1), [r["prompt"] for r in rows])
            rewards = rewards.float().cpu().numpy().reshape(-1, best_of)  # (slots, best_of)
            ok = np.array([r.correct for r in len_c]).reshape(-1, best_of)
            ok_strict = np.array([r.correct for r in str_c]).reshape(-1, best_of)
            pick = rewards.argmax(1)
            for slot, j in enumerate(pick):
                lenient.append(len_c[slot * best_of + j])
                strict.append(str_c[slot * best_of + j])
                best_l = slot * best_of + int(ok[slot].argmax())
                best_s = slot * best_of + int(ok_strict[slot].argmax())
                oracle_lenient.append(len_c[best_l])
                oracle_strict.append(str_c[best_s])
            all_rewards.append(rewards)
            all_ok.append(ok)
            all_strict_ok.append(ok_strict)
            all_tags += [tag] * len(rewards)
            all_objects += [r.num_objects for r in len_c]
    out: dict[str, Any] = {"lenient": _summary(lenient), "strict": _summary(strict), "best_of": best_of}
    if best_of > 1:
        rewards, ok, ok_strict = np.concatenate(all_rewards), np.concatenate(all_ok), np.concatenate(all_strict_ok)
        out["oracle_best_of"] = {"lenient": _summary(oracle_lenient), "strict": _summary(oracle_strict)}
        out["reward_auc"] = {"lenient": within_group_auc(rewards, ok), "strict": within_group_auc(rewards, ok_strict)}
        tags = np.array(all_tags)
        out["reward_auc_per_tag"] = {t: within_group_auc(rewards[tags == t], ok[tags == t]) for t in TAGS}
        out["candidates_mean_objects"] = float(np.mean(all_objects))
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
    """POPE-style accuracy per split on `n_images` seeded scenes; greedy answers, official parser."""
    world = WorldConfig(resolution=adapter.image_size)
    rng = np.random.default_rng([seed, 7])
    scenes = [sample_scene(rng, world) for _ in range(n_images)]
    names = [f"{i:05d}.png" for i in range(n_images)]
    pixels = {name: to_pixels([render(s)]) for name, s in zip(names, scenes)}
    greedy = TextSampling(temperature=0.0, max_new_tokens=4)
    out: dict[str, Any] = {}
    per_image: dict[str, np.ndarray] = {}
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
        hits = np.zeros((n_images, 2))  # per image: right answers, questions
        for q, p in zip(questions, preds):
            hits[names.index(q["image"])] += (p == q["label"], 1)
        per_image[split] = hits
        ci = image_bootstrap_ci([hits])
        out[split] = {"accuracy": m.accuracy, "ci95": ci[0], "f1": m.f1, "yes_ratio": m.yes_ratio, "n": m.n}
    out["mean_accuracy"] = float(np.mean([out[s]["accuracy"] for s in POPE_SPLITS]))
    out["mean_accuracy_ci95"] = image_bootstrap_ci([per_image[s] for s in POPE_SPLITS])[1]
    return out


def image_bootstrap_ci(
    splits: list[np.ndarray], level: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile bootstrap over IMAGES (the questions about one image share its difficulty):
    `splits` holds one (images, 2) array of (right answers, questions) per split, rows aligned by
    image. Returns the interval of the first split's accuracy and of the mean over splits."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(splits[0]), size=(n_boot, len(splits[0])))
    accs = np.stack([a[idx, 0].sum(1) / a[idx, 1].sum(1) for a in splits])  # (splits, n_boot)
    alpha = (1.0 - level) / 2.0

    def interval(x: np.ndarray) -> tuple[float, float]:
        low, high = np.quantile(x, [alpha, 1.0 - alpha])
        return (float(low), float(high))

    return interval(accs[0]), interval(accs.mean(0))


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
