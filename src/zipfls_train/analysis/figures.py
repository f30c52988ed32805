"""What every figure command does to its matplotlib Figure (a ``matplotlib.figure.Figure``, never
pyplot: pyplot would switch a notebook's backend, see ``zipf_fit.plot``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .run_loading import AnalysisError

# The paper's colours for classes (Figure 4): the ground truth, a similar class, any other (right /
# wrong in Figure 6); grey where similarity is unknown.
GROUND_TRUTH, SIMILAR, IRRELEVANT, UNRATED = "#1b5e20", "#7cb342", "#c62828", "#616161"


def output_path(path: Path) -> Path:
    """A figure's path as asked for, checked before any run is read: not a folder; a name without a
    suffix gets ``.png`` (matplotlib would add it without saying so)."""
    if path.is_dir():
        raise AnalysisError(f"{path} is a folder: give the figure's file name, e.g. {path / 'figure.png'}")
    return path if path.suffix else path.with_suffix(".png")


def without_ticks(axes: Iterable[Any]) -> None:
    """Image and embedding panels: their axes' numbers mean nothing."""
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])


def save(figure: Any, path: Path, dpi: int) -> Any:
    """Lay the panels out and write the image file (its folder made if missing); the figure, for notebooks."""
    figure.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)
    except OSError as error:
        raise AnalysisError(f"cannot write the figure {path}: {error.strerror or error}") from None
    return figure
