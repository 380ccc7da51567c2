"""The price of best-of-K by self-reward at inference: `dualfw predict` with best_of K against
plain sampling (best_of 1) on the same prompts, seed and batches, in one run.

Each run is Lightning's predict loop as `dualfw predict` drives it (Policy.predict_step:
sample, score with the DualScorer; BestOfKWriter: decode the chosen image, write PNG + JSON line)
into a fresh folder; model loading is outside the timing. Runs alternate (plain, best-of-K,
plain, ...) so that load from other processes hits both alike; figures are medians over the
repeats. Reported: output images/s, candidates/s, seconds per prompt, and the ratio of seconds per
prompt (best-of-K / plain).

    python benchmarks/best_of_k.py                       # the shipped Shapes base, K = 8
    python benchmarks/best_of_k.py --k 4 --prompts 16 --device cuda

--threads defaults to 1: on a small shared machine more OpenMP threads than free cores make timings
erratic; 0 keeps torch's default.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def build(model: str, prompts: int, batch: int, device: str, guidance: float):
    """The Policy (model + DualScorer) and a DataModule over the first `prompts` Shapes GenEval prompts."""
    from dualfw import DualScorer, ImageSampling, JanusAdapter, Policy, SelfRewardDataModule
    from dualfw.core.files import resolve_path

    lines = resolve_path("dualfw:assets/shapes_geneval.jsonl").read_text().splitlines()[:prompts]
    folder = Path(tempfile.mkdtemp(prefix="best_of_k_"))
    (folder / "prompts.txt").write_text("\n".join(__import__("json").loads(line)["prompt"] for line in lines) + "\n")
    policy = Policy(JanusAdapter(path=model), scorer=DualScorer())
    data = SelfRewardDataModule(prompts=str(folder / "prompts.txt"), inputs_per_step=batch, progress=False,
                                sampling=ImageSampling(guidance_scale=guidance))
    return policy, data, folder


def predict_once(policy, data, folder: Path, k: int, run: int, device: str) -> float:
    """Wall seconds of one predict loop writing the best of `k` into a fresh folder."""
    import lightning as L

    from dualfw.training.predict import BestOfKWriter

    writer = BestOfKWriter(out_dir=str(folder / f"k{k}_run{run}"), best_of=k)
    trainer = L.Trainer(accelerator="cuda" if device.startswith("cuda") else "cpu", devices=1, logger=False,
                        callbacks=[writer], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(folder))
    start = time.perf_counter()
    trainer.predict(policy, datamodule=data, return_predictions=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dualfw:assets/shapes_base")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="prompts per predict batch (data.inputs_per_step)")
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch
    from lightning.pytorch.utilities import disable_possible_user_warnings
    import logging

    disable_possible_user_warnings()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy, data, folder = build(args.model, args.prompts, args.batch, args.device, args.guidance_scale)
    predict_once(policy, data, folder, 1, -1, args.device)  # warm-up (first-call allocations)
    times: dict[int, list[float]] = {1: [], args.k: []}
    for run in range(args.repeats):
        for k in (1, args.k):
            times[k].append(predict_once(policy, data, folder, k, run, args.device))
    n = args.prompts
    print(f"{n} prompts, batches of {args.batch}, guidance {args.guidance_scale}, device {args.device}, "
          f"threads {args.threads or torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'':>12} {'s/prompt':>10} {'images/s':>10} {'candidates/s':>13}")
    per_prompt = {}
    for k, label in ((1, "plain"), (args.k, f"best of {args.k}")):
        t = statistics.median(times[k])
        per_prompt[k] = t / n
        print(f"{label:>12} {t / n:10.4f} {n / t:10.2f} {n * k / t:13.2f}")
    print(f"best-of-{args.k} costs {per_prompt[args.k] / per_prompt[1]:.2f}x plain sampling per prompt")


if __name__ == "__main__":
    main()
