"""Where a training step's time goes, each loss beside CE, from torch.profiler.

Step-time ratios say how much Zipf's LS costs; this says where. For each variant (loss x
trainer.compile mode) it runs the trainer's exact step (Trainer.train_step) on synthetic batches
already on the device, times it without the profiler, then profiles a few steps and prints per step:
the device time of every kernel, the kernels the host launched itself and the CUDA-graph replays
(under trainer.compile=reduce-overhead a captured step is one or two replays), and whether a
compiled graph was left out of CUDA graphs or split for them. Then, per loss, the kernels whose time differs from CE's
under the same compile mode: what that loss adds to the step.

    python scripts/profile_step.py --device cuda
    python scripts/profile_step.py --device cuda --losses ce,zipf,zipf_dense2 --compile reduce-overhead
    python scripts/profile_step.py --device cuda --losses ce,zipf,zipf+loss.kernel=torch
    python scripts/profile_step.py --device cpu --width 8 --batch-size 8 --steps 2 --warmup 2 --compile false

On the CPU there are no kernels: the host operators' own times are listed instead.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import SYNTHETIC_32PX, cudagraph_counts, cudagraph_note, endless, make_trainer, small_model_overrides, sync, time_steps  # noqa: E402

from zipfls_train.engine.distributed import resolve_device  # noqa: E402

# Host calls that start work on the GPU: single kernels, and replays of captured CUDA graphs.
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")


def kernel_kind(name: str) -> str:
    """A kernel's name without what differs between two compilations of the same code: Inductor
    numbers its generated kernels (``triton_poi_fused_relu_12``) and hashes its graphs, so one extra
    kernel in one step would renumber all the others and hide that the rest are the same."""
    name = re.sub(r"CompiledFxGraph \w+", "CompiledFxGraph", name)
    return re.sub(r"_\d+$", "", name)


def profile_variant(label: str, overrides: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, tuple[float, float]]:
    """Prints the variant's step; returns {kernel kind (host operator on the CPU): (us per step, calls per step)}."""
    trainer = make_trainer(overrides, device)
    batches = endless(trainer)
    counts = cudagraph_counts()
    time_steps(trainer, batches, args.warmup)  # compilation, autotuning, CUDA-graph recording
    note = cudagraph_note(counts, device)
    step_ms = min(time_steps(trainer, batches, args.steps) for _ in range(3)) * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            trainer.train_step(batches)
        sync(device)
    events = prof.key_averages()
    per_step = 1.0 / args.steps
    host_calls = {e.key: e.count * per_step for e in events if e.device_type == DeviceType.CPU}
    timed: dict[str, tuple[float, float]] = {}
    for e in events:
        if device.type == "cuda":
            us = e.self_device_time_total if e.device_type == DeviceType.CUDA else 0.0
        else:  # no kernels: the operators' own host time
            us = e.self_cpu_time_total
        if us > 0:
            kind = kernel_kind(e.key)
            total_us, calls = timed.get(kind, (0.0, 0.0))
            timed[kind] = (total_us + us * per_step, calls + e.count * per_step)
    kernels = sum(host_calls.get(k, 0.0) for k in KERNEL_LAUNCHES)
    replays = sum(host_calls.get(k, 0.0) for k in GRAPH_LAUNCHES)
    total_us = sum(us for us, _ in timed.values())
    what = "GPU kernels" if device.type == "cuda" else "host operators (self time)"
    print(f"\n== {label}: {step_ms:.2f} ms/step (fastest of 3 x {args.steps} steps, unprofiled); {what} {total_us / 1e3:.2f} ms/step; "
          f"launched by the host per step: {kernels:.0f} kernels, {replays:.0f} CUDA-graph replays"
          + note, flush=True)
    for key, (us, calls) in sorted(timed.items(), key=lambda item: -item[1][0])[: args.top]:
        print(f"   {us:9.1f} us {calls:6.1f}x  {key[:110]}", flush=True)
    return timed


def print_difference(label: str, timed: dict[str, tuple[float, float]], baseline: dict[str, tuple[float, float]], threshold_us: float) -> None:
    """Per kernel, this variant's time per step minus the baseline's (only differences above the threshold)."""
    difference: dict[str, float] = defaultdict(float)
    for key, (us, _) in timed.items():
        difference[key] += us
    for key, (us, _) in baseline.items():
        difference[key] -= us
    total = sum(difference.values())
    print(f"\n-- {label}: {total:+.1f} us/step in all", flush=True)
    for key, us in sorted(difference.items(), key=lambda item: -abs(item[1])):
        if abs(us) < threshold_us:
            break
        calls = timed.get(key, (0.0, 0.0))[1]
        print(f"   {us:+9.1f} us  ({calls:.1f}x/step here)  {key[:110]}", flush=True)


def loss_overrides(entry: str) -> list[str]:
    """``zipf+loss.kernel=torch`` -> ``["loss=zipf", "loss.kernel=torch"]``."""
    name, *extra = entry.split("+")
    return [f"loss={name}", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--losses", default="ce,zipf",
                        help="comma list of loss configs, each with optional '+'-joined overrides "
                             "(zipf+loss.kernel=torch); the first is the baseline")
    parser.add_argument("--compile", default="false,reduce-overhead", help="comma list of trainer.compile values")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=20, help="steps timed and profiled")
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--top", type=int, default=15, help="kernels listed per variant")
    parser.add_argument("--threshold-us", type=float, default=3.0, help="smallest per-step difference listed")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"cifar_resnet18 width {args.width}, batch {args.batch_size}, 32 px synthetic, 200 classes", flush=True)
    small = small_model_overrides(device, args.precision, args.width, args.batch_size)
    losses = args.losses.split(",")
    for mode in args.compile.split(","):
        results = {loss: profile_variant(f"loss={loss}, compile={mode}", [*small, *SYNTHETIC_32PX, *loss_overrides(loss), f"trainer.compile={mode}"], args, device)
                   for loss in losses}
        for loss in losses[1:]:
            print_difference(f"loss={loss} minus loss={losses[0]}, compile={mode}", results[loss], results[losses[0]], args.threshold_us)


if __name__ == "__main__":
    main()
