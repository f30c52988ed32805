"""What a long run on a shared cluster relies on when things go wrong around it: a file the loader
cannot read, a full disk, a second process on the same run folder, a kill in the middle of a save."""

from __future__ import annotations

import json
import os
import resource
import signal
import stat

import pytest
import torch

from zipfls_train.data.images import DatasetError
from zipfls_train.data.tensor_loader import TensorLoader
from zipfls_train.engine import checkpoint
from zipfls_train.engine.checkpoint import CheckpointError, FileWriteError, load_checkpoint, save_atomic
from zipfls_train.engine.folder_lock import RunFolderBusy, RunFolderLock
from zipfls_train.engine.interrupt import TrainingInterrupted
from zipfls_train.engine.metrics import RunRecords

from test_training import read_jsonl

ARGS = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=4", "trainer.log_every=4")


def fail_reading(monkeypatch, train: bool, after_batches: int, in_epoch: int = 0) -> None:
    """The pack loader's train epoch ``in_epoch`` (0-based), or its first val pass, stops with a
    decode error after ``after_batches`` batches, as a corrupt image file met there would (once)."""
    original = TensorLoader.epoch
    failed = {"done": False}

    def epoch(self, epoch, start_step=0):
        for count, batch in enumerate(original(self, epoch, start_step)):
            if self.train == train and epoch == in_epoch and count == after_batches and not failed["done"]:
                failed["done"] = True
                raise DatasetError("cannot decode image /data/train/n01/broken.JPEG: image file is truncated")
            yield batch

    monkeypatch.setattr(TensorLoader, "epoch", epoch)


def assert_same_final_state(straight, resumed) -> None:
    a, b = load_checkpoint(straight / "checkpoints/last.pt"), load_checkpoint(resumed / "checkpoints/last.pt")
    assert a["progress"] == b["progress"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [m["val_top1"] for m in read_jsonl(straight / "metrics.jsonl")] == [m["val_top1"] for m in read_jsonl(resumed / "metrics.jsonl")]


@pytest.mark.parametrize(("train", "after_batches", "step", "where"), [
    (True, 2, 6, "epoch 2/2, after step 2/4:"),                           # mid-epoch (epoch 2's third batch)
    (False, 0, 4, "epoch 1/2, after step 4/4 (before its evaluation):"),  # the val set, after epoch 1's steps
])  # fmt: skip
def test_an_unreadable_file_keeps_what_was_trained_and_the_rerun_ends_as_an_uninterrupted_run(
    run_tiny, tmp_path, monkeypatch, train, after_batches, step, where
):
    _, straight = run_tiny(*ARGS, run_dir=tmp_path / "straight")
    fail_reading(monkeypatch, train, after_batches, in_epoch=1 if train else 0)
    with pytest.raises(DatasetError) as error:
        run_tiny(*ARGS, run_dir=tmp_path / "resumed")
    message = str(error.value)
    assert message.startswith("cannot decode image /data/train/n01/broken.JPEG: image file is truncated\n"), message
    assert f"saved {tmp_path / 'resumed/checkpoints/last.pt'} in {where} once the file reads, rerun the same command to resume" in message
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["progress"]["global_step"] == step
    monkeypatch.undo()

    run_tiny(*ARGS, run_dir=tmp_path / "resumed")  # the file fixed: the same command
    assert_same_final_state(straight, tmp_path / "resumed")


def test_a_full_disk_is_one_error_naming_the_file_and_the_previous_checkpoint_survives(tmp_path):
    # A real file size limit (ulimit -f): torch.save then fails as on a full disk, with a RuntimeError
    # ("unexpected pos ...") raised while handling the OSError that says why.
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.zeros(10)}}, path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the process is killed)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(FileWriteError) as error:
            save_atomic({"model": {"w": torch.ones(1_000_000)}}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert str(error.value).startswith(f"cannot write {path} (File too large): the previous last.pt is unchanged; free disk space")
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_files_written_atomically_take_the_umask_or_keep_the_replaced_file_s_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "_UMASK", 0o002)  # a shared project's group-writable umask
    save_atomic({"model": {}}, tmp_path / "best.pt")
    assert stat.S_IMODE((tmp_path / "best.pt").stat().st_mode) == 0o664  # not mkstemp's 0600
    (tmp_path / "best.pt").chmod(0o640)
    save_atomic({"model": {}}, tmp_path / "best.pt")
    assert stat.S_IMODE((tmp_path / "best.pt").stat().st_mode) == 0o640


def test_a_run_trains_where_windows_lacks_fcntl_resource_and_fchmod(run_tiny, tmp_path, monkeypatch):
    """Windows has no fcntl (the folder lock), no resource (the CPU memory peak) and, before Python
    3.13, no os.fchmod: a run there trains and saves, says that its folder is not locked, and records
    no CPU peak (rather than failing at import or at its first checkpoint)."""
    from zipfls_train.engine import folder_lock, memory

    monkeypatch.setattr(folder_lock, "fcntl", None)
    monkeypatch.setattr(memory, "resource", None)
    monkeypatch.delattr(os, "fchmod")
    monkeypatch.setattr(checkpoint, "_UMASK", 0o022)
    with pytest.warns(UserWarning, match=r"no advisory file locks on this platform \(Windows\): nothing stops a second process"):
        summary, run_dir = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1")
    assert summary["status"] == "finished" and not (run_dir / ".lock").exists()
    assert stat.S_IMODE((run_dir / "checkpoints" / "last.pt").stat().st_mode) == 0o644
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["peak_cpu_mem_mb"] is None


def test_a_second_process_on_a_run_folder_in_use_is_refused_and_writes_nothing(run_tiny, tmp_path):
    run_dir = tmp_path / "run"
    with RunFolderLock(run_dir):  # flock: a second open file (the run's) conflicts, as another process's would
        with pytest.raises(RunFolderBusy) as error:
            run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=run_dir)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]
    message = str(error.value)
    assert message.startswith(f"{run_dir} is in use: process {os.getpid()} on ")
    assert "hydra.run.dir=" in message
    assert not (run_dir / ".lock").exists()  # released with its holder

    run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=run_dir)  # free again: trains
    assert (run_dir / "summary.json").is_file() and not (run_dir / ".lock").exists()


def test_temporary_files_of_saves_cut_short_by_a_kill_are_removed(run_tiny, tmp_path):
    run_dir = tmp_path / "run"
    stale = [run_dir / "checkpoints/.last.pt.x3cqfvqo.tmp", run_dir / ".metrics.jsonl.k2j9d0aa.tmp"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=run_dir)
    assert not any(path.exists() for path in stale)
    assert (run_dir / "checkpoints/last.pt").is_file()


def test_an_unreadable_summary_of_a_finished_run_says_how_to_get_it_back(run_tiny, tmp_path):
    _, run_dir = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "run")
    written = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text("")  # a write cut short
    with pytest.raises(CheckpointError, match=r"summary.json, this finished run's summary, is unreadable .*delete it and rerun"):
        run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=run_dir)
    (run_dir / "summary.json").unlink()
    run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=run_dir)  # rewritten from last.pt
    assert json.loads((run_dir / "summary.json").read_text())["best_val_top1"] == written["best_val_top1"]


def test_the_error_that_stopped_a_run_is_not_hidden_by_tensorboard_failing_to_close(run_tiny, tmp_path, monkeypatch):
    def close(self):
        raise OSError(30, "Read-only file system")  # the disk went away under the writer too

    monkeypatch.setattr(RunRecords, "close", close)
    fail_reading(monkeypatch, True, 0)
    with pytest.raises(DatasetError, match="cannot decode image"):
        run_tiny("loss=ce", "trainer.max_steps_per_epoch=2", run_dir=tmp_path / "run")


def test_a_stop_request_during_evaluation_stops_there_and_the_rerun_evaluates_the_epoch(run_tiny, tmp_path, monkeypatch):
    # An ImageNet evaluation can outlast a cluster's grace period between SIGTERM and SIGKILL.
    _, straight = run_tiny(*ARGS, run_dir=tmp_path / "straight")
    original = TensorLoader.epoch

    def sigterm_in_the_first_evaluation(self, epoch, start_step=0):
        for batch in original(self, epoch, start_step):
            if not self.train:
                monkeypatch.setattr(TensorLoader, "epoch", original)
                signal.raise_signal(signal.SIGTERM)  # (this thread: handled before the next batch)
            yield batch

    monkeypatch.setattr(TensorLoader, "epoch", sigterm_in_the_first_evaluation)
    with pytest.raises(TrainingInterrupted, match=r"interrupted \(SIGTERM\) in epoch 1/2, after step 4/4; saved .*evaluate this epoch"):
        run_tiny(*ARGS, run_dir=tmp_path / "resumed")
    assert load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["progress"]["global_step"] == 4
    assert not (tmp_path / "resumed/metrics.jsonl").exists() or read_jsonl(tmp_path / "resumed/metrics.jsonl") == []

    run_tiny(*ARGS, run_dir=tmp_path / "resumed")
    assert_same_final_state(straight, tmp_path / "resumed")


def test_ctrl_c_while_a_run_sets_up_is_one_line_and_leaves_no_empty_run_folder(tmp_path):
    # Set-up (imports, reading the dataset, building the model) takes seconds before training's own
    # stop handling begins. Ctrl-C there, made exact: a KeyboardInterrupt when train.py imports the
    # training code (a sitecustomize module, which Python imports at start-up from PYTHONPATH).
    import subprocess
    import sys

    from conftest import REPO

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\n"
        "class CtrlC:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'zipfls_train.engine.run':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
    )
    run_dir = tmp_path / "outputs" / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "train.py", "trainer.device=cpu", f"hydra.run.dir={run_dir}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["[zipfls-train] stopped at once (SIGINT): nothing was written"], result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["hook"]


def test_an_unreadable_file_in_figure_2_s_pass_after_the_last_epoch_is_reported_as_it_is(run_tiny, tmp_path, monkeypatch):
    # Every epoch is saved by then: nothing to add, and no "epoch 3/2" to name.
    original, val_passes = TensorLoader.epoch, {"n": 0}

    def third_val_pass_fails(self, epoch, start_step=0):
        if not self.train:
            val_passes["n"] += 1
            if val_passes["n"] == 3:  # after the evaluations of epochs 1 and 2: the Zipf fit's pass
                raise DatasetError("cannot decode image /data/val/broken.JPEG: image file is truncated")
        return original(self, epoch, start_step)

    monkeypatch.setattr(TensorLoader, "epoch", third_val_pass_fails)
    with pytest.raises(DatasetError) as error:
        run_tiny(*ARGS, "trainer.zipf_fit_at_end=true", run_dir=tmp_path / "run")
    assert str(error.value) == "cannot decode image /data/val/broken.JPEG: image file is truncated"
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["progress"]["epoch"] == 2


def _draws() -> tuple:
    import random

    import numpy as np

    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_a_restored_rng_state_replays_python_numpy_and_torch_draws():
    """Whatever draws from the global generators (a Zipf run's random_uniform / random_pareto weights,
    dropout, user code) must continue after a resume as it would have: restoring the captured state
    gives the very draws that followed the capture, for each of the three generators."""
    state = checkpoint.capture_rng_state(torch.device("cpu"))
    expected = _draws()
    assert _draws() != expected  # the generators moved on
    checkpoint.restore_rng_state(state, torch.device("cpu"))
    assert _draws() == expected


@pytest.mark.parametrize("seed", [3, 2**32 + 3])
def test_a_run_seeds_python_and_numpy_too(tmp_path, seed):
    """A method a user adds may draw from ``random`` or ``np.random``: the run's seed must fix those
    draws as it fixes torch's, and so the initial weights (numpy takes the seed modulo 2**32)."""
    import random

    import numpy as np

    from conftest import compose
    from zipfls_train.engine.distributed import DistContext
    from zipfls_train.engine.trainer import Trainer

    def build(caller_seed: int) -> dict[str, torch.Tensor]:
        # The caller's generators in another state each time: the run's seed alone decides.
        random.seed(caller_seed)
        np.random.seed(caller_seed)
        torch.manual_seed(caller_seed)
        trainer = Trainer(compose(["dataset=synthetic", "dataset.num_classes=10", "dataset.image_size=32", "model.options.width=8",
                                   "trainer.device=cpu", "trainer.batch_size=16", f"seed={seed}"]), DistContext(), tmp_path)  # fmt: skip
        return trainer.model.state_dict()

    weights = build(99)
    drawn = random.random(), float(np.random.rand())
    random.seed(seed)
    np.random.seed(3)
    assert drawn == (random.random(), float(np.random.rand()))
    # torch's generator too: the same initial weights whatever state the caller left it in.
    again = build(7)
    assert all(torch.equal(tensor, again[name]) for name, tensor in weights.items())


def test_each_rank_resumes_its_own_rng_state(monkeypatch):
    """A checkpoint holds one state per rank (rank order); a rank beyond them has none (it keeps its
    own seed's stream rather than repeat another rank's draws), and a single (older) state is rank
    0's. A checkpoint's list of CUDA states gives device k its k-th."""
    per_rank = [{"name": "rank0"}, {"name": "rank1"}]
    assert [checkpoint.rank_rng_state(per_rank, rank) for rank in (0, 1, 2)] == [{"name": "rank0"}, {"name": "rank1"}, None]
    single = {"name": "single"}
    assert [checkpoint.rank_rng_state(single, rank) for rank in (0, 1)] == [single, None]

    applied = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: applied.append((state.tolist(), device)))
    state = checkpoint.capture_rng_state(torch.device("cpu"))
    state["cuda"] = [torch.tensor([10], dtype=torch.uint8), torch.tensor([11], dtype=torch.uint8)]
    checkpoint.restore_rng_state(state, torch.device("cuda", 1))
    assert applied == [([11], torch.device("cuda", 1))]
