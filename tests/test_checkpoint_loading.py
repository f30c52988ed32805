"""Checkpoints are data: every entry of last.pt and best.pt loads with torch.load's default
weights_only=True, load_checkpoint unpickles nothing else, and the checkpoints earlier versions
wrote (numpy's RNG state inside) still load and resume."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from zipfls_train.engine import checkpoint
from zipfls_train.engine.checkpoint import CheckpointError, load_checkpoint, save_atomic
from zipfls_train.engine.trainer import Trainer

RESUMABLE = ("model", "optimizer", "scheduler", "scaler", "method", "progress", "running", "rng", "config")
# One run per method family (the method state each keeps in last.pt differs: PS-KD's memory of past
# predictions, TF-KD's/CS-KD's none, BAN a teacher reloaded from its path).
METHODS = ["ce", "ls", "zipf", "zipf_dense2", "byot", "cskd", "ddgsd", "pskd", "tfkd", "ban"]


@pytest.mark.parametrize("loss", METHODS)
def test_last_and_best_load_with_plain_torch_load(loss, run_tiny, tmp_path):
    extra = []
    if loss == "ban":
        run_tiny("loss=ce", "trainer.max_steps_per_epoch=2", run_dir=tmp_path / "teacher")
        extra = ["loss.generation=2", f"loss.teacher_checkpoint={tmp_path / 'teacher/checkpoints/best.pt'}"]
    _, run_dir = run_tiny(f"loss={loss}", "trainer.max_steps_per_epoch=2", *extra)
    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], name
        state = torch.load(path)  # weights_only=True, torch's default
        assert state["model"].keys() == load_checkpoint(path)["model"].keys()
    assert set(RESUMABLE) <= set(state := torch.load(run_dir / "checkpoints/last.pt"))
    assert isinstance(state["rng"][0]["numpy"]["key"], torch.Tensor)
    if loss == "pskd":
        assert state["method"], "PS-KD's memory of past predictions is in the checkpoint"


def _draws() -> list[float]:
    return [float(np.random.random()), float(np.random.normal()), float(np.random.random())]


def test_numpy_rng_state_is_restored_exactly_after_a_plain_torch_load(tmp_path):
    np.random.seed(1234)
    np.random.normal()  # an odd number of normals: the generator holds a cached Gaussian (has_gauss=1)
    path = tmp_path / "last.pt"
    save_atomic({"model": {}, "rng": [checkpoint.capture_rng_state(torch.device("cpu"))]}, path)
    expected = _draws()
    np.random.seed(99)
    state = torch.load(path)
    checkpoint.restore_rng_state(checkpoint.rank_rng_state(state["rng"], 0), torch.device("cpu"))
    assert _draws() == expected
    numpy_state = state["rng"][0]["numpy"]
    assert numpy_state["has_gauss"] == 1 and numpy_state["key"].numel() == 624


def _earlier_format(path) -> None:  # noqa: ANN001
    """Rewrites ``path``'s RNG states as the code before this change wrote them: ``np.random.get_state()``,
    a tuple holding a uint32 numpy array, in every rank's entry (the same draws as the new format)."""
    state = load_checkpoint(path)
    for rank_state in state["rng"]:
        new = rank_state["numpy"]
        rank_state["numpy"] = (new["bit_generator"], new["key"].numpy().astype(np.uint32), new["pos"],
                               new["has_gauss"], new["cached_gaussian"])  # fmt: skip
    save_atomic(state, path)
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(path)


def test_an_earlier_checkpoint_with_numpy_rng_state_loads_and_resumes_exactly(run_tiny, tmp_path, monkeypatch):
    """A last.pt as earlier versions wrote it (numpy's state a tuple with a numpy array: plain
    torch.load refuses it) resumes: the same weights as an uninterrupted run, and numpy's generator
    continues with the draw that followed the capture."""
    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=3")
    _, straight = run_tiny(*args, run_dir=tmp_path / "straight")

    class Interrupted(Exception):
        pass

    original = Trainer.save

    def stop_after_first_epoch(self, name="last.pt", **kwargs):  # noqa: ANN001, ANN202
        original(self, name, **kwargs)
        if self.progress.epoch == 1 and self.progress.step_in_epoch == 0:
            raise Interrupted

    monkeypatch.setattr(Trainer, "save", stop_after_first_epoch)
    with pytest.raises(Interrupted):
        run_tiny(*args, run_dir=tmp_path / "resumed")
    monkeypatch.setattr(Trainer, "save", original)
    last = tmp_path / "resumed/checkpoints/last.pt"
    _earlier_format(last)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(last)  # as the auditor found it
    saved = load_checkpoint(last)["rng"][0]["numpy"]
    assert isinstance(saved[1], np.ndarray)
    np.random.set_state(saved)
    expected = float(np.random.random())

    restored = []

    def restore_and_draw(state, device):  # noqa: ANN001, ANN202
        checkpoint.restore_rng_state(state, device)
        numpy_state = np.random.get_state()
        restored.append(float(np.random.random()))
        np.random.set_state(numpy_state)

    monkeypatch.setattr("zipfls_train.engine.trainer.restore_rng_state", restore_and_draw)
    np.random.seed(7)  # the resume must bring numpy's generator back, not keep this one
    run_tiny(*args, run_dir=tmp_path / "resumed")
    assert restored == [expected]
    a, b = load_checkpoint(straight / "checkpoints/last.pt"), load_checkpoint(last)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["progress"] == b["progress"]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(last) == []  # rewritten in the new format


def test_an_earlier_checkpoint_written_with_numpy_1_loads(tmp_path):
    """numpy 1 pickles its arrays through numpy.core.multiarray._reconstruct (numpy 2: numpy._core)."""
    path = tmp_path / "last.pt"
    np.random.seed(5)
    save_atomic({"model": {"w": torch.ones(2)}, "rng": [{"numpy": np.random.get_state()}]}, path)
    expected = float(np.random.random())
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    (pickle_name,) = [name for name in members if name.endswith("/data.pkl")]
    members[pickle_name] = members[pickle_name].replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    path.write_bytes(buffer.getvalue())
    assert "numpy.core.multiarray._reconstruct" in torch.serialization.get_unsafe_globals_in_checkpoint(path)
    state = load_checkpoint(path)
    checkpoint.set_numpy_rng_state(state["rng"][0]["numpy"])
    assert float(np.random.random()) == expected


class _RunsCode:
    def __reduce__(self):  # noqa: ANN204
        return (print, ("unpickled code ran",))


def test_load_checkpoint_refuses_to_unpickle_other_objects(tmp_path, capsys):
    """A checkpoint file is data: one holding any other object (here one whose unpickling calls a
    function) is refused, naming the object, before anything of it runs."""
    path = tmp_path / "teacher.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match=r"teacher\.pt holds a Python object .*\(print\).*arbitrary code"):
        load_checkpoint(path)
    assert "unpickled code ran" not in capsys.readouterr().out
