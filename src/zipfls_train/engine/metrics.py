"""Accuracy counting and the run's records: metrics.jsonl, TensorBoard scalars."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a device tensor)."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top == targets[:, None]
    return torch.stack([hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks])


class TermAccumulator:
    """Sums loss terms on the device; reading them (``means``) is the only host sync, done at log time."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, terms: Mapping[str, Tensor]) -> None:
        for name, value in terms.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        if not self.count:
            return {}
        stacked = torch.stack(list(self.sums.values())).cpu().tolist()  # one sync for all terms
        return {name: total / self.count for name, total in zip(self.sums, stacked)}

    def all_reduce_mean(self) -> None:
        """Average the sums over DDP ranks (equal step counts per rank), so logged train losses
        describe the whole global batch, not rank 0's share. One collective; no-op in one process."""
        from .distributed import all_reduce_sum

        if not self.sums or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        stacked = all_reduce_sum(torch.stack(list(self.sums.values()))) / torch.distributed.get_world_size()
        self.sums = dict(zip(self.sums, stacked.unbind()))

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count = int(state["count"])


class RunRecords:
    """metrics.jsonl (one JSON object per epoch) + TensorBoard events, written by rank 0 only."""

    def __init__(self, run_dir: Path, resume_epoch: int, global_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        self._truncate_after(resume_epoch)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run wrote after its last checkpoint.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=global_step if global_step else None)

    def _truncate_after(self, epoch: int) -> None:
        """Drop metric lines of epochs the checkpoint does not contain (a run killed between them)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= epoch]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def epoch(self, record: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a") as stream:
            stream.write(json.dumps(dict(record)) + "\n")
        numeric = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        self.scalars("epoch", numeric, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
