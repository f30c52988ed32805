"""zipfls-train: Zipf's label smoothing and its baselines, reproducible at any scale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_trained_model"]

if TYPE_CHECKING:
    from .trained import load_trained_model


def __getattr__(name: str) -> Any:
    # Imported on first use: ``import zipfls_train`` stays free of torch for the light entry points.
    if name == "load_trained_model":
        from .trained import load_trained_model

        return load_trained_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
