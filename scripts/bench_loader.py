"""Does the file loader keep the device fed? Images/s of, side by side:

  decode only     the DataLoader workers alone (JPEG decode + crop + flip -> uint8 host batches)
  loader          the full loader path: + pinned copy to the device + normalisation there
  model alone     forward + backward + SGD step on synthetic device tensors (no data loading)
  loader + model  the real training combination

data stall = 1 - (loader + model) / (model alone): the fraction of step time spent waiting for data.

Images are real JPEG files on disk in the ImageNet layout (train/<wnid>/*.JPEG): either an existing
folder (--data) or one generated here from the 24 real ImageNet photographs of
../shared/data/imagenet-samples (each written many times with a different random crop/flip so the
files differ; sizes around 500 x 375 like ImageNet's), or, without them, synthetic 500 x 375 photos.

    python scripts/bench_loader.py --device cpu --model resnet18 --batch-size 16 --workers 2 --steps 8
    python scripts/bench_loader.py --device cuda --model resnet50 --batch-size 256 --workers 16
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zipfls_train.data.bundle import LoaderOptions  # noqa: E402
from zipfls_train.data.file_loader import FileLoader  # noqa: E402
from zipfls_train.data.imagenet import read_imagenet  # noqa: E402
from zipfls_train.data.transforms import TrainTransform  # noqa: E402
from zipfls_train.engine.precision import precision_name, resolve_precision  # noqa: E402
from zipfls_train.models import build_model  # noqa: E402

DEFAULT_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-samples"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def write_dataset(root: Path, classes: int, per_class: int, samples: Path | None, seed: int = 0) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG of realistic ImageNet-like JPEGs (quality 95)."""
    rng = random.Random(seed)
    photos: list[Image.Image] = []
    if samples is not None and samples.is_dir():
        for path in sorted(samples.glob("*.JPEG")):
            with Image.open(path) as image:
                photos.append(image.convert("RGB"))
    for c in range(classes):
        wnid = f"n{10000000 + c:08d}"
        for split, count in (("train", per_class), ("val", max(1, per_class // 10))):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                if photos:
                    photo = photos[rng.randrange(len(photos))]
                    w, h = photo.size
                    cw, ch = int(w * rng.uniform(0.8, 1.0)), int(h * rng.uniform(0.8, 1.0))
                    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                    image = photo.crop((left, top, left + cw, top + ch))
                    # Back to ImageNet's typical size (shorter side ~375, longer ~500).
                    scale = 500 / max(cw, ch)
                    image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR)
                    if rng.random() < 0.5:
                        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                else:
                    # Smooth random colour fields + noise, 500 x 375: compresses like a photograph.
                    base = np.asarray(Image.fromarray(np.uint8(rng.randrange(256) * np.ones((6, 8, 3)))).resize((500, 375)))
                    noise = np.random.default_rng(rng.randrange(2**31)).normal(0, 30, (375, 500, 3))
                    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
                image.save(folder / f"{wnid}_{k}.JPEG", quality=95)
    return root


def forever(loader: FileLoader, raw: bool) -> Iterator:
    epoch = 0
    while True:
        yield from (loader.raw_batches(epoch) if raw else loader.epoch(epoch))
        epoch += 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, warmup: int, steps: int, batch_size: int, device: torch.device) -> float:  # noqa: ANN001
    """Images/s over ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start, cudnn autotune)")
    parser.add_argument("--data", type=Path, default=None, help="an ImageNet-layout folder (default: generate one)")
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="real JPEGs to build the generated folder from")
    parser.add_argument("--classes", type=int, default=20, help="classes of the generated folder")
    parser.add_argument("--per-class", type=int, default=0, help="train images per class of the generated folder (0: enough for the run)")
    parser.add_argument("--precision", default="auto", help="as trainer.precision: auto | fp32 | bf16")
    parser.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "device"], help="where JPEGs are decoded (dataset.decode)")
    parser.add_argument("--skip-model", action="store_true", help="measure the loader only")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads of the main process (0: torch's default)")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    autocast = resolve_precision(args.precision, device)

    with tempfile.TemporaryDirectory() as scratch:
        if args.data is None:
            # Files are re-read every epoch (from the page cache, as a warm dataset on a local disk).
            per_class = args.per_class or max(4, -(-max(4 * args.batch_size, 512) // args.classes))
            started = time.perf_counter()
            root = write_dataset(Path(scratch) / "imagenet", args.classes, per_class, args.samples)
            print(f"generated {args.classes} x {per_class} train JPEGs under {root} in {time.perf_counter() - started:.1f} s"
                  f" (from {'real photos in ' + str(args.samples) if args.samples.is_dir() else 'synthetic images'})")
        else:
            root = args.data
        train_files, _ = read_imagenet(root)
        mean_bytes = np.mean([os.path.getsize(train_files.path(i)) for i in range(min(200, len(train_files)))])
        options = LoaderOptions(batch_size=args.batch_size, eval_batch_size=args.batch_size, device=device, seed=0,
                                num_workers=args.workers, channels_last=device.type == "cuda")
        loader = FileLoader(train_files, options, train=True, transform=TrainTransform(args.image_size, draft=not args.no_draft),
                            mean=MEAN, std=STD, decode=args.decode)

        # What one worker costs per image (decode + crop + resize + flip), in this process.
        probe = TrainTransform(args.image_size, draft=not args.no_draft)
        count = min(100, len(train_files))
        started = time.perf_counter()
        for i in range(count):
            probe(train_files.path(i), random.Random(i))
        print(f"one image through the CPU transform: {1000 * (time.perf_counter() - started) / count:.2f} ms (main process)")
        if device.type == "cuda":
            check_cuda_paths(train_files, args, device)

        results: dict[str, float] = {}
        raw = forever(loader, raw=True)
        # With decode=device the workers only read bytes: "decode only" is then their part alone.
        results["workers only" if args.decode == "device" else "decode only"] = timed(
            lambda: next(raw), args.warmup, args.steps, args.batch_size, device)
        batches = forever(loader, raw=False)
        results["loader"] = timed(lambda: next(batches), args.warmup, args.steps, args.batch_size, device)
        if args.skip_model:
            report(args, device, autocast, train_files, mean_bytes, results)
            return

        model = build_model(args.model, len(train_files.classes)).to(device)
        if options.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

        def train_step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss = torch.nn.functional.cross_entropy(model(inputs).logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        fake = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        if options.channels_last:
            fake = fake.contiguous(memory_format=torch.channels_last)
        fake_targets = torch.randint(0, len(train_files.classes), (args.batch_size,), device=device)
        results["model alone"] = timed(lambda: train_step(fake, fake_targets), args.warmup, args.steps, args.batch_size, device)

        def real_step() -> None:
            batch = next(batches)
            train_step(batch.inputs, batch.targets)

        results["loader + model"] = timed(real_step, args.warmup, args.steps, args.batch_size, device)
    report(args, device, autocast, train_files, mean_bytes, results)


def check_cuda_paths(train_files, args: argparse.Namespace, device: torch.device) -> None:  # noqa: ANN001
    """The CUDA loader paths against the CPU one on the same batch, and nvjpeg on the original samples
    (grayscale included) and on a truncated file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def first_batch(options: LoaderOptions, decode: str) -> torch.Tensor:
        loader = FileLoader(train_files, options, train=True, transform=TrainTransform(args.image_size, draft=False),
                            mean=MEAN, std=STD, decode=decode)
        batch = next(loader.epoch(5))
        return batch.inputs.float().cpu(), batch.inputs.is_contiguous(memory_format=torch.channels_last)

    cpu_options = LoaderOptions(batch_size=8, eval_batch_size=8, device=torch.device("cpu"), seed=0, num_workers=0)
    gpu_options = LoaderOptions(batch_size=8, eval_batch_size=8, device=device, seed=0, num_workers=2, channels_last=True)
    reference, _ = first_batch(cpu_options, "cpu")
    scale = torch.tensor(STD).view(1, 3, 1, 1) * 255
    for decode in ("cpu", "device"):
        inputs, channels_last = first_batch(gpu_options, decode)
        diff = ((inputs - reference) * scale).abs()
        print(f"CUDA loader (decode={decode}) vs CPU loader, same batch: mean abs diff {diff.mean():.3f}, "
              f"max {diff.max():.1f} (0..255 units), channels_last {channels_last}")
    if args.samples.is_dir():
        files = sorted(args.samples.glob("*.JPEG"))
        data = [torch.from_numpy(np.fromfile(f, dtype=np.uint8)) for f in files]
        on_gpu = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        worst = max(float((g.cpu().float() - decode_jpeg(d, mode=ImageReadMode.RGB).float()).abs().mean()) for g, d in zip(on_gpu, data))
        print(f"nvjpeg vs libjpeg on {len(files)} real samples (4 grayscale): worst mean abs diff {worst:.3f}")
        try:
            decode_jpeg([data[0][:3000]], mode=ImageReadMode.RGB, device=device)
            print("nvjpeg on a truncated file: no error")
        except RuntimeError as error:
            print(f"nvjpeg on a truncated file: RuntimeError {str(error)[:100]}")


def report(args: argparse.Namespace, device: torch.device, autocast, train_files, mean_bytes: float, results: dict[str, float]) -> None:  # noqa: ANN001
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  host {platform.node()}  {os.cpu_count()} CPU cores  GPU: {gpu}")
    print(f"torch {torch.__version__}  python {platform.python_version()}  device {device}  precision {precision_name(autocast)}")
    print(f"model {args.model}  batch {args.batch_size}  workers {args.workers}  image_size {args.image_size}  "
          f"decode {args.decode}  draft {'off' if args.no_draft else 'on'}  files {len(train_files)} (mean {mean_bytes / 1024:.0f} KiB)  "
          f"steps {args.steps} after {args.warmup} warm-up")
    print(f"\n{'':16s}{'images/s':>10s}")
    for name, value in results.items():
        print(f"{name:16s}{value:10.1f}")
    if "model alone" not in results:
        return
    stall = max(0.0, 1.0 - results["loader + model"] / results["model alone"])
    print(f"\ndata stall: {100 * stall:.0f}% of step time waiting for data "
          f"(loader alone {results['loader'] / results['model alone']:.2f}x the model's need)")


if __name__ == "__main__":
    main()
