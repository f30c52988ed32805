"""What every figure command does to its matplotlib Figure (a ``matplotlib.figure.Figure``, never
pyplot: pyplot would switch a notebook's backend, see ``zipf_fit.plot``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


def without_ticks(axes: Iterable[Any]) -> None:
    """Image and embedding panels: their axes' numbers mean nothing."""
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])


def save(figure: Any, path: Path, dpi: int) -> Any:
    """Lay the panels out and write the PNG (its folder made if missing); the figure, for notebooks."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return figure
