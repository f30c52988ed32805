"""Training-step throughput (images/s), measured side by side in one process.

For each case the exact training step of the trainer (Trainer.train_step: method forward, loss,
backward, optimiser, schedule) runs on (a) synthetic batches already on the device and (b) the real
in-memory loader (TinyImageNet 32 px pack, augmentation on the device), so the data-stall fraction
1 - real/synthetic is visible. Methods are interleaved in rounds and medians reported, so drift
cancels out of the ratios.

Cases: small (cifar_resnet18 32 px, ce/ls/zipf/zipf_dense2, and on CUDA zipf with
loss.kernel=torch beside the fused kernel), resnet50 (224 px, batch 256); both also time a plain
PyTorch step (:class:`PlainStep`: the same model, resp. torchvision's ResNet-50, with no framework
code) beside the trainer's, the trainer's overhead being their ratio; small_real (the real
loader), compile (ce and zipf with trainer.compile=default and reduce-overhead, beside eager ce), compile_real
(reduce-overhead with the real loader: what a long 32 px run trains at), resnet50_compile (the
same for ResNet-50), layout, precision and frozen_backbone (eager CE with trainer.channels_last false
and true, with trainer.precision fp32 and bf16, with optim.backbone_lr_factor null and 0, for each of
--models: the 32 px ones at --batch-size, the others at 224 px and --r50-batch-size; --precision sets
the layout and frozen_backbone cases', the precision case sets its own),
threads (CPU: eager CE at each of --thread-counts torch threads, by default torch's own count and
the cores the process may use, which a cgroup's CPU limit lowers: experiments/cpu_threads.md).
Run in that order: the eager cases take seconds, each compiled one a minute or more.

    python scripts/bench_train.py --device cuda --data ../shared/data
    python scripts/bench_train.py --device cpu --cases small --batch-size 32 --width 16 --steps 5
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from zipfls_train.engine.cpu_cores import cgroup_cpu_limit, usable_cpu_cores  # noqa: E402
from zipfls_train.engine.distributed import DistContext, resolve_device  # noqa: E402
from zipfls_train.engine.trainer import Trainer  # noqa: E402


# Cases that time one setting's two values (eager CE) for each of --models: (config key, values).
SETTING_CASES = {
    "layout": ("trainer.channels_last", ("false", "true")),
    "precision": ("trainer.precision", ("fp32", "bf16")),
    # Fine-tuning with the backbone frozen (a linear probe) beside training all of it.
    "frozen_backbone": ("optim.backbone_lr_factor", ("null", "0")),
}
CASES = ("small", "compile", "resnet50", "small_real", "compile_real", "resnet50_compile", *SETTING_CASES, "threads")


# The trainers' run folders (nothing is trained into them): one temporary folder, removed at exit.
RUN_DIRS = tempfile.TemporaryDirectory(prefix="bench_train_")


# TinyImageNet's shape at 32 px (200 classes, Zipf's recipe there: bilinear x2, lambda 1.0), random data.
SYNTHETIC_32PX = ["dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=200", "dataset.steps_per_epoch=100",
                  "dataset.zipf.upsample=bilinear", "dataset.zipf.weight=1.0"]


def common_overrides(device: torch.device, precision: str) -> list[str]:
    return [f"trainer.device={device.type}", f"trainer.precision={precision}", "trainer.progress_bar=false"]


def small_model_overrides(device: torch.device, precision: str, width: int, batch_size: int) -> list[str]:
    """cifar_resnet18 of the given width and batch: the paper's 32 px model."""
    return [*common_overrides(device, precision), "model=cifar_resnet18", f"model.options.width={width}", f"trainer.batch_size={batch_size}"]


def make_trainer(overrides: list[str], device: torch.device) -> Trainer:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return Trainer(cfg, DistContext(device=device), Path(tempfile.mkdtemp(dir=RUN_DIRS.name)))


def endless(trainer: Trainer | PlainStep):
    epoch = 0
    while True:
        yield from trainer.data.train.epoch(epoch)
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cudagraph_counts() -> tuple[int, int]:
    """Process totals so far: (graphs Inductor compiled for CUDA graphs but runs without them,
    partitions of graphs Inductor split around operations it cannot capture; each split graph
    replays its captured parts and runs the rest from the host in between, every step)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"]), int(counters["inductor"]["cudagraph_partitions"])


def cudagraph_note(before: tuple[int, int], device: torch.device) -> str:
    """What went wrong with CUDA graphs since ``before`` (a :func:`cudagraph_counts`), or '' (always
    on the CPU, which has none to capture)."""
    if device.type != "cuda":
        return ""
    skipped, partitions = (now - then for now, then in zip(cudagraph_counts(), before))
    notes = [f"{skipped} graph(s) not captured in CUDA graphs"] if skipped else []
    notes += [f"graph(s) split into {partitions} partitions around operations left out of CUDA graphs"] if partitions else []
    return f"; {', '.join(notes)} (TORCH_LOGS=cudagraphs says why)" if notes else ""


def time_steps(trainer: Trainer | PlainStep, batches, steps: int) -> float:
    """Seconds per step over ``steps`` steps, with one sync at each end (as in training)."""
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batches)
    sync(trainer.device)
    return (time.perf_counter() - start) / steps


class PlainStep:
    """The textbook training step, with none of this project's code in it: ``model(x)``, cross-entropy,
    backward, SGD (fused on CUDA, foreach on the CPU, as the trainer's), under the same autocast, in
    the same layout, on the same pre-made batch as ``like`` (a Trainer on synthetic data). It is what
    "plain eager PyTorch" means in issue #8: the trainer's step over this one is the framework's cost
    (wrapper, method, term bookkeeping, scheduler), and this one's images/s the reference to beat."""

    def __init__(self, model: torch.nn.Module, like: Trainer) -> None:
        self.cfg, self.device, self.data = like.cfg, like.device, like.data  # run_case reads these
        layout = torch.channels_last if like.channels_last else torch.contiguous_format
        self.model = model.to(like.device, memory_format=layout).train()
        self.autocast_dtype = like.autocast_dtype
        optim = like.cfg.optim
        kind = {"fused": True} if like.device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=float(optim.lr), momentum=float(optim.momentum),
                                         weight_decay=float(optim.weight_decay), **kind)

    def train_step(self, batches) -> None:  # noqa: ANN001
        batch = next(batches)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            output = self.model(batch.inputs)
            logits = output.logits if hasattr(output, "logits") else output
            loss = torch.nn.functional.cross_entropy(logits, batch.targets)
        loss.backward()
        self.optimizer.step()


PLAIN_SAME_MODEL, PLAIN_TORCHVISION = "plain step, same model", "plain torchvision resnet50"


def torchvision_resnet50(like: Trainer) -> PlainStep:
    import torchvision

    return PlainStep(torchvision.models.resnet50(num_classes=like.data.num_classes), like)


def same_model(like: Trainer) -> PlainStep:
    """The trainer's own model architecture (a fresh copy), stepped plainly: the trainer's overhead alone."""
    from zipfls_train.models import build_model

    options = dict(like.cfg.model.get("options") or {})
    return PlainStep(build_model(str(like.cfg.model.name), like.data.num_classes, **options), like)


@contextlib.contextmanager
def torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_case(name: str, variants: dict[str, list[str]], args: argparse.Namespace, device: torch.device,
             plain: tuple[str, Callable[[Trainer], PlainStep]] | None = None,
             contexts: Mapping[str, Callable[[], contextlib.AbstractContextManager]] | None = None) -> dict[str, float]:
    """Images/s of each variant's trainer step (medians of interleaved rounds); ``plain``: (label,
    builder) of a :class:`PlainStep` timed beside them, built like the first variant's trainer;
    ``contexts``: per label, a context its steps run in (warm-up and compilation included)."""
    def context(label: str) -> contextlib.AbstractContextManager:
        return (contexts or {}).get(label, contextlib.nullcontext)()

    trainers: dict[str, Trainer | PlainStep] = {label: make_trainer(overrides, device) for label, overrides in variants.items()}
    if plain is not None:
        label, build = plain
        trainers[label] = build(next(iter(trainers.values())))
    streams = {label: endless(t) for label, t in trainers.items()}
    for label, trainer in trainers.items():  # warm-up: kernels, allocator, autotuning, compilation
        start, counts = time.perf_counter(), cudagraph_counts()
        with context(label):
            time_steps(trainer, streams[label], args.warmup)
            warmup_s = time.perf_counter() - start
            # A first figure right away: a time limit that falls in a later variant's compilation (a
            # minute or more for ResNet-50) must not take this one's with it. The medians below, over
            # interleaved rounds, are the figures to compare.
            first = int(trainer.cfg.trainer.batch_size) / time_steps(trainer, streams[label], args.steps)
        print(f"{name:<28} {label:<22} warm-up {warmup_s:6.1f} s, first look {first:10.0f} img/s{cudagraph_note(counts, device)}", flush=True)
    samples: dict[str, list[float]] = {label: [] for label in trainers}
    for _ in range(args.rounds):
        for label, trainer in trainers.items():
            with context(label):
                samples[label].append(time_steps(trainer, streams[label], args.steps))
    result = {}
    for label, trainer in trainers.items():
        batch = int(trainer.cfg.trainer.batch_size)
        seconds = statistics.median(samples[label])
        result[label] = batch / seconds
        print(f"{name:<28} {label:<22} {seconds * 1e3:8.2f} ms/step  {batch / seconds:10.0f} img/s", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="folder holding tinyimagenet-32/")
    parser.add_argument("--cases", default="small,resnet50,small_real", help=f"comma list of: {', '.join(CASES)}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--r50-batch-size", type=int, default=256)
    parser.add_argument("--models", default="cifar_resnet18", help="comma list of model configs for the layout and precision cases")
    parser.add_argument("--thread-counts", default="",
                        help="comma list of torch thread counts for the threads case (default: torch's own, the usable cores)")
    parser.add_argument("--compile-modes", default="default,reduce-overhead",
                        help="trainer.compile values of the compile and resnet50_compile cases (each costs a compilation per loss)")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)  # (the Trainer turns on cuDNN's autotuning, as in a run)
    except ValueError as error:  # ConfigError: no GPU for --device cuda, or an unknown device
        parser.error(str(error))
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}", flush=True)
    common = common_overrides(device, args.precision)
    small = small_model_overrides(device, args.precision, args.width, args.batch_size)
    cases = args.cases.split(",")
    modes = args.compile_modes.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected a subset of {list(CASES)}")
    results: dict[str, dict[str, float]] = {}
    # Most informative first: a time limit that cuts the run short loses the later cases only.
    if "small" in cases:
        # On CUDA, loss=zipf runs the fused kernel (loss.kernel=auto); kernel=torch is the reference path.
        variants = {f"loss={m}": [*small, *SYNTHETIC_32PX, f"loss={m}"] for m in ("ce", "ls", "zipf", "zipf_dense2")}
        if device.type == "cuda":
            variants["loss=zipf,kernel=torch"] = [*small, *SYNTHETIC_32PX, "loss=zipf", "loss.kernel=torch"]
        results["small"] = r = run_case("cifar_resnet18 32px synthetic", variants, args, device, plain=(PLAIN_SAME_MODEL, same_model))
        print_ratios(r, "loss=ce", [label for label in r if label not in ("loss=ce", PLAIN_SAME_MODEL)])
        print_ratios(r, PLAIN_SAME_MODEL, ["loss=ce"])
    r50 = [*common, "model=resnet50", "dataset=synthetic", "dataset.image_size=224", "dataset.num_classes=1000",
           f"trainer.batch_size={args.r50_batch_size}"]
    if "resnet50" in cases:
        results["r50"] = r = run_case("resnet50 224px synthetic", {f"loss={m}": [*r50, f"loss={m}"] for m in ("ce", "zipf")}, args, device,
                                      plain=(PLAIN_TORCHVISION, torchvision_resnet50))
        print_ratios(r, "loss=ce", ["loss=zipf"])
        print_ratios(r, PLAIN_TORCHVISION, ["loss=ce"])
    real = ["dataset=tinyimagenet", "dataset.format=pack", f"dataset.root={args.data}"]
    if "small_real" in cases:
        results["real"] = run_case("cifar_resnet18 32px real", {f"loss={m}": [*small, *real, f"loss={m}"] for m in ("ce", "zipf")}, args, device)
        print_stalls(results, "real", "small", {f"loss={m}": f"loss={m}" for m in ("ce", "zipf")})
    if "compile" in cases:
        # The eager step too, interleaved with the compiled ones: what compiling buys, side by side.
        variants = {"eager,loss=ce": [*small, *SYNTHETIC_32PX, "loss=ce"]}
        for mode in modes:
            for m in ("ce", "zipf"):
                variants[f"compile={mode},loss={m}"] = [*small, *SYNTHETIC_32PX, f"loss={m}", f"trainer.compile={mode}"]
            if device.type == "cuda":
                # Zipf's reference functions, which Inductor fuses itself, beside the fused kernel
                # (a custom op, opaque to it): under CUDA graphs on an H100 (2026-11-28) the fused
                # kernel's step cost 1.015-1.024x CE's, the reference's 1.026-1.032x
                # (experiments/gpu_h100_2026-11-28.md).
                variants[f"compile={mode},loss=zipf,kernel=torch"] = [
                    *small, *SYNTHETIC_32PX, "loss=zipf", "loss.kernel=torch", f"trainer.compile={mode}"]
        results["compile"] = r = run_case("cifar_resnet18 32px compiled", variants, args, device)
        print_ratios(r, "eager,loss=ce", [f"compile={mode},loss=ce" for mode in modes])
        for mode in modes:
            print_ratios(r, f"compile={mode},loss=ce", [label for label in r if label.startswith(f"compile={mode},loss=zipf")])
    if "compile_real" in cases:
        variants = {f"compile=reduce-overhead,loss={m}": [*small, *real, f"loss={m}", "trainer.compile=reduce-overhead"] for m in ("ce", "zipf")}
        results["compile_real"] = r = run_case("cifar_resnet18 32px real compiled", variants, args, device)
        print_ratios(r, "compile=reduce-overhead,loss=ce", ["compile=reduce-overhead,loss=zipf"])
        print_stalls(results, "compile_real", "compile", {label: label for label in variants})
    if "resnet50_compile" in cases:
        variants = {f"compile={mode},loss={m}": [*r50, f"loss={m}", f"trainer.compile={mode}"]
                    for mode in modes for m in ("ce", "zipf")}
        results["r50_compile"] = r = run_case("resnet50 224px compiled", variants, args, device)
        for mode in modes:
            print_ratios(r, f"compile={mode},loss=ce", [f"compile={mode},loss=zipf"])
    for case, (key, values) in SETTING_CASES.items():
        if case not in cases:
            continue
        for model in args.models.split(","):
            # 32 px models (the cifar_* configs; --width is cifar_resnet18's), the rest at 224 px.
            if model == "cifar_resnet18":
                shape = [*small, *SYNTHETIC_32PX]
            elif model.startswith("cifar_"):
                shape = [*common, f"model={model}", f"trainer.batch_size={args.batch_size}", *SYNTHETIC_32PX]
            else:
                shape = [*r50, f"model={model}"]
            name = key.split(".")[-1]
            variants = {f"{model},{name}={value}": [*shape, "loss=ce", f"{key}={value}"] for value in values}
            results[f"{case}_{model}"] = r = run_case(f"{model} {case}, loss=ce", variants, args, device)
            print_ratios(r, f"{model},{name}={values[0]}", [f"{model},{name}={values[1]}"])
    if "threads" in cases and device.type != "cpu":
        print("threads: a CPU case (torch's CPU threads); --device cpu runs it", flush=True)
    if "threads" in cases and device.type == "cpu":
        limit = cgroup_cpu_limit()
        print(f"CPU: {torch.get_num_threads()} torch threads by default, {usable_cpu_cores()} usable cores "
              f"(cgroup CPU limit: {'none' if limit is None else f'{limit:g} CPUs'})", flush=True)
        counts = [int(n) for n in args.thread_counts.split(",")] if args.thread_counts else [torch.get_num_threads(), usable_cpu_cores()]
        labels = {f"threads={n}": n for n in dict.fromkeys(counts)}
        variants = {label: [*small, *SYNTHETIC_32PX, "loss=ce"] for label in labels}
        contexts = {label: functools.partial(torch_threads, n) for label, n in labels.items()}
        results["threads"] = r = run_case("cifar_resnet18 threads, loss=ce", variants, args, device, contexts=contexts)
        print_ratios(r, next(iter(labels)), list(labels)[1:])


def print_stalls(results: dict[str, dict[str, float]], real: str, synthetic: str, labels: dict[str, str]) -> None:
    """Data-stall fractions 1 - real / synthetic images/s, for ``labels`` (real variant: synthetic
    variant), where the synthetic variant ran too."""
    for real_label, synthetic_label in labels.items():
        if synthetic_label not in results.get(synthetic, {}):
            continue
        stall = 1 - results[real][real_label] / results[synthetic][synthetic_label]
        print(f"  data-stall fraction ({real_label}): {stall:.3f}  (1 - real / synthetic images/s)", flush=True)


def print_ratios(images_per_s: dict[str, float], baseline: str, others: list[str]) -> None:
    """Step-time ratios other / baseline (= baseline images/s / other images/s)."""
    for label in others:
        print(f"  step-time ratio {label} / {baseline}: {images_per_s[baseline] / images_per_s[label]:.3f}", flush=True)

if __name__ == "__main__":
    main()
