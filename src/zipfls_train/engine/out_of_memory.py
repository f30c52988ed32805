"""Running out of GPU memory (or RAM) is the commonest way a new setting fails: torch's error, a
page of allocator figures after a traceback, becomes one line saying where it ran out (setting the
run up, a training step, evaluation, a loader worker), the figures that matter, the setting that
needs less memory while keeping the recipe, and the checkpoint to resume from."""

from __future__ import annotations

import re
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig

TRAINER_FILE = str(Path("engine") / "trainer.py")  # (whose frames say setup)


class OutOfMemory(RuntimeError):
    """A run needed more GPU memory (or RAM) than there was; the message says where and what helps."""


# Functions whose frames in the traceback say where the memory ran out: while evaluating (the val
# pass of an epoch, the Figure 2 pass at the end), or setting the run up (the trainer's constructor:
# model, optimiser, a method's per-sample state; loading the checkpoint to resume from).
EVALUATION_FRAMES = ("evaluate", "mean_sorted_softmax")
SETUP_FRAMES = ("__init__", "maybe_resume")
_CPU_ALLOCATOR = "DefaultCPUAllocator: can't allocate memory"
# GPU memory that CUDA's libraries (not torch's allocator) failed to get: a plain RuntimeError.
_GPU_LIBRARY = re.compile(r"CUDA error: out of memory|CU(?:BLAS|DNN|SOLVER|SPARSE)_STATUS_ALLOC_FAILED")
_SIZE = r"([\d.]+ (?:[KMGTPE]i?B|bytes))"
_TRIED = re.compile(rf"Tried to allocate {_SIZE}")
_CAPACITY = re.compile(rf"GPU (\d+) has a total capacity of {_SIZE} of which {_SIZE} is free")
_TRIED_RAM = re.compile(r"you tried to allocate (\d+) bytes")
_IN_A_WORKER = "in DataLoader worker process"  # (torch's words for an error it brings back from a worker)


def out_of_memory_of_a_run(error: BaseException, cfg: DictConfig, processes: int, processes_on_the_node: int,
                           run_dir: Path) -> OutOfMemory | None:  # fmt: skip
    """:func:`out_of_memory` with the figures of the run's config (``processes``: all ranks)."""
    from .checkpoint import resume_note
    from .config_checks import loader_workers

    tcfg = cfg.trainer
    return out_of_memory(error, int(tcfg.batch_size), processes, int(tcfg.accumulate_steps), int(tcfg.eval_batch_size),
                         loader_workers(tcfg.num_workers, processes_on_the_node), resume_note(run_dir))  # fmt: skip


def out_of_memory(error: BaseException, batch_size: int, processes: int, accumulate_steps: int, eval_batch_size: int,
                  workers: int, resume_note: str) -> OutOfMemory | None:  # fmt: skip
    """``error`` as an :class:`OutOfMemory` when torch's out-of-memory error is it or behind it (a
    compiler's error wraps one raised while it compiled); None otherwise. ``batch_size``:
    trainer.batch_size (the global batch), split over ``processes`` and ``accumulate_steps``;
    ``workers``: trainer.num_workers as resolved; ``resume_note``: what is saved."""
    from ..errors import error_in_chain, user_errors

    if isinstance(error, user_errors()):  # (already one line that says what to do, whatever it was raised while handling)
        return None
    cause = error_in_chain(error, _is_memory_error)
    if cause is None:
        return None
    on_gpu = isinstance(cause, torch.OutOfMemoryError) or _GPU_LIBRARY.search(str(cause)) is not None
    memory = "GPU memory" if on_gpu else "memory (RAM)"
    figures = _figures(str(cause)) if on_gpu else _ram_figures(str(cause))
    stack = [frame for failure in (error, cause) for frame in traceback.extract_tb(failure.__traceback__)]
    frames = {frame.name for frame in stack}
    trainer_frames = {frame.name for frame in stack if frame.filename.endswith(TRAINER_FILE)}
    if _IN_A_WORKER in str(cause):
        where = "in a data-loading worker"
        fix = f"each of the {workers} workers holds its own images: fewer (trainer.num_workers=N) need less"
    elif trainer_frames.intersection(SETUP_FRAMES):
        where = "while setting the run up, before its first step"
        fix = ("the model, the optimiser and the method's state did not fit: a smaller model or image size, or for "
               "PS-KD's per-sample memory loss.memory=topk, needs less")  # fmt: skip
    elif frames.intersection(EVALUATION_FRAMES):
        where = "while evaluating"
        fix = f"a smaller trainer.eval_batch_size (now {eval_batch_size}; it changes no result) needs less"
    else:
        where = "in a training step"
        fix = _training_fix(batch_size, max(1, processes), accumulate_steps)
    return OutOfMemory(f"out of {memory} {where}{figures}; {fix}; {resume_note}")


def _is_memory_error(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and (_CPU_ALLOCATOR in str(error) or _GPU_LIBRARY.search(str(error)) is not None)
    )


# Micro-batches the advice goes down to: BatchNorm normalises each over its own images, and over one
# image (per pixel of a 1 x 1 map: nothing) it trains on statistics of no use, or fails.
MIN_MICRO_BATCH = 2


def _training_fix(batch_size: int, processes: int, accumulate_steps: int) -> str:
    """The next accumulate_steps that splits the global batch evenly into smaller micro-batches (of
    at least MIN_MICRO_BATCH images)."""
    per_step = batch_size // (processes * accumulate_steps)
    holds = (f"each step holds {per_step} image{'s' if per_step != 1 else ''} per process (trainer.batch_size={batch_size} "
             f"over {processes} process(es) and trainer.accumulate_steps={accumulate_steps})")  # fmt: skip
    for steps in range(accumulate_steps + 1, batch_size // processes + 1):
        smaller = batch_size // (processes * steps)
        if smaller < MIN_MICRO_BATCH:
            break
        if batch_size % (processes * steps) == 0:
            return (f"{holds}: trainer.accumulate_steps={steps} makes that {smaller} and keeps the global batch and the learning "
                    f"rate (BatchNorm then normalises over {smaller} images at a time, as over a process's share under DDP)")
    fewer = "not even one image fits" if per_step <= 1 else f"micro-batches of fewer than {MIN_MICRO_BATCH} images would leave BatchNorm one image"
    return f"{holds}: {fewer}; a smaller model or dataset.image_size, or trainer.precision=bf16, needs less"


def _ram_figures(message: str) -> str:
    tried = _TRIED_RAM.search(message)
    return f" ({int(tried.group(1)) / 2**30:.2f} GiB asked for)" if tried else ""


def _figures(message: str) -> str:
    """' (2.00 GiB asked for; GPU 0: 79.19 GiB, 1.20 GiB of it free)' from torch's CUDA message."""
    tried, capacity = _TRIED.search(message), _CAPACITY.search(message)
    parts = [f"{tried.group(1)} asked for"] if tried else []
    if capacity:
        parts.append(f"GPU {capacity.group(1)}: {capacity.group(2)}, {capacity.group(3)} of it free")
    return f" ({'; '.join(parts)})" if parts else ""
