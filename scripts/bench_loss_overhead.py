#!/usr/bin/env python
"""What Zipf's label smoothing costs over CE and LS: training-step time and peak memory, side by side.

The paper's headline is that Zipf's LS is one-pass and almost free (Table 1). This script measures it
the way training runs it: methods built with ``zipfls_train.losses.build_method`` from the shipped
``configs/loss/*.yaml``, models with ``build_model``, each step ``method.training_step(model, batch)``
+ backward + SGD step. Methods are interleaved (round r runs ce, ls, zipf, the next round the
reverse order, ...), so drift (thermal, other processes) hits all of them alike; we report medians.

Cases:
  cifar100, cifar200   CIFAR ResNet-18 (pre-activation) at 32 px, 100 / 200 classes, batch 128;
                       Zipf with the CIFAR/TinyImageNet recipe: 4x4 final map, bilinear x2 -> 64 votes.
  head1000, head10000  a synthetic ResNet-50 head: a random 2048 x 7 x 7 feature map (a leaf that
                       requires grad, standing in for the backbone; bf16 under --precision bf16, as
                       the backbone's output under autocast) + GAP + Linear(2048, C), batch
                       256, Zipf without upsampling (49 votes), C = 1,000 (ImageNet) / 10,000
                       (INAT21). Only the head runs, so this isolates the dense classification cost
                       that a real backbone would dilute.
  resnet50_1000, resnet50_10000
                       the whole ResNet-50 (timm, as ``model=resnet50``) at 224 px with 1,000 /
                       10,000 classes, the ImageNet/INAT21 recipe: the training step the paper's
                       Table 1 times. Batch 256 on CUDA, 8 on the CPU (``--resnet-batch-size``).
On CUDA a fourth column, zipf_ref, is Zipf through the reference torch functions (loss.kernel=torch)
beside the fused kernel that loss.kernel=auto picks there.

Timing: CUDA with events around each step after a synchronise, plus warm-up rounds; CPU with
``time.perf_counter`` (torch's default thread count). Each line gives medians (and their ratios),
then, after "|", the per-method minimum over rounds and (CPU) the median process CPU time with their
ratios: the figures least disturbed when other processes share the CPU (the 1-minute load average
ends the line). Peak memory: CUDA
``max_memory_allocated`` over one step (reset before it); on CPU "n/a".

  python scripts/bench_loss_overhead.py                          # all cases, auto device
  python scripts/bench_loss_overhead.py --device cpu --cases cifar100 --repeats 9
  python scripts/bench_loss_overhead.py --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from zipfls_train.data.batch import Batch
from zipfls_train.engine.distributed import resolve_device
from zipfls_train.losses import Method, build_method
from zipfls_train.models import ModelOutput, build_model
from zipfls_train.models.wrapper import ClassifierWrapper

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ce", "ls", "zipf")
# On CUDA, Zipf runs the fused kernel (loss.kernel=auto); "zipf_ref" is the same method through the
# reference torch functions (loss.kernel=torch), so one run shows what the kernel saves.
CUDA_METHODS = (*METHODS, "zipf_ref")
CASES = ("cifar100", "cifar200", "head1000", "head10000", "resnet50_1000", "resnet50_10000")
# ImageNet / INAT21 recipe: no upsampling of the 7x7 map (lambda does not change the cost).
IMAGENET_ZIPF = {"weight": 0.1, "upsample": "none", "aux_weight": 0.1}


@dataclass
class Case:
    name: str
    model: nn.Module
    batch: Batch
    methods: dict[str, Method]
    leaf_input: bool  # the synthetic head's input is a leaf whose grad must be cleared every step


class FeatureMapStandIn(nn.Module):
    """A 'backbone' whose only stage output is its input: the synthetic head case feeds it a random
    2048 x 7 x 7 map that requires grad (what ResNet-50's last stage would hand the head)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stage_channels = [channels]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        return [x]


def loss_config(name: str, dataset_zipf: dict) -> dict:
    """``configs/loss/<name>.yaml`` resolved against the dataset's ``zipf`` block, as Hydra would
    (``zipf_ref``: ``zipf.yaml`` with ``kernel: torch``)."""
    file_name = "zipf" if name == "zipf_ref" else name
    config = OmegaConf.create({"dataset": {"zipf": dataset_zipf}, "loss": OmegaConf.load(ROOT / "configs" / "loss" / f"{file_name}.yaml")})
    if name == "zipf_ref":
        config.loss.kernel = "torch"
    return OmegaConf.to_container(config.loss, resolve=True)


def method_names(device: torch.device) -> tuple[str, ...]:
    return CUDA_METHODS if device.type == "cuda" else METHODS


def build_case(name: str, args: argparse.Namespace, device: torch.device) -> Case:
    generator = torch.Generator(device="cpu").manual_seed(0)
    if name.startswith("cifar"):
        num_classes = int(name.removeprefix("cifar"))
        dataset_zipf = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "dataset" / "cifar100.yaml").zipf)
        methods = {m: build_method(loss_config(m, dataset_zipf), num_classes) for m in method_names(device)}
        aux_stages = sorted({s for m in methods.values() for s in m.needs.aux_stages})
        model = build_model("cifar_resnet18", num_classes, aux_stages=aux_stages, width=args.width)
        n = args.batch_size
        inputs = torch.randn(n, 3, 32, 32, generator=generator)
        leaf = False
    elif name.startswith("resnet50_"):
        num_classes = int(name.removeprefix("resnet50_"))
        methods = {m: build_method(loss_config(m, IMAGENET_ZIPF), num_classes) for m in method_names(device)}
        model = build_model("resnet50", num_classes)
        n = args.resnet_batch_size
        inputs = torch.randn(n, 3, 224, 224, generator=generator)
        leaf = False
    else:
        num_classes = int(name.removeprefix("head"))
        methods = {m: build_method(loss_config(m, IMAGENET_ZIPF), num_classes) for m in method_names(device)}
        model = ClassifierWrapper(FeatureMapStandIn(2048), num_classes)
        n = args.head_batch_size
        inputs = torch.relu(torch.randn(n, 2048, 7, 7, generator=generator))
        if args.precision == "bf16":  # what ResNet-50's last stage hands the head under autocast
            inputs = inputs.to(torch.bfloat16)  # (a float32 map made the votes a float32 matmul: 10 ms at 10k classes)
        leaf = True
    targets = torch.randint(0, num_classes, (n,), generator=generator)
    model = model.to(device)
    inputs = inputs.to(device)
    if device.type == "cuda":  # the framework's GPU layout
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    if leaf:
        inputs.requires_grad_(True)
    batch = Batch(inputs=inputs, targets=targets.to(device), indices=torch.arange(n, device=device))
    methods = {k: m.to(device) for k, m in methods.items()}
    return Case(name, model, batch, methods, leaf)


def make_step(case: Case, method: Method, optimizer: torch.optim.Optimizer, autocast: Callable) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if case.leaf_input:
            case.batch.inputs.grad = None
        with autocast():
            terms = method.training_step(case.model, case.batch)
        terms["loss"].backward()
        method.after_backward()
        optimizer.step()

    return step


@dataclass
class Sample:
    wall_ms: float
    cpu_ms: float | None  # process CPU time (CPU device): barely moved by other processes' load
    peak_bytes: float | None  # CUDA max_memory_allocated over the step


def timed(step: Callable[[], None], device: torch.device) -> Sample:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return Sample(start.elapsed_time(end), None, float(torch.cuda.max_memory_allocated(device)))
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return Sample((time.perf_counter() - wall) * 1000.0, (time.process_time() - cpu) * 1000.0, None)


@dataclass
class Summary:
    median_ms: float
    min_ms: float
    median_cpu_ms: float | None
    peak_bytes: float | None


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Summary]:
    """Interleaved rounds (ce, ls, zipf, then zipf, ls, ce, ...); per method the timed rounds' summary."""
    case.model.train()
    optimizer = torch.optim.SGD(case.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    if args.precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    steps = {name: make_step(case, method, optimizer, autocast) for name, method in case.methods.items()}
    samples: dict[str, list[Sample]] = {name: [] for name in steps}
    order = list(steps)
    for round_index in range(args.warmup + args.repeats):
        for name in order if round_index % 2 == 0 else reversed(order):
            sample = timed(steps[name], device)
            if round_index >= args.warmup:
                samples[name].append(sample)
    summaries = {}
    for name, runs in samples.items():
        cpu = [r.cpu_ms for r in runs if r.cpu_ms is not None]
        peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
        summaries[name] = Summary(
            median_ms=statistics.median(r.wall_ms for r in runs),
            min_ms=min(r.wall_ms for r in runs),
            median_cpu_ms=statistics.median(cpu) if cpu else None,
            peak_bytes=max(peaks) if peaks else None,
        )
    return summaries


def isolated_loss_ms(case: Case, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, float], dict[str, float] | None]:
    """Per method, the fastest of ``args.loss_repeats`` runs of its loss alone: ``loss_terms`` on one
    fixed model output + backward to the logits (detached from the network). The network's forward
    and backward are the same for every method, so zipf - ce here is the whole of Zipf's extra work
    per step, measured without the step's much larger variance. On CUDA also the same loss and
    backward captured in a CUDA graph and replayed: its GPU time alone, without the host's launches
    (what the loss costs inside a ``reduce-overhead`` step); None on the CPU."""
    # (No autocast weight-cast cache: a CUDA graph must not capture casts cached outside it.)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)) if args.precision == "bf16" else contextlib.nullcontext
    stages = sorted({s for m in case.methods.values() for s in m.needs.feature_stages})
    with torch.no_grad(), autocast():
        out = case.model(case.batch.inputs, features=stages, aux=True)

    def loss_step(method: Method) -> Callable[[], None]:
        def run() -> None:
            output = ModelOutput(
                logits=out.logits.detach().requires_grad_(),
                pooled=out.pooled,
                features=out.features,
                aux_logits={k: v.detach().requires_grad_() for k, v in out.aux_logits.items()},
            )
            with autocast():
                terms = method.loss_terms(output, case.batch, case.model)
            terms["loss"].backward()

        return run

    runs = {name: loss_step(method) for name, method in case.methods.items()}
    for run in runs.values():
        run()  # warm-up
    fastest = {name: float("inf") for name in runs}
    for _ in range(args.loss_repeats):  # interleaved, like the steps: a burst of load hits every method
        for name, run in runs.items():
            fastest[name] = min(fastest[name], timed(run, device).wall_ms)
    graphed = {name: graphed_or_nan(name, run, args.loss_repeats) for name, run in runs.items()} if device.type == "cuda" else None
    return fastest, graphed


def graphed_or_nan(name: str, run: Callable[[], None], replays: int) -> float:
    """:func:`graphed_gpu_ms`, or NaN (said on stderr) where the loss cannot be captured: one method
    that fails there must not cost a GPU session the other figures."""
    try:
        return graphed_gpu_ms(run, replays)
    except Exception as error:  # noqa: BLE001 - reported, and the column shows nan
        print(f"# {name}: not captured in a CUDA graph ({type(error).__name__}: {error})", file=sys.stderr, flush=True)
        return float("nan")


def graphed_gpu_ms(run: Callable[[], None], replays: int) -> float:
    """GPU milliseconds of ``run`` captured once in a CUDA graph and replayed ``replays`` times back
    to back (events around all replays: the GPU never waits for the host). Warmed up on a side
    stream first, as ``torch.cuda.graph`` requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()  # first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def format_line(name: str, device: torch.device, r: dict[str, Summary]) -> str:
    """One line per case: medians and their ratios first; then memory; then the minima and, on CPU,
    the process CPU time, the figures that other processes' load disturbs least."""

    names = method_names(device)

    def ratios(values: dict[str, float]) -> str:
        text = f"zipf/ce {values['zipf'] / values['ce']:.3f} zipf/ls {values['zipf'] / values['ls']:.3f}"
        return text + (f" zipf_ref/ce {values['zipf_ref'] / values['ce']:.3f}" if "zipf_ref" in values else "")

    def per_method(values: dict[str, float], digits: int = 1) -> str:
        return " ".join(f"{m} {values[m]:.{digits}f}" for m in names)

    median = {m: r[m].median_ms for m in names}
    fastest = {m: r[m].min_ms for m in names}
    parts = [f"{name:<10} {device.type:<4} median ms {per_method(median)}  time {ratios(median)}"]
    if device.type == "cuda":
        peak = {m: r[m].peak_bytes / 2**20 for m in names}
        parts.append(f"peak MiB {per_method(peak, 0)}  mem {ratios(peak)}")
    else:
        parts.append("mem zipf/ce n/a zipf/ls n/a")
    parts.append(f"| min ms {per_method(fastest)}  min-time {ratios(fastest)}")
    if device.type == "cpu":
        cpu = {m: r[m].median_cpu_ms for m in names}
        parts.append(f"| median cpu-ms {per_method(cpu)}  cpu-time {ratios(cpu)}")
    parts.append(f"| {load_average()}")
    return "  ".join(parts)


def load_average() -> str:
    """The 1-minute load average: on a shared CPU machine, the context every CPU number needs."""
    try:
        return f"load {os.getloadavg()[0]:.2f}"
    except OSError:  # pragma: no cover - not on every platform
        return "load n/a"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (each runs every method once)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1 on CPU, 5 on CUDA)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, as trainer.precision=bf16")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--batch-size", type=int, default=128, help="CIFAR cases' batch (the recipe: 128)")
    parser.add_argument("--width", type=int, default=64, help="CIFAR ResNet-18 base width (the recipe: 64)")
    parser.add_argument("--loss-repeats", type=int, default=20,
                        help="runs of each loss alone (fixed model output) for the isolated-loss column; 0 = skip")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU: torch.set_num_threads (default: torch's default); 1 makes the CPU-time "
                             "figures insensitive to other processes' load (no OpenMP barrier waits)")
    parser.add_argument("--head-batch-size", type=int, default=256, help="synthetic head cases' batch (the recipe: 256)")
    parser.add_argument("--resnet-batch-size", type=int, default=None,
                        help="ResNet-50 cases' batch (default 256 on CUDA, the recipe; 8 on the CPU)")
    args = parser.parse_args(argv)

    try:
        device = resolve_device(args.device)  # the trainer's rule, as bench_methods.py
    except ValueError as error:  # ConfigError: no GPU for --device cuda, or an unknown device
        parser.error(str(error))
    if args.warmup is None:
        args.warmup = 5 if device.type == "cuda" else 1
    if args.resnet_batch_size is None:
        args.resnet_batch_size = 256 if device.type == "cuda" else 8
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected a subset of {list(CASES)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"# torch {torch.__version__}, device {describe_device(device)}, precision {args.precision}, "
          f"repeats {args.repeats} (+{args.warmup} warm-up), CIFAR batch {args.batch_size} width {args.width}, "
          f"head batch {args.head_batch_size}, ResNet-50 batch {args.resnet_batch_size}, {load_average()}", flush=True)
    for name in cases:
        case = build_case(name, args, device)
        results = run_case(case, args, device)
        line = format_line(name, device, results)
        if args.loss_repeats > 0:
            loss, graphed = isolated_loss_ms(case, args, device)
            extra = loss["zipf"] - loss["ce"]
            each = " ".join(f"{name} {ms:.2f}" for name, ms in loss.items())
            line += (f"  | isolated loss ms {each}: "
                     f"zipf extra {extra:.2f} ms = {100 * extra / results['ce'].min_ms:.2f}% of the fastest ce step")
            if graphed is not None:
                each = " ".join(f"{name} {1e3 * ms:.1f}" for name, ms in graphed.items())
                line += f"  | in a CUDA graph, GPU us {each}: zipf extra {1e3 * (graphed['zipf'] - graphed['ce']):.1f} us"
        print(line, flush=True)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
