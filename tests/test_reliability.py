"""Bad input fails fast and names what is wrong; nothing already written is lost."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import compose
from zipfls_train.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from zipfls_train.engine.config_checks import ConfigError, validate_config
from zipfls_train.engine.trainer import NonFiniteLossError
from zipfls_train.losses.ls import LabelSmoothing


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.epochs=-3", r"trainer.epochs must be an integer >= 1, got -3"),
        ("trainer.batch_size=0", r"trainer.batch_size must be an integer >= 1"),
        ("trainer.precision=fp8", r"trainer.precision must be one of \['auto', 'fp32', 'bf16', 'fp16'\], got 'fp8'"),
        ("trainer.device=tpu", r"trainer.device must be one of"),
        ("+loss.not_an_option=1", r"loss=zipf has no option\(s\) \['not_an_option'\]"),
        ("optim.lr=-0.1", r"optim.lr must be > 0"),
        ("optim.lr=fast", r"optim.lr must be a number, got 'fast'"),
        ("optim.momentum=5", r"optim.momentum must be in \[0, 1\)"),
        ("optim.weight_decay=-1", r"optim.weight_decay must be >= 0"),
        ("sched.gamma=0", r"sched.gamma .* must be in \(0, 1\]"),
        ("sched.milestones=[150,100]", r"sched.milestones must be in increasing order, got \[150, 100\]"),
        ("sched.milestones=[0.5,100]", r"sched.milestones must be all fractions in \(0, 1\) or all epoch numbers"),
        ("sched.milestones=[soon]", r"sched.milestones must be numbers"),
        ("model.name=resnet19", r"model.name='resnet19' is not a known model; expected one of \[.*'cifar_resnet18'"),
        ("loss.alpha=abc", r"got 'abc'$"),
        ("trainer.sync_batchnorm=true trainer.devices=2 trainer.device=cpu", r"trainer.sync_batchnorm=true needs CUDA devices"),
    ],
)
def test_bad_config_values_fail_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose(override.split(" ")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_cuda_on_a_machine_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match=r"trainer.device=cuda but no CUDA device is available"):
        validate_config(compose(["trainer.device=cuda"]))


def test_fp16_on_the_cpu_warns_that_it_is_slow():
    with pytest.warns(UserWarning, match=r"trainer.precision=fp16 on the CPU runs many times slower"):
        validate_config(compose(["trainer.precision=fp16", "trainer.device=cpu"]))


def test_global_batch_not_divisible_by_processes_is_rejected():
    with pytest.raises(ConfigError, match=r"trainer.batch_size=127 \(the global batch\) must be divisible by the number of processes \(2\)"):
        validate_config(compose(["trainer.batch_size=127", "trainer.devices=2"]))


def test_bad_zipf_option_value_names_the_key():
    with pytest.raises(ValueError, match="loss.distribution"):
        validate_config(compose(["loss.distribution=gaussian"]))


def poison_label_smoothing_from_step(monkeypatch, first_bad_step: int) -> None:
    """LS's loss terms become NaN from the ``first_bad_step``-th training step (1-based) on."""
    original = LabelSmoothing.loss_terms
    calls = {"n": 0}

    def poisoned(self, outputs, batch, model):
        calls["n"] += 1
        terms = original(self, outputs, batch, model)
        return {name: value * float("nan") for name, value in terms.items()} if calls["n"] >= first_bad_step else terms

    monkeypatch.setattr(LabelSmoothing, "loss_terms", poisoned)


def test_a_mid_epoch_checkpoint_never_holds_a_non_finite_step(run_tiny, tmp_path, monkeypatch):
    # NaN from step 2; checkpoints every 3 steps, logs every 4: the step-3 checkpoint finds it first.
    poison_label_smoothing_from_step(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at global step 1\.\.3"):
        run_tiny("loss=ls", "trainer.max_steps_per_epoch=6", "trainer.log_every=4", "trainer.checkpoint_every_steps=3",
                 run_dir=tmp_path / "run")  # fmt: skip
    assert not (tmp_path / "run/checkpoints/last.pt").exists()


def test_nan_loss_stops_naming_step_and_terms_and_keeps_last_good_checkpoint(run_tiny, tmp_path, monkeypatch):
    poison_label_smoothing_from_step(monkeypatch, 4)  # epoch 2 (3 steps per epoch)
    with pytest.raises(NonFiniteLossError) as error:
        run_tiny("loss=ls", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", run_dir=tmp_path / "run")
    message = str(error.value)
    assert "global step 4" in message and "epoch 2" in message and "ls=nan" in message and "last.pt" in message
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert state["progress"]["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_corrupt_or_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"last.pt is corrupt or truncated"):
        load_checkpoint(path)


def test_a_failed_write_never_replaces_the_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.zeros(3)}}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"model": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_resume_must_without_checkpoint_fails(run_tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run_tiny("loss=ce", "trainer.resume=must", run_dir=tmp_path / "fresh")
