"""Nested config dicts as dotted keys, the form config comparisons and tables use:
``{"trainer": {"epochs": 2}}`` -> ``{"trainer.epochs": 2}`` (an empty mapping contributes no key)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat
