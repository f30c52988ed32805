#!/usr/bin/env python
"""What every method of Table 1 costs per training step, relative to CE, side by side in one process.

Each method (ce, ls, zipf, tfkd, cskd, pskd, byot, ddgsd, ban) is built from its shipped
``configs/loss/<name>.yaml`` (composed by Hydra with the chosen dataset and model, so
dataset/model-dependent defaults resolve as in training) and gets its own model (same architecture,
same initial weights, with the auxiliary heads the method needs) and its own SGD optimiser (the
trainer's ``build_optimizer``). A step is exactly what the trainer runs: ``zero_grad``,
``method.training_step(model, batch)`` under autocast, ``backward``, ``method.after_backward()``, ``optimizer.step()``. What
each method needs is on the batch: a same-class pair (CS-KD), a second view (DDGSD), sample indices
into a dataset-sized memory (PS-KD), a frozen teacher (BAN generation 2; its weights are a fresh
model's, which costs the same as a trained one). Producing pairs and views (data loading and
augmentation) is *not* timed: inputs are fixed random tensors on the device.

Rounds are interleaved (round r runs ``--steps`` steps of every method, in forward order on even
rounds and reverse order on odd ones; the default is one step per method per round, the finest
interleaving), so drift and load from other processes hit all methods alike; we report the median
step time over all timed steps. On a shared or small CPU, ``--threads 1`` avoids the stalls of
oversubscribed intra-op threads (those made 2-thread timings swing 5x on a loaded 2-core machine).
Columns:

  ms/step     median wall time of one training step (CUDA: events after a synchronise)
  x CE        that time over CE's
  state MB    persistent memory the method keeps on the device: model + aux heads, gradients,
              optimiser momentum, the method's buffers (PS-KD memory), BAN's teacher
  peak MB     CUDA only: state MB + the largest transient allocation during a step
              (max_memory_allocated minus what was allocated before the step); "n/a" on CPU
  peak x CE   that peak over CE's (CUDA only)

  python scripts/bench_methods.py --device cpu --model cifar_resnet18 --width 16 --batch 32 --classes 200 --threads 1
  python scripts/bench_methods.py --device cuda --width 64 --batch 128 --classes 100 --dataset cifar100
  python scripts/bench_methods.py --device cuda --model resnet50 --image-size 224 --batch 256 \\
      --classes 1000 --dataset imagenet --dataset-size 1281167
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from zipfls_train.data.batch import Batch
from zipfls_train.engine.checkpoint import save_atomic
from zipfls_train.engine.distributed import resolve_device
from zipfls_train.engine.optim import build_optimizer
from zipfls_train.engine.precision import precision_name, resolve_precision
from zipfls_train.losses import Method, build_method
from zipfls_train.models import build_model

ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = ("ce", "ls", "zipf", "tfkd", "cskd", "pskd", "byot", "ddgsd", "ban")


def loss_configs(names: list[str], dataset: str, model: str) -> dict[str, dict]:
    """Each method's resolved loss config, composed as ``train.py dataset=... model=... loss=...``."""
    configs = {}
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for name in names:
            cfg = compose(config_name="train", overrides=[f"dataset={dataset}", f"model={model}", f"loss={name}"])
            configs[name] = OmegaConf.to_container(cfg.loss, resolve=True)
    return configs


def tensor_bytes(tensors) -> int:  # noqa: ANN001
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None or not isinstance(tensor, torch.Tensor) or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, method: Method) -> int:
    tensors = [*model.parameters(), *model.buffers(), *(p.grad for p in model.parameters()), *method.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    teacher = getattr(method, "teacher", None)
    if isinstance(teacher, nn.Module):
        tensors += [*teacher.parameters(), *teacher.buffers()]
    return tensor_bytes(tensors)


class Runner:
    """One method with its own model, optimiser and batch."""

    def __init__(self, name: str, method: Method, args: argparse.Namespace, device: torch.device) -> None:
        self.name, self.method, self.device = name, method, device
        torch.manual_seed(0)  # identical initial weights for every method
        needs = method.needs
        self.model = build_model(args.model, args.classes, aux_stages=needs.aux_stages, aux_head=needs.aux_head, **args.model_options)
        self.model.to(device).train()
        channels_last = device.type == "cuda" and not args.no_channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        method.to(device)
        factory = lambda: build_model(args.model, args.classes, **args.model_options)  # noqa: E731
        method.setup(num_classes=args.classes, dataset_size=args.dataset_size, model_factory=factory)
        sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
        self.optimizer = build_optimizer(sgd, [p for p in self.model.parameters() if p.requires_grad], args.batch, device)
        generator = torch.Generator().manual_seed(1)
        n, size = args.batch, args.image_size
        layout = torch.channels_last if channels_last else torch.contiguous_format

        def images() -> torch.Tensor:
            return torch.randn(n, 3, size, size, generator=generator).to(device).contiguous(memory_format=layout)

        targets = torch.randint(0, args.classes, (n,), generator=generator).to(device)
        self.batch = Batch(
            inputs=images(),
            targets=targets,
            indices=torch.randperm(args.dataset_size, generator=generator)[:n].to(device),
            pair_inputs=images() if needs.pairs else None,
            second_view=images() if needs.two_views else None,
        )
        dtype = resolve_precision(args.precision, device)
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
        )
        self.times: list[float] = []
        self.transient: list[int] = []

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            terms = self.method.training_step(self.model, self.batch)
        terms["loss"].backward()
        self.method.after_backward()  # PS-KD writes its memory here
        self.optimizer.step()

    def timed_step(self, record: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step()
            end.record()
            torch.cuda.synchronize(self.device)
            if record:
                self.times.append(start.elapsed_time(end))
                self.transient.append(torch.cuda.max_memory_allocated(self.device) - before)
            return
        started = time.perf_counter()
        self.step()
        if record:
            self.times.append((time.perf_counter() - started) * 1000.0)


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load}"


def parse_options(items: list[str]) -> dict:
    """KEY=VALUE builder options; values parsed as YAML scalars (ints, floats, booleans, strings)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-option expects KEY=VALUE, got {item!r}")
        options[key] = OmegaConf.to_container(OmegaConf.create(f"v: {value}"))["v"]
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--model", default="cifar_resnet18", help="a model config name (configs/model/)")
    parser.add_argument("--width", type=int, default=None, help="shorthand for --model-option width=W (CIFAR ResNet-18)")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE", help="builder keyword option")
    parser.add_argument("--dataset", default="tinyimagenet", help="dataset config whose method defaults apply (configs/dataset/)")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128, help="per-step batch (CS-KD adds as many pairs, DDGSD as many views)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--dataset-size", type=int, default=None, help="PS-KD memory rows (default 500 per class)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="as trainer.precision")
    parser.add_argument("--no-channels-last", action="store_true", help="CUDA: keep NCHW (the trainer uses channels_last)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS))
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1 on CPU, 3 on CUDA)")
    parser.add_argument("--steps", type=int, default=1, help="steps per method per round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)  # the trainer's rule: "cuda" means cuda:0 (an indexed device)
    except ValueError as error:  # ConfigError: no GPU for --device cuda, or an unknown device
        parser.error(str(error))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    args.dataset_size = args.dataset_size or 500 * args.classes
    args.model_options = parse_options(args.model_option)
    if args.width is not None:
        args.model_options["width"] = args.width
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(names) - set(ALL_METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; expected a subset of {list(ALL_METHODS)}")
    if "ce" not in names:
        names.insert(0, "ce")

    configs = loss_configs(names, args.dataset, args.model)
    workdir = Path(tempfile.mkdtemp(prefix="bench_methods_"))
    runners: dict[str, Runner] = {}
    for name in names:
        config = configs[name]
        if name == "ban":  # generation 2: distils from a (here untrained) generation-1 checkpoint
            torch.manual_seed(123)
            teacher = build_model(args.model, args.classes, **args.model_options)
            save_atomic({"model": teacher.state_dict()}, workdir / "teacher.pt")
            config = {**config, "generation": 2, "teacher_checkpoint": str(workdir / "teacher.pt")}
        try:
            method = build_method(config, args.classes)
        except ImportError as error:  # e.g. a method module that is not written yet
            print(f"# skipped {name}: {error}", file=sys.stderr)
            continue
        runners[name] = Runner(name, method, args, device)

    shutil.rmtree(workdir)  # BAN's teacher is loaded by now
    order = list(runners)
    for round_index in range(args.warmup + args.rounds):
        for name in order if round_index % 2 == 0 else reversed(order):
            for _ in range(args.steps):
                runners[name].timed_step(record=round_index >= args.warmup)

    cuda = device.type == "cuda"
    print(f"# {datetime.date.today().isoformat()}  {describe_machine(device)}  torch {torch.__version__}")
    print(
        f"# model {args.model} {args.model_options or ''} classes {args.classes} batch {args.batch} "
        f"image {args.image_size}px precision {precision_name(resolve_precision(args.precision, device))} dataset-defaults {args.dataset} "
        f"PS-KD rows {args.dataset_size}; {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up rounds)"
    )
    ce_ms = statistics.median(runners["ce"].times)
    ce_peak = None
    rows = []
    for name, runner in runners.items():
        ms = statistics.median(runner.times)
        state = state_bytes(runner.model, runner.optimizer, runner.method)
        peak = state + max(runner.transient) if cuda else None
        if name == "ce":
            ce_peak = peak
        rows.append((name, ms, state, peak))
    print(f"{'method':<8}{'ms/step':>10}{'x CE':>8}{'state MB':>11}{'peak MB':>10}{'peak x CE':>11}")
    for name, ms, state, peak in rows:
        peak_text = f"{peak / 2**20:>10.1f}{peak / ce_peak:>11.2f}" if peak is not None else f"{'n/a':>10}{'n/a':>11}"
        print(f"{name:<8}{ms:>10.1f}{ms / ce_ms:>8.2f}{state / 2**20:>11.1f}{peak_text}")
    if not cuda:
        print("# peak memory: n/a on CPU (CUDA max_memory_allocated only); state MB is exact on any device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
