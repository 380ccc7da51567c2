"""Peak memory of DPO training with and without LoRA.

Without LoRA the Reference is a frozen copy of the policy (two models in memory); with LoRA it is
the policy with its adapters disabled (one model). Each variant runs in its own process (peak RSS
cannot be reset within one) on the same ~30 M-parameter Janus, builds the Policy, and takes two
optimizer steps on a fixed preference pair. Prints both peaks, the model's size and the ratio.

    python benchmarks/lora_memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def run_variant(lora: bool, hidden: int, layers: int) -> dict:
    import torch

    from dualfw.core.losses import DPO
    from dualfw.core.interface import ImageSampling
    from dualfw.adapters.janus import JanusAdapter
    from dualfw.adapters.tiny import TinyJanusSpec
    from dualfw.training.policy import LoraSpec, Policy
    from dualfw.core.selfreward import Group

    torch.set_num_threads(2)
    spec = TinyJanusSpec(hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers, num_heads=8)
    policy = Policy(JanusAdapter(tiny=spec), loss=DPO(), lora=LoraSpec(r=8) if lora else None)
    params = sum(p.numel() for p in policy.model.parameters())
    prompts = ["a red circle", "two blue squares"]
    tokens = policy.model.sample_images(prompts, k=2, sampling=ImageSampling(), seed=0)
    group = Group("t2i", torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0, 0, 1], [1, 0, 1]]), prompts=prompts, image_tokens=tokens)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        loss, _ = policy.direction_loss(group)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    return {"lora": lora, "params_m": params / 1e6, "peak_rss_mb": peak_mb, "reference_is_copy": policy.reference.holds_copy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--variant", choices=["lora", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant == "lora", args.hidden, args.layers)))
        return
    print("command:", " ".join([sys.executable, *sys.argv]))
    results = {}
    for variant in ("full", "lora"):
        out = subprocess.run(
            [sys.executable, __file__, "--variant", variant, "--hidden", str(args.hidden), "--layers", str(args.layers)],
            capture_output=True, text=True, check=True,
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"DPO {variant:4s}: {r['params_m']:.1f} M params, Reference is a copy: {r['reference_is_copy']}, peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"peak RSS ratio full / LoRA: {results['full']['peak_rss_mb'] / results['lora']['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
