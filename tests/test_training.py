"""End-to-end runs on tiny data: learning, run-folder contents, auto-resume, multirun, errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY_RUN
from zipfls_train.engine.checkpoint import CheckpointError, load_checkpoint
from zipfls_train.engine.config_checks import ConfigError
from zipfls_train.engine.interrupt import TrainingInterrupted
from zipfls_train.engine.resume import ResumeError
from zipfls_train.engine.trainer import Trainer


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_epochs_learn_and_fill_the_run_folder(run_tiny):
    summary, run_dir = run_tiny("loss=ce", "trainer.epochs=4", "optim.lr=0.05")
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    for key in ("train_loss", "train_ce", "val_top1", "val_top5", "best_val_top1", "lr", "images_per_s"):
        assert key in metrics[0]
    assert summary["best_val_top1"] == max(m["val_top1"] for m in metrics)
    # The run's first step (loader start, compilation, tuning) is timed apart and left out of
    # epoch 1's images/s; later epochs time all their steps.
    first, second = metrics[0], metrics[1]
    assert 0 < first["first_step_s"] < first["epoch_time_s"]
    assert all("first_step_s" not in m for m in metrics[1:])
    images_per_epoch = second["images_per_s"] * second["epoch_time_s"]  # batch 16 x the steps
    timed_s = first["epoch_time_s"] - first["first_step_s"]
    assert first["images_per_s"] * timed_s == pytest.approx(images_per_epoch - 16, rel=1e-6)
    assert (run_dir / "config.yaml").read_text().count("name: tinyimagenet") == 1
    assert (run_dir / "checkpoints/last.pt").is_file() and (run_dir / "checkpoints/best.pt").is_file()
    assert any((run_dir / "tb").iterdir())
    # lr recorded is the one the epoch trained with: 0.05, then x0.1 from epoch 3 (50%) and x0.01
    # from epoch 4 (75%).
    assert [round(m["lr"], 6) for m in metrics] == [0.05, 0.05, 0.005, 0.0005]
    # Chance is 10% on this 10-class set; the class patterns are easy.
    assert summary["best_val_top1"] > 30.0



def test_a_run_from_a_notebook_trains_as_usual_and_leaves_its_torch_state_alone(run_tiny, tmp_path):
    """run_training inside a session that made float64 the default, switched gradients off, set its
    own deterministic flags and joined its own process group: the run trains in float32 with
    gradients (it trained in float64, recorded as fp32, or failed blaming the loss), and returns
    the session's dtype, grad mode, flags and process group as they were (the group was destroyed)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    torch.set_default_dtype(torch.float64)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        with torch.inference_mode():  # (no_grad's stronger form, which enable_grad alone does not undo)
            summary, run_dir = run_tiny("loss=zipf", "trainer.max_steps_per_epoch=2", "trainer.zipf_fit_at_end=false")
            assert not torch.is_grad_enabled() and torch.is_inference_mode_enabled()
        assert torch.get_default_dtype() == torch.float64
        assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == (True, False)
        assert torch.backends.cudnn.benchmark is False
        assert dist.is_initialized()
    finally:
        torch.set_default_dtype(torch.float32)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = benchmark
        if dist.is_initialized():
            dist.destroy_process_group()
    weights = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    assert summary["status"] == "finished"


def test_best_epoch_is_one_based_and_the_earliest_of_a_tie(run_tiny, monkeypatch):
    """Val top-1 50, 50, 40 over three epochs (Trainer.evaluate replaced): the best epoch is epoch
    1, counted from 1 as metrics.jsonl counts epochs, and the earlier of the two tied epochs, as
    analysis/results.py picks it from metrics.jsonl; summary.json and best.pt say so, and best.pt
    holds the weights epoch 1 ended with (those its evaluation saw), not epoch 2's."""
    scores, seen = iter([50.0, 50.0, 40.0]), []

    def evaluate(self, stoppable=False):  # noqa: ANN001, ANN202
        seen.append({name: value.detach().clone() for name, value in self.model.state_dict().items()})
        return next(scores), 90.0, 160

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    summary, run_dir = run_tiny("loss=ce", "trainer.epochs=3", "trainer.max_steps_per_epoch=2", "trainer.precision=fp32")
    assert len(seen) == 3
    assert [(m["epoch"], m["val_top1"], m["best_val_top1"]) for m in read_jsonl(run_dir / "metrics.jsonl")] == [(1, 50.0, 50.0), (2, 50.0, 50.0), (3, 40.0, 50.0)]
    assert (summary["best_epoch"], summary["best_val_top1"]) == (1, 50.0)
    assert json.loads((run_dir / "summary.json").read_text())["best_epoch"] == 1
    from zipfls_train.analysis.results import read_run

    assert (read_run(run_dir).best_epoch, read_run(run_dir).best_top1) == (1, 50.0)
    best = torch.load(run_dir / "checkpoints/best.pt", map_location="cpu", weights_only=False)
    assert (best["epoch"], best["val_top1"]) == (1, 50.0)
    assert best["model"].keys() == seen[0].keys()
    weights = [name for name, value in seen[0].items() if value.is_floating_point()]
    assert any(not torch.equal(seen[0][name], seen[1][name]) for name in weights)  # epoch 2 did train
    for name in best["model"]:
        assert torch.equal(best["model"][name], seen[0][name]), name

def test_zipf_run_logs_every_term(run_tiny):
    _, run_dir = run_tiny("loss=zipf", "trainer.max_steps_per_epoch=3")
    record = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert {"train_loss", "train_ce", "train_zipf"} <= set(record)
    assert record["train_loss"] == pytest.approx(record["train_ce"] + 1.0 * record["train_zipf"], rel=1e-5)
    # the Zipf term is there: a peaked soft label against a fresh model's near-uniform non-target
    # softmax is far from 0 (a term computed as 0 would pass the sum above)
    assert record["train_zipf"] > 0.05


class Interrupted(Exception):
    pass


def run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args, epoch: int = 1, **kwargs) -> None:
    """``run_tiny(*args, **kwargs)``, killed right after its checkpoint (last.pt) of ``epoch`` is written."""
    original = Trainer.save

    def stop_after_the_epoch(self, name="last.pt", **options):
        original(self, name, **options)
        if self.progress.epoch == epoch and self.progress.step_in_epoch == 0:
            raise Interrupted

    monkeypatch.setattr(Trainer, "save", stop_after_the_epoch)
    with pytest.raises(Interrupted):
        run_tiny(*args, **kwargs)
    monkeypatch.setattr(Trainer, "save", original)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_auto_resume_continues_at_the_next_epoch_with_identical_state(device, run_tiny, tmp_path, monkeypatch):
    # On CUDA: deterministic kernels, so that the resumed run can equal the straight one bit for bit.
    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=4", f"trainer.device={device}",
            f"trainer.deterministic={device == 'cuda'}")  # fmt: skip
    _, straight = run_tiny(*args, run_dir=tmp_path / "straight")
    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args, run_dir=tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["progress"]["epoch"] == 1

    run_tiny(*args, run_dir=tmp_path / "resumed")  # the same command again
    resumed_metrics = read_jsonl(tmp_path / "resumed/metrics.jsonl")
    assert [m["epoch"] for m in resumed_metrics] == [1, 2]
    a = load_checkpoint(straight / "checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["progress"] == b["progress"]
    straight_metrics = read_jsonl(straight / "metrics.jsonl")
    assert resumed_metrics[-1]["val_top1"] == straight_metrics[-1]["val_top1"]
    assert resumed_metrics[-1]["train_loss"] == pytest.approx(straight_metrics[-1]["train_loss"], rel=1e-6)
    # TensorBoard keeps the epoch written before the interruption (its events sit at the checkpoint's step).
    assert tensorboard_steps(tmp_path / "resumed", "epoch/val_top1") == tensorboard_steps(straight, "epoch/val_top1") == [4, 8]


def tensorboard_steps(run_dir, tag, subdir="tb"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / subdir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_logged_lr_is_the_lr_each_step_and_epoch_applied(run_tiny, tmp_path):
    # 2 epochs x 3 steps, warm-up over the first epoch (lr 0.1 x (step + 1) / 3), / 10 after epoch 1.
    _, run_dir = run_tiny("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", "trainer.log_every=1",
                          "optim.lr=0.1", "sched.warmup_epochs=1", "sched.milestones=[1]", run_dir=tmp_path / "run")  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = [event.value for event in events.Scalars("train/lr")]  # stored as float32
    assert logged == pytest.approx([0.1 / 3, 0.2 / 3, 0.1, 0.01, 0.01, 0.01], rel=1e-6)
    assert [m["lr"] for m in read_jsonl(run_dir / "metrics.jsonl")] == pytest.approx([0.1 / 3, 0.01])


def test_resume_refuses_another_number_of_steps_per_epoch(run_tiny, tmp_path):
    # The schedule maps steps to epochs: a checkpoint of 2 steps per epoch cannot go on with 3.
    run_tiny("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=2", "trainer.epochs=1", run_dir=tmp_path / "run")
    with pytest.raises(ResumeError, match=r"trainer.max_steps_per_epoch: 2 -> 3"):
        run_tiny("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", run_dir=tmp_path / "run")


def test_a_finished_run_asked_for_more_epochs_says_why_it_is_not_extended(run_tiny, tmp_path):
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "run")
    with pytest.raises(ResumeError, match=r"trainer.epochs: 1 -> 3\)\. A run is not extended in place: its lr schedule .* laid out for trainer.epochs=1"):
        run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", "trainer.epochs=3", run_dir=tmp_path / "run")


@pytest.mark.parametrize(("key", "before", "now"), [
    # Where and how a run executes (the keys sweep folder names leave out, configs/hydra/default.yaml):
    ("trainer.device", "cpu", "cuda"), ("trainer.devices", 1, 2), ("trainer.progress_bar", True, False),
    ("trainer.log_every", 50, 10), ("trainer.num_workers", 4, 0), ("trainer.data_on", "cpu", "device"),
    ("trainer.eval_batch_size", 256, 64), ("trainer.checkpoint_every_steps", 0, 500), ("trainer.stop_check_s", 5.0, 20.0),
    ("trainer.resume", "auto", "always"), ("trainer.zipf_fit_at_end", True, False), ("trainer.compile", False, True),
    ("dataset.root", "/a", "/b"), ("loss.kernel", "torch", "fused"), ("tag", "", "x"),
    # What scores the weights, not what trains them; None: a checkpoint written before the key existed.
    ("trainer.eval_precision", "train", "fp32"), ("trainer.eval_precision", None, "fp32"),
])
def test_a_checkpoint_resumes_under_another_value_of_a_key_that_only_says_how_it_runs(key, before, now):
    from omegaconf import OmegaConf

    from zipfls_train.engine.resume import check_same_config

    def config(value):
        cfg = {"tag": "", "seed": 0, "trainer": {"epochs": 200, "batch_size": 128}, "dataset": {"name": "cifar100"},
               "loss": {"name": "zipf", "weight": 0.1}}  # fmt: skip
        OmegaConf.update(node := OmegaConf.create(cfg), key, value, force_add=True)
        return node

    saved = OmegaConf.to_container(config(before))
    check_same_config(config(now), saved, REPO / "last.pt")  # accepted
    # What the run computes is not tolerated, alongside the same change:
    changed = config(now)
    changed.loss.weight = 1.0
    with pytest.raises(ResumeError, match=r"\(loss.weight: 0.1 -> 1.0\)"):
        check_same_config(changed, saved, REPO / "last.pt")


def test_a_recorded_dataset_format_must_match_unless_it_was_recorded_as_auto():
    # Runs before 2026-11-27 recorded dataset.format=auto (what was asked): it matches whatever auto
    # finds now. A recorded tree / pack is what the run trained on: the other copy is other data.
    from omegaconf import OmegaConf

    from zipfls_train.engine.resume import check_same_config

    def config(fmt):
        return {"seed": 0, "trainer": {"epochs": 200}, "dataset": {"name": "tinyimagenet", "format": fmt}, "loss": {"name": "ce"}}

    check_same_config(OmegaConf.create(config("pack")), config("auto"), REPO / "last.pt")
    check_same_config(OmegaConf.create(config("tree")), config("auto"), REPO / "last.pt")
    with pytest.raises(ResumeError, match=r"dataset.format: 'tree' -> 'pack'"):
        check_same_config(OmegaConf.create(config("pack")), config("tree"), REPO / "last.pt")


def test_one_epoch_line_without_a_checkpoint_is_redone_and_two_are_kept(tmp_path):
    # A kill between epoch 1's metrics line and its checkpoint leaves one line: the run starts over.
    # Two or more lines without last.pt: a checkpoint was lost, and starting over would overwrite them.
    from zipfls_train.engine.resume import refuse_to_overwrite_results

    lines = [json.dumps({"epoch": epoch, "val_top1": 1.0}) + "\n" for epoch in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text(lines[0])
    refuse_to_overwrite_results(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    with pytest.raises(ResumeError, match=r"holds the results of 2 epoch\(s\) but no checkpoints/last.pt"):
        refuse_to_overwrite_results(tmp_path)


def test_resume_refuses_a_checkpoint_of_another_configuration_and_changes_nothing(run_tiny, tmp_path):
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "run")
    written = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}
    with pytest.raises(ResumeError, match=r"loss.name: 'ce' -> 'ls'"):
        run_tiny("loss=ls", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "run")
    # The finished run's config.yaml still describes its weights (tables read it).
    assert {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()} == written


def test_rerunning_a_finished_run_trains_and_rewrites_nothing(run_tiny, tmp_path, capsys):
    first, run_dir = run_tiny("loss=zipf", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "run")
    written = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    capsys.readouterr()
    again, _ = run_tiny("loss=zipf", "trainer.max_steps_per_epoch=1", run_dir=run_dir)
    assert "run already finished (1 epochs" in capsys.readouterr().out
    assert again == first
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == written


def test_a_finished_run_rerun_unchanged_is_told_from_its_folder_without_its_data(run_tiny, tiny_pack_root, tmp_path, monkeypatch,
                                                                                  capsys):
    """A sweep rerun after a preemption skips its finished runs from their folders alone (summary.json
    and config.yaml): no images read, no model built, no ranks spawned; it used to take seconds and GBs
    per run. dataset.format=auto, which the run recorded as the pack it found, is the same command
    while the root holds only the pack; where the folder alone cannot tell (another dataset.root, a
    summary written before it named its root, a root where auto now finds the tree), the data is read
    and compared as before."""
    from zipfls_train.data import DatasetError

    data = tmp_path / "data"
    shutil.copytree(tiny_pack_root, data)
    args = ("loss=zipf", "dataset.format=auto", f"dataset.root={data}", "trainer.max_steps_per_epoch=1")
    first, run_dir = run_tiny(*args, run_dir=tmp_path / "run")
    assert first["dataset_root"] == str(data.resolve())
    written = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    import zipfls_train.engine.trainer as trainer_module

    builds = []
    real_build_data = trainer_module.build_data
    monkeypatch.setattr(trainer_module, "build_data", lambda *a, **k: builds.append(1) or real_build_data(*a, **k))
    monkeypatch.setattr("zipfls_train.engine.run.mp.start_processes", lambda *a, **k: pytest.fail("ranks spawned"))
    capsys.readouterr()
    again, _ = run_tiny(*args, "trainer.devices=2", "trainer.num_workers=1", run_dir=run_dir)  # where it runs may differ
    assert "run already finished (1 epochs" in capsys.readouterr().out
    assert (again, builds) == (first, [])
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == written

    # The same data under another root: read, compared with the run's, and then finished.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_pack_root, copy)
    again, _ = run_tiny(*args, f"dataset.root={copy}", run_dir=run_dir)
    assert (again, builds) == (first, [1])
    # The official tree added beside the pack: format=auto now means the tree, another run (this
    # stand-in tree has no images: reading it fails, where the folder alone said "finished").
    (data / "tiny-imagenet-200").mkdir()
    (data / "tiny-imagenet-200/wnids.txt").write_text("n01443537\n")
    with pytest.raises(DatasetError):
        run_tiny(*args, run_dir=run_dir)
    assert builds == [1, 1]
    shutil.rmtree(data / "tiny-imagenet-200")
    # A summary without the root (written before 2026-11-28): read and compared.
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["dataset_root"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    again, _ = run_tiny(*args, run_dir=run_dir)
    assert (again, builds) == (summary, [1, 1, 1])


def test_a_finished_run_records_the_root_it_read_as_the_folder_it_names(tmp_path, monkeypatch):
    from zipfls_train.engine.resume import absolute_root

    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    real = str((tmp_path / "data").resolve())
    assert absolute_root("~/data") == absolute_root("data") == absolute_root("link/../data") == absolute_root(str(tmp_path / "link")) == real
    assert absolute_root(None) is None


def test_a_finished_run_without_last_pt_is_still_refused_by_resume_must(run_tiny, tmp_path):
    """trainer.resume=must: fail if there is no checkpoint to resume from; the folder alone does not
    answer for it (the fast path is trainer.resume=auto's)."""
    args = ("loss=ce", "trainer.max_steps_per_epoch=1")
    _, run_dir = run_tiny(*args, run_dir=tmp_path / "run")
    (run_dir / "checkpoints/last.pt").unlink()
    with pytest.raises(CheckpointError):
        run_tiny(*args, "trainer.resume=must", run_dir=run_dir)


def test_a_finished_run_with_a_best_top1_of_zero_says_zero(tmp_path, capsys):
    from zipfls_train.engine.resume import report_finished

    report_finished({"epochs": 2, "best_val_top1": 0.0}, tmp_path)
    assert "(2 epochs, best val top-1 0.00%)" in capsys.readouterr().out  # not nan%


def test_resume_accepts_a_different_implementation_of_the_same_loss(run_tiny, tmp_path, monkeypatch):
    """loss.kernel chooses how Zipf's loss is computed, not what: a run checkpointed with one
    (or before the key existed) resumes with another."""
    args = ("loss=zipf", "trainer.epochs=2", "trainer.max_steps_per_epoch=1")
    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args, "loss.kernel=torch", run_dir=tmp_path / "run")
    checkpoint = tmp_path / "run/checkpoints/last.pt"
    state = load_checkpoint(checkpoint)
    del state["config"]["loss"]["kernel"]  # as written by a version without the key
    torch.save(state, checkpoint)
    summary, _ = run_tiny(*args, run_dir=tmp_path / "run")  # loss.kernel=auto now
    assert summary["epochs"] == 2
    assert [m["epoch"] for m in read_jsonl(tmp_path / "run/metrics.jsonl")] == [1, 2]


def assert_same_weights(a_dir, b_dir):
    a = load_checkpoint(a_dir / "checkpoints/last.pt")
    b = load_checkpoint(b_dir / "checkpoints/last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["progress"] == b["progress"]


def signal_at_step(monkeypatch, signal_number, global_step):
    """The process receives ``signal_number`` while it trains step ``global_step`` (1-based)."""
    original = Trainer.train_step

    def train_step(self, batches):
        terms = original(self, batches)
        if self.progress.global_step + 1 == global_step:
            os.kill(os.getpid(), signal_number)
        return terms

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return original


@pytest.mark.parametrize(("signal_number", "at_step"), [(signal.SIGINT, 6), (signal.SIGTERM, 8)])
def test_a_signal_saves_the_step_and_the_rerun_resumes_exactly(signal_number, at_step, run_tiny, tmp_path, monkeypatch):
    # 2 epochs x 4 steps: step 6 is mid-epoch 2; step 8 ends epoch 2 (stopped before its evaluation).
    args = ("loss=zipf", "trainer.epochs=3", "trainer.max_steps_per_epoch=4")
    _, straight = run_tiny(*args, run_dir=tmp_path / "straight")
    handler_before = signal.getsignal(signal_number)
    original = signal_at_step(monkeypatch, signal_number, at_step)
    name = signal.Signals(signal_number).name
    with pytest.raises(TrainingInterrupted, match=rf"interrupted \({name}\) in epoch 2/3, after step {at_step - 4}/4; saved .*last.pt"):
        run_tiny(*args, run_dir=tmp_path / "resumed")
    assert signal.getsignal(signal_number) == handler_before  # the run's handler is gone with it
    stopped_state = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")
    assert stopped_state["progress"]["global_step"] == at_step
    monkeypatch.setattr(Trainer, "train_step", original)
    run_tiny(*args, run_dir=tmp_path / "resumed")
    assert_same_weights(straight, tmp_path / "resumed")
    metrics = read_jsonl(tmp_path / "resumed/metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["val_top1"] == read_jsonl(straight / "metrics.jsonl")[-1]["val_top1"]
    # The resumed epoch's throughput counts only the images it trained after the restart, less the
    # restarted run's first step, timed apart (none when it stopped after the epoch's last step:
    # then nothing was timed, and the first step comes in epoch 3). Its epoch_time_s is the whole
    # epoch's: the steps before the stop (in last.pt) and after the restart.
    resumed = metrics[1]
    if at_step == 8:
        assert resumed["images_per_s"] is None and resumed["epoch_time_s"] is None
        assert "first_step_s" not in resumed and metrics[2]["first_step_s"] > 0
    else:
        before = stopped_state["progress"]["epoch_train_s"]
        assert before > 0
        timed_s = resumed["epoch_time_s"] - before - resumed["first_step_s"]
        assert resumed["images_per_s"] * timed_s == pytest.approx((8 - at_step - 1) * 16, rel=1e-6)
        assert "first_step_s" not in metrics[2]


def test_train_curve_points_span_the_same_steps_however_the_run_was_saved_or_stopped(run_tiny, tmp_path, monkeypatch):
    """TensorBoard's train/* point at a log step is the mean since the previous one, whether the run
    saved mid-epoch checkpoints in between or was stopped and resumed there (the steps before such
    a save used to be in no point)."""
    args = ("loss=zipf", "trainer.epochs=2", "trainer.max_steps_per_epoch=6", "trainer.log_every=4")
    _, straight = run_tiny(*args, run_dir=tmp_path / "straight")
    _, saved = run_tiny(*args, "trainer.checkpoint_every_steps=3", run_dir=tmp_path / "saved")
    original = signal_at_step(monkeypatch, signal.SIGTERM, 3)
    with pytest.raises(TrainingInterrupted):
        run_tiny(*args, run_dir=tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "train_step", original)
    run_tiny(*args, run_dir=tmp_path / "resumed")

    def curve(run_dir):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run_dir / "tb"))
        events.Reload()
        return [(event.step, event.value) for event in events.Scalars("train/loss")]

    expected = curve(straight)
    assert [step for step, _ in expected] == [4, 6, 8, 12]  # every 4 steps and at each epoch's end
    for run_dir in (saved, tmp_path / "resumed"):
        assert [step for step, _ in curve(run_dir)] == [4, 6, 8, 12]
        assert [value for _, value in curve(run_dir)] == pytest.approx([value for _, value in expected], rel=1e-5)


def test_epoch_time_counts_each_step_once_across_mid_epoch_checkpoints(run_tiny, tmp_path, monkeypatch):
    """4 steps of 0.5 s each, a checkpoint after each of the first 3 (each adds the time so far to
    last.pt's epoch_train_s): epoch_time_s is the time from the first step's start to the last
    one's end, measured here, not the time before a save counted twice (0.5 s more at the least).
    (A fixed bound failed on a loaded machine: 3.9 s with 4 busy processes on 2 cores.)"""
    import time

    original = Trainer.train_step
    starts, ends = [], []

    def slow_step(self, batches):
        starts.append(time.perf_counter())
        time.sleep(0.5)
        result = original(self, batches)
        ends.append(time.perf_counter())
        return result

    monkeypatch.setattr(Trainer, "train_step", slow_step)
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=4", "trainer.checkpoint_every_steps=1", run_dir=tmp_path / "run")
    (record,) = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert len(starts) == 4
    # 0.3 s for the first batch's loading before the first step, and the clock readings around it.
    assert 2.0 <= record["epoch_time_s"] <= ends[-1] - starts[0] + 0.3, (record["epoch_time_s"], ends[-1] - starts[0])


def test_a_log_file_gets_a_line_at_every_log_step_not_a_progress_bar(run_tiny, tmp_path, capsys):
    """Where the output is no terminal (a cluster job's log), trainer.progress_bar=true prints a line
    at every log step; tqdm's bar would write carriage-return updates, one line of megabytes per
    epoch there. trainer.progress_bar=false: the epoch lines only."""
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=4", "trainer.log_every=2", "trainer.progress_bar=true", run_dir=tmp_path / "a")
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch 1/1  step")]
    assert [line.split("  loss")[0] for line in lines] == ["epoch 1/1  step 2/4", "epoch 1/1  step 4/4"]
    assert "\r" not in captured.out + captured.err
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=4", "trainer.log_every=2", run_dir=tmp_path / "b")
    assert "  step " not in capsys.readouterr().out


def test_a_truncated_last_metrics_line_does_not_block_the_resume(run_tiny, tmp_path, monkeypatch):
    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=3")
    original = signal_at_step(monkeypatch, signal.SIGINT, 5)
    with pytest.raises(TrainingInterrupted):
        run_tiny(*args, run_dir=tmp_path / "run")
    monkeypatch.setattr(Trainer, "train_step", original)
    with (tmp_path / "run/metrics.jsonl").open("a") as stream:
        stream.write('{"epoch": 2, "train_lo')  # a kill in the middle of writing epoch 2's line
    with pytest.warns(UserWarning, match="ignoring a truncated last line"):
        run_tiny(*args, run_dir=tmp_path / "run")
    assert [m["epoch"] for m in read_jsonl(tmp_path / "run/metrics.jsonl")] == [1, 2]


def test_other_data_under_another_root_is_never_taken_for_the_run(run_tiny, tiny_pack_root, tmp_path, monkeypatch, capsys):
    """Run folders are named without dataset.root (the same data copied elsewhere is the same run),
    so other data under another root (an image folder of other photos, say) is told apart by what it
    holds: refused, never reported as this finished run nor resumed into it."""
    from conftest import write_tinyimagenet_pack

    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=1")
    other = write_tinyimagenet_pack(tmp_path / "other", num_classes=10, train_per_class=30, val_per_class=10, seed=1)
    refused = (r"is a run on other data than dataset.root=.*other holds: it trained on 10 classes \(names sha1 \w+\), "
               r"400 train / 100 val images, this data has 10 classes \(names sha1 \w+\), 300 train / 100 val images")  # fmt: skip
    unfinished = tmp_path / "unfinished"
    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args, run_dir=unfinished)
    with pytest.raises(ResumeError, match=refused):
        run_tiny(*args, f"dataset.root={other}", run_dir=unfinished)
    _, finished = run_tiny(*args, run_dir=tmp_path / "finished")
    written = {path: path.read_bytes() for path in finished.rglob("*") if path.is_file()}
    with pytest.raises(ResumeError, match=refused):
        run_tiny(*args, f"dataset.root={other}", run_dir=finished)
    assert {path: path.read_bytes() for path in finished.rglob("*") if path.is_file()} == written
    # The same data elsewhere: the same run, finished; and the unfinished one resumes.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_pack_root, copy)
    capsys.readouterr()
    run_tiny(*args, f"dataset.root={copy}", run_dir=finished)
    assert "run already finished (2 epochs" in capsys.readouterr().out
    run_tiny(*args, f"dataset.root={copy}", run_dir=unfinished)
    assert [m["epoch"] for m in read_jsonl(unfinished / "metrics.jsonl")] == [1, 2]


def test_the_run_records_the_format_auto_found_and_resumes_runs_that_recorded_auto(run_tiny, tmp_path, monkeypatch):
    # TinyImageNet's tree (64 px originals) and pack (32 px JPEG tiles) are different inputs: the
    # config says which one a run read, so results and resumes never mix them.
    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=1", "dataset.format=auto")
    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args, run_dir=tmp_path / "run")
    assert "format: pack" in (tmp_path / "run/config.yaml").read_text()
    checkpoint = tmp_path / "run/checkpoints/last.pt"
    state = load_checkpoint(checkpoint)
    assert state["config"]["dataset"]["format"] == "pack"
    state["config"]["dataset"]["format"] = "auto"  # as runs recorded it before the format was resolved
    del state["data"]
    torch.save(state, checkpoint)
    run_tiny(*args, run_dir=tmp_path / "run")
    assert [m["epoch"] for m in read_jsonl(tmp_path / "run/metrics.jsonl")] == [1, 2]


def test_an_unfinished_run_whose_last_checkpoint_is_gone_is_not_overwritten(run_tiny, tmp_path, monkeypatch):
    args = ("loss=ce", "trainer.epochs=3", "trainer.max_steps_per_epoch=2")
    original = signal_at_step(monkeypatch, signal.SIGTERM, 5)  # in epoch 3: 2 epochs written
    with pytest.raises(TrainingInterrupted):
        run_tiny(*args, run_dir=tmp_path / "run")
    monkeypatch.setattr(Trainer, "train_step", original)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints/last.pt").unlink()
    written = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    with pytest.raises(ResumeError, match=r"holds the results of 2 epoch\(s\) but no checkpoints/last.pt .*trainer.resume=never"):
        run_tiny(*args, run_dir=run_dir)
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == written
    run_tiny(*args, "trainer.resume=never", run_dir=run_dir)  # the explicit way to start over
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_a_finished_run_whose_last_checkpoint_was_deleted_stays_finished(run_tiny, tmp_path, capsys):
    # Deleting last.pt after a run (to save disk) must not make a sweep's rerun train it again.
    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=2")
    first, run_dir = run_tiny(*args, run_dir=tmp_path / "run")
    (run_dir / "checkpoints/last.pt").unlink()
    written = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    capsys.readouterr()
    again, _ = run_tiny(*args, run_dir=run_dir)
    assert f"run already finished (2 epochs, best val top-1 {first['best_val_top1']:.2f}%)" in capsys.readouterr().out
    assert again == first
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == written
    with pytest.raises(ResumeError, match=r"loss.name: 'ce' -> 'ls'"):  # still its own run only
        run_tiny(*args[1:], "loss=ls", run_dir=run_dir)


def test_a_run_killed_after_its_last_epoch_resumes_to_write_its_summary(run_tiny, tmp_path, capsys):
    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=2")
    first, run_dir = run_tiny(*args, run_dir=tmp_path / "run")
    (run_dir / "summary.json").unlink()  # as a kill between the last checkpoint and the summary leaves it
    capsys.readouterr()
    again, _ = run_tiny(*args, run_dir=run_dir)
    assert "run resumed after its last epoch (2/2) to write its summary" in capsys.readouterr().out
    assert again["best_val_top1"] == first["best_val_top1"]
    assert json.loads((run_dir / "summary.json").read_text())["best_val_top1"] == first["best_val_top1"]
    assert [m["epoch"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_starting_over_sets_the_whole_earlier_attempt_aside(run_tiny, tmp_path, monkeypatch):
    from zipfls_train.analysis.results import load_runs

    args = ("loss=ce", "trainer.epochs=1", "trainer.max_steps_per_epoch=2")
    _, run_dir = run_tiny(*args, run_dir=tmp_path / "run")
    first = {path.relative_to(run_dir): path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    # Starting over, then failing before the first checkpoint: the old last.pt, best.pt and
    # summary.json must not stay in the folder as if they were this attempt's.
    original = Trainer.train_step

    def failing_step(self, batches):
        raise RuntimeError("a failure in the first step")

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="a failure in the first step"):
        run_tiny(*args, "optim.lr=0.05", "trainer.resume=never", run_dir=run_dir)
    monkeypatch.setattr(Trainer, "train_step", original)
    earlier = run_dir / "earlier_attempt_1"
    assert {path.relative_to(earlier): path.read_bytes() for path in earlier.rglob("*") if path.is_file()} == first
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "summary.json").exists()
    # The original command trains again (nothing says it finished) and its TensorBoard holds its
    # own events only; the failed attempt is set aside in turn.
    run_tiny(*args, run_dir=run_dir)
    assert tensorboard_steps(run_dir, "epoch/val_top1") == [2]  # not [2, 2]
    assert tensorboard_steps(earlier, "epoch/val_top1") == [2]
    assert sorted(path.name for path in run_dir.glob("earlier_attempt_*")) == ["earlier_attempt_1", "earlier_attempt_2"]
    assert [run.path for run in load_runs([tmp_path])] == [run_dir.resolve()]  # tables skip set-aside attempts
    earlier.rename(run_dir / "earlier_attempt_5")  # numbers need not be dense
    run_tiny(*args, "trainer.resume=never", run_dir=run_dir)
    assert (run_dir / "earlier_attempt_6/checkpoints/last.pt").is_file()


def test_best_pt_in_place_of_last_pt_is_named_not_a_resumable_checkpoint(run_tiny, tmp_path):
    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=2")
    _, run_dir = run_tiny(*args, "trainer.epochs=1", run_dir=tmp_path / "run")
    shutil.copy(run_dir / "checkpoints/best.pt", run_dir / "checkpoints/last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt is not a checkpoint to resume from \(it lacks \['optimizer'"):
        run_tiny(*args, run_dir=run_dir)


def test_max_steps_per_epoch_below_one_is_refused(run_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.max_steps_per_epoch must be >= 1, or null for full epochs; got 0"):
        run_tiny("loss=ce", "trainer.max_steps_per_epoch=0", run_dir=tmp_path / "run")


def _train_py(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_multirun_sweeps_losses_and_seeds(tiny_pack_root, tmp_path):
    result = _train_py(
        "-m", *TINY_RUN, f"dataset.root={tiny_pack_root}", "trainer.epochs=1", "trainer.max_steps_per_epoch=2",
        "loss=ce,ls", "seed=0,1", f"hydra.sweep.dir={tmp_path}/sweep",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import yaml

    folders = [p.parent for p in (tmp_path / "sweep").glob("*/metrics.jsonl")]
    cells = sorted((c["loss"]["name"], c["seed"]) for c in (yaml.safe_load((f / "config.yaml").read_text()) for f in folders))
    assert cells == [("ce", 0), ("ce", 1), ("ls", 0), ("ls", 1)]
    # Folder names come from the overrides, without the machine-specific dataset.root.
    assert all("loss=" in f.name and "seed=" in f.name and "dataset.root" not in f.name for f in folders)

    # The table builder reads the real run folders: CE and LS rows with 2 seeds each, the mean of
    # the two runs' best top-1 (computed here from their metrics files), and the paper's value.
    from zipfls_train.tables import main as tables_main

    best = {}
    for folder in folders:
        config = yaml.safe_load((folder / "config.yaml").read_text())
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        best.setdefault(config["loss"]["name"], []).append(max(m["val_top1"] for m in metrics))
    assert tables_main([str(tmp_path / "sweep"), "--table", "2", "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    ce_row = next(line for line in table.splitlines() if line.startswith("| Vanilla"))
    assert f"{sum(best['ce']) / 2:.2f}" in ce_row and "n=2" in ce_row and "56.41" in ce_row
    ls_row = next(line for line in table.splitlines() if line.startswith("| LS"))
    assert f"{sum(best['ls']) / 2:.2f}" in ls_row and "56.89" in ls_row


def test_help_starts_with_how_to_call_it_then_lists_the_groups():
    result = _train_py("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "zipfls-train: Zipf's label smoothing (ECCV 2022) and its baselines."
    assert "  python train.py -m loss=ce,ls,zipf seed=0,1,2,3,4 dataset.root=../shared/data" in lines
    groups = lines.index("== Configuration groups ==")
    assert lines[groups - 1] == ""
    assert any(line.startswith("loss: ban, byot, ce, cskd, ddgsd, ls, pskd, tfkd, zipf,") for line in lines[groups:])
    assert [line for line in lines if line][-1].startswith("python train.py ... --cfg job prints the composed config")


def test_unknown_config_choice_names_the_group_and_options():
    result = _train_py("loss=nope", "--cfg", "job")
    assert result.returncode != 0
    assert "nope" in result.stderr and "loss" in result.stderr and "zipf" in result.stderr


def test_train_py_prints_its_own_warnings_as_one_line_each(tmp_path):
    result = _train_py("dataset=synthetic", "dataset.num_classes=2", "dataset.image_size=32", "dataset.steps_per_epoch=1", "loss=zipf",
                       "model.options.width=4", "trainer.batch_size=4", "trainer.epochs=1", "trainer.progress_bar=false",
                       f"hydra.run.dir={tmp_path}/run")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert "warning: loss=zipf with 2 classes: the soft label has one non-target class, so the Zipf term is 0 and loss.weight has " \
           "no effect (the run trains as cross-entropy)" in lines
    assert "UserWarning" not in result.stderr and "check_run(device)" not in result.stderr  # no file, line or source


def test_missing_dataset_fails_with_the_expected_layout(tmp_path):
    result = _train_py("dataset=tinyimagenet", f"dataset.root={tmp_path}/empty", "trainer.device=cpu")
    assert result.returncode != 0
    assert "tiny-imagenet-200/wnids.txt" in result.stderr and f"{tmp_path}/empty" in result.stderr


def test_ban_generations_chain_inside_one_sweep(tiny_pack_root, tmp_path):
    result = _train_py(
        "-m", "experiment=ban_generations", *TINY_RUN, f"dataset.root={tiny_pack_root}", "trainer.epochs=1",
        "trainer.max_steps_per_epoch=2", "loss.generation=1,2", f"hydra.sweep.dir={tmp_path}/sweep",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import yaml

    runs = {}
    for folder in (tmp_path / "sweep").iterdir():
        if (folder / "config.yaml").exists():
            runs[yaml.safe_load((folder / "config.yaml").read_text())["loss"]["generation"]] = folder
    assert sorted(runs) == [1, 2]
    second = yaml.safe_load((runs[2] / "config.yaml").read_text())["loss"]
    assert second["teacher_checkpoint"] == str(runs[1] / "checkpoints" / "best.pt")
    assert "train_ban_kl" in read_jsonl(runs[2] / "metrics.jsonl")[0]
    assert "train_ban_kl" not in read_jsonl(runs[1] / "metrics.jsonl")[0]


def test_compile_true_is_cuda_graphs_on_one_gpu_and_inductor_alone_elsewhere():
    from zipfls_train.engine.config_checks import compile_mode

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert compile_mode(True, gpu) == compile_mode("true", gpu) == "reduce-overhead"
    assert compile_mode(True, gpu, distributed=True) == "default"  # DDP's hooks between the backward's graphs
    assert compile_mode(True, cpu) == "default"  # no CUDA graphs on the CPU
    assert compile_mode("default", gpu) == "default" and compile_mode("max-autotune", cpu) == "max-autotune"
    assert compile_mode(False, gpu) is None and compile_mode("false", gpu) is None
    with pytest.raises(ConfigError, match=r"trainer.compile must be false, true or one of .*got 'fast'"):
        compile_mode("fast", gpu)


def test_each_ban_generation_distils_from_the_one_before_in_its_own_sweep_cell():
    """The teacher of generation k is generation k-1's best.pt in the job that differs only by
    loss.generation (k = 3 reads 2's, not 1's), whatever else the sweep varies."""
    from zipfls_train.engine.naming import previous_generation_checkpoint

    sweep = "/runs/sweep"
    assert previous_generation_checkpoint(sweep, "loss.generation=1,seed=4", 1) is None
    assert previous_generation_checkpoint(sweep, "loss.generation=3,seed=4", 3) == f"{sweep}/loss.generation=2,seed=4/checkpoints/best.pt"
    assert previous_generation_checkpoint(sweep, "dataset.root=/d,loss.generation=2", 2) == f"{sweep}/dataset.root=_d,loss.generation=1/checkpoints/best.pt"
    with pytest.raises(ValueError, match="sweep loss.generation"):
        previous_generation_checkpoint(sweep, "seed=4", 2)


@pytest.mark.parametrize("loss", ["zipf", "zipf_dense2", "tfkd", "cskd", "pskd", "byot", "ddgsd", "ban"])
def test_every_method_compiled_trains_as_it_does_eagerly(tmp_path, loss):
    """Two steps, eager and compiled (same seed, batches and start): the same losses. The second
    step's loss depends on the first step's update and on state the first step left. Caught: PS-KD
    stored each step's predictions inside the step, and the compiled backward recomputed the targets
    from the memory after that write, training on its own predictions (second loss 2.831 vs 2.783).
    (ce, ls and zipf_logits take the paths of zipf's model call and loss; zipf_random_*: compiled
    code draws other random numbers than eager code; BAN: generation 2 of a saved generation 1.) The step is
    one graph: a graph break would run the code around it eagerly, and under reduce-overhead split
    the step into several CUDA graphs with host work between them."""
    from conftest import compose
    from torch._dynamo.utils import counters

    from zipfls_train.engine.distributed import DistContext

    overrides = ["dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=20", "dataset.steps_per_epoch=2",
                 "dataset.zipf.upsample=bilinear", "model.options.width=8", "trainer.batch_size=32", f"loss={loss}",
                 "trainer.device=cpu", "trainer.progress_bar=false", "trainer.precision=fp32"]
    if loss == "ban":  # generation 2 distils from a saved generation 1
        Trainer(compose([*overrides, "loss=ce"]), DistContext(), tmp_path / "teacher").save()
        overrides += ["loss.generation=2", f"loss.teacher_checkpoint={tmp_path / 'teacher' / 'checkpoints' / 'last.pt'}"]
    losses = {}
    for compiled in ("false", "true"):
        trainer = Trainer(compose([*overrides, f"trainer.compile={compiled}"]), DistContext(), tmp_path / compiled)
        trainer.method.on_epoch_start(0, 2)  # PS-KD: alpha_t = 0.4
        batch = next(trainer.data.train.epoch(0))  # twice: PS-KD's step 2 reads step 1's predictions
        counters.clear()
        losses[compiled] = [trainer.train_step(iter([batch]))["loss"].item() for _ in range(2)]
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    # Float rounding of the compiled kernels moves the second loss by ~1e-5 (relative).
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)


@pytest.mark.parametrize("loss", ["pskd", "zipf"])
def test_compiled_step_is_not_recompiled_as_epochs_change_the_method(tmp_path, loss):
    """A value that changes every epoch (PS-KD's alpha_t) must reach the compiled step as a tensor:
    a Python float would be a guard, a recompilation each epoch, and after 8 of them dynamo gives up
    and runs the step eagerly for the rest of the run."""
    from conftest import compose
    from zipfls_train.engine.distributed import DistContext

    overrides = ["dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=20", "dataset.steps_per_epoch=2",
                 "dataset.zipf.upsample=bilinear", "model.options.width=8", "trainer.batch_size=16", f"loss={loss}",
                 "trainer.device=cpu", "trainer.progress_bar=false", "trainer.compile=true", "trainer.epochs=3",
                 "trainer.zipf_fit_at_end=false"]
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        summary = Trainer(compose(overrides), DistContext(), tmp_path).fit()
    assert (summary["status"], summary["epochs"]) == ("finished", 3)
    assert counters["stats"]["unique_graphs"] == 1  # the step was compiled (once), not run eagerly


def test_each_run_of_a_sweep_compiles_its_own_static_graph(tmp_path, monkeypatch):
    """A sweep trains its runs in one process, each compiling the same training_step. Without a
    fresh start per run the second run (other classes, other batch) was a recompilation: compiled
    with dynamic shapes, and past dynamo's recompile limit (1 here, 8 by default) not compiled."""
    from conftest import compose
    from zipfls_train.engine.distributed import DistContext

    graphs = []  # per compilation: did it get symbolic (dynamic) shapes?

    def recording_backend(graph_module, example_inputs):
        sizes = [size for x in example_inputs if isinstance(x, torch.Tensor) for size in x.shape]
        graphs.append(any(isinstance(value, torch.SymInt) for value in [*sizes, *example_inputs]))
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: real_compile(function, backend=recording_backend))
    base = ["dataset=synthetic", "dataset.image_size=32", "dataset.steps_per_epoch=1", "model.options.width=8",
            "trainer.device=cpu", "trainer.progress_bar=false", "trainer.compile=true"]
    with torch._dynamo.config.patch(recompile_limit=1):
        for run, (classes, batch) in enumerate([(20, 16), (10, 8)]):
            cfg = compose([*base, f"dataset.num_classes={classes}", f"trainer.batch_size={batch}"])
            trainer = Trainer(cfg, DistContext(), tmp_path / str(run))
            trainer.train_step(trainer.data.train.epoch(0))
    assert graphs == [False, False]


@pytest.mark.parametrize(("deterministic", "autotune"), [("false", True), ("true", False)])
def test_cudnn_autotunes_unless_the_run_is_deterministic(tmp_path, monkeypatch, deterministic, autotune):
    from conftest import compose
    from zipfls_train.engine.distributed import DistContext

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not autotune)  # restored after the test
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *args, **kwargs: None)  # process-wide otherwise
    overrides = ["dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=4", "dataset.steps_per_epoch=1",
                 "model.options.width=8", "trainer.device=cpu", "trainer.progress_bar=false", f"trainer.deterministic={deterministic}"]
    Trainer(compose(overrides), DistContext(), tmp_path)
    assert torch.backends.cudnn.benchmark is autotune


def test_a_deterministic_run_does_not_leave_the_next_run_of_its_sweep_deterministic(tmp_path, monkeypatch):
    """Hydra runs a sweep's jobs in one process, and torch's deterministic mode is process-wide: the
    trainer only ever switched it on, so every job after a trainer.deterministic=true one ran with
    deterministic (slower, on GPUs) kernels."""
    from conftest import compose
    from zipfls_train.engine.distributed import DistContext

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)  # restored after the test
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    overrides = ["dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=4", "dataset.steps_per_epoch=1",
                 "model.options.width=8", "trainer.device=cpu", "trainer.progress_bar=false"]
    states = []
    try:
        for deterministic in ("true", "false"):
            Trainer(compose([*overrides, f"trainer.deterministic={deterministic}"]), DistContext(), tmp_path / deterministic)
            states.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark))
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    assert states == [(True, False), (False, True)]


@pytest.mark.parametrize(("amx", "expected"), [(True, torch.bfloat16), (False, None), ("absent", None)])
def test_precision_auto_is_bf16_on_cpus_with_amx_and_fp32_on_other_cpus(monkeypatch, amx, expected):
    from zipfls_train.engine.precision import resolve_precision

    if amx == "absent":  # a torch without the probe
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is expected
    # explicit choices do not depend on the CPU
    assert (resolve_precision("fp32", cpu), resolve_precision("bf16", cpu), resolve_precision("fp16", cpu)) == (
        None, torch.bfloat16, torch.float16)  # fmt: skip


@pytest.mark.parametrize(("amx", "used"), [(True, "bf16"), (False, "fp32")])
def test_the_run_reports_the_precision_auto_chose(run_tiny, capsys, monkeypatch, amx, used):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    summary, _ = run_tiny("trainer.precision=auto")
    assert summary["precision"] == used
    assert re.search(rf"\[zipfls-train\] run started: \S+ \(cpu, {used}\)", capsys.readouterr().out)


def test_a_run_resumed_where_auto_means_another_precision_says_so(run_tiny, tmp_path, monkeypatch):
    # Started on a CPU without AMX (auto = fp32), resumed on one with it (auto = bf16).
    args = ("trainer.precision=auto", "trainer.epochs=2", "trainer.max_steps_per_epoch=2")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args)
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["precision"] == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    with pytest.warns(UserWarning, match=r"last.pt trained in fp32 so far; trainer.precision=auto is bf16 on this machine, so the run "
                                         r"continues in bf16 \(trainer.precision=fp32 keeps it in fp32\)"):
        summary, _ = run_tiny(*args)
    # Both in the record: per epoch in metrics.jsonl, in turn in the summary (not the last one alone).
    assert [m["precision"] for m in read_jsonl(tmp_path / "run/metrics.jsonl")] == ["fp32", "bf16"]
    assert (summary["status"], summary["precision"]) == ("finished", "fp32 (epoch 1), bf16 (epoch 2)")


def test_a_run_resumed_where_auto_means_another_precision_keeps_its_own_when_named(run_tiny, tmp_path, monkeypatch):
    """What the warning advises works: trainer.precision=fp32 (the precision auto chose where the run
    started) resumes it, and the original command (auto) resumes it after that."""
    args = ("trainer.epochs=3", "trainer.max_steps_per_epoch=2")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args, "trainer.precision=auto")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    # was refused: trainer.precision: 'auto' -> 'fp32'
    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args, "trainer.precision=fp32", epoch=2)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    summary, run_dir = run_tiny(*args, "trainer.precision=auto")  # fp32 here again
    assert [m["precision"] for m in read_jsonl(run_dir / "metrics.jsonl")] == ["fp32"] * 3
    assert summary["precision"] == "fp32"


@pytest.mark.parametrize(
    ("before", "now", "trained_in", "training_in", "same"),
    [
        ("auto", "fp32", "fp32", "fp32", True),  # named as the warning advises
        ("fp32", "auto", "fp32", "fp32", True),  # auto means fp32 here too
        ("fp32", "auto", "fp32", "bf16", False),  # an explicit fp32 run is not auto where auto means bf16
        ("fp16", "auto", "fp16", "bf16", False),  # nor an fp16 one (its GradScaler would be dropped)
        ("auto", "bf16", "fp32", "bf16", False),  # auto trained in fp32: bf16 is another precision
    ],
)
def test_auto_and_the_precision_a_run_trained_in_are_the_same_run_only_where_both_mean_it(before, now, trained_in, training_in, same, tmp_path):
    from zipfls_train.engine.resume import check_same_config

    cfg = OmegaConf.create({"trainer": {"precision": now}})
    check = lambda: check_same_config(cfg, {"trainer": {"precision": before}}, tmp_path / "last.pt",  # noqa: E731
                                      trained_in=trained_in, training_in=training_in)  # fmt: skip
    if same:
        check()
    else:
        with pytest.raises(ResumeError, match=rf"trainer.precision: '{before}' -> '{now}'"):
            check()


def test_precision_history_names_each_precision_with_its_epochs():
    from zipfls_train.engine.precision import precision_history

    records = [{"epoch": 1, "precision": "bf16"}, {"epoch": 2, "precision": "bf16"}, {"epoch": 3, "precision": "fp32"}]
    assert precision_history(records, "fp32") == "bf16 (epochs 1-2), fp32 (epoch 3)"
    assert precision_history(records[:2], "fp32") == "bf16"
    assert precision_history([{"epoch": 1}], "fp32") == "fp32"  # a record of the previous version
    assert precision_history([], "bf16") == "bf16"


def test_a_teacher_named_by_another_path_to_the_same_file_is_the_same_run(tmp_path, monkeypatch):
    from zipfls_train.engine.resume import check_same_config

    teacher = tmp_path / "teacher/best.pt"
    teacher.parent.mkdir()
    teacher.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({"loss": {"name": "ban", "teacher_checkpoint": str(teacher)}})
    check_same_config(cfg, {"loss": {"name": "ban", "teacher_checkpoint": "teacher/best.pt"}}, tmp_path / "last.pt")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ as the shell would have expanded it
    check_same_config(cfg, {"loss": {"name": "ban", "teacher_checkpoint": "~/teacher/best.pt"}}, tmp_path / "last.pt")
    (tmp_path / "other.pt").write_bytes(b"weights")  # the same bytes, but another file: another teacher
    with pytest.raises(ResumeError, match=r"loss.teacher_checkpoint: 'other.pt' -> "):
        check_same_config(cfg, {"loss": {"name": "ban", "teacher_checkpoint": "other.pt"}}, tmp_path / "last.pt")


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_run_lays_out_its_model_batches_and_teacher_as_trainer_channels_last_says(tmp_path, tiny_pack_root, channels_last):
    # On the CPU too (oneDNN's NHWC convolutions are faster: experiments/cpu_speed.md): the model,
    # BAN's teacher (saved here from an NCHW run) and the in-memory loader's batches.
    from conftest import compose
    from zipfls_train.engine.distributed import DistContext

    teacher_run = tmp_path / "teacher"
    Trainer(compose([*TINY_RUN, f"dataset.root={tiny_pack_root}", "trainer.channels_last=false"]), DistContext(), teacher_run).save()
    overrides = [*TINY_RUN, f"dataset.root={tiny_pack_root}", "loss=ban", "loss.generation=2",
                 f"loss.teacher_checkpoint={teacher_run / 'checkpoints' / 'last.pt'}", f"trainer.channels_last={channels_last}"]
    trainer = Trainer(compose(overrides), DistContext(), tmp_path / "run")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for model in (trainer.model, trainer.method.teacher):
        weights = [w for w in model.parameters() if w.dim() == 4]
        assert weights and all(w.is_contiguous(memory_format=layout) for w in weights)
        assert channels_last == weights[0].is_contiguous(memory_format=torch.channels_last) != weights[0].is_contiguous()
    for batch in (next(trainer.data.train.epoch(0)), next(trainer.data.val.epoch(0))):
        assert batch.inputs.is_contiguous(memory_format=layout) and batch.inputs.is_contiguous() != channels_last


COMPILE_OVERRIDES = ["dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=20", "dataset.steps_per_epoch=2",
                     "dataset.zipf.upsample=bilinear", "model.options.width=8", "trainer.batch_size=16",
                     "trainer.device=cpu", "trainer.progress_bar=false"]


@pytest.mark.parametrize("loss", ["ce", "ls", "zipf", "zipf_dense2", "zipf_logits", "zipf_random_pareto", "tfkd", "cskd",
                                  "pskd", "byot", "ddgsd", "ban"])
def test_every_method_compiles_to_one_graph(tmp_path, loss):
    """trainer.compile traces the model's forward and the method's loss as one graph: a graph break
    would split the step into several graphs with eager Python between them, which under
    reduce-overhead means several CUDA graphs and launches in between, at every step."""
    from conftest import compose
    from zipfls_train.engine.distributed import DistContext

    options = [f"loss={loss}"]
    if loss == "ban":  # generation 2 distils from a saved generation 1
        Trainer(compose([*COMPILE_OVERRIDES, "loss=ce"]), DistContext(), tmp_path / "teacher").save()
        options += ["loss.generation=2", f"loss.teacher_checkpoint={tmp_path / 'teacher' / 'checkpoints' / 'last.pt'}"]
    trainer = Trainer(compose([*COMPILE_OVERRIDES, *options]), DistContext(), tmp_path / "run")
    torch._dynamo.reset()
    traced = torch._dynamo.explain(trainer.method.training_step)(trainer.train_model, next(trainer.data.train.epoch(0)))
    assert (traced.graph_count, traced.graph_break_count) == (1, 0), [str(b.reason) for b in traced.break_reasons]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda ce: {"ce": ce}, r"must return a dict with a 'loss' entry, the value back-propagated; got keys \['ce', 'top1'\]"),
        (lambda ce: {"loss": ce.expand(4)}, r"returned loss of shape \(4,\): every term must be a 0-dim tensor"),
        (lambda ce: {"loss": ce, "ce": 1.5}, r"returned ce=1.5, a float: every term must be a 0-dim tensor"),
        (lambda ce: {"loss": ce.detach()}, r"returned a 'loss' without a gradient"),
    ],
)
def test_a_method_that_returns_what_the_trainer_cannot_use_is_named(returned, message, run_tiny, tmp_path, monkeypatch):
    """A new method's mistake (no 'loss', a per-sample vector, a float, a detached loss) is one line
    naming the loss config, not a traceback from backward() or the term accumulator."""
    from zipfls_train.losses.base import MethodContractError
    from zipfls_train.losses.ce import CrossEntropy, cross_entropy

    monkeypatch.setattr(CrossEntropy, "loss_terms", lambda self, outputs, batch, model: returned(cross_entropy(outputs.logits, batch.targets)))
    with pytest.raises(MethodContractError, match=r"^loss=ce: its training_step \(loss_terms\) " + message):
        run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "run")


def test_a_dense_method_given_a_1x1_map_is_warned_before_the_run(tiny_pack_root, tmp_path):
    """An ImageNet model on 32 px images ends on a 1 x 1 map: it trains, but Zipf's LS then gets one
    vote per image. Said at set-up (the meta-device shape check), not discovered from the results."""
    from conftest import compose
    from zipfls_train.engine.distributed import DistContext
    from zipfls_train.models import check_trains_on

    assert check_trains_on("resnet18", 10, 32, 2, feature_stages=("final",)) == {"final": (1, 1)}
    assert check_trains_on("cifar_resnet18", 10, 32, 2, feature_stages=("final", "penultimate")) == {"final": (4, 4), "penultimate": (8, 8)}
    base = [item for item in TINY_RUN if not item.startswith("model")]
    cfg = compose([*base, f"dataset.root={tiny_pack_root}", "model=resnet18", "loss=zipf"])
    with pytest.warns(UserWarning, match=r"loss=zipf reads the dense final map\(s\) of model=resnet18, 1 x 1 at dataset.image_size=32"):
        Trainer(cfg, DistContext(), tmp_path / "run")
