"""Out of GPU memory or RAM: one line saying where, the figures, the setting that needs less and the
checkpoint to resume from."""

from __future__ import annotations

import pytest
import torch

from zipfls_train.engine.checkpoint import load_checkpoint
from zipfls_train.engine.out_of_memory import OutOfMemory
from zipfls_train.engine.trainer import Trainer
from zipfls_train.errors import user_errors

ARGS = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", "trainer.zipf_fit_at_end=false")
# torch's CUDA allocator message (c10/cuda/CUDACachingAllocator.cpp), as an H100 prints it.
CUDA_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.20 GiB "
                "is free. Including non-PyTorch memory, this process has 77.98 GiB memory in use. Of the allocated memory "
                "75.10 GiB is allocated by PyTorch, and 1.37 GiB is reserved by PyTorch but unallocated. If reserved but "
                "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")  # fmt: skip


def _in_epoch_2(monkeypatch, method: str, failure) -> None:  # noqa: ANN001
    original = getattr(Trainer, method)

    def patched(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if self.progress.epoch == 1 and self.progress.global_step == 4:
            failure()
        return original(self, *args, **kwargs)

    patched.__name__ = method
    monkeypatch.setattr(Trainer, method, patched)


def test_a_training_step_out_of_gpu_memory_names_the_per_step_batch_and_accumulation(run_tiny, tmp_path, monkeypatch):
    def cuda_out_of_memory() -> None:
        raise torch.OutOfMemoryError(CUDA_MESSAGE)

    _in_epoch_2(monkeypatch, "train_step", cuda_out_of_memory)
    with pytest.raises(OutOfMemory) as error:
        run_tiny(*ARGS, "trainer.batch_size=16", "trainer.accumulate_steps=2", run_dir=tmp_path / "run")
    last = tmp_path / "run/checkpoints/last.pt"
    # 16 images a step over 1 process and 2 micro-batches: 8 per forward pass.
    assert str(error.value) == (
        "out of GPU memory in a training step (2.00 GiB asked for; GPU 0: 79.19 GiB, 1.20 GiB of it free); each step "
        "holds 8 images per process (trainer.batch_size=16 over 1 process(es) and trainer.accumulate_steps=2): "
        "trainer.accumulate_steps=4 makes that 4 and keeps the global batch and the learning rate (BatchNorm then normalises "
        f"over 4 images at a time, as over a process's share under DDP); its last checkpoint, {last}, "
        "is where the same command resumes"
    )
    assert isinstance(error.value, user_errors())  # train.py prints the line alone
    assert load_checkpoint(last)["progress"]["epoch"] == 1  # epoch 1's, as it was


def test_evaluation_out_of_gpu_memory_names_the_eval_batch(run_tiny, tmp_path, monkeypatch):
    def cuda_out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB.")

    original = Trainer.evaluate

    def evaluate(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if self.progress.epoch == 1:
            cuda_out_of_memory()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    with pytest.raises(OutOfMemory, match=r"^out of GPU memory while evaluating \(20\.00 MiB asked for\); a smaller "
                                          r"trainer\.eval_batch_size \(now 64; it changes no result\) needs less; its last checkpoint"):  # fmt: skip
        run_tiny(*ARGS, run_dir=tmp_path / "run")


def test_a_step_that_ram_cannot_hold_is_named_with_torch_s_own_error(run_tiny, tmp_path, monkeypatch):
    """The CPU allocator's real error (an allocation no machine has), not a made-up message."""
    _in_epoch_2(monkeypatch, "train_step", lambda: torch.empty(1 << 62, dtype=torch.uint8))
    with pytest.raises(OutOfMemory, match=r"^out of memory \(RAM\) in a training step \(4294967296\.00 GiB asked for\); "
                                          r"each step holds 16 images per process"):  # (2**62 bytes)
        run_tiny(*ARGS, "trainer.batch_size=16", run_dir=tmp_path / "run")


@pytest.mark.parametrize(("batch", "processes", "accumulate", "advice"), [
    (256, 4, 1, "each step holds 64 images per process (trainer.batch_size=256 over 4 process(es) and "
                "trainer.accumulate_steps=1): trainer.accumulate_steps=2 makes that 32"),
    (96, 1, 2, "trainer.accumulate_steps=3 makes that 32"),  # 96 = 3 x 32: the next even split
    (6, 2, 3, "each step holds 1 image per process (trainer.batch_size=6 over 2 process(es) and "
              "trainer.accumulate_steps=3): not even one image fits"),
    # 2 images per process: the only smaller split is 1, which the advice does not go down to.
    (8, 2, 2, "each step holds 2 images per process (trainer.batch_size=8 over 2 process(es) and trainer.accumulate_steps=2): "
              "micro-batches of fewer than 2 images would leave BatchNorm one image; a smaller model"),
    (12, 1, 2, "trainer.accumulate_steps=3 makes that 4"),  # 6 per step; 5 does not divide 12; 4 does
    (6, 1, 2, "trainer.accumulate_steps=3 makes that 2"),  # 3 per step: 2 is as low as the advice goes
])  # fmt: skip
def test_the_advice_is_an_accumulation_that_splits_the_global_batch_evenly(batch, processes, accumulate, advice):
    from zipfls_train.engine.out_of_memory import out_of_memory

    message = str(out_of_memory(torch.OutOfMemoryError("CUDA out of memory."), batch, processes, accumulate, 512, 8, "saved"))
    assert message.startswith("out of GPU memory in a training step; ") and advice in message and message.endswith("; saved")


def test_out_of_memory_while_setting_the_run_up_is_named_too(run_tiny, tmp_path, monkeypatch):
    """Before the first step: the trainer builds the model, the optimiser and the method's state
    (PS-KD's per-sample memory is the largest) and loads the checkpoint it resumes from."""
    from zipfls_train.engine import trainer as trainer_module

    def method_out_of_memory(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.")

    monkeypatch.setattr(trainer_module, "build_method", method_out_of_memory)
    with pytest.raises(OutOfMemory, match=r"^out of GPU memory while setting the run up, before its first step \(20\.00 GiB "
                                          r"asked for\); the model, the optimiser and the method's state did not fit: .*"
                                          r"loss\.memory=topk, needs less; no checkpoint was written yet$"):  # fmt: skip
        run_tiny(*ARGS, run_dir=tmp_path / "run")


def test_an_out_of_memory_error_behind_another_or_from_a_loader_worker(tmp_path):
    from zipfls_train.engine.out_of_memory import out_of_memory

    class BackendCompilerFailed(RuntimeError):  # (torch._dynamo's, which keeps the error as inner_exception)
        def __init__(self, inner: BaseException) -> None:
            super().__init__(f"backend='inductor' raised: {inner}")
            self.inner_exception = inner

    compiled = BackendCompilerFailed(torch.OutOfMemoryError(CUDA_MESSAGE))
    try:
        try:
            raise torch.OutOfMemoryError(CUDA_MESSAGE)
        except torch.OutOfMemoryError as error:
            raise RuntimeError("a wrapper's own words") from error
    except RuntimeError as wrapper:
        chained = wrapper
    for error in (compiled, chained):
        message = str(out_of_memory(error, 128, 1, 1, 512, 8, "saved"))
        assert message.startswith("out of GPU memory in a training step (2.00 GiB asked for; GPU 0: 79.19 GiB, 1.20 GiB of it free)")
    # DataLoader brings a worker's error back as its type with the worker's traceback as message.
    in_worker = torch.OutOfMemoryError("Caught OutOfMemoryError in DataLoader worker process 0.\nOriginal Traceback ...")
    assert str(out_of_memory(in_worker, 128, 1, 1, 512, 8, "saved")) == (
        "out of GPU memory in a data-loading worker; each of the 8 workers holds its own images: fewer "
        "(trainer.num_workers=N) need less; saved")
    assert out_of_memory(RuntimeError("CUDA error: an illegal memory access"), 128, 1, 1, 512, 8, "saved") is None
    from zipfls_train.engine.resume import ResumeError

    try:  # a user error raised while an out-of-memory error was being handled keeps its own message
        try:
            raise torch.OutOfMemoryError(CUDA_MESSAGE)
        except torch.OutOfMemoryError:
            raise ResumeError("the checkpoint is another run's") from None
    except ResumeError as user_error:
        assert user_error.__context__ is not None and out_of_memory(user_error, 128, 1, 1, 512, 8, "saved") is None
    # CUDA's libraries' own allocation failures (torch's C10_CUDA_CHECK and cuBLAS wording)
    for words in ("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
                  "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"):
        assert str(out_of_memory(RuntimeError(words), 128, 1, 1, 512, 8, "saved")).startswith("out of GPU memory in a training step; ")


def test_other_runtime_errors_pass_through(run_tiny, tmp_path, monkeypatch):
    def bug() -> None:
        raise RuntimeError("a bug in a method")

    _in_epoch_2(monkeypatch, "train_step", bug)
    with pytest.raises(RuntimeError, match="^a bug in a method$"):
        run_tiny(*ARGS, run_dir=tmp_path / "run")
