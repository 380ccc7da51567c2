"""Build a Shapes base model from scratch with one command (run it from the project root, which
holds conf/shapes/), on the cores there are:

    python -m dualfw.shapes.build        # writes runs/shapes/base; prints stage times

Stages are `dualfw fit` runs of the configs in conf/shapes/. The runs of one step of `STEPS` are
independent (the tokenizer and the reader), so they run at once, one thread each; a step with one
run gets every thread. The shipped base (dualfw:assets/shapes_base) is this command's output; its
build time and evaluation are in dualfw/assets/shapes_base/README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# (config, what it makes); the runs of one step start together
STEPS: list[list[tuple[str, str]]] = [
    [("conf/shapes/tokenizer.yaml", "tokenizer"), ("conf/shapes/reader.yaml", "reader")],
    [("conf/shapes/base.yaml", "reader learns to draw")],
]


def run(cmd: list[str], log: Path, threads: int | None = None, cwd: Path | None = None) -> float:
    """Run `cmd` in `cwd` (default: here) with its output in `log` (OMP_NUM_THREADS=`threads` if
    given); returns seconds; raises on failure, naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    with open(log, "w") as fp:
        fp.write("$ " + shlex.join(cmd) + "\n")
        fp.flush()
        code = subprocess.call(cmd, cwd=cwd, stdout=fp, stderr=subprocess.STDOUT, env=env)
    if code:
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {code}); see {log}")
    return time.time() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="threads to share among a step's runs")
    ap.add_argument("--logs", default="runs/shapes/logs", help="one log per stage")
    args = ap.parse_args(argv)
    start = time.time()
    for step in STEPS:
        threads = max(1, args.cores // len(step))
        with ThreadPoolExecutor(len(step)) as pool:
            jobs = {
                (config, what): pool.submit(run, ["dualfw", "fit", "--config", config],
                                            Path(args.logs) / (Path(config).stem + ".log"), threads)
                for config, what in step
            }
            for (config, what), job in jobs.items():
                print(f"dualfw fit --config {config}  ({what}, {threads} thread(s)): {job.result() / 60:.1f} min", flush=True)
    print(f"base model built in {(time.time() - start) / 60:.1f} min: runs/shapes/base", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
