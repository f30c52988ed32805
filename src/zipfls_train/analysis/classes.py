"""Class names and which classes are similar, for the figure commands.

Names: a class whose id is a WordNet id (the ImageNet family's) is named by its first lemma, from
timm's copy of ImageNet-21k's synset list (:func:`wordnet_names`); a file of "<id> <name>[, more
names]" lines names them instead (:func:`read_class_names`: Tiny ImageNet's ``words.txt``,
ImageNet's ``LOC_synset_mapping.txt``, a list of your own).

Similar classes (:class:`Similarity`) come from a hierarchy (:func:`read_hierarchy`): WordNet 3.0's
``data.noun`` itself (nltk's copy is ``~/nltk_data/corpora/wordnet/data.noun``; ImageNet's wnids are
its offsets), or "<parent id> <child id>" lines (ImageNet's ``wordnet.is_a.txt``; iNaturalist's
taxonomy written as such pairs). Two classes are similar when they share an ancestor at most
``within`` is-a steps above each. Counting steps is a choice with a cost: WordNet's depth differs
from branch to branch (a standard poodle is 2 steps below "dog", a Labrador retriever 4; jellyfish
and trilobite are both 2 below "invertebrate"), so one step limit is strict in some branches and
loose in others.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .run_loading import AnalysisError

# The first entry line of WordNet's data.noun: "<8-digit offset> <2-digit lex_filenum> n <hex w_cnt> ..."
WORDNET_ENTRY = re.compile(r"^\d{8} \d{2} n [0-9a-f]{2} ")


def _read_text(path: Path, expected: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise AnalysisError(f"{path} is a folder: expected a file of {expected}") from None
    except OSError as error:
        raise AnalysisError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise AnalysisError(f"{path} is not UTF-8 text: expected {expected}") from None


def _pairs(path: Path, text: str, expected: str) -> list[tuple[int, str, str]]:
    """(line number, first field, rest) of each non-blank line of a two-column text file."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.strip().split(maxsplit=1)
        if not fields:
            continue
        if len(fields) != 2:
            raise AnalysisError(f"{path}, line {number}: {line.strip()!r} has one field, expected {expected}")
        pairs.append((number, fields[0], fields[1].strip()))
    return pairs


# --- names ------------------------------------------------------------------------------------------------
def read_class_names(path: Path, classes: Sequence[str]) -> list[str]:
    """Each class's first name in ``path`` ("<id> <name>[, more names]" lines), its id if it has none;
    an error when no class of the run is in the file (the wrong file, or the wrong dataset)."""
    expected = "'<id> <name>[, more names]' lines"
    names = {key: rest.split(",")[0].strip() or key for _, key, rest in _pairs(path, _read_text(path, expected), expected)}
    if not any(c in names for c in classes):
        raise AnalysisError(f"{path} names none of the runs' {len(classes)} classes (e.g. {classes[0]!r}): "
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


# --- hierarchy --------------------------------------------------------------------------------------------
def read_hierarchy(path: Path) -> dict[str, set[str]]:
    """The parents of every child in ``path``: WordNet's ``data.noun`` (known by its first entry line,
    whatever the file is called), or "<parent id> <child id>" lines."""
    expected = "'<parent id> <child id>' lines, or WordNet's data.noun"
    text = _read_text(path, expected)
    first_entry = next((line for line in text.splitlines() if line and not line[0].isspace()), "")
    if WORDNET_ENTRY.match(first_entry):
        return wordnet_hypernyms(path, text)
    parents: dict[str, set[str]] = {}
    for number, parent, child in _pairs(path, text, expected):
        if len(child.split()) != 1:
            raise AnalysisError(f"{path}, line {number}: {parent} {child!r} has more than two fields, expected '<parent id> <child id>'")
        parents.setdefault(child, set()).add(parent)
    return parents


def wordnet_hypernyms(path: Path, text: str) -> dict[str, set[str]]:
    """The hypernyms of every noun synset in the text of WordNet's ``data.noun`` (its database format,
    wndb(5WN): "offset lex_filenum n w_cnt (word lex_id){w_cnt} p_cnt (symbol offset pos
    source/target){p_cnt} ... | gloss", w_cnt in hex), as ImageNet's ids: "n" + the 8-digit offset.
    Hypernyms are the pointers "@" and "@i" (instance of) to nouns; the licence lines at the top
    start with a space."""
    parents: dict[str, set[str]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line or line[0].isspace():
            continue
        fields = line.split(" | ")[0].split()
        try:
            pointers_at = 4 + 2 * int(fields[3], 16)
            count = int(fields[pointers_at])
            pointers = [fields[pointers_at + 1 + 4 * j : pointers_at + 5 + 4 * j] for j in range(count)]
            found = {f"n{offset}" for symbol, offset, pos, _ in pointers if symbol in ("@", "@i") and pos == "n"}
        except (IndexError, ValueError):
            raise AnalysisError(f"{path}, line {number}: not a WordNet data.noun entry "
                                "('offset lex_filenum n w_cnt words... p_cnt pointers... | gloss')") from None  # fmt: skip
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
            raise AnalysisError(f"--similar-within must be at least 1 (1: siblings), got {within}")
        self.missing = [c for c in classes if c not in parents]
        if len(self.missing) == len(classes):
            raise AnalysisError(f"{source} places none of the runs' {len(classes)} classes (e.g. {classes[0]!r}) "
                                "under a parent: expected '<parent id> <child id>' lines with the dataset's class ids")  # fmt: skip
        self.num_classes = len(classes)
        self._ancestors = [ancestors_within(c, parents, within) for c in classes]
        self._members: dict[str, set[int]] = {}  # ancestor -> the classes under it (within the steps)
        for index, ancestors in enumerate(self._ancestors):
            for ancestor in ancestors:
                self._members.setdefault(ancestor, set()).add(index)
        self._similar_to: dict[int, Tensor] = {}

    def __call__(self, a: int, b: int) -> bool:
        return a != b and not self._ancestors[a].isdisjoint(self._ancestors[b])

    def similar_to(self, target: int) -> Tensor:
        """The classes similar to ``target`` (indices, int64), through the classes under each of its
        ancestors: never all C x C pairs (10^8 for INAT21's 10,000 classes)."""
        if target not in self._similar_to:
            found = set().union(*(self._members[a] for a in self._ancestors[target])) - {target}
            self._similar_to[target] = torch.tensor(sorted(found), dtype=torch.int64)
        return self._similar_to[target]

    def rows(self, targets: Tensor) -> Tensor:
        """N x C bool: row i marks the classes similar to ``targets[i]``."""
        rows = torch.zeros(targets.numel(), self.num_classes, dtype=torch.bool)
        for i, target in enumerate(targets.tolist()):
            rows[i, self.similar_to(target)] = True
        return rows

    def chance(self, targets: Tensor) -> float:
        """The share a draw of non-target classes at random would score: per image, the fraction of
        the other classes similar to its target, averaged over ``targets``."""
        counts = {t: self.similar_to(t).numel() for t in set(targets.tolist())}
        return sum(counts[t] for t in targets.tolist()) / ((self.num_classes - 1) * max(targets.numel(), 1))

    def expected_similar(self, scores: Tensor, targets: Tensor, k: int) -> Tensor:
        """Per image, how many of the ``k`` highest-scoring non-target classes are similar to its
        target (float64, N), with a tie at the k-th score shared out: the classes above the tie count
        whole, and the places left in the top k go to the tied classes in proportion (the expected
        count if ties were broken at random; a soft label ties many classes, whose order by class
        index would otherwise decide)."""
        scores = scores.detach().double().cpu().scatter(1, targets.cpu()[:, None], float("-inf"))
        kth = scores.topk(k, dim=1).values[:, -1:]
        above, tied = scores > kth, scores == kth
        similar = self.rows(targets)
        places_left = k - above.sum(dim=1)
        return (above & similar).sum(dim=1) + places_left * (tied & similar).sum(dim=1) / tied.sum(dim=1)
