"""Running out of GPU memory (or RAM) is the commonest way a new setting fails: torch's error, a
page of allocator figures after a traceback, becomes one line saying where it ran out (a training
step or evaluation), the figures that matter, the setting that needs less memory while keeping the
recipe, and the checkpoint to resume from."""

from __future__ import annotations

import re
import traceback

import torch


class OutOfMemory(RuntimeError):
    """A training step or evaluation needed more GPU memory (or RAM) than there was."""


# Functions whose frames in the traceback mean the memory ran out while evaluating (the val pass of
# an epoch, the Figure 2 pass at the end).
EVALUATION_FRAMES = ("evaluate", "mean_sorted_softmax")
_CPU_ALLOCATOR = "DefaultCPUAllocator: can't allocate memory"
_TRIED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")
_CAPACITY = re.compile(r"GPU (\d+) has a total capacity of ([\d.]+ [KMGT]?i?B) of which ([\d.]+ [KMGT]?i?B) is free")


def out_of_memory(error: BaseException, batch_size: int, processes: int, accumulate_steps: int, eval_batch_size: int,
                  resume_note: str) -> OutOfMemory | None:  # fmt: skip
    """``error`` as an :class:`OutOfMemory` when it is torch's out-of-memory error (None otherwise).
    ``batch_size``: trainer.batch_size (the global batch), split over ``processes`` and
    ``accumulate_steps``; ``resume_note``: what is saved."""
    on_gpu = isinstance(error, torch.OutOfMemoryError)
    if not on_gpu and not (isinstance(error, RuntimeError) and _CPU_ALLOCATOR in str(error)):
        return None
    memory = "GPU memory" if on_gpu else "memory (RAM)"
    figures = _figures(str(error)) if on_gpu else ""
    frames = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    if frames.intersection(EVALUATION_FRAMES):
        where = "while evaluating"
        fix = f"a smaller trainer.eval_batch_size (now {eval_batch_size}; it changes no result) needs less"
    else:
        where = "in a training step"
        fix = _training_fix(batch_size, max(1, processes), accumulate_steps)
    return OutOfMemory(f"out of {memory} {where}{figures}; {fix}; {resume_note}")


def _training_fix(batch_size: int, processes: int, accumulate_steps: int) -> str:
    """The next accumulate_steps that splits the global batch evenly into smaller micro-batches."""
    per_step = batch_size // (processes * accumulate_steps)
    holds = (f"each step holds {per_step} images per process (trainer.batch_size={batch_size} over {processes} "
             f"process(es) and trainer.accumulate_steps={accumulate_steps})")  # fmt: skip
    for steps in range(accumulate_steps + 1, batch_size // processes + 1):
        if batch_size % (processes * steps) == 0:
            smaller = batch_size // (processes * steps)
            return f"{holds}: trainer.accumulate_steps={steps} makes that {smaller} and keeps the global batch, the recipe"
    return f"{holds}: not even one image fits; a smaller model or dataset.image_size, or trainer.precision=bf16, needs less"


def _figures(message: str) -> str:
    """' (2.00 GiB asked for; GPU 0: 79.19 GiB, 1.20 GiB of it free)' from torch's CUDA message."""
    tried, capacity = _TRIED.search(message), _CAPACITY.search(message)
    parts = [f"{tried.group(1)} asked for"] if tried else []
    if capacity:
        parts.append(f"GPU {capacity.group(1)}: {capacity.group(2)}, {capacity.group(3)} of it free")
    return f" ({'; '.join(parts)})" if parts else ""
