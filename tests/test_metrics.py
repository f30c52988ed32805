"""Accuracy: top-k counting by hand, the training top-1 every method reports, the logged val accuracy
recomputed outside the trainer, and per-run peak memory."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from zipfls_train.data import LoaderOptions, build_data
from zipfls_train.engine.checkpoint import load_checkpoint
from zipfls_train.data.batch import Batch
from zipfls_train.engine.metrics import topk_correct
from zipfls_train.losses import build_method
from zipfls_train.losses.base import with_train_top1
from zipfls_train.models import build_model


def last_metrics(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_topk_correct_counts_targets_by_their_rank() -> None:
    # Rows over 7 classes with distinct logits; the target's rank (1 = best) is 1, 2, 5, 6, 3.
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 6],  # target 0: rank 1
            [1.0, 9, 8, 2, 3, 4, 5],  # target 2: rank 2
            [7.0, 6, 5, 4, 3, 2, 1],  # target 4: rank 5
            [7.0, 6, 5, 4, 3, 2, 1],  # target 5: rank 6
            [0.0, 1, 2, 3, 4, 5, 6],  # target 4: rank 3
        ]
    )
    targets = torch.tensor([0, 2, 4, 5, 4])
    assert topk_correct(logits, targets).tolist() == [1, 4]  # top-1: row 0; top-5: all but row 3
    assert topk_correct(logits, targets, ks=(1, 2, 3, 6)).tolist() == [1, 2, 3, 5]
    # Fewer classes than k: every target is within the top k.
    assert topk_correct(logits[:, :3], torch.tensor([0, 2, 1, 2, 0]), ks=(1, 5)).tolist() == [1, 5]


def test_a_sample_with_a_nan_or_infinite_logit_is_a_miss() -> None:
    nan, inf = float("nan"), float("inf")
    # topk ranks NaN above every number: row 0 (target's logit NaN) would be a top-1 hit, row 1 a top-2 one.
    logits = torch.tensor([[nan, 1.0, 0.0], [0.0, nan, 1.0], [1.0, 0.0, 2.0]])
    assert topk_correct(logits, torch.tensor([0, 2, 2]), ks=(1, 2)).tolist() == [1, 1]
    assert topk_correct(torch.full((4, 10), nan), torch.tensor([0, 1, 2, 9])).tolist() == [0, 0]
    # Tied infinities are ordered by index: the target 3 would win top-1, 4 only top-2.
    tied = torch.zeros(3, 10)
    tied[:, 3] = tied[:, 4] = inf
    assert topk_correct(tied, torch.tensor([3, 4, 4])).tolist() == [0, 0]
    # A large finite logit still counts.
    assert topk_correct(torch.tensor([[3e38, 0.0], [0.0, -3e38]]), torch.tensor([0, 0])).tolist() == [2, 2]


@pytest.mark.parametrize(("precision", "eval_precision", "autocast_on", "recorded"),
                         [("bf16", "fp32", False, "fp32"), ("bf16", "train", True, "bf16"), ("fp32", "train", False, "fp32")])
def test_evaluation_scores_in_fp32_unless_asked_for_the_training_precision(run_tiny, monkeypatch, precision, eval_precision, autocast_on,
                                                                            recorded) -> None:
    """A bf16 forward rounds close logits into ties and moves the val top-1 (in
    test_logged_val_accuracy_is_what_the_saved_model_scores_on_the_val_set's run: 16% logged in bf16
    vs 14% in fp32, one thread), and auto picks bf16 on some machines only: evaluation turns
    autocast off unless trainer.eval_precision=train."""
    from zipfls_train.engine.trainer import Trainer

    seen = []
    evaluate = Trainer.evaluate

    def watched(self, stoppable=False):  # noqa: ANN001, ANN202
        handle = self.model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        try:
            return evaluate(self, stoppable)
        finally:
            handle.remove()

    monkeypatch.setattr(Trainer, "evaluate", watched)
    _, run_dir = run_tiny("loss=ce", "trainer.max_steps_per_epoch=2", f"trainer.precision={precision}", f"trainer.eval_precision={eval_precision}")
    assert seen and set(seen) == {autocast_on}
    assert last_metrics(run_dir)["eval_precision"] == recorded


def test_val_images_with_non_finite_logits_are_misses_and_named(run_tiny, monkeypatch) -> None:
    from zipfls_train.engine.trainer import Trainer

    evaluate = Trainer.evaluate

    def first_rows_nan(self, stoppable=False):  # noqa: ANN001, ANN202
        def hook(module, inputs, output):  # noqa: ANN001, ANN202
            # One logit of each of the first 3 images of every val batch: NaN, +inf, -inf.
            output.logits[0, 0], output.logits[1, 1], output.logits[2, 2] = float("nan"), float("inf"), float("-inf")
        handle = self.model.register_forward_hook(hook)
        try:
            return evaluate(self, stoppable)
        finally:
            handle.remove()

    monkeypatch.setattr(Trainer, "evaluate", first_rows_nan)
    with pytest.warns(RuntimeWarning, match=r"^15 of 100 val images got a NaN or infinite logit \(epoch 1.*evaluated in fp32\); each is scored a miss"):
        _, run_dir = run_tiny("loss=ce", "trainer.max_steps_per_epoch=2", "trainer.eval_batch_size=20")
    assert last_metrics(run_dir)["val_images"] == 100  # (5 batches of 20)


def test_train_top1_is_the_percentage_of_rows_whose_argmax_is_the_target() -> None:
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 3.0, 2.0]])
    terms = with_train_top1({"loss": torch.tensor(1.0)}, logits, torch.tensor([1, 1, 2, 2]))
    assert float(terms["top1"]) == 50.0  # rows 0 and 2 (arg-max 1 and 2) are right, 1 and 3 wrong
    assert set(terms) == {"loss", "top1"}


@pytest.mark.parametrize("name", ["ce", "zipf", "cskd", "ddgsd", "byot"])
def test_every_training_step_reports_the_top1_of_its_own_forward(name) -> None:
    # The base training_step and each method that overrides it (CS-KD, DDGSD, BYOT). Targets are
    # set from the model's own arg-max so that exactly 3 of 8 are right: top1 must read 37.5.
    torch.manual_seed(0)
    num_classes, n = 6, 8
    method = build_method({"name": name}, num_classes)
    needs = method.needs
    model = build_model("cifar_resnet18", num_classes, aux_stages=needs.aux_stages, aux_head=needs.aux_head, width=4)
    model.train()  # BatchNorm on the batch's statistics: the same batch gives the same logits
    x = torch.randn(n, 3, 16, 16)
    # DDGSD's second view holds other images (the top-1 of view 2, or of both views, would read 25.0
    # or 31.25 here, not 37.5); it forwards both views at once, so BatchNorm sees both here too.
    second_view = x.flip(0)
    with torch.no_grad():
        forwarded = torch.cat([x, second_view]) if name == "ddgsd" else x
        predicted = model(forwarded).logits[:n].argmax(dim=1)
    right = torch.tensor([True, False, False, True, False, True, False, False])
    targets = torch.where(right, predicted, (predicted + 1) % num_classes)
    batch = Batch(inputs=x, targets=targets, indices=torch.arange(n), pair_inputs=x.flip(0), second_view=second_view)
    terms = method.training_step(model, batch)
    assert float(terms["top1"]) == pytest.approx(37.5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logged_val_accuracy_is_what_the_saved_model_scores_on_the_val_set(run_tiny, precision) -> None:
    # Trained in bf16 too: evaluation scores in fp32 (trainer.eval_precision), as the reference below
    # (in bf16 autocast near-tied logits ranked otherwise: OMP_NUM_THREADS=1 gave 16% logged vs 14%).
    _, run_dir = run_tiny("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=4", f"trainer.precision={precision}")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    logged = last_metrics(run_dir)
    model = build_model(str(cfg.model.name), int(cfg.dataset.num_classes), **cfg.model.options)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints/last.pt")["model"])
    model.eval()
    options = LoaderOptions(batch_size=16, eval_batch_size=7, device=torch.device("cpu"), seed=0)
    val = build_data(OmegaConf.to_container(cfg.dataset, resolve=True), options).val
    correct1 = correct5 = total = 0
    with torch.no_grad():
        for batch in val.epoch(0):
            logits = model(batch.inputs).logits
            # Rank of each target = 1 + number of classes scoring strictly higher.
            ranks = 1 + (logits > logits.gather(1, batch.targets[:, None])).sum(dim=1)
            correct1 += int((ranks <= 1).sum())
            correct5 += int((ranks <= 5).sum())
            total += len(batch.targets)
    assert total == 100  # 10 classes x 10 val images, each scored once
    assert logged["val_top1"] == pytest.approx(100 * correct1 / total)
    assert logged["val_top5"] == pytest.approx(100 * correct5 / total)


def proc_status_mb(field: str) -> float:
    """VmHWM (the resident high-water mark) or VmRSS from /proc, independently of getrusage."""
    for line in open("/proc/self/status"):
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise AssertionError(f"no {field} line in /proc/self/status")


@pytest.mark.skipif(sys.platform != "linux", reason="the resident high-water mark is read from Linux's /proc")
def test_a_run_reports_its_own_peak_memory_not_an_earlier_run_of_the_same_process(run_tiny, monkeypatch) -> None:
    # A sweep trains its runs one after another in one process; stand in for a large earlier run
    # by touching 1 GiB, then freeing it, before a tiny run starts (which itself adds ~300 MiB to
    # the imports' ~750 MiB).
    from zipfls_train.engine import trainer

    spike = torch.ones(1024 * 2**20 // 4)
    process_peak = proc_status_mb("VmHWM")
    del spike
    marks_at_reset = []
    reset = trainer.reset_peak_memory

    def reset_and_read(device):  # noqa: ANN001, ANN202
        reset(device)
        marks_at_reset.append(proc_status_mb("VmHWM"))

    monkeypatch.setattr(trainer, "reset_peak_memory", reset_and_read)
    _, run_dir = run_tiny("loss=ce", "trainer.max_steps_per_epoch=2")
    logged = last_metrics(run_dir)["peak_cpu_mem_mb"]
    assert len(marks_at_reset) == 1
    assert logged < process_peak - 400, (logged, process_peak)
    # And it is a peak over the run: at least the mark the reset set (the size then). Not compared
    # with the size after the run, which goes on allocating (Figure 2, TensorBoard's last flush)
    # after its last metrics line is written (CI failed so by 9 MiB). Within 1 MiB: getrusage and
    # /proc's VmHWM read the kernel's RSS counters, which it batches per thread (64 pages each), and
    # the floors check once saw the peak 12 KiB under the mark.
    assert logged >= marks_at_reset[0] - 1.0, (logged, marks_at_reset)


@pytest.mark.cuda
def test_a_cuda_run_reports_its_own_peak_gpu_memory(run_tiny) -> None:
    spike = torch.ones(1024 * 2**20 // 4, device="cuda")  # 1 GiB, freed before the run
    del spike
    _, run_dir = run_tiny("trainer.device=cuda", "loss=ce", "trainer.max_steps_per_epoch=2")
    logged = last_metrics(run_dir)["peak_gpu_mem_mb"]
    assert 0 < logged < 256, logged  # a width-8 ResNet at batch 16: a few MiB, not the 1 GiB before it


def test_term_accumulator_means_by_name_and_refuses_terms_that_change_between_steps() -> None:
    """The running sums are stacked by position: a step that returns other terms (a method whose
    training_step returns 'ce' on some steps only, or the same terms in another order) would mix
    one term's values into another's mean. Means by hand: loss (1 + 3) / 2, ce (10 + 20) / 2."""
    from zipfls_train.engine.metrics import TermAccumulator
    from zipfls_train.losses.base import MethodContractError

    running = TermAccumulator()
    running.add({"loss": torch.tensor(1.0), "ce": torch.tensor(10.0)})
    running.add({"loss": torch.tensor(3.0), "ce": torch.tensor(20.0)})
    assert running.means() == {"loss": 2.0, "ce": 15.0}
    with pytest.raises(MethodContractError, match=r"returned the terms \['loss'\] after steps that returned \['loss', 'ce'\]"):
        running.add({"loss": torch.tensor(3.0)})
    with pytest.raises(MethodContractError, match=r"the same terms, in the same order"):
        running.add({"ce": torch.tensor(5.0), "loss": torch.tensor(1.0)})
    assert running.means() == {"loss": 2.0, "ce": 15.0}  # the refused steps added nothing


def test_tensorboard_drops_the_steps_a_killed_run_logged_after_its_checkpoint(tmp_path) -> None:
    """A run killed after step 6 whose last checkpoint is at step 4 resumes from step 4: its TensorBoard
    scalars of steps 5 and 6 are stale and the resumed run's replace them (events *at* step 4 stay)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from zipfls_train.engine.metrics import RunRecords

    killed = RunRecords(tmp_path, resume_epoch=0, global_step=0, enabled=True)
    for step in range(1, 7):
        killed.scalars("train", {"loss": float(step)}, step)
    killed.close()
    resumed = RunRecords(tmp_path, resume_epoch=1, global_step=4, enabled=True)
    for step in (5, 6):
        resumed.scalars("train", {"loss": 10.0 * step}, step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]


def test_the_window_of_the_train_curve_restarts_at_each_log_and_survives_a_save() -> None:
    """TermAccumulator's window: the mean since the last restart_window(), by hand; kept through
    state_dict/load_state_dict; a state written before the window existed measures from the resume."""
    from zipfls_train.engine.metrics import TermAccumulator

    running = TermAccumulator()
    for value in (1.0, 2.0, 3.0, 4.0):
        running.add({"loss": torch.tensor(value)})
    assert running.means(since=running.window) == {"loss": 2.5} and running.steps_in_window == 4
    running.restart_window()
    running.add({"loss": torch.tensor(10.0)})
    running.add({"loss": torch.tensor(20.0)})
    assert running.means(since=running.window) == {"loss": 15.0} and running.steps_in_window == 2
    restored = TermAccumulator()
    restored.load_state_dict(running.state_dict(), torch.device("cpu"))
    restored.add({"loss": torch.tensor(30.0)})
    assert restored.means(since=restored.window) == {"loss": 20.0}  # (10 + 20 + 30) / 3
    assert restored.means() == {"loss": 70.0 / 7}  # the epoch's mean is the epoch's
    older = TermAccumulator()  # a checkpoint of the previous version: sums and count only
    older.load_state_dict({"sums": {"loss": torch.tensor(10.0)}, "count": 5}, torch.device("cpu"))
    older.add({"loss": torch.tensor(2.0)})
    older.add({"loss": torch.tensor(4.0)})
    assert older.means(since=older.window) == {"loss": 3.0}


def test_the_train_curve_points_are_the_means_of_the_steps_since_the_last_log(run_tiny, monkeypatch) -> None:
    """train/loss at each log step, against the losses the steps returned (recorded as they ran)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from zipfls_train.engine.trainer import Trainer

    original, losses = Trainer.train_step, []

    def recording_step(self, batches):
        terms = original(self, batches)
        losses.append(float(terms["loss"].detach()))
        return terms

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    _, run_dir = run_tiny("loss=ls", "trainer.max_steps_per_epoch=7", "trainer.log_every=3")
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    expected = [(3, sum(losses[0:3]) / 3), (6, sum(losses[3:6]) / 3), (7, losses[6])]
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-5)
