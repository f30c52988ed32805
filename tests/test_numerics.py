"""Numerical failure modes: fp16 steps that GradScaler skips, PS-KD's soft cross-entropy at a -inf logit."""

from __future__ import annotations

import json
import math

import pytest
import torch

from zipfls_train.losses.pskd import soft_cross_entropy


def test_pskd_soft_cross_entropy_is_finite_at_a_minus_inf_logit_the_target_gives_zero():
    """An fp16 logit below -65504 overflows to -inf under autocast. Its class has probability 0; where
    the target gives it 0 too (every class but y in epoch 0, whose target is one-hot) it adds 0 to the
    loss and 0 to the gradient (softmax - target)."""
    logits = torch.tensor([[2.0, 0.5, float("-inf"), -1.0], [0.0, 1.0, -3.0, float("-inf")]], dtype=torch.float16, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]])
    finite = [[2.0, 0.5, -1.0], [0.0, 1.0, -3.0]]  # each row's finite logits
    lse = [math.log(sum(math.exp(v) for v in row)) for row in finite]
    want = ((lse[0] - 2.0) + (0.25 * (lse[1] - 1.0) + 0.75 * (lse[1] + 3.0))) / 2
    loss = soft_cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    p = [[math.exp(2.0 - lse[0]), math.exp(0.5 - lse[0]), 0.0, math.exp(-1.0 - lse[0])],
         [math.exp(0.0 - lse[1]), math.exp(1.0 - lse[1]), math.exp(-3.0 - lse[1]), 0.0]]  # fmt: skip
    want_grad = (torch.tensor(p, dtype=torch.float64) - targets.double()) / 2
    assert torch.allclose(logits.grad.double(), want_grad, atol=1e-3)  # (fp16 gradient)


def poison_steps(monkeypatch, steps, lrs=None):
    """An inf gradient at the given global steps (1-based): GradScaler skips their updates. ``lrs``
    collects the lr each optimiser update applies."""
    from zipfls_train.engine.trainer import Trainer

    original = Trainer._optimizer_update

    def update(self):
        if self.progress.global_step + 1 in steps:
            next(p for p in self.model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        if lrs is not None:
            lrs.append(self.optimizer.param_groups[0]["lr"])
        original(self)

    monkeypatch.setattr(Trainer, "_optimizer_update", update)



def skipped_counts(run_dir) -> list[int]:
    return [json.loads(line)["amp_skipped_steps"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_fp16_steps_whose_update_gradscaler_skips_are_counted_and_named(run_tiny, tmp_path, monkeypatch):
    """Steps 2 (epoch 1) and 4-6 (all of epoch 2) get an inf gradient: GradScaler skips their updates.
    metrics.jsonl counts them per epoch and the run warns, saying when a whole epoch changed nothing."""
    poison_steps(monkeypatch, {2, 4, 5, 6})
    with pytest.warns(RuntimeWarning) as caught:
        run_tiny("loss=ce", "trainer.precision=fp16", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", run_dir=tmp_path / "run")
    assert skipped_counts(tmp_path / "run") == [1, 3]
    messages = [str(w.message) for w in caught if "GradScaler skipped" in str(w.message)]
    assert len(messages) == 2
    assert "epoch 1/2" in messages[0] and "1 of its 3 steps" in messages[0] and "did not change" not in messages[0]
    assert "epoch 2/2" in messages[1] and "3 of its 3 steps" in messages[1] and "the weights did not change this epoch" in messages[1]


def test_fp32_records_no_skipped_steps(run_tiny, tmp_path):
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=2", run_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert "amp_skipped_steps" not in record


def test_pskd_soft_cross_entropy_keeps_very_negative_log_probabilities_the_target_weighs():
    """The clamp only stands in for -inf: a finite log-probability of -150 or -7e4 (a class the soft
    target weighs, far below the row's best) is the loss's as it is, and so is its gradient."""
    logits = torch.tensor([[0.0, -150.0], [0.0, -7e4]], requires_grad=True)
    targets = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    # log softmax: [-log(1 + e^-150), -150 - log(1 + e^-150)]; e^-150 and e^-7e4 vanish in float64.
    want = (0.5 * 0.0 + 0.5 * 150.0 + 0.25 * 0.0 + 0.75 * 7e4) / 2
    loss = soft_cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    # (softmax - target) / N with softmax = [1, 0] in both rows.
    want_grad = torch.tensor([[0.5, -0.5], [0.75, -0.75]], dtype=torch.float64) / 2
    assert torch.allclose(logits.grad.double(), want_grad, atol=1e-7)


def test_pskd_soft_cross_entropy_does_not_drop_a_minus_inf_logit_the_target_weighs():
    """A class the target gives 0.5 but whose logit overflowed to -inf (probability 0) is no class to
    leave out: the loss is at least 0.5 x the float32 range / 2 (its log-probability clamped to the
    most negative float), not the other class's term alone."""
    logits = torch.tensor([[1.0, float("-inf")], [0.0, 0.0]])
    loss = soft_cross_entropy(logits, torch.tensor([[0.5, 0.5], [1.0, 0.0]])).item()
    assert loss >= 0.5 * 3.4e38 / 2


def test_an_fp16_epoch_without_skipped_steps_records_0_and_warns_nothing(run_tiny, tmp_path, monkeypatch):
    """Epoch 1 skips 2 of its 3 updates (some weights changed: no 'did not change'), epoch 2 none: 0
    in its record and no warning for it."""
    import warnings

    poison_steps(monkeypatch, {1, 3})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_tiny("loss=ce", "trainer.precision=fp16", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", run_dir=tmp_path / "run")
    assert skipped_counts(tmp_path / "run") == [2, 0]
    messages = [str(w.message) for w in caught if "GradScaler skipped" in str(w.message)]
    assert len(messages) == 1
    assert "epoch 1/2" in messages[0] and "2 of its 3 steps" in messages[0] and "did not change" not in messages[0]


def test_a_resumed_epoch_counts_the_skipped_steps_before_the_stop(run_tiny, tmp_path, monkeypatch):
    """Steps 1 and 4 of a 4-step epoch skipped; the run is stopped (SIGTERM) after step 2 and resumed:
    the epoch's record counts both, the one before the stop (kept in last.pt) and the one after."""
    import signal

    from zipfls_train.engine.checkpoint import load_checkpoint
    from zipfls_train.engine.interrupt import TrainingInterrupted
    from zipfls_train.engine.trainer import Trainer

    args = ("loss=ce", "trainer.precision=fp16", "trainer.max_steps_per_epoch=4")
    poison_steps(monkeypatch, {1, 4})
    train_step = Trainer.train_step

    def stopping_step(self, batches):
        terms = train_step(self, batches)
        if self.progress.global_step + 1 == 2:
            signal.raise_signal(signal.SIGTERM)  # (this thread: handled before the step ends)
        return terms

    monkeypatch.setattr(Trainer, "train_step", stopping_step)
    with pytest.raises(TrainingInterrupted):
        run_tiny(*args, run_dir=tmp_path / "run")
    progress = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["progress"]
    assert (progress["global_step"], progress["epoch_skipped_steps"]) == (2, 1)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    with pytest.warns(RuntimeWarning, match="skipped the update of 2 of its 4 steps"):
        run_tiny(*args, run_dir=tmp_path / "run")
    assert skipped_counts(tmp_path / "run") == [2]


def test_the_lr_schedule_moves_on_at_steps_whose_update_was_skipped(run_tiny, tmp_path, monkeypatch):
    """Milestone at epoch 1 (gamma 0.1), every update of epoch 1 skipped: epoch 2's steps still take
    0.1 x the lr (the schedule is the epoch's, not the count of applied updates)."""
    lrs = []
    poison_steps(monkeypatch, {1, 2, 3}, lrs)
    with pytest.warns(RuntimeWarning, match="did not change") as caught:
        run_tiny("loss=ce", "trainer.precision=fp16", "trainer.epochs=2", "trainer.max_steps_per_epoch=3",
                 "sched.milestones=[1]", "sched.gamma=0.1", run_dir=tmp_path / "run")
    # Not torch's "lr_scheduler.step() before optimizer.step()" (that the schedule skips its first value):
    # this schedule's lr is a function of the step count, and the record names the skipped steps.
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert len(lrs) == 6
    assert [lr / lrs[0] for lr in lrs] == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1], rel=1e-12)
