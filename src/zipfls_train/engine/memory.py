"""Peak memory of one run, for metrics.jsonl and Table 1's memory columns (`tables --cost`).

Both counters read here are process-wide high-water marks, and a Hydra sweep trains its runs one
after another in one process: without a reset at each run's start, a run would report the peak of
an earlier, larger one (CE after BYOT would show BYOT's memory).
"""

from __future__ import annotations

import sys

try:
    import resource
except ImportError:  # Windows: no getrusage; the CPU peak is not recorded there
    resource = None

import torch

# Writing "5" here resets the process's resident-set high-water mark (VmHWM, which getrusage's
# ru_maxrss reports for the calling process) to its current size: Linux >= 4.0.
_CLEAR_REFS = "/proc/self/clear_refs"


def reset_peak_memory(device: torch.device) -> None:
    """Start this run's peaks from the memory in use now. The CPU peak cannot be reset on macOS or
    where /proc is read-only: there it stays the process's peak since it started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_cpu_memory_mb() -> float | None:
    """Peak resident memory of this process since the last reset, in MiB; None on Windows."""
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes, Linux KiB


def peak_gpu_memory_mb(device: torch.device) -> float | None:
    """Peak memory torch allocated on the run's GPU since the last reset, in MiB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
