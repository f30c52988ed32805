"""How long one sweep takes run by Hydra's basic launcher (one run after another, each with all the
cores) and by hydra/launcher=parallel (several at once, each pinned to its share of the cores; on a
GPU machine, several per GPU), side by side: the same sweep of train.py runs, into fresh folders,
alternating launchers round by round; prints each sweep's wall time and the ratio parallel / basic.

    python scripts/bench_sweep.py --data ../shared/data --runs-at-once 2
    python scripts/bench_sweep.py --data ../shared/data --device cuda --runs-at-once 4 -- trainer.compile=true

The default sweep: TinyImageNet 32 px pack, 10 classes x 100 train images, quarter-width ResNet18,
3 epochs, batch 64, one run per loss of --losses (ce, zipf, ls, tfkd); extra overrides after ``--``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = ["dataset=tinyimagenet", "dataset.format=pack", "dataset.num_classes_subset=10", "dataset.train_per_class=100",
         "model=cifar_resnet18", "model.options.width=16", "trainer.epochs=3", "trainer.batch_size=64",
         "trainer.progress_bar=false", "trainer.zipf_fit_at_end=false"]  # fmt: skip


def timed_sweep(launcher: list[str], overrides: list[str], folder: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", "-m", *launcher, *overrides, f"hydra.sweep.dir={folder}"],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"the sweep failed ({' '.join(launcher) or 'basic launcher'}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder holding tinyimagenet-32/")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--runs-at-once", type=int, default=2, help="cpu_runs on the CPU, runs_per_gpu on GPUs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--losses", default="ce,zipf,ls,tfkd", help="the sweep's runs: one per loss")
    parser.add_argument("extra", nargs="*", help="overrides for every run (after --)")
    args = parser.parse_args()

    overrides = [*SWEEP, f"loss={args.losses}", f"dataset.root={args.data}", f"trainer.device={args.device}", *args.extra]
    key = "hydra.launcher.cpu_runs" if args.device == "cpu" else "hydra.launcher.runs_per_gpu"
    launchers = {"basic": [], "parallel": ["hydra/launcher=parallel", f"{key}={args.runs_at_once}"]}
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores, device {args.device}")
    print(f"# sweep: {' '.join(overrides)}")
    times: dict[str, list[float]] = {name: [] for name in launchers}
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as scratch:
        for round_index in range(args.rounds):
            for name, launcher in launchers.items():
                seconds = timed_sweep(launcher, overrides, Path(scratch) / f"{name}{round_index}")
                times[name].append(seconds)
                print(f"round {round_index + 1} {name:8s} {seconds:8.2f} s", flush=True)
    basic, parallel = statistics.median(times["basic"]), statistics.median(times["parallel"])
    print(f"median: basic {basic:.2f} s, parallel ({key}={args.runs_at_once}) {parallel:.2f} s; wall-time ratio parallel/basic: {parallel / basic:.3f}")


if __name__ == "__main__":
    main()
