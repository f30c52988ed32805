"""CUDA behaviour (run by scripts/gpu_check.sh on a GPU machine; deselected by `make test`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import compose
from zipfls_train.data import ImageTensors, LoaderOptions, TensorLoader
from zipfls_train.engine.distributed import DistContext
from zipfls_train.engine.trainer import Trainer
from zipfls_train.losses.zipf import dense_votes, nontarget_kl, vote_counts, zipf_soft_labels

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("CUDA tests run on a GPU machine (scripts/gpu_check.sh); `make test` deselects them")


def test_zipf_functions_agree_between_cpu_and_cuda():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(16, 64, 4, 4, generator=generator)
    weight, bias = torch.randn(100, 64, generator=generator), torch.randn(100, generator=generator)
    targets = torch.randint(0, 100, (16,), generator=generator)
    logits = torch.randn(16, 100, generator=generator)
    cpu_votes = dense_votes(features, weight, bias, upsample="bilinear")
    gpu_votes = dense_votes(features.to(CUDA), weight.to(CUDA), bias.to(CUDA), upsample="bilinear")
    assert torch.equal(cpu_votes, gpu_votes.cpu())
    soft = zipf_soft_labels(vote_counts(cpu_votes, 100), targets)
    soft_gpu = zipf_soft_labels(vote_counts(gpu_votes, 100), targets.to(CUDA))
    torch.testing.assert_close(soft_gpu.cpu(), soft)
    kl = nontarget_kl(logits, targets, soft)
    kl_gpu = nontarget_kl(logits.to(CUDA).bfloat16(), targets.to(CUDA), soft_gpu)
    assert kl_gpu.dtype == torch.float32
    torch.testing.assert_close(kl_gpu.cpu(), kl, rtol=2e-2, atol=2e-2)


def test_loader_on_cuda_draws_the_same_order_as_on_cpu():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    data = ImageTensors(images, torch.arange(64) % 4, list("abcd"))

    def first_batch(device):
        options = LoaderOptions(batch_size=16, eval_batch_size=16, device=device, seed=1)
        loader = TensorLoader(data, options, train=True, augment="crop_pad", image_size=32, mean=[0.5] * 3, std=[0.25] * 3)
        return next(loader.epoch(0))

    cpu, gpu = first_batch(torch.device("cpu")), first_batch(CUDA)
    # The order comes from a CPU generator: identical. Augmentation draws come from a generator on
    # the data's device, whose stream differs between CPU and CUDA, so pixels are not compared.
    assert torch.equal(cpu.indices, gpu.indices.cpu())
    assert gpu.inputs.is_cuda and gpu.inputs.dtype == torch.float32 and gpu.inputs.shape == cpu.inputs.shape


def _trainer(tmp_path: Path, *overrides: str) -> Trainer:
    cfg = compose(["trainer.device=cuda", "trainer.progress_bar=false", *overrides])
    return Trainer(cfg, DistContext(device=CUDA), tmp_path)


@pytest.mark.parametrize("loss", ["ce", "ls", "zipf", "zipf_dense2", "tfkd", "cskd", "pskd", "byot", "ddgsd"])
def test_training_step_makes_no_host_sync(tmp_path, loss):
    """The whole step (loader with on-device augmentation, forward, loss, backward, fused SGD,
    schedule) under CUDA's sync debug mode set to error: any synchronising call raises."""
    from conftest import write_tinyimagenet_pack

    data_root = write_tinyimagenet_pack(tmp_path / "data", num_classes=10, train_per_class=64, val_per_class=4)
    trainer = _trainer(tmp_path / "run", "dataset=tinyimagenet", "dataset.format=pack", f"dataset.root={data_root}",
                       "dataset.num_classes=10", "model.options.width=16", "trainer.batch_size=32", f"loss={loss}")
    batches = trainer.data.train.epoch(0)
    for _ in range(3):  # warm-up: allocator, cuDNN heuristics, first-epoch permutation copy
        trainer.train_step(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            terms = trainer.train_step(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(terms["loss"]).item()


def test_short_cuda_run_learns_in_bf16_channels_last(run_tiny):
    summary, run_dir = run_tiny("trainer.device=cuda", "trainer.precision=bf16", "trainer.epochs=4", "loss=zipf", "optim.lr=0.05")
    assert summary["best_val_top1"] > 30.0  # 10 classes: chance is 10%


def test_step_captured_in_cuda_graphs_runs_the_fused_kernel(tmp_path, monkeypatch):
    """trainer.compile=reduce-overhead: the fused Zipf kernel is in the compiled graph (the custom
    op), checked on its first call, captured with the rest of the step, and the compiled steps
    compute what the eager steps compute (fp32, same seed: same start and batches)."""
    from conftest import captured_whole_in_cuda_graphs
    from zipfls_train.losses import zipf_fused

    launches = []
    run_kernel = zipf_fused._run_kernel
    monkeypatch.setattr(zipf_fused, "_run_kernel", lambda *args: launches.append(1) or run_kernel(*args))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convolutions: rounding-level differences only
    overrides = ["dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=20", "dataset.steps_per_epoch=4",
                 "dataset.zipf.upsample=bilinear", "model.options.width=16", "trainer.batch_size=32", "loss=zipf",
                 "trainer.precision=fp32"]
    losses = {}
    for compiled in ("false", "reduce-overhead"):
        launches.clear()
        # Captured whole: not left out of CUDA graphs, nor split around the kernel's custom op (the
        # op would then run from the host every step).
        with captured_whole_in_cuda_graphs(f"trainer.compile={compiled}"):
            trainer = _trainer(tmp_path / compiled, *overrides, f"trainer.compile={compiled}")
            batches = trainer.data.train.epoch(0)
            # (copied at once: a CUDA graph's replay overwrites the outputs of the previous one)
            losses[compiled] = torch.stack([trainer.train_step(batches)["loss"].detach().clone() for _ in range(4)]).tolist()
        assert launches, f"trainer.compile={compiled}: the fused kernel never ran"
    assert zipf_fused._kernel_state.get("cuda:0") == "checked"
    assert losses["reduce-overhead"] == pytest.approx(losses["false"], rel=1e-3)


def test_a_refused_page_lock_does_not_fail_the_next_kernel():
    from zipfls_train.data.page_lock import CUDA_SUCCESS, page_lock, page_unlock

    buffer = torch.empty(1 << 20, dtype=torch.uint8)
    assert page_lock(buffer) == CUDA_SUCCESS
    try:
        assert page_lock(buffer) != CUDA_SUCCESS  # already registered: a refusal, like WSL's
        # torch reads the runtime's last error after each launch: a stale one would raise here.
        assert torch.ones(8, device=CUDA).sum().item() == 8
    finally:
        page_unlock(buffer.data_ptr())

