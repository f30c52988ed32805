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


def test_fp16_steps_whose_update_gradscaler_skips_are_counted_and_named(run_tiny, tmp_path, monkeypatch):
    """Steps 2 (epoch 1) and 4-6 (all of epoch 2) get an inf gradient: GradScaler skips their updates.
    metrics.jsonl counts them per epoch and the run warns, saying when a whole epoch changed nothing."""
    from zipfls_train.engine.trainer import Trainer

    poisoned_steps = {2, 4, 5, 6}
    original = Trainer._optimizer_update

    def update(self):
        if self.progress.global_step + 1 in poisoned_steps:
            next(p for p in self.model.parameters() if p.grad is not None).grad.fill_(float("inf"))
        original(self)

    monkeypatch.setattr(Trainer, "_optimizer_update", update)
    with pytest.warns(RuntimeWarning) as caught:
        run_tiny("loss=ce", "trainer.precision=fp16", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", run_dir=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["amp_skipped_steps"] for r in records] == [1, 3]
    messages = [str(w.message) for w in caught if "GradScaler skipped" in str(w.message)]
    assert len(messages) == 2
    assert "epoch 1/2" in messages[0] and "1 of its 3 steps" in messages[0] and "did not change" not in messages[0]
    assert "epoch 2/2" in messages[1] and "3 of its 3 steps" in messages[1] and "the weights did not change this epoch" in messages[1]


def test_fp32_records_no_skipped_steps(run_tiny, tmp_path):
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=2", run_dir=tmp_path / "run")
    record = json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[0])
    assert "amp_skipped_steps" not in record
