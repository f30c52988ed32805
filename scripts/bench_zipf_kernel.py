#!/usr/bin/env python
"""The fused Zipf kernel's GPU time under each launch config, then the compiled step with the fastest.

Under ``trainer.compile=reduce-overhead`` the 32 px step is GPU-bound, and there Zipf's LS cost
1.5-2.4% over CE on an H100 (40-63 us of a 2.7 ms step; experiments/gpu_h100_2026-11-28.md). The
largest known part is the fused kernel: 28 us for 128 samples, one program per sample, each alone on
its SM, so the kernel's time is one program's latency. How it is launched (warps per program, the
tile of its vote casting: :class:`zipfls_train.losses.zipf_fused.LaunchConfig`) changes that latency
and nothing else. This script:

1. times the kernel as the loss launches it (the kernel and the one sum of its per-sample rows),
   captured in a CUDA graph and replayed (GPU time, no host launches), for each config on the
   trainer's own shapes: the 32 px recipe (128 samples, a 4 x 4 map of dense
   logits the kernel upsamples and votes on itself; 100 and 200 classes) and the 224 px one (256
   samples, 49 votes given; 1,000 and 10,000 classes). Configs are interleaved in rounds, medians
   reported. Each config's loss and gradient are checked against the default config's (float32
   inputs, and bf16 ones as timed) before it is timed;
2. on CUDA, unless ``--kernel-only``, times the training step of cifar_resnet18 (batch 128, 200
   classes, bf16, ``trainer.compile=reduce-overhead``) for CE, Zipf with the default config and Zipf
   with the fastest config of part 1 (its step compiled and captured under that config),
   interleaved, as ``scripts/bench_train.py`` does: the Zipf/CE ratio each config gives.

    python scripts/bench_zipf_kernel.py                           # on a GPU
    TRITON_INTERPRET=1 python scripts/bench_zipf_kernel.py --device cpu --quick   # dry run: part 1's checks
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from zipfls_train.losses import zipf_fused  # noqa: E402
from zipfls_train.losses.zipf_fused import LaunchConfig, launched_with  # noqa: E402

# Candidates: the default first (16 warps where the kernel casts the votes, a 1,024-element vote
# tile; 4 warps before 2026-11-29) and other warps per program, with the same or a larger tile
# (registers per thread on sm_90, from Triton's own build: 4/1024 128, 8/1024 80, 8/2048 153,
# 16/1024 61, 16/2048 97, 16/4096 128 plus a 128-byte stack).
CAST_CONFIGS = [LaunchConfig(w, t) for w, t in [(16, 1024), (4, 1024), (8, 1024), (8, 2048), (16, 2048), (16, 4096)]]
GIVEN_CONFIGS = [LaunchConfig(w) for w in (4, 8, 16)]  # no vote casting: the tile does not matter


@dataclass(frozen=True)
class KernelCase:
    name: str
    batch: int
    num_classes: int
    weight: float
    map_side: int  # the dense map's side (the kernel casts the votes: 4 x 4 upsampled x2), or 0: given votes
    num_votes: int  # given votes per sample (map_side 0)


CASES = [
    KernelCase("32px_c100", 128, 100, 0.1, 4, 0),
    KernelCase("32px_c200", 128, 200, 1.0, 4, 0),
    KernelCase("224px_c1000", 256, 1000, 0.1, 0, 49),
    KernelCase("224px_c10000", 256, 10000, 1.0, 0, 49),
]


def kernel_inputs(case: KernelCase, dtype: torch.dtype, device: torch.device, batch: int) -> tuple:
    """``(logits, targets, *options)`` as ``zipf_fused._run_kernel`` takes them, random but fixed."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, case.num_classes, generator=generator).to(device, dtype)
    targets = torch.randint(case.num_classes, (batch,), generator=generator).to(device)
    if case.map_side:
        pixels = case.map_side * case.map_side
        votes = torch.randn(batch, pixels, case.num_classes, generator=generator).to(device, dtype)
        source = (votes, zipf_fused._UPSAMPLED_DENSE_LOGITS, case.map_side, case.map_side)
    else:
        votes = torch.randint(case.num_classes, (batch, case.num_votes), generator=generator).to(device)
        source = (votes, zipf_fused._GIVEN_VOTES, 1, 1)
    return (logits, targets, *source, 1.0, "zipf", case.weight, True)


# How far a config may differ from the default (relative to the largest value): the order of
# float sums only; votes are exact either way. bf16 gradients are stored rounded (8 bits).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def check_config(case: KernelCase, config: LaunchConfig, device: torch.device, batch: int) -> str:
    """'' if ``config`` gives the default config's loss and gradient (float32 and bf16 inputs),
    else what differs."""
    for dtype, tolerance in TOLERANCE.items():
        inputs = kernel_inputs(case, dtype, device, batch)
        expected_totals, expected_grad = zipf_fused._run_kernel(*inputs)
        with launched_with(config):
            totals, grad = zipf_fused._run_kernel(*inputs)
        totals_gap = ((totals - expected_totals).abs() / expected_totals.abs().clamp_min(1e-6)).max().item()
        grad_gap = ((grad.float() - expected_grad.float()).abs().max() / expected_grad.float().abs().max()).item()
        if not (totals_gap <= tolerance and grad_gap <= tolerance):  # (NaN fails too)
            return f"differs from the default in {str(dtype)[6:]}: loss terms by {totals_gap:.2e}, gradient by {grad_gap:.2e} (relative)"
    return ""


def kernel_microseconds(case: KernelCase, config: LaunchConfig, device: torch.device, args: argparse.Namespace) -> float:
    """One round: microseconds per kernel launch (GPU time in a CUDA graph on CUDA; wall time in
    Triton's interpreter on the CPU, which only exercises the code)."""
    inputs = kernel_inputs(case, torch.bfloat16, device, args.batch or case.batch)
    with launched_with(config):
        if device.type != "cuda":
            start = time.perf_counter()
            zipf_fused._run_kernel(*inputs)
            return 1e6 * (time.perf_counter() - start)
        from bench_loss_overhead import graphed_gpu_ms

        def launches() -> None:
            for _ in range(args.launches):
                zipf_fused._run_kernel(*inputs)

        return 1e3 * graphed_gpu_ms(launches, args.replays) / args.launches


def time_kernels(args: argparse.Namespace, device: torch.device) -> dict[str, LaunchConfig]:
    """Part 1: per case, each config's median microseconds; returns each case's fastest config."""
    fastest = {}
    for case in CASES[:2] if args.quick else CASES:
        configs = CAST_CONFIGS if case.map_side else GIVEN_CONFIGS
        labels = {config: f"warps {config.num_warps}" + (f", tile {config.vote_tile}" if case.map_side else "") for config in configs}
        for config in configs:
            problem = check_config(case, config, device, args.batch or case.batch)
            if problem:
                raise SystemExit(f"{case.name}, {labels[config]}: {problem}")
        samples: dict[LaunchConfig, list[float]] = {config: [] for config in configs}
        for config in configs:  # build and warm each kernel before any timing
            kernel_microseconds(case, config, device, args)
        for _ in range(args.rounds):
            for config in configs:
                samples[config].append(kernel_microseconds(case, config, device, args))
        medians = {config: statistics.median(values) for config, values in samples.items()}
        default = medians[configs[0]]
        for config in configs:
            print(f"kernel {case.name:<14} {labels[config]:<20} {medians[config]:9.1f} us  x{medians[config] / default:5.2f} of the default", flush=True)
        fastest[case.name] = min(configs, key=medians.get)
        print(f"kernel {case.name:<14} fastest: {labels[fastest[case.name]]}", flush=True)
    return fastest


def time_steps(config: LaunchConfig, args: argparse.Namespace, device: torch.device) -> None:
    """Part 2: the compiled 32 px training step, CE vs Zipf under the default and under ``config``
    (each variant compiled and captured, and timed, under its own launch config)."""
    from bench_train import SYNTHETIC_32PX, print_ratios, run_case, small_model_overrides

    base = [*small_model_overrides(device, "bf16", 64, 128), *SYNTHETIC_32PX, "trainer.compile=reduce-overhead"]
    fastest = f"zipf, warps {config.num_warps}, tile {config.vote_tile}"
    variants = {"ce": [*base, "loss=ce"], "zipf, default launch": [*base, "loss=zipf"], fastest: [*base, "loss=zipf"]}
    timing = argparse.Namespace(warmup=args.step_warmup, steps=50, rounds=args.step_rounds)
    result = run_case("cifar_resnet18 32px reduce-overhead", variants, timing, device, contexts={fastest: lambda: launched_with(config)})
    print_ratios(result, "ce", ["zipf, default launch", fastest])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--launches", type=int, default=20, help="kernel launches per CUDA graph")
    parser.add_argument("--replays", type=int, default=20, help="replays of the graph per round")
    parser.add_argument("--batch", type=int, default=0, help="samples per launch (0: each case's own); with --kernel-only")
    parser.add_argument("--quick", action="store_true", help="the 32 px cases only, 2 samples, 1 round, no part 2 (a dry run)")
    parser.add_argument("--kernel-only", action="store_true", help="skip part 2 (the compiled training steps)")
    parser.add_argument("--step-rounds", type=int, default=21)
    parser.add_argument("--step-warmup", type=int, default=15)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.kernel_only = args.batch or 2, 1, True
    if args.batch and not args.kernel_only:
        parser.error("--batch needs --kernel-only: part 2 trains at the recipe's batch of 128, so its config must be chosen there")
    device = torch.device(args.device)
    reason = zipf_fused.unavailable_reason(device, 64)
    if reason:
        parser.error(f"the fused kernel cannot run here: {reason}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton's interpreter: the times mean nothing)"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    fastest = time_kernels(args, device)
    if device.type == "cuda" and not args.kernel_only:
        time_steps(fastest["32px_c200"], args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
