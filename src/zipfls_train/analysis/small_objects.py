"""Small objects (the paper's section 5, "Non-target class dense classification ranking design"):
dense votes favour large objects, so does Zipf's LS cost accuracy on small ones? The paper takes,
from ImageNet's bounding boxes, the 5 val images of each class whose object is smallest, and finds
Zipf's LS ahead of CE there too (69.25% vs 67.72%, ResNet-50). This measures that for any runs of
one dataset, and goes on to the accuracy by object size over the whole val set.

An image's object size is the area of the largest box of its own class, as a share of the image
(pixel-inclusive coordinates, (x1 - x0 + 1) (y1 - y0 + 1) / (W H), capped at 1); an image without
a box of its class is left out, and counted. The ``--per-class`` smallest of each class are
chosen once, from the boxes, and every run is scored on the same images (ties: the earlier image
in val order). The size quintiles are of all val images with a box.

With --figure, the paper's Figure 6: the smallest of the chosen objects, and each run's class
activation map of the true class over them (its classifier applied to every pixel of the final
map), titled with the run's top-1 class.

Boxes (--boxes), by what the path is:

* a folder of PASCAL VOC ``.xml`` files (ImageNet's ``ILSVRC2012_bbox_val_v3.tgz``, or
  ``ILSVRC/Annotations/CLS-LOC/val`` of Kaggle's download): file name, size and boxes in each;
* a ``.csv``: Kaggle's ``LOC_val_solution.csv`` ("ImageId,PredictionString" with
  "<wnid> <x0> <y0> <x1> <y1> ..."); the image sizes are read from the run's val files;
* any other file: Tiny ImageNet's ``val/val_annotations.txt`` (``<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>``,
  64 x 64 images), which also places a run trained on the 32 px pack: the pack keeps each class's
  val images in the order of their file numbers.

    python -m zipfls_train.analysis.small_objects RUN_CE RUN_ZIPF --boxes <imagenet>/LOC_val_solution.csv
    python -m zipfls_train.analysis.small_objects RUN... --boxes tiny-imagenet-200/val/val_annotations.txt --per-class 5
    python -m zipfls_train.analysis.small_objects RUN_CE RUN_ZIPF --boxes <imagenet>/ILSVRC2012_bbox_val --figure fig6.png
"""

from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..models.wrapper import unwrap
from .classes import wordnet_names
from .figures import GROUND_TRUTH, IRRELEVANT, output_path, save, without_ticks
from .run_loading import (AnalysisError, LoadedRun, add_run_arguments, as_shown, check_same_val_set, evaluated, forward_eval, inputs_at,
                          load_runs, run_title, same_inputs)  # fmt: skip

TINYIMAGENET_SIZE = (64, 64)  # every image of the official Tiny ImageNet
QUINTILES = (0.2, 0.4, 0.6, 0.8)

# stem of an image file -> (wnid, area as a share of the image) of each of its boxes
Boxes = dict[str, list[tuple[str, float]]]


class SmallObjectsError(AnalysisError):
    """Boxes, runs or options that cannot give the measurement; the message says which."""


def box_share(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> float:
    """A box's area as a share of its image (pixel-inclusive coordinates), at most 1."""
    return min(1.0, max(0.0, x1 - x0 + 1) * max(0.0, y1 - y0 + 1) / (width * height))


# --- reading boxes ----------------------------------------------------------------------------------------
def read_voc_folder(folder: Path) -> Boxes:
    """PASCAL VOC annotations, one ``.xml`` per image (ImageNet's val boxes)."""
    boxes: Boxes = {}
    files = sorted(folder.rglob("*.xml"))
    if not files:
        raise SmallObjectsError(f"{folder} holds no .xml annotation: expected PASCAL VOC files (ImageNet's val boxes)")
    for path in files:
        try:
            root = ElementTree.parse(path).getroot()
            size = root.find("size")
            width, height = int(size.findtext("width")), int(size.findtext("height"))
            found = []
            for obj in root.iter("object"):
                box = obj.find("bndbox")
                x0, y0, x1, y1 = (float(box.findtext(key)) for key in ("xmin", "ymin", "xmax", "ymax"))
                found.append((obj.findtext("name").strip(), box_share(x0, y0, x1, y1, width, height)))
        except (ElementTree.ParseError, AttributeError, TypeError, ValueError, ZeroDivisionError):
            raise SmallObjectsError(f"{path}: not a PASCAL VOC annotation (expected <size><width>/<height> and <object>s with "
                                    "<name> and <bndbox><xmin>/<ymin>/<xmax>/<ymax>)") from None  # fmt: skip
        stem = Path(root.findtext("filename") or path.stem).stem
        boxes[stem] = found
    return boxes


SOLUTION_ROW = "'<wnid> <x0> <y0> <x1> <y1>' (repeated for more boxes)"
TINYIMAGENET_ROW = "'<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>' (Tiny ImageNet's val_annotations.txt)"


def _box_shares(path: Path, line: int, tokens: Sequence[str], size: tuple[int, int], expected: str) -> list[tuple[str, float]]:
    """(wnid, share) of each "<wnid> <x0> <y0> <x1> <y1>" group of ``tokens``."""
    try:
        if not tokens or len(tokens) % 5:
            raise ValueError
        return [(tokens[i], box_share(*map(float, tokens[i + 1 : i + 5]), *size)) for i in range(0, len(tokens), 5)]
    except ValueError:
        raise SmallObjectsError(f"{path}, line {line}: expected {expected} with numbers for coordinates, got {' '.join(tokens)!r}") from None


def read_solution_csv(path: Path, image_size: Callable[[str], tuple[int, int] | None]) -> Boxes:
    """Kaggle's LOC_val_solution.csv; ``image_size(stem)`` gives (width, height), None for an image
    not in the run's val set (left out)."""
    from ..data.imagenet import solution_rows

    boxes: Boxes = {}
    for line, image, tokens in solution_rows(path):
        size = image_size(Path(image).stem)
        if size is not None:
            boxes[Path(image).stem] = _box_shares(path, line, tokens, size, SOLUTION_ROW)
    return boxes


def read_tinyimagenet_annotations(path: Path) -> Boxes:
    """Tiny ImageNet's val_annotations.txt: one box per image, in a 64 x 64 image."""
    from ..data.tinyimagenet import read_val_annotations

    return {Path(name).stem: _box_shares(path, line, [wnid, *box], TINYIMAGENET_SIZE, TINYIMAGENET_ROW) for line, name, wnid, box in read_val_annotations(path)}


def read_boxes(path: Path, image_size: Callable[[str], tuple[int, int] | None]) -> Boxes:
    expected = "a folder of VOC .xml files, LOC_val_solution.csv or val_annotations.txt"
    if not path.exists():
        raise SmallObjectsError(f"{path} does not exist: expected {expected}")
    try:
        if path.is_dir():
            return read_voc_folder(path)
        if path.suffix.lower() == ".csv":
            return read_solution_csv(path, image_size)
        return read_tinyimagenet_annotations(path)
    except UnicodeDecodeError:
        raise SmallObjectsError(f"{path} (or a file in it) is not UTF-8 text: expected {expected}") from None


# --- which val image is which file ----------------------------------------------------------------------
def _file_stems(files) -> list[str]:  # noqa: ANN001 - a data.file_list.FileList
    """Each file's name without its folder and extension: what box files name an image by."""
    return [Path(os.fsdecode(name)).stem for name in files.names]


def val_stems(run: LoadedRun, targets: np.ndarray, boxes: Boxes) -> list[str | None]:
    """The file stem of each val image, in val order: from the run's file list, or, for Tiny ImageNet
    (held in memory), from the boxes: the j-th val image of a class is the file of that class with
    the j-th smallest number (the order of the official tree and of the pack alike). None for the
    images of a class the boxes do not list at all (left out: boxes of a part of the classes)."""
    from ..data.tinyimagenet import trailing_number

    files = getattr(run.val, "files", None)
    if files is not None:
        return _file_stems(files)
    if run.cfg.dataset.name != "tinyimagenet":
        raise SmallObjectsError(f"dataset={run.cfg.dataset.name} has no bounding boxes to measure object sizes with")
    by_class: dict[str, list[str]] = {}
    for stem, found in boxes.items():
        if found:  # (a VOC file may list no object)
            by_class.setdefault(found[0][0], []).append(stem)
    for stems in by_class.values():
        stems.sort(key=trailing_number)
    seen = np.zeros(len(run.classes), dtype=np.int64)
    result = []
    for target in targets.tolist():
        wnid = run.classes[target]
        stems = by_class.get(wnid)
        if stems is None:
            result.append(None)
            continue
        if seen[target] >= len(stems):
            raise SmallObjectsError(f"the boxes list {len(stems)} val image(s) of class {wnid}, the run's val set has more: "
                                    "pass the val_annotations.txt of the Tiny ImageNet the run trained on")  # fmt: skip
        result.append(stems[seen[target]])
        seen[target] += 1
    return result


def object_shares(stems: Sequence[str | None], targets: np.ndarray, classes: Sequence[str], boxes: Boxes) -> np.ndarray:
    """Per val image, the largest share of a box of its own class; NaN where it has none."""
    shares = np.full(len(stems), np.nan)
    for i, (stem, target) in enumerate(zip(stems, targets.tolist())):
        own = [share for wnid, share in boxes.get(stem, ()) if wnid == classes[target]] if stem is not None else []
        if own:
            shares[i] = max(own)
    return shares


def smallest_per_class(shares: np.ndarray, targets: np.ndarray, per_class: int) -> np.ndarray:
    """Positions (ascending) of the ``per_class`` images of each class with the smallest object
    share (ties: the earlier position), among the images with a box."""
    boxed = np.flatnonzero(~np.isnan(shares))
    order = boxed[np.lexsort((boxed, shares[boxed], targets[boxed]))]  # by class, share, position
    classes = targets[order]
    first = np.searchsorted(classes, classes, side="left")
    rank = np.arange(len(order)) - first
    return np.sort(order[rank < per_class])


def size_bins(shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The quintile edges of the boxed images' shares, and each image's quintile (0 smallest; -1 none):
    quintile i holds the shares in (edge i-1, edge i], an image on an edge the lower one (many share
    an edge where boxes are whole pixels of small images: 13 of Tiny ImageNet's 1,000 at 84.375%)."""
    boxed = ~np.isnan(shares)
    edges = np.quantile(shares[boxed], QUINTILES)
    bins = np.full(len(shares), -1)
    bins[boxed] = np.searchsorted(edges, shares[boxed], side="left")
    return edges, bins


# --- Figure 6: where the models look on the smallest objects ------------------------------------------------
@torch.no_grad()
def class_maps(model: nn.Module, inputs: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Class activation maps (Zhou et al., 2016; the paper's Figure 6) of ``classes[i]`` for input
    i: the classifier's row of that class applied to every pixel of the final map, before any
    upsample (N x h x w, float32; their mean over the pixels is the class's logit, as pooling and
    the classifier are linear), and the logits (N x C)."""
    outputs = forward_eval(model, inputs, ("final",))
    classifier = unwrap(model).classifier
    index = torch.as_tensor(list(classes), device=inputs.device)
    maps = torch.einsum("ndhw,nd->nhw", outputs.features["final"].float(), classifier.weight.float()[index])
    if classifier.bias is not None:
        maps = maps + classifier.bias.float()[index][:, None, None]
    return maps, outputs.logits.float()


def plot_class_maps(images: list[Tensor], maps: list[Tensor], logits: list[Tensor], titles: list[str], targets: list[int],
                    shares: list[float], names: list[str], path: Path):  # noqa: ANN201 - a Figure
    """One row per image: the image, then each run's map of the target class over it (bilinear to
    the image's size, scaled to [0, 1] per map) titled with its top-1 class, green when right."""
    import torch.nn.functional as F
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.9 * (1 + len(titles)), 2.1 * len(images)))
    axes = figure.subplots(len(images), 1 + len(titles), squeeze=False)
    for row, (image, target, share) in enumerate(zip(images, targets, shares)):
        axes[row][0].imshow(image.numpy(), interpolation="nearest")
        axes[row][0].set_title(f"{names[target][:22]}\nobject {share:.1%} of the image", fontsize=7)
        for column, title in enumerate(titles, start=1):
            heat = F.interpolate(maps[column - 1][row][None, None].cpu(), size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
            probabilities = torch.softmax(logits[column - 1][row], dim=0)
            top = int(probabilities.argmax())
            axis = axes[row][column]
            axis.imshow(image.numpy(), interpolation="nearest")
            axis.imshow(heat.numpy(), cmap="jet", alpha=0.45, interpolation="nearest")
            axis.set_title(f"{title}\n{names[top][:20]} {float(probabilities[top]):.0%}", fontsize=7, color=GROUND_TRUTH if top == target else IRRELEVANT)
    without_ticks(axes.flat)
    return save(figure, path, dpi=130)


def _image_sizes(run: LoadedRun) -> Callable[[str], tuple[int, int] | None]:
    """stem -> (width, height) of the run's val file of that stem (read from its header), or None."""
    from PIL import Image

    files = getattr(run.val, "files", None)
    if files is None:
        return lambda stem: None
    path_of = {stem: i for i, stem in enumerate(_file_stems(files))}

    def size(stem: str) -> tuple[int, int] | None:
        index = path_of.get(stem)
        if index is None:
            return None
        with Image.open(files.path(index)) as image:
            return image.size

    return size


def _checked_options(args) -> None:  # noqa: ANN001
    for option, value in (("--per-class", args.per_class), ("--figure-images", args.figure_images)):
        if value < 1:
            raise SmallObjectsError(f"{option} must be at least 1, got {value}")


def correct_top1(run: LoadedRun) -> tuple[np.ndarray, np.ndarray]:
    """The run's val labels and whether its top-1 class is each one, in val order."""
    targets, right = [], []
    for batch, outputs in evaluated(run.model, run.val):
        targets.append(batch.targets.cpu())
        right.append((outputs.logits.argmax(dim=1) == batch.targets).cpu())
    return torch.cat(targets).numpy(), torch.cat(right).numpy()


def draw_figure(args, runs: Sequence[LoadedRun], chosen: np.ndarray, shares: np.ndarray, targets: np.ndarray, out: Path) -> None:  # noqa: ANN001
    """Figure 6: the smallest of the chosen objects, each run's class map of the true class over them."""
    shown = sorted(sorted(chosen.tolist(), key=lambda i: (shares[i], i))[: args.figure_images])  # (loaders are read in val order)
    classes = [int(targets[i]) for i in shown]
    inputs = inputs_at(runs[0].val, shown)
    # One read of the images serves every run whose val images are the same; others read their own.
    maps, logits = zip(*(class_maps(run.model, inputs if same_inputs([runs[0], run]) else inputs_at(run.val, shown), classes) for run in runs))
    plot_class_maps(as_shown(runs[0].val, inputs), list(maps), list(logits), [run_title(path, run) for path, run in zip(args.runs, runs)],
                    classes, [float(shares[i]) for i in shown], wordnet_names(runs[0].classes), out)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "")
    parser.add_argument("--boxes", type=Path, required=True, help="VOC .xml folder, LOC_val_solution.csv or val_annotations.txt")
    parser.add_argument("--per-class", type=int, default=5, help="smallest objects taken per class (default 5, as the paper)")
    parser.add_argument("--figure", type=Path, default=None, help="image file of the runs' class activation maps on the smallest objects (Figure 6)")
    parser.add_argument("--figure-images", type=int, default=6, help="images in --figure: the smallest of the chosen objects (default 6)")
    args = parser.parse_args(argv)
    from ..errors import user_errors

    try:
        _checked_options(args)
        out = output_path(args.figure) if args.figure is not None else None
        _, runs = load_runs(args)
        targets, right = zip(*(correct_top1(run) for run in runs))
        check_same_val_set(args.runs, [torch.from_numpy(t) for t in targets])
        targets = targets[0]
        boxes = read_boxes(args.boxes, _image_sizes(runs[0]))
        shares = object_shares(val_stems(runs[0], targets, boxes), targets, runs[0].classes, boxes)
        boxed = ~np.isnan(shares)
        if not boxed.any():
            raise SmallObjectsError(f"{args.boxes} has a box of its own class for none of the {len(targets)} val images: "
                                    "not the boxes of this dataset?")  # fmt: skip
        chosen = smallest_per_class(shares, targets, args.per_class)
        edges, bins = size_bins(shares)
        percent = 100 * shares
        print(f"{args.boxes}: a box of their own class for {int(boxed.sum())} of {len(targets)} val images"
              + (f" ({int((~boxed).sum())} without: left out)" if not boxed.all() else "")
              + f"; object area, % of the image: median {np.median(percent[boxed]):.1f}, smallest {percent[boxed].min():.1f}")
        print(f"the {args.per_class} smallest objects of each of {len(np.unique(targets[chosen]))} classes: {len(chosen)} images, "
              f"object area {percent[chosen].min():.1f}-{percent[chosen].max():.1f}% of the image")
        counts = [int((bins == b).sum()) for b in range(len(QUINTILES) + 1)]
        print("object-area quintiles, % of the image: " + " | ".join(f"<= {100 * edge:.1f}" for edge in edges)
              + f" | > {100 * edges[-1]:.1f}  (images: " + " / ".join(map(str, counts)) + ")")
        for path, run, correct in zip(args.runs, runs, right):
            by_bin = [correct[bins == b].mean() if (bins == b).any() else float("nan") for b in range(len(QUINTILES) + 1)]
            print(f"{path}: loss={run.cfg.loss.name}  smallest {args.per_class} per class: top-1 {100 * correct[chosen].mean():.2f}% "
                  f"({int(correct[chosen].sum())}/{len(chosen)})  all val images: {100 * correct.mean():.2f}%  "
                  f"those with a box: {100 * correct[boxed].mean():.2f}%  "
                  f"by object-area quintile, smallest first: " + " / ".join(f"{100 * a:.2f}" for a in by_bin), flush=True)  # fmt: skip
        if out is not None:
            draw_figure(args, runs, chosen, shares, targets, out)
            print(f"figure: {out}")
    except (*user_errors(), AnalysisError, OSError) as error:
        raise SystemExit(f"error: {error}") from None

if __name__ == "__main__":
    main()
