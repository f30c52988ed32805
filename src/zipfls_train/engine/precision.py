"""trainer.precision: which autocast dtype a run trains in, and what ``auto`` means on a device."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from .config_checks import PRECISION_NAMES, ConfigError


def cpu_has_bf16_matrix_units() -> bool:
    """Intel AMX (Xeon from the 4th generation on): bf16 tiles for convolutions and matmuls, on which
    bf16 autocast trains 1.9-2.9x faster than fp32 (experiments/cpu_speed.md; MobileNetV2 no
    faster). Elsewhere a CPU emulates bf16 matrix products, or only converts faster, so fp32 stays
    the default there."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # (private; absent from older torch)
    return bool(probe is not None and probe())


# trainer.precision's explicit values: the autocast dtype of each (None: no autocast, fp32).
PRECISIONS: dict[str, torch.dtype | None] = dict(zip(PRECISION_NAMES, (None, torch.bfloat16, torch.float16), strict=True))


def resolve_precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. auto: bf16 where the device multiplies bf16 matrices
    natively (CUDA GPUs with bf16, CPUs with AMX), fp32 elsewhere."""
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_bf16_matrix_units():
            return torch.bfloat16
        return None
    if requested not in PRECISIONS:
        raise ConfigError(f"trainer.precision must be one of {['auto', *PRECISIONS]}, got {requested!r}")
    return PRECISIONS[requested]


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    """The trainer.precision value of an autocast dtype (what ``auto`` resolved to)."""
    return next(name for name, dtype in PRECISIONS.items() if dtype is autocast_dtype)


def precision_history(records: Iterable[Mapping[str, Any]], current: str) -> str:
    """What a run trained in, from its metrics.jsonl records (``precision`` per epoch; ``current`` for
    records written before 2026-11-28): one name, or each in turn with its epochs, 'bf16 (epochs 1-2),
    fp32 (epochs 3-4)', for a run resumed where trainer.precision=auto means another precision."""
    spans: list[list[Any]] = []  # [name, first epoch, last epoch]
    for record in records:
        name = record.get("precision", current)
        if spans and spans[-1][0] == name:
            spans[-1][2] = record["epoch"]
        else:
            spans.append([name, record["epoch"], record["epoch"]])
    if len(spans) <= 1:
        return spans[0][0] if spans else current
    return ", ".join(f"{name} (epoch {first})" if first == last else f"{name} (epochs {first}-{last})" for name, first, last in spans)
