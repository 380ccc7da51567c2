"""Can the Shapes base learn its self-reward's picks offline, at a large step, within the fit budget?

    python benchmarks/shapes_distill.py --rollouts RUN/rollouts.jsonl --pick self --out runs/distill/self
    python benchmarks/shapes_distill.py --rollouts RUN/rollouts.jsonl --pick random --out runs/distill/random

The candidates and their rewards are a run's `rollouts.jsonl`. From a run with
`--model.init_args.rollouts_from initial --model.init_args.scorer.init_args.frozen true` they are K
samples of the frozen base per prompt, rewarded by the frozen base's R_G: they do not depend on the
policy, so every such run with the same data seed writes the same file. Each line gives one
training image: the best sample by the recorded reward (`self`), a uniform one (`random`, the
control), or a correct one by the exact detector, else a uniform one (`oracle`). A copy of the base
learns these images by likelihood (`ShapesSFT.t2i_token_loss`: prompt dropped 10% of the time, the
VQ frozen), `--batch` per step, AdamW (weight decay 0.01, 20 warm-up steps, then constant `--lr`,
clip 1.0), for `--minutes` of wall time; the export is then judged as the study judges its fits
(`python -m dualfw.shapes.evaluate --images-per-tag 300 --pope-images 100`). Use one thread per
run beside another, or all cores alone, as the README's rows say.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dualfw.training.rollouts import read_rollouts
from dualfw.core.errors import ConfigError
from dualfw.adapters.janus import JanusAdapter
from dualfw.shapes import evaluate
from dualfw.shapes.oracle import OracleScorer
from dualfw.shapes.sft import ShapesSFT, export


def training_images(records: list[dict], pick: str, adapter: JanusAdapter, rng: np.random.Generator) -> torch.Tensor:
    """(n, N) tokens: one sample of each t2i rollout, chosen as `pick` says."""
    if pick == "self":
        chosen = [int(np.argmax(r["rewards"])) for r in records]
    elif pick == "random":
        chosen = [int(rng.integers(len(r["rewards"]))) for r in records]
    else:  # the exact detector's GenEval verdict, 0 or 1 per sample
        oracle, chosen, found = OracleScorer(judge="lenient"), [], 0
        oracle.attach(adapter)
        for r in records:
            verdict = oracle.image_rewards(torch.tensor(r["image_tokens"]), [r["prompt"]] * len(r["image_tokens"]))
            correct = torch.nonzero(verdict).flatten().tolist()
            found += bool(correct)
            chosen.append(int(rng.choice(correct)) if correct else int(rng.integers(len(verdict))))
        print(f"rollouts with a correct sample: {found}/{len(records)}", flush=True)
    return torch.tensor([r["image_tokens"][c] for r, c in zip(records, chosen)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rollouts", required=True, help="a t2i run's rollouts.jsonl")
    ap.add_argument("--pick", choices=("self", "random", "oracle"), default="self")
    ap.add_argument("--model", default="dualfw:assets/shapes_base", help="the model the rollouts were sampled from")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=36, help="images per step")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock training time (the fit budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="folder for the export and report.json")
    ap.add_argument("--images-per-tag", type=int, default=300)
    ap.add_argument("--pope-images", type=int, default=100)
    args = ap.parse_args(argv)

    records = [r for r in read_rollouts(args.rollouts) if r.get("direction") == "t2i"]
    if not records:
        raise ConfigError(f"{args.rollouts}: no t2i rollouts")
    rng = np.random.default_rng(args.seed)
    module = ShapesSFT(JanusAdapter(path=args.model), stage="lm", cfg_drop=0.1)
    tokens = training_images(records, args.pick, module.model, rng)
    prompts = [r["prompt"] for r in records]
    params = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    module.model.train()
    step, start = 0, time.time()
    while time.time() - start < args.minutes * 60:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)
        batch = rng.integers(len(records), size=args.batch)
        loss = module.t2i_token_loss(tokens[batch], [prompts[i] for i in batch], generator)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % 250 == 0:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    module.model.eval()
    out = export(module.model, Path(args.out) / "export")
    print(f"{args.pick}: {len(records)} images, {step} steps of {args.batch} at lr {args.lr:g} in "
          f"{(time.time() - start) / 60:.1f} min -> {out}", flush=True)
    evaluate.main(["--model", str(out), "--images-per-tag", str(args.images_per_tag),
                   "--pope-images", str(args.pope_images), "--out", str(Path(args.out) / "report.json")])


if __name__ == "__main__":
    main()
