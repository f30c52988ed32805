"""Accuracy counting and the run's records: metrics.jsonl, TensorBoard scalars."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..losses.base import MethodContractError
from .checkpoint import write_error, write_text_atomically
from .run_folder import parse_metrics


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a device tensor). A
    sample with a NaN or infinite logit is a miss: topk ranks NaN above every number and orders
    tied infinities by index, so such a row would score by accident."""
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = (top == targets[:, None]) & torch.isfinite(logits).all(dim=1, keepdim=True)
    return torch.stack([hits[:, : min(k, max_k)].any(dim=1).sum() for k in ks])


class TermAccumulator:
    """Sums of the loss terms over steps, kept as one stacked device tensor: two small kernels per
    step (stack + add) whatever the number of terms, which matters when a step is launch-bound.
    Reading the means is the only host sync, done at log time. The terms are summed by position, so
    every step must return the same names in the same order (checked: a host-side list compare)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.total: Tensor | None = None
        self.count = 0
        # The mark the next log measures from (TensorBoard's train/* point: the mean since the last
        # one). Kept in checkpoints, so a point spans the same steps however often the run was saved,
        # stopped and resumed.
        self.window: tuple[Tensor | None, int] = (None, 0)

    def add(self, terms: Mapping[str, Tensor]) -> None:
        values = torch.stack([value.detach().float() for value in terms.values()])
        if self.total is None:
            self.names, self.total = list(terms), values
        elif list(terms) != self.names:
            raise MethodContractError(
                f"a training step returned the terms {list(terms)} after steps that returned {self.names}: a method's "
                "training_step (loss_terms) must return the same terms, in the same order, at every step"
            )
        else:
            self.total = self.total + values  # out of place: a mark() keeps its snapshot for free
        self.count += 1

    def mark(self) -> tuple[Tensor | None, int]:
        """A point to measure a window from (see ``means``)."""
        return self.total, self.count

    def restart_window(self) -> None:
        self.window = self.mark()

    @property
    def steps_in_window(self) -> int:
        return self.count - self.window[1]

    def means(self, since: tuple[Tensor | None, int] = (None, 0), across_ranks: bool = False) -> dict[str, float]:
        """Per-term means over all steps, or over the steps after the mark ``since``; ``across_ranks``:
        of every DDP rank's steps (one collective, which every rank must make), not this rank's alone."""
        start_total, start_count = since
        if self.total is None or self.count == start_count:
            return {}
        total = self.total if start_total is None else self.total - start_total
        if across_ranks:
            total = _mean_over_ranks(total)
        values = (total / (self.count - start_count)).cpu().tolist()  # one sync for all terms
        return dict(zip(self.names, values))

    def all_reduce_mean(self) -> None:
        """Average the sums, and the window's mark, over DDP ranks (equal step counts per rank), so that
        every rank holds the same state, valid for all on resume; logged means are unchanged (they
        are means over the ranks already). One collective; no-op in one process."""
        if self.total is None:
            return
        window_total, window_count = self.window
        if window_total is None:
            self.total = _mean_over_ranks(self.total)
        else:
            self.total, window_total = _mean_over_ranks(torch.stack([self.total, window_total])).unbind()
            self.window = (window_total, window_count)

    def state_dict(self) -> dict[str, Any]:
        return {**self._sums(self.total, self.count), "window": self._sums(*self.window)}

    def _sums(self, total: Tensor | None, count: int) -> dict[str, Any]:
        return {"sums": {} if total is None else {name: value.cpu() for name, value in zip(self.names, total)}, "count": count}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.names = list(state["sums"])

        def stacked(sums: Mapping[str, Tensor]) -> Tensor | None:
            return torch.stack([sums[name] for name in self.names]).to(device) if sums else None

        self.total, self.count = stacked(state["sums"]), int(state["count"])
        window = state.get("window")  # (absent before 2026-11-28: the window starts where the run resumes)
        self.window = self.mark() if window is None else (stacked(window["sums"]), int(window["count"]))


def _mean_over_ranks(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over the DDP ranks (one collective; ``tensor`` itself in one process)."""
    from .distributed import all_reduce_sum

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    return all_reduce_sum(tensor.clone()) / torch.distributed.get_world_size()


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

        # purge_step drops events a killed run wrote after its last checkpoint, which is at
        # global_step: events *at* that step (the epoch's scalars) belong to the checkpoint and stay.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=global_step + 1 if global_step else None)

    def _truncate_after(self, epoch: int) -> None:
        """Drop metric lines of epochs the checkpoint does not contain (a run killed between them),
        and a last line cut short by a kill. Rewritten through a temporary file: a kill now leaves
        the old file or the new one, never half of either."""
        if not self.metrics_path.exists():
            return
        kept = [record for record in parse_metrics(self.metrics_path) if record["epoch"] <= epoch]
        text = "".join(json.dumps(record) + "\n" for record in kept)
        write_text_atomically(self.metrics_path, text)

    def scalars(self, prefix: str, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def epoch(self, record: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            with self.metrics_path.open("a") as stream:
                stream.write(json.dumps(dict(record)) + "\n")
        except OSError as error:
            raise write_error(self.metrics_path, error, kept="a line cut short there is dropped when the run resumes") from error
        numeric = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "epoch"}
        self.scalars("epoch", numeric, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return parse_metrics(path) if path.exists() else []
