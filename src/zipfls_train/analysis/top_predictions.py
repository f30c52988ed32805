"""Figure 4 of the paper: trained models' top-5 predictions on the same val images, side by side,
with the soft label Zipf's LS gives each image (for a run trained with it: the supervision it
trained towards), coloured as the paper colours them: the ground truth dark green, classes similar
to it light green, the others red.

"Similar" needs a class hierarchy, which the datasets do not carry: pass one with --hierarchy,
WordNet 3.0's ``data.noun`` for the ImageNet family (nltk's copy is
``~/nltk_data/corpora/wordnet/data.noun``; ImageNet's wnids are its offsets), or a file of
"<parent id> <child id>" lines (ImageNet's ``wordnet.is_a.txt``; iNaturalist's taxonomy written as
such pairs). Two classes are similar when they share an ancestor at most
--similar-within is-a steps above each (default 2: siblings and cousins). Without a hierarchy the
ground truth is dark green and every other class grey.

The numbers, over the whole val set, per run (printed; the figure shows a few images):

* ``top-1`` and ``top-5`` accuracy (top-k for --top k);
* with --hierarchy, ``similar@5``: the share of each image's 5 most probable *non-target* classes
  that are similar to its target, averaged over the images: the paper's reading of its Figure 4
  ("more similar concepts arise in the top-5 prediction"). For a run trained with Zipf's LS, also
  the same share of its soft labels' 5 largest classes (ties broken by class index). Printed beside
  them: the share that non-target classes drawn at random would have (the fraction of an image's
  other classes similar to its target, averaged).

The soft label is computed as the run computed it (its loss options: rank_by, distribution, alpha,
upsample), in float32, eval mode, from the final map's votes: a run that also voted with an
auxiliary head (Dense2) is shown with the final map's votes alone, and says so.

Images: --pick random (default) draws --images val images by --seed; --pick disagree draws them
among the images whose top-1 class differs between the runs.

Class names: a class whose id is a WordNet id (the ImageNet family's) is shown by its first lemma,
from timm's copy of ImageNet-21k's synset list; --class-names reads "<id> <name>[, more names]"
lines instead (Tiny ImageNet's ``words.txt``, ImageNet's ``LOC_synset_mapping.txt``, a list of your
own); the first name is shown, the id where a class has none.

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

from .figures import save, without_ticks
from .run_loading import LoadedRun, add_run_arguments, images_at, load_runs, run_title

GROUND_TRUTH, SIMILAR, IRRELEVANT, UNRATED = "#1b5e20", "#7cb342", "#c62828", "#616161"


class TopPredictionsError(ValueError):
    """Runs, files or options that cannot make the figure; the message says which."""


# --- class names and hierarchy --------------------------------------------------------------------------
def _pairs(path: Path, expected: str) -> list[tuple[int, str, str]]:
    """(line number, first field, rest) of each non-blank line of a two-column text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise TopPredictionsError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise TopPredictionsError(f"{path} is not UTF-8 text: expected {expected}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.strip().split(maxsplit=1)
        if not fields:
            continue
        if len(fields) != 2:
            raise TopPredictionsError(f"{path}, line {number}: {line.strip()!r} has one field, expected {expected}")
        pairs.append((number, fields[0], fields[1].strip()))
    return pairs


def read_class_names(path: Path, classes: Sequence[str]) -> list[str]:
    """Each class's first name in ``path`` ("<id> <name>[, more names]" lines), its id if it has none;
    an error when no class of the run is in the file (the wrong file, or the wrong dataset)."""
    names = {key: rest.split(",")[0].strip() or key for _, key, rest in _pairs(path, "'<id> <name>[, more names]' lines")}
    if not any(c in names for c in classes):
        raise TopPredictionsError(f"{path} names none of the runs' {len(classes)} classes (e.g. {classes[0]!r}): "
                                  "expected '<id> <name>' lines with the dataset's class ids")  # fmt: skip
    return [names.get(c, c) for c in classes]


def wordnet_names(classes: Sequence[str]) -> list[str]:
    """Each class's first WordNet lemma where its id is a synset of ImageNet-21k, else its id."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-22k")  # (the lemmas of all 21k synsets, whatever the subset)

    def name(cls: str) -> str:
        try:
            return info.label_name_to_description(cls).split(",")[0].strip() or cls
        except KeyError:
            return cls

    return [name(c) for c in classes]


def read_hierarchy(path: Path) -> dict[str, set[str]]:
    """The parents of every child in ``path``: "<parent id> <child id>" lines, or WordNet's own
    ``data.noun`` (read by :func:`read_wordnet_nouns`)."""
    if path.name == "data.noun":
        return read_wordnet_nouns(path)
    parents: dict[str, set[str]] = {}
    for number, parent, child in _pairs(path, "'<parent id> <child id>' lines"):
        if len(child.split()) != 1:
            raise TopPredictionsError(f"{path}, line {number}: {parent} {child!r} has more than two fields, expected '<parent id> <child id>'")
        parents.setdefault(child, set()).add(parent)
    return parents


def read_wordnet_nouns(path: Path) -> dict[str, set[str]]:
    """The hypernyms of every noun synset in WordNet's ``data.noun`` (its database format, wndb(5WN):
    "offset lex_filenum n w_cnt (word lex_id){w_cnt} p_cnt (symbol offset pos source/target){p_cnt}
    ... | gloss", w_cnt in hex), as ImageNet's ids: "n" + the 8-digit offset. Hypernyms are the
    pointers "@" and "@i" (instance of) to nouns; the licence lines at the top start with a space."""
    parents: dict[str, set[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TopPredictionsError(f"cannot read {path} as WordNet's data.noun: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line or line[0] == " ":
            continue
        fields = line.split(" | ")[0].split()
        try:
            pointers_at = 4 + 2 * int(fields[3], 16)
            count = int(fields[pointers_at])
            pointers = [fields[pointers_at + 1 + 4 * j : pointers_at + 5 + 4 * j] for j in range(count)]
        except (IndexError, ValueError):
            raise TopPredictionsError(f"{path}, line {number}: not a WordNet data.noun entry "
                                      "('offset lex_filenum n w_cnt words... p_cnt pointers... | gloss')") from None  # fmt: skip
        found = {f"n{offset}" for symbol, offset, pos, _ in pointers if symbol in ("@", "@i") and pos == "n"}
        if found:
            parents[f"n{fields[0]}"] = found
    return parents


def ancestors_within(node: str, parents: dict[str, set[str]], steps: int) -> set[str]:
    """``node`` and its ancestors at most ``steps`` is-a steps above it (a DAG: WordNet has nodes
    with two parents)."""
    found, frontier = {node}, {node}
    for _ in range(steps):
        frontier = {parent for child in frontier for parent in parents.get(child, ())} - found
        found |= frontier
    return found


class Similarity:
    """Whether two classes are similar: they share an ancestor at most ``within`` steps above each."""

    def __init__(self, classes: Sequence[str], parents: dict[str, set[str]], within: int, source: Path) -> None:
        if within < 1:
            raise TopPredictionsError(f"--similar-within must be at least 1 (1: siblings), got {within}")
        self.missing = [c for c in classes if c not in parents]
        if len(self.missing) == len(classes):
            raise TopPredictionsError(f"{source} places none of the runs' {len(classes)} classes (e.g. {classes[0]!r}) "
                                      "under a parent: expected '<parent id> <child id>' lines with the dataset's class ids")  # fmt: skip
        self._ancestors = [ancestors_within(c, parents, within) for c in classes]
        self._members: dict[str, set[int]] = {}  # ancestor -> the classes under it (within the steps)
        for index, ancestors in enumerate(self._ancestors):
            for ancestor in ancestors:
                self._members.setdefault(ancestor, set()).add(index)

    def __call__(self, a: int, b: int) -> bool:
        return a != b and not self._ancestors[a].isdisjoint(self._ancestors[b])

    def chance(self, targets: Tensor) -> float:
        """The share a draw of non-target classes at random would score: per image, the fraction of
        the other classes similar to its target, averaged over ``targets``."""
        others = len(self._ancestors) - 1
        # (through the classes under each ancestor: not C x C pairs, 10^8 for INAT21's 10,000 classes)
        similar_to = {t: len(set().union(*(self._members[a] for a in self._ancestors[t]))) - 1 for t in set(targets.tolist())}
        return sum(similar_to[t] for t in targets.tolist()) / (others * max(targets.numel(), 1))

    def share(self, targets: Tensor, chosen: Tensor) -> float:
        """The share of ``chosen`` (N x k class indices, none the target) similar to ``targets`` (N)."""
        pairs = zip(targets.tolist(), chosen.tolist())
        return sum(self(t, c) for t, row in pairs for c in row) / max(chosen.numel(), 1)


# --- predictions -----------------------------------------------------------------------------------------
def ranked(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row and their column indices, ties in column order."""
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


@dataclass
class Predictions:
    """One run's val set, in the val loader's order; all N x k but ``targets`` (N)."""

    targets: Tensor
    top: Tensor  # the k most probable classes
    top_p: Tensor  # their softmax probabilities
    non_target: Tensor  # the k most probable classes other than the target (similar@k)
    soft: Tensor | None = None  # the k largest classes of the Zipf soft label (Zipf's LS runs)
    soft_p: Tensor | None = None

    def accuracy(self, k: int) -> float:
        return float((self.top[:, :k] == self.targets[:, None]).any(dim=1).double().mean())


def zipf_method(run: LoadedRun):  # noqa: ANN201 - ZipfLabelSmoothing or None
    """The run's Zipf's LS, rebuilt from its loss options with the final map voting alone and the
    reference (torch) functions; None for a run of another method."""
    from omegaconf import OmegaConf

    from ..losses import build_method

    options = OmegaConf.to_container(run.cfg.loss, resolve=True)
    if options.get("name") != "zipf":
        return None
    options.update(kernel="torch", stages=["final"])
    return build_method(options, int(run.model.num_classes))


@torch.no_grad()
def predict(model: nn.Module, loader, k: int, device: torch.device, method=None, seed: int = 0) -> Predictions:  # noqa: ANN001
    """``model``'s top ``k`` on every image of ``loader`` (float32, eval mode), and the soft label of
    the Zipf's LS ``method`` where given (its random distributions drawn from ``seed``)."""
    from ..losses.zipf import zipf_soft_labels

    model.eval()
    stages = method.needs.feature_stages if method is not None else ()
    generator = torch.Generator(device=device).manual_seed(seed)
    parts: dict[str, list[Tensor]] = {}
    for batch in loader.epoch(0):
        with torch.autocast(device.type, enabled=False):
            outputs = model(batch.inputs, features=stages)
        logits, targets = outputs.logits.float(), batch.targets
        top_p, top = ranked(torch.softmax(logits, dim=1), k)
        _, non_target = ranked(logits.scatter(1, targets[:, None], float("-inf")), k)
        found = {"targets": targets, "top": top, "top_p": top_p, "non_target": non_target}
        if method is not None:
            soft = zipf_soft_labels(method.scores(outputs, model), targets, method.alpha, method.distribution, generator=generator)
            found["soft_p"], found["soft"] = ranked(soft, k)
        for key, value in found.items():
            parts.setdefault(key, []).append(value.cpu())
    if not parts:
        raise TopPredictionsError("the val set holds no image")
    return Predictions(**{key: torch.cat(values) for key, values in parts.items()})


def pick_images(predictions: Sequence[Predictions], count: int, how: str, seed: int) -> Tensor:
    """Positions (in val order, ascending) of ``count`` images drawn by ``seed``: among all, or
    (``how="disagree"``) among those whose top-1 class is not the same for every run."""
    n = predictions[0].targets.numel()
    if how == "disagree":
        if len(predictions) < 2:
            raise TopPredictionsError("--pick disagree compares runs: pass at least 2")
        first = torch.stack([p.top[:, 0] for p in predictions])
        candidates = torch.nonzero((first != first[0]).any(dim=0)).flatten()
        if candidates.numel() == 0:
            raise TopPredictionsError(f"the runs agree on the top-1 class of all {n} val images: nothing for --pick disagree")
    else:
        candidates = torch.arange(n)
    order = torch.randperm(candidates.numel(), generator=torch.Generator().manual_seed(seed))[:count]
    return candidates[order].sort().values


# --- the figure -----------------------------------------------------------------------------------------
def colour(target: int, cls: int, similarity: Similarity | None) -> str:
    if cls == target:
        return GROUND_TRUTH
    if similarity is None:
        return UNRATED
    return SIMILAR if similarity(target, cls) else IRRELEVANT


def plot(images: list[Tensor], targets: list[int], columns: list[tuple[str, Tensor, Tensor]], names: list[str],
         similarity: Similarity | None, path: Path):  # noqa: ANN201 - a Figure
    """One row per image: the image, then one column per (title, classes, probabilities)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.6 + 2.6 * len(columns), 1.5 * len(images)))
    axes = figure.subplots(len(images), 1 + len(columns), squeeze=False, gridspec_kw={"width_ratios": [1.6] + [2.6] * len(columns)})
    for row, (image, target) in enumerate(zip(images, targets)):
        axes[row][0].imshow(image.numpy(), interpolation="nearest")
        axes[row][0].set_xlabel(names[target], fontsize=7, color=GROUND_TRUTH)
        for column, (title, classes, probabilities) in enumerate(columns, start=1):
            axis = axes[row][column]
            for line, (cls, p) in enumerate(zip(classes[row].tolist(), probabilities[row].tolist())):
                axis.text(0.02, 0.9 - 0.19 * line, f"{p:6.1%}  {names[cls][:24]}", fontsize=7, family="monospace",
                          color=colour(target, cls, similarity), transform=axis.transAxes, va="top")
            if row == 0:
                axis.set_title(title, fontsize=8)
    without_ticks(axes.flat)
    return save(figure, path, dpi=130)


def check_same_val_set(paths: Sequence[Path], runs: Sequence[LoadedRun], predictions: Sequence[Predictions]) -> None:
    for path, run, found in zip(paths[1:], runs[1:], predictions[1:]):
        if run.classes != runs[0].classes or not torch.equal(found.targets, predictions[0].targets):
            raise TopPredictionsError(f"{path} was not evaluated on the val images of {paths[0]} (other classes, "
                                      "or other images): the runs must be of one dataset")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, ", one column each")
    parser.add_argument("--images", type=int, default=6, help="val images shown (default 6)")
    parser.add_argument("--pick", choices=("random", "disagree"), default="random", help="how the images are drawn (default random)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image draw and of random soft labels")
    parser.add_argument("--top", type=int, default=5, help="classes shown and counted per image (default 5, as the paper)")
    parser.add_argument("--class-names", type=Path, default=None, help="'<id> <name>' lines (default: WordNet's lemmas for WordNet ids)")
    parser.add_argument("--hierarchy", type=Path, default=None, help="WordNet's data.noun, or '<parent id> <child id>' lines (wordnet.is_a.txt)")
    parser.add_argument("--similar-within", type=int, default=2, help="is-a steps to the shared ancestor of similar classes (default 2)")
    parser.add_argument("--out", type=Path, default=Path("top_predictions.png"), help="PNG path (default: top_predictions.png)")
    args = parser.parse_args(argv)
    from ..errors import user_errors

    try:
        if args.images < 1 or args.top < 1:
            raise TopPredictionsError(f"--images and --top must be at least 1, got {args.images} and {args.top}")
        device, runs = load_runs(args)
        classes = runs[0].classes
        names = read_class_names(args.class_names, classes) if args.class_names else wordnet_names(classes)
        similarity = None
        if args.hierarchy:
            similarity = Similarity(classes, read_hierarchy(args.hierarchy), args.similar_within, args.hierarchy)
            if similarity.missing:
                print(f"{args.hierarchy}: {len(similarity.missing)} of the {len(classes)} classes have no parent there "
                      f"(e.g. {similarity.missing[0]}): similar to none", flush=True)  # fmt: skip
        k = min(args.top, len(classes) - 1)
        predictions, columns = [], []
        for path, run in zip(args.runs, runs):
            method = zipf_method(run)
            found = predict(run.model, run.val, k, device, method, args.seed)
            predictions.append(found)
            line = (f"{path}: loss={run.cfg.loss.name}  {found.targets.numel()} val images  "
                    f"top-1 {found.accuracy(1):.2%}  top-{k} {found.accuracy(k):.2%}")  # fmt: skip
            if similarity is not None:
                line += f"  similar@{k} {similarity.share(found.targets, found.non_target):.3f}"
                if found.soft is not None:
                    line += f"  soft label similar@{k} {similarity.share(found.targets, found.soft):.3f}"
            if method is not None and list(run.cfg.loss.stages) != ["final"]:
                line += f"  (soft label from the final map's votes alone; the run voted with {list(run.cfg.loss.stages)})"
            print(line, flush=True)
            label = run_title(path, run)
            columns.append((label, found.top, found.top_p))
            if found.soft is not None:
                columns.append((f"{label}: Zipf soft label", found.soft, found.soft_p))
        check_same_val_set(args.runs, runs, predictions)
        if similarity is not None:
            print(f"similar@{k} by chance (non-target classes drawn at random): {similarity.chance(predictions[0].targets):.3f}")
        positions = pick_images(predictions, args.images, args.pick, args.seed)
        images = images_at(runs[0].val, positions.tolist())
    except (*user_errors(), TopPredictionsError) as error:
        raise SystemExit(f"error: {error}") from None
    targets = predictions[0].targets[positions].tolist()
    shown = [(title, classes_[positions], p[positions]) for title, classes_, p in columns]
    for row, (position, target) in enumerate(zip(positions.tolist(), targets)):
        print(f"val image {position} ({names[target]}):")
        for title, top, p in shown:
            print(f"  {title}: " + ", ".join(f"{names[c]} {q:.1%}" for c, q in zip(top[row].tolist(), p[row].tolist())))
    plot(images, targets, shown, names, similarity, args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
