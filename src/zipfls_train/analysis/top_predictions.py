"""Figure 4 of the paper: trained models' top-5 predictions on the same val images, side by side,
with, for a run trained with Zipf's LS, the soft label its loss computes for each image from the
trained model's own dense votes (in eval mode, with the final weights, on val images: the label its
last steps trained towards, not the labels of its augmented training batches), coloured as the paper
colours them: the ground truth dark green, classes similar to it light green, the others red.

"Similar" needs a class hierarchy, which the datasets do not carry: pass one with --hierarchy,
WordNet 3.0's ``data.noun`` for the ImageNet family (nltk's copy is
``~/nltk_data/corpora/wordnet/data.noun``) or "<parent id> <child id>" lines (see ``classes.py``).
Two classes are similar when they share an ancestor at most --similar-within is-a steps above each
(default 2: siblings and cousins; WordNet's uneven depth makes any limit strict in some branches and
loose in others). Without a hierarchy the ground truth is dark green and every other class grey.

The numbers, over the whole val set, per run (printed; the figure shows a few images):

* ``top-1`` and ``top-5`` accuracy (top-k for --top k);
* with --hierarchy, ``similar@5``: the share of each image's 5 most probable *non-target* classes
  that are similar to its target, averaged over the images: the paper's reading of its Figure 4
  ("more similar concepts arise in the top-5 prediction"). For a run trained with Zipf's LS, also
  the same share of its soft labels' 5 largest classes. A soft label ties many classes (every class
  without a vote, and classes with equal votes): a tie at the 5th place is shared out in proportion,
  the expected share if ties were broken at random (and the figure marks with "*" a class shown
  out of a tie that goes on past it, in class-index order). Printed beside them: the share that
  non-target classes drawn at random would have.

The soft label is computed as the run's loss computes it (its rank_by, distribution, alpha,
upsample and voting stages, Dense2's auxiliary head included), in float32, by the reference
functions. A random distribution's label is drawn from --seed; its similar@5 is chance by design.

Images: --pick random (default) draws --images val images by --seed; --pick disagree draws them
among the images whose top-1 class differs between the runs.

Class names: WordNet ids are named by their first lemma; --class-names reads "<id> <name>" lines
instead (see ``classes.py``).

    python -m zipfls_train.analysis.top_predictions RUN_CE RUN_ZIPF --hierarchy ~/nltk_data/corpora/wordnet/data.noun
    python -m zipfls_train.analysis.top_predictions RUN... --images 8 --pick disagree --seed 1 --out fig4.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .classes import Similarity, read_class_names, read_hierarchy, wordnet_names
from .figures import GROUND_TRUTH, IRRELEVANT, SIMILAR, UNRATED, output_path, save, without_ticks
from .run_loading import AnalysisError, LoadedRun, add_run_arguments, as_shown, check_same_val_set, evaluated, inputs_at, load_runs, run_title

MAX_IMAGES = 64  # rows of the figure


class TopPredictionsError(AnalysisError):
    """Runs, files or options that cannot make the figure; the message says which."""


def ranked(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row and their column indices, ties in column order."""
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


@dataclass
class Predictions:
    """One run's val set, in the val loader's order: N x k, or N."""

    targets: Tensor
    top: Tensor  # the k most probable classes
    top_p: Tensor  # their softmax probabilities
    similar: Tensor | None = None  # similar classes among the k most probable non-target ones (expected count)
    soft: Tensor | None = None  # the k largest classes of the soft label (Zipf's LS runs)
    soft_p: Tensor | None = None
    soft_tied: Tensor | None = None  # N x k: shown out of a tie that goes on past the k-th place
    soft_similar: Tensor | None = None

    def accuracy(self, k: int) -> float:
        return float((self.top[:, :k] == self.targets[:, None]).any(dim=1).double().mean())


def zipf_method(run: LoadedRun):  # noqa: ANN201 - ZipfLabelSmoothing or None
    """The run's Zipf's LS, rebuilt from its loss options with the reference (torch) functions; None
    for a run of another method."""
    from omegaconf import OmegaConf

    from ..losses import build_method

    options = OmegaConf.to_container(run.cfg.loss, resolve=True)
    if options.get("name") != "zipf":
        return None
    options.update(kernel="torch")
    return build_method(options, int(run.model.num_classes))


def soft_label_title(method) -> str:  # noqa: ANN001
    shape = "Zipf" if method.distribution == "zipf" else method.distribution
    return f"{shape} soft label" + (", ranked by logits" if method.rank_by == "logits" else "")


def predict(model: nn.Module, loader, k: int, device: torch.device, method=None, seed: int = 0,  # noqa: ANN001
            similarity: Similarity | None = None) -> Predictions:  # fmt: skip
    """``model``'s top ``k`` on every image of ``loader`` (float32, eval mode), the soft label of the
    Zipf's LS ``method`` where given (its random distributions drawn from ``seed``), and with a
    ``similarity`` the similar classes among the k highest of each."""
    from ..losses.zipf import zipf_soft_labels

    stages = method.needs.feature_stages if method is not None else ()
    generator = torch.Generator(device=device).manual_seed(seed)
    parts: dict[str, list[Tensor]] = {}
    for batch, outputs in evaluated(model, loader, stages):
        logits, targets = outputs.logits.float(), batch.targets
        top_p, top = ranked(torch.softmax(logits, dim=1), k)
        found = {"targets": targets, "top": top, "top_p": top_p}
        if similarity is not None:
            found["similar"] = similarity.expected_similar(logits, targets, k)
        if method is not None:
            soft = zipf_soft_labels(method.scores(outputs, model), targets, method.alpha, method.distribution, generator=generator)
            values, classes = ranked(soft, k + 1)  # (the (k+1)-th tells a tie that goes on past the k-th)
            found["soft"], found["soft_p"], found["soft_tied"] = classes[:, :k], values[:, :k], values[:, :k] == values[:, k:]
            if similarity is not None:
                found["soft_similar"] = similarity.expected_similar(soft, targets, k)
        for key, value in found.items():
            parts.setdefault(key, []).append(value.cpu())
    if not parts:
        raise TopPredictionsError("the val set holds no image")
    return Predictions(**{key: torch.cat(values) for key, values in parts.items()})


def _check_runs_to_compare(how: str, runs: int) -> None:
    if how == "disagree" and runs < 2:
        raise TopPredictionsError("--pick disagree compares runs: pass at least 2")


def pick_images(predictions: Sequence[Predictions], count: int, how: str, seed: int) -> Tensor:
    """Positions (in val order, ascending) of ``count`` images drawn by ``seed``: among all, or
    (``how="disagree"``) among those whose top-1 class is not the same for every run."""
    n = predictions[0].targets.numel()
    _check_runs_to_compare(how, len(predictions))
    if how == "disagree":
        first = torch.stack([p.top[:, 0] for p in predictions])
        candidates = torch.nonzero((first != first[0]).any(dim=0)).flatten()
        if candidates.numel() == 0:
            raise TopPredictionsError(f"the runs agree on the top-1 class of all {n} val images: nothing for --pick disagree")
    else:
        candidates = torch.arange(n)
    order = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))[:count]
    return candidates[order].sort().values


# --- the figure -----------------------------------------------------------------------------------------
@dataclass
class Column:
    title: str
    classes: Tensor  # images x k
    probabilities: Tensor
    tied: Tensor | None = None  # images x k, or None

    def entries(self, row: int) -> list[tuple[int, float, bool]]:
        """(class, probability, shown out of a tie that goes on past the k-th) of image ``row``."""
        tied = self.tied[row].tolist() if self.tied is not None else [False] * self.classes.shape[1]
        return list(zip(self.classes[row].tolist(), self.probabilities[row].tolist(), tied))


def colour(target: int, cls: int, similarity: Similarity | None) -> str:
    if cls == target:
        return GROUND_TRUTH
    if similarity is None:
        return UNRATED
    return SIMILAR if similarity(target, cls) else IRRELEVANT


def entry(name: str, probability: float, tied: bool) -> str:
    return f"{probability:6.1%}  {name[:24]}" + ("*" if tied else "")


def plot(images: list[Tensor], targets: list[int], columns: list[Column], names: list[str],
         similarity: Similarity | None, path: Path):  # noqa: ANN201 - a Figure
    """One row per image: the image, then one text column per run (and soft label)."""
    from matplotlib.figure import Figure

    k = columns[0].classes.shape[1]
    figure = Figure(figsize=(1.6 + 2.6 * len(columns), max(1.5, 0.22 * k + 0.4) * len(images)))
    axes = figure.subplots(len(images), 1 + len(columns), squeeze=False, gridspec_kw={"width_ratios": [1.6] + [2.6] * len(columns)})
    for row, (image, target) in enumerate(zip(images, targets)):
        axes[row][0].imshow(image.numpy(), interpolation="nearest")
        axes[row][0].set_xlabel(names[target], fontsize=7, color=GROUND_TRUTH)
        for axis, column in zip(axes[row][1:], columns):
            for line, (cls, p, tie) in enumerate(column.entries(row)):
                axis.text(0.02, 0.94 - 0.9 * line / k, entry(names[cls], p, tie), fontsize=7, family="monospace",
                          color=colour(target, cls, similarity), transform=axis.transAxes, va="top")  # fmt: skip
            if row == 0:
                axis.set_title(column.title, fontsize=8)
    without_ticks(axes.flat)
    return save(figure, path, dpi=130)


def _checked_options(args) -> None:  # noqa: ANN001
    if not 1 <= args.images <= MAX_IMAGES:
        raise TopPredictionsError(f"--images must be in [1, {MAX_IMAGES}] (a row of the figure each), got {args.images}")
    if args.top < 1:
        raise TopPredictionsError(f"--top must be at least 1, got {args.top}")
    _check_runs_to_compare(args.pick, len(args.runs))  # (before any run is evaluated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, ", one column each")
    parser.add_argument("--images", type=int, default=6, help=f"val images shown (default 6, at most {MAX_IMAGES})")
    parser.add_argument("--pick", choices=("random", "disagree"), default="random", help="how the images are drawn (default random)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image draw and of random soft labels")
    parser.add_argument("--top", type=int, default=5, help="classes shown and counted per image (default 5, as the paper)")
    parser.add_argument("--class-names", type=Path, default=None, help="'<id> <name>' lines (default: WordNet's lemmas for WordNet ids)")
    parser.add_argument("--hierarchy", type=Path, default=None, help="WordNet's data.noun, or '<parent id> <child id>' lines (wordnet.is_a.txt)")
    parser.add_argument("--similar-within", type=int, default=2, help="is-a steps to the shared ancestor of similar classes (default 2)")
    parser.add_argument("--out", type=Path, default=Path("top_predictions.png"), help="figure path (default: top_predictions.png)")
    args = parser.parse_args(argv)
    from ..errors import user_errors

    try:
        _checked_options(args)
        out = output_path(args.out)
        device, runs = load_runs(args, aux_heads=True)  # (Dense2's soft label needs its auxiliary voter)
        classes = runs[0].classes
        names = read_class_names(args.class_names, classes) if args.class_names else wordnet_names(classes)
        similarity = None
        if args.hierarchy:
            similarity = Similarity(classes, read_hierarchy(args.hierarchy), args.similar_within, args.hierarchy)
            if similarity.missing:
                print(f"{args.hierarchy}: {len(similarity.missing)} of the {len(classes)} classes have no parent there "
                      f"(e.g. {similarity.missing[0]}): similar to none", flush=True)  # fmt: skip
        k = min(args.top, len(classes) - 1)
        if k < args.top:
            print(f"--top {args.top}: the runs have {len(classes)} classes, so {k} non-target classes at the most: showing {k}")
        predictions, columns = [], []
        for path, run in zip(args.runs, runs):
            method = zipf_method(run)
            found = predict(run.model, run.val, k, device, method, args.seed, similarity)
            predictions.append(found)
            line = (f"{path}: loss={run.cfg.loss.name}  {found.targets.numel()} val images  "
                    f"top-1 {found.accuracy(1):.2%}  top-{k} {found.accuracy(k):.2%}")  # fmt: skip
            if similarity is not None:
                line += f"  similar@{k} {float(found.similar.mean()) / k:.3f}"
                if found.soft is not None:
                    line += f"  {soft_label_title(method)} similar@{k} {float(found.soft_similar.mean()) / k:.3f}"
            print(line, flush=True)
            columns.append(Column(run_title(path, run), found.top, found.top_p))
            if found.soft is not None:
                columns.append(Column(f"{run_title(path, run)}: {soft_label_title(method)}", found.soft, found.soft_p, found.soft_tied))
        check_same_val_set(args.runs, [found.targets for found in predictions])
        if similarity is not None:
            print(f"similar@{k} by chance (non-target classes drawn at random): {similarity.chance(predictions[0].targets):.3f}")
        positions = pick_images(predictions, args.images, args.pick, args.seed)
        if positions.numel() < args.images:
            print(f"--images {args.images}: {positions.numel()} val images to draw from, all shown")
        images = as_shown(runs[0].val, inputs_at(runs[0].val, positions.tolist()))
        targets = predictions[0].targets[positions].tolist()
        shown = [Column(c.title, c.classes[positions], c.probabilities[positions], None if c.tied is None else c.tied[positions])
                 for c in columns]  # fmt: skip
        for row, (position, target) in enumerate(zip(positions.tolist(), targets)):
            print(f"val image {position} ({names[target]}):")
            for column in shown:
                print(f"  {column.title}: " + ", ".join(f"{names[c]}{'*' if tie else ''} {q:.1%}" for c, q, tie in column.entries(row)))
        plot(images, targets, shown, names, similarity, out)
    except (*user_errors(), AnalysisError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
