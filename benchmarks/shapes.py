"""The Shapes self-reward study: does dual self-reward training improve the shipped base model,
and by more than a random-pair control?

    export OMP_NUM_THREADS=1
    python benchmarks/shapes.py --out runs/study                 # the whole study, 2 jobs at a time
    python benchmarks/shapes.py --out runs/study --only base,self # a subset; finished parts are reused

What it runs (every fit is `dualfw fit --config conf/t2i.yaml` from dualfw:assets/shapes_base with
the overrides shown in the table's "command" column; every evaluation is
`python -m dualfw.shapes.evaluate`, GenEval-style over all 240 Shapes prompts + POPE-style):

  base, base@seed1   the base, evaluated with two sampling seeds: the noise floor
  best-of-K          no training: each judged image is the best of K samples by the base's own R_G
                     (the report also holds the oracle's best-of-K and the reward's AUC vs the judges)
  self               dual self-reward training (DualScorer, the method)
  random             the same run with random pairs (RandomScorer): what training alone does
  oracle             the same run with pairs chosen by the exact detector (OracleScorer): the bound
  joint              conf/dual.yaml: both directions every step
  tokens             where a sampled image's likelihood sits, base vs self (background tokens)

`--seeds 2,3` evaluates every part (base, best-of-K and each fit's export) with each of those
sampling seeds, one row per part and seed (`self@seed2`); by default each part is evaluated with
seed 0 and the base also with seed 1. Each part writes `<out>/<name>/report.json`; a part whose
report exists is not redone (a crashed study resumes where it stopped). Then the table prints (and is written to `<out>/table.md`):
GenEval-style lenient and strict overall with 95% CIs, objects per image, per-tag accuracy, and
POPE-style accuracy per split.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dualfw.shapes.build import run
from dualfw.shapes.text import POPE_SPLITS as SPLITS, TAGS

ROOT = Path(__file__).resolve().parents[1]
BASE = "dualfw:assets/shapes_base"

# The training runs: a recipe and its overrides. They differ only in where the pairs come from.
FITS: dict[str, list[str]] = {
    "self": ["--config", "conf/t2i.yaml"],
    "random": ["--config", "conf/t2i.yaml", "--model.init_args.scorer", "dualfw.RandomScorer"],
    "oracle": ["--config", "conf/t2i.yaml", "--model.init_args.scorer", "dualfw.shapes.oracle.OracleScorer"],
    "joint": ["--config", "conf/dual.yaml"],
}


def evaluate(name: str, model: str, out: Path, args, seed: int = 0, flags: tuple[str, ...] = ()) -> dict:
    report = out / name / "report.json"
    if not report.exists():
        cmd = [sys.executable, "-m", "dualfw.shapes.evaluate", "--model", model, "--seed", str(seed),
               "--images-per-tag", str(args.images_per_tag), "--pope-images", str(args.pope_images),
               "--out", str(report), *flags]
        run(cmd, out / name / "evaluate.log", cwd=ROOT)
    return json.loads(report.read_text())


def fit(name: str, out: Path, args) -> tuple[str, list[str], float | None]:
    """Train one run (unless its export exists); returns (export folder, the command as a user
    would type it (without the run-folder options), seconds)."""
    folder = out / name
    export = folder / "fit" / "export"
    steps = ["--trainer.max_steps", str(args.steps)] if args.steps else []
    cmd = ["dualfw", "fit", *FITS[name], "--model.init_args.model.init_args.path", args.base, *steps,
           "--trainer.default_root_dir", str(folder),
           "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.name", "fit",
           "--trainer.logger.init_args.version", "", *args.extra]
    seconds = None
    if not (export / "config.json").exists():
        seconds = run(cmd, folder / "fit.log", cwd=ROOT)
        (folder / "fit_seconds.txt").write_text(f"{seconds:.0f}\n")
    elif (folder / "fit_seconds.txt").exists():
        seconds = float((folder / "fit_seconds.txt").read_text())
    base = [] if args.base == BASE else ["--model.init_args.model.init_args.path", args.base]
    return str(export), ["dualfw", "fit", *FITS[name], *base, *steps, *args.extra], seconds


def study_part(name: str, out: Path, args, seed: int = 0) -> dict:
    """One row of the table: fit (if a training run, once for every seed) then evaluate with `seed`."""
    label = name if name in ("base@seed1", "tokens") or not args.seeds else f"{name}@seed{seed}"
    if name == "base":
        return {"report": evaluate(label, args.base, out, args, seed=seed), "command": "(no training)"}
    if name == "base@seed1":
        return {"report": evaluate("base@seed1", args.base, out, args, seed=1), "command": "(no training; sampling seed 1)"}
    if name == "best-of-K":
        report = evaluate(label, args.base, out, args, seed=seed, flags=("--best-of", str(args.best_of), "--skip-pope"))
        return {"report": report, "command": f"(no training; best of {args.best_of} by R_G)"}
    if name == "tokens":  # where the likelihood of the base's and the self-reward run's images sits
        flags = ("--skip-geneval", "--skip-pope", "--tokens")
        models = {"base": args.base, "self": str(out / "self" / "fit" / "export")}
        return {m: evaluate(f"tokens-{m}", path, out, args, flags=flags)["tokens"] for m, path in models.items()}
    export, shown, seconds = fit(name, out, args)
    report = evaluate(label, export, out, args, seed=seed)
    return {"report": report, "command": shlex.join(shown), "fit_seconds": seconds}


def _ci(summary: dict) -> str:
    lo, hi = summary["ci95"]
    return f"{summary['overall']:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: dict[str, dict]) -> str:
    """Markdown: the overall table, then per tag, then POPE-style per split."""
    rows = dict(rows)
    tokens = rows.pop("tokens", None)
    lines = ["| run | GenEval-style lenient [95% CI] | strict [95% CI] | objects / image | POPE-style [95% CI] | fit |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        g, p = row["report"].get("geneval"), row["report"].get("pope")
        pope = f"{p['mean_accuracy']:.3f} [{p['mean_accuracy_ci95'][0]:.3f}, {p['mean_accuracy_ci95'][1]:.3f}]" if p else "-"
        secs = f"{row['fit_seconds'] / 60:.1f} min" if row.get("fit_seconds") else "-"
        lines.append(f"| {name} | {_ci(g['lenient'])} | {_ci(g['strict'])} | {g['lenient']['mean_objects']:.2f} | {pope} | {secs} |")
    lines += ["", "Per tag (lenient; 95% CI half-width):", "", "| run | " + " | ".join(TAGS) + " |",
              "|---|" + "---|" * len(TAGS)]
    for name, row in rows.items():
        g = row["report"]["geneval"]["lenient"]
        cells = [f"{g['per_tag'][t]:.2f} ±{(g['per_tag_ci95'][t][1] - g['per_tag_ci95'][t][0]) / 2:.2f}" for t in TAGS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "POPE-style accuracy per split [95% CI] (yes-ratio):", "", "| run | " + " | ".join(SPLITS) + " |",
              "|---|" + "---|" * len(SPLITS)]
    for name, row in rows.items():
        p = row["report"].get("pope")
        if p:
            cells = [f"{p[s]['accuracy']:.3f} [{p[s]['ci95'][0]:.3f}, {p[s]['ci95'][1]:.3f}] ({p[s]['yes_ratio']:.2f})" for s in SPLITS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    extra = [r for r in rows.values() if "oracle_best_of" in r["report"]["geneval"]]
    for row in extra:
        g = row["report"]["geneval"]
        lines += ["", f"Best-of-{g['best_of']}: self-reward pick {_ci(g['lenient'])} lenient / {_ci(g['strict'])} strict;"
                  f" oracle pick {_ci(g['oracle_best_of']['lenient'])} / {_ci(g['oracle_best_of']['strict'])};"
                  f" R_G's within-prompt AUC vs the judges {g['reward_auc']['lenient']:.3f} (lenient),"
                  f" {g['reward_auc']['strict']:.3f} (strict); objects / image: picked"
                  f" {g['lenient']['mean_objects']:.2f}, all candidates {g['candidates_mean_objects']:.2f}."]
    if tokens:
        lines += ["", "Where a sampled image's likelihood sits (`background_token_stats`: 40 prompts x 8 samples):", "",
                  "| model | background share of tokens | codes on background / object patches | log-prob per token, background / object | background share of log pi(image) |",
                  "|---|---|---|---|---|"]
        for m, t in tokens.items():
            lines.append(f"| {m} | {t['background_token_share']:.2f} | {t['background_codes']} / {t['object_codes']} |"
                         f" {t['background_logp_per_token']:.2f} / {t['object_logp_per_token']:.2f} | {t['background_share_of_image_logp']:.2f} |")
    lines += ["", "Commands (from the project root; the study adds `--trainer.default_root_dir <out>/<run>` and the"
              " logger's folder; every run starts from dualfw:assets/shapes_base, the recipes' default):", ""]
    lines += [f"- {name}: `{row['command']}`" for name, row in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/study", help="study folder (parts found there are reused)")
    ap.add_argument("--only", default="base,base@seed1,best-of-K,self,random,oracle,joint,tokens",
                    help="comma-separated parts to run, in table order")
    ap.add_argument("--base", default=BASE, help="the model every part starts from (a folder or dualfw: asset)")
    ap.add_argument("--steps", type=int, default=None, help="override every fit's trainer.max_steps")
    ap.add_argument("--images-per-tag", type=int, default=300)
    ap.add_argument("--pope-images", type=int, default=300)
    ap.add_argument("--best-of", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=2, help="parts run at once (one core each)")
    ap.add_argument("--extra", default="", help="overrides appended to every fit, e.g. '--model.init_args.chosen_nll_weight 0.1'")
    ap.add_argument("--seeds", default="", help="comma-separated sampling seeds every part is evaluated with (default: 0)")
    args = ap.parse_args(argv)
    args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    args.extra = shlex.split(args.extra)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if args.seeds:  # base@seed1 is the default's second seed; --seeds replaces it
        names = [n for n in names if n != "base@seed1"]
    unknown = [n for n in names if n not in ("base", "base@seed1", "best-of-K", *FITS, "tokens")]
    if unknown:
        ap.error(f"--only: unknown part {unknown[0]!r}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    seeds = args.seeds or [0]
    with ThreadPoolExecutor(args.jobs) as pool:
        # every seed's evaluation of a fit waits for that one fit (fit() skips an existing export)
        first = {n: pool.submit(study_part, n, out, args, seeds[0]) for n in names if n != "tokens"}
        rows = {}
        for n, f in first.items():
            rows[n if not args.seeds else f"{n}@seed{seeds[0]}"] = f.result()
        later = {f"{n}@seed{s}": pool.submit(study_part, n, out, args, s) for s in seeds[1:] for n in first}
        rows.update({key: f.result() for key, f in later.items()})
    if "tokens" in names:  # reads the self run's export, so after the fits
        rows["tokens"] = study_part("tokens", out, args)
    text = table(rows)
    text += f"\n\n`python benchmarks/{Path(__file__).name} {shlex.join(argv if argv is not None else sys.argv[1:])}`"
    text += (f" ({(time.time() - start) / 60:.1f} min wall for what this invocation computed; reports found in"
             f" {args.out} are reused; {args.jobs} jobs, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})")
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
