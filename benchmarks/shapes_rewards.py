"""Which self-reward picks the right image, and does it favour clutter? No training.

    python benchmarks/shapes_rewards.py                       # the shipped Shapes base, ~2 min on 2 cores
    python benchmarks/shapes_rewards.py --model runs/t2i/version_0/export

For `--slots` prompts per tag (GenEval-style, the exact detector as judge), K images are sampled
with CFG 2 like a training step, and each image is scored by R_G against its own prompt and
`--negatives` other prompts drawn at random from the world (what a training batch of
negatives + 1 prompts holds). Per reward it prints:

  best-of-K    lenient / strict accuracy and objects per image of each prompt's top-scored image
  pairs        best-vs-worst pairs (what `pairing: best_worst` trains on) by the strict judge: share
               right (chosen correct, rejected not), wrong (the reverse), and the mean object-count
               difference chosen - rejected (> 0: the reward teaches clutter)
  AUC          within-prompt AUC of the reward against the strict judge

Rewards: R_G (the paper); R_G relative to the other prompts (`DualScorer(batch_contrast=True)`,
the log-mean-exp over them); R_G minus a single other prompt's R_G; R_G relative to the prompt's
near misses (`DualScorer(near_misses=...)` with the world's words, all of them: every prompt one
colour, shape, number or relation away, or with two such words swapped); and the model's own yes/no
answers as a checklist (`checklist_rewards`: "Is there a red circle in the image?" for each object
the prompt names, and also "no" for each shape it does not name); the drawer's own likelihood of the
sample under its prompt against the near misses (`drawer_rewards`: the generator as a classifier);
and R_G averaged over the image's mirror images (`mirror_rewards`). The per-sample base accuracy and the
oracle best-of-K are printed first; per tag, each reward's AUC and its within-prompt spread (the
mean std of a prompt's K rewards: what GRPO's per-group normalisation divides by).

Then what GRPO's first step pulls toward (`pulls`): with the advantages of `GRPO(scale="batch")`
over all K samples or over each group's best and worst only (`extremes`), the advantage-weighted
mean of the strict judge and of the object count, per unit of |A|: > 0 on objects, the update's
first-order direction adds clutter.

Last, whether the generator listens to colour words at all (`color_conditioning`): rendered
ground-truth scenes of each colors prompt ("a photo of a red circle"), scored by the CFG-2
log-likelihood of their tokens under the six prompts that differ only in the colour.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from collections import defaultdict

import numpy as np
import torch

from dualfw.core.interface import ImageSampling
from dualfw.core.losses import group_advantages
from dualfw.adapters.janus import JanusAdapter
from dualfw.training.scorer import DualScorer, near_miss_prompts
from dualfw.shapes.detector import ShapesDetector
from dualfw.core.pixels import to_uint8
from dualfw.eval.runners import judge_images, within_group_auc
from dualfw.shapes.text import TAGS, enumerate_geneval_prompts, near_miss_words, pope_question_text
from dualfw.shapes.world import WorldConfig


def checklist_rewards(adapter, pixels: torch.Tensor, rows: list[dict], shapes) -> tuple[np.ndarray, np.ndarray]:
    """The model's yes/no answers about its own images as a reward: per image, the sum over the
    prompt's objects of log p(Yes) / (p(Yes) + p(No)) to "Is there a <colour> <shape> in the image?";
    and that plus log p(No) / (p(Yes) + p(No)) to "Is there a <shape> ...?" for each shape the prompt
    does not name (what the strict judge fails as stray objects)."""
    items = []  # (image, question, the answer the prompt asks for)
    for i, r in enumerate(rows):
        named = {c["class"] for c in r["include"]}
        items += [(i, pope_question_text((c.get("color", ""), c["class"])), True) for c in r["include"]]
        items += [(i, pope_question_text(("", s)), False) for s in shapes if s not in named]
    by_question = defaultdict(list)
    for j, (_, question, _) in enumerate(items):
        by_question[question].append(j)
    asked, unasked = np.zeros(len(rows)), np.zeros(len(rows))
    for question, js in by_question.items():
        images = pixels[[items[j][0] for j in js]]
        yes = adapter.text_logprobs(images, ["Yes"] * len(js), question)[0].sum(-1)
        no = adapter.text_logprobs(images, ["No"] * len(js), question)[0].sum(-1)
        norm = torch.logaddexp(yes, no)
        for j, y, n, z in zip(js, yes.tolist(), no.tolist(), norm.tolist()):
            image, _, want_yes = items[j]
            if want_yes:
                asked[image] += y - z
            else:
                unasked[image] += n - z
    return asked, asked + unasked


@torch.no_grad()
def drawer_rewards(adapter, tokens: torch.Tensor, prompts: list[str], groups: list[list[str]]) -> np.ndarray:
    """The drawer as a classifier of its own samples: per image, log pi(tokens | prompt) minus the
    log-mean-exp over the prompt's near misses of log pi(tokens | near miss), without CFG, summed over
    the image's tokens (0 for a prompt without near misses)."""
    summed = DualScorer(i2t_reduction="sum")
    summed.attach(adapter)
    misses = [near_miss_prompts(p, groups) for p in prompts]
    rows = [i for i, m in enumerate(misses) for _ in range(1 + len(m))]
    logps = summed.image_loglik(tokens[rows], [t for p, m in zip(prompts, misses) for t in (p, *m)])
    out = []
    for scores in logps.split([1 + len(m) for m in misses]):
        own, others = scores[0], scores[1:]
        out.append((own - others.logsumexp(0) + math.log(len(others))).item() if len(others) else 0.0)
    return np.array(out)


MIRRORED = {-1: {"left of": "right of", "right of": "left of"}, -2: {"above": "below", "below": "above"}}


def mirrored_prompt(prompt: str, dims: tuple[int, ...]) -> str:
    """The prompt of the image flipped along `dims` (-1: left-right, -2: up-down): its relations mirrored."""
    for dim in dims:
        swap = MIRRORED[dim]
        prompt = re.sub("|".join(swap), lambda m: swap[m.group(0)], prompt)
    return prompt


def mirror_rewards(scorer, tokens: torch.Tensor, prompts: list[str], pixels: torch.Tensor) -> np.ndarray:
    """R_G averaged over the image and its three mirror images (left-right, up-down, both), each
    read with its prompt's relations mirrored alike: the reader's noise on one view averaged out."""
    views = ((), (-1,), (-2,), (-1, -2))
    scores = [scorer.prompt_loglik(tokens, [mirrored_prompt(p, dims) for p in prompts], pixels.flip(dims) if dims else pixels)
              for dims in views]
    return torch.stack(scores).mean(0).float().cpu().numpy()


def score_matrix(adapter, scorer, slots: int, k: int, negatives: int, seed: int):
    """Sample and judge; returns per (prompt slot, sample): R_G for own prompt + negatives, R_G
    relative to the prompt's near misses, the yes/no checklists, the drawer's and the mirrored
    rewards, judged lenient / strict correctness, objects, and the slot's tag."""
    world = WorldConfig(resolution=adapter.image_size)
    detector, records = ShapesDetector(world), enumerate_geneval_prompts(world)
    every = [r["prompt"] for r in records]
    near = DualScorer(near_misses=near_miss_words(world))
    near.attach(adapter)
    by_tag = defaultdict(list)
    for r in records:
        by_tag[r["tag"]].append(r)
    rng = random.Random(seed)
    out = defaultdict(list)
    for t, tag in enumerate(TAGS):
        chosen = (by_tag[tag] * math.ceil(slots / len(by_tag[tag])))[:slots]
        for start in range(0, slots, 16):
            chunk = chosen[start : start + 16]
            tokens = adapter.sample_images([r["prompt"] for r in chunk], k, ImageSampling(guidance_scale=2.0), seed=seed * 1000 + t * 100 + start)
            flat = tokens.flatten(0, 1)
            rows = [r for r in chunk for _ in range(k)]
            pixels = adapter.decode_images(flat)  # decoded once: judged, then scored under every column's prompts
            lenient, strict = judge_images(rows, to_uint8(pixels), detector)
            columns = [[r["prompt"]] + rng.sample([p for p in every if p != r["prompt"]], negatives) for r in rows]
            scores = torch.stack([scorer.prompt_loglik(flat, [c[j] for c in columns], pixels) for j in range(negatives + 1)], 1)
            out["R"].append(scores.float().cpu().numpy().reshape(len(chunk), k, negatives + 1))
            out["near"].append(near.image_rewards(flat, [r["prompt"] for r in rows]).float().cpu().numpy().reshape(len(chunk), k))
            asked, with_absent = checklist_rewards(adapter, pixels, rows, world.shapes)
            out["asked"].append(asked.reshape(len(chunk), k))
            out["checklist"].append(with_absent.reshape(len(chunk), k))
            out["drawer"].append(drawer_rewards(adapter, flat, [r["prompt"] for r in rows], near.near_misses).reshape(len(chunk), k))
            out["mirror"].append(mirror_rewards(scorer, flat, [r["prompt"] for r in rows], pixels).reshape(len(chunk), k))
            out["ok"].append(np.array([x.correct for x in lenient]).reshape(-1, k))
            out["strict"].append(np.array([x.correct for x in strict]).reshape(-1, k))
            out["objects"].append(np.array([x.num_objects for x in lenient]).reshape(-1, k))
            out["tag"] += [tag] * len(chunk)
    return {key: np.concatenate(v) if key != "tag" else np.array(v) for key, v in out.items()}


@torch.no_grad()
def color_conditioning(adapter, scenes_per_prompt: int = 8, seed: int = 0) -> tuple[float, float]:
    """(mean log-likelihood of a scene under its own colour's prompt minus the log-mean-exp over the
    six colours' prompts, share of scenes whose own colour's prompt is the most likely; chance 1/6)."""
    from dualfw.core.pixels import to_pixels
    from dualfw.shapes.sft import scene_for_record
    from dualfw.shapes.world import render

    world = WorldConfig(resolution=adapter.image_size)
    records = [r for r in enumerate_geneval_prompts(world) if r["tag"] == "colors"]
    rng = np.random.default_rng(seed)
    gains, top = [], []
    for record in records:
        tokens = adapter.encode_images(to_pixels([render(scene_for_record(record, rng, world)) for _ in range(scenes_per_prompt)]))
        shape = record["include"][0]["class"]
        rivals = [r["prompt"] for r in records if r["include"][0]["class"] == shape]
        logps = torch.stack([adapter.image_logprobs([p] * len(tokens), tokens, 2.0).sum(-1) for p in rivals])
        own = rivals.index(record["prompt"])
        gains.append((logps[own] - logps.logsumexp(0) + math.log(len(rivals))).mean().item())
        top.append((logps.argmax(0) == own).float().mean().item())
    return float(np.mean(gains)), float(np.mean(top))


def log_mean_exp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = x.max(axis, keepdims=True)
    return (m + np.log(np.exp(x - m).mean(axis, keepdims=True))).squeeze(axis)


def pairs(reward: np.ndarray, d: dict) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Each prompt's top and bottom sample by `reward`, and of those best-vs-worst pairs by the
    strict judge: the share right, the share wrong, the mean objects chosen - rejected."""
    rows = np.arange(len(reward))
    best, worst = reward.argmax(1), reward.argmin(1)
    strict, objects = d["strict"].astype(int), d["objects"]
    right = (strict[rows, best] > strict[rows, worst]).mean()
    wrong = (strict[rows, best] < strict[rows, worst]).mean()
    return best, worst, right, wrong, (objects[rows, best] - objects[rows, worst]).mean()


def pair_stats(reward: np.ndarray, d: dict) -> str:
    _, _, right, wrong, objects = pairs(reward, d)
    return f"{right:.2f} / {wrong:.2f} / {objects:+.2f}"


def report(name: str, reward: np.ndarray, d: dict) -> str:
    rows = np.arange(len(reward))
    best, _, right, wrong, objects = pairs(reward, d)
    return (
        f"| {name} | {d['ok'][rows, best].mean():.3f} | {d['strict'][rows, best].mean():.3f} | {d['objects'][rows, best].mean():.2f} "
        f"| {right:.3f} | {wrong:.3f} | {objects:+.2f} | {within_group_auc(reward, d['strict']):.3f} |"
    )


def pulls(reward: np.ndarray, d: dict, extremes: bool) -> tuple[float, float]:
    """Advantage-weighted strict accuracy and object count, sum(A * x) / sum(|A|), with GRPO's
    batch-scaled advantages: the direction of a first GRPO step on these samples."""
    adv = group_advantages(torch.from_numpy(reward).double(), "batch", extremes=extremes).numpy()
    weight = np.abs(adv).sum()
    return float((adv * d["strict"]).sum() / weight), float((adv * d["objects"]).sum() / weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dualfw:assets/shapes_base")
    ap.add_argument("--slots", type=int, default=32, help="prompts per tag (cycling through the tag's prompts)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--negatives", type=int, default=3, help="other prompts each image is scored against")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.negatives < 1:
        raise SystemExit("--negatives must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    adapter = JanusAdapter(path=args.model).eval()
    scorer = DualScorer()
    scorer.attach(adapter)
    start = time.time()
    d = score_matrix(adapter, scorer, args.slots, args.k, args.negatives, args.seed)
    own = d["R"][..., 0]
    print(f"{args.model}: {len(own)} prompts x K={args.k}, {args.negatives} negatives, {time.time() - start:.0f} s")
    print(f"per sample: lenient {d['ok'].mean():.3f}, strict {d['strict'].mean():.3f}, {d['objects'].mean():.2f} objects; "
          f"oracle best-of-{args.k}: lenient {d['ok'].any(1).mean():.3f}, strict {d['strict'].any(1).mean():.3f}")
    print("| reward | best-of-K lenient | strict | objects | pairs right | pairs wrong | objects chosen - rejected | AUC (strict) |")
    print("|---|---|---|---|---|---|---|---|")
    contrast = own - log_mean_exp(d["R"][..., 1:])  # what DualScorer(batch_contrast=True) computes
    print(report("R_G", own, d))
    print(report(f"R_G vs {args.negatives} other prompts (batch_contrast)", contrast, d))
    print(report("R_G - R_G(one other prompt)", own - d["R"][..., 1], d))
    near = d["near"]
    print(report("R_G vs the prompt's near misses", near, d))
    print(report("yes/no: the prompt's objects", d["asked"], d))
    print(report("yes/no: the prompt's objects, no other shape", d["checklist"], d))
    print(report("the drawer's likelihood vs the near misses", d["drawer"], d))
    print(report("R_G over the image's mirror images", d["mirror"], d))
    print("\nGRPO's pull (advantage-weighted strict accuracy / objects per unit |A|): all K samples | best and worst only")
    oracle = d["strict"].astype(float) + 1e-3 * np.random.default_rng(args.seed).random(d["strict"].shape)  # ties broken at random
    for name, r in (("R_G", own), ("batch_contrast", contrast), ("near misses", near), ("yes/no checklist", d["checklist"]),
                    ("the detector (strict)", oracle)):
        (s_all, o_all), (s_ext, o_ext) = pulls(r, d, False), pulls(r, d, True)
        print(f"  {name:22s} {s_all:+.3f} / {o_all:+.3f} | {s_ext:+.3f} / {o_ext:+.3f}")
    print("\nper tag (strict judge): best-vs-worst pairs right / wrong / objects chosen - rejected; AUC; within-prompt spread")
    for tag in TAGS:
        mask = d["tag"] == tag
        sub = {key: value[mask] for key, value in d.items()}
        print(f"  {tag:14s}", "   ".join(
            f"{name} {pair_stats(r[mask], sub)}, {within_group_auc(r[mask], sub['strict']):.2f}, {r[mask].std(1).mean():.3f}"
            for name, r in (("R_G", own), ("batch_contrast", contrast), ("near misses", near), ("yes/no checklist", d["checklist"]),
                            ("drawer", d["drawer"]), ("mirrored", d["mirror"]))
        ))
    gain, top = color_conditioning(adapter, seed=args.seed)
    print(f"colour conditioning of the generator: own colour's prompt {gain:+.3f} nats per image above the "
          f"six colours' mean; the most likely for {top:.2f} of scenes (chance 0.17)")


if __name__ == "__main__":
    main()
