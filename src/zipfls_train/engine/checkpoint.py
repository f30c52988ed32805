"""Atomic checkpoints and the RNG state that makes a resumed run identical to an uninterrupted one."""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..errors import error_in_chain


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read; the message names the file."""


class FileWriteError(OSError):
    """A file could not be written (disk full, file size limit, read-only or vanished folder); the
    message names it and says the previous version is intact."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through :func:`replace_atomically`."""
    replace_atomically(path, lambda stream: torch.save(state, stream))


def write_text_atomically(path: Path, text: str) -> None:
    """``text`` (UTF-8) through :func:`replace_atomically`."""
    replace_atomically(path, lambda stream: stream.write(text.encode()))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import (single-threaded): os.umask can only be read by setting it.
_UMASK = _current_umask()
TEMPORARY_GLOB = ".*.tmp"  # what replace_atomically's temporary files look like (".<name>.<random>.tmp")


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a temporary file in the same folder, fsync, then ``os.replace``: a crash at any
    point leaves either the old complete file or the new complete file, never a torn one. The file
    gets the mode of the one it replaces, or the umask's for a new one (mkstemp's 0600 would hide
    a shared project's checkpoints from the group). A failure to write is a :class:`FileWriteError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise write_error(path, error) from error
    try:
        with os.fdopen(handle, "wb") as stream:  # closed before the unlink below, which Windows needs
            os.chmod(temporary, mode)  # (os.fchmod is POSIX, and on Windows only from Python 3.13)
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        cause = _os_error_in(error)
        if cause is not None:
            raise write_error(path, cause) from error
        raise


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, or one it was raised from or while handling (torch.save
    on a full disk raises RuntimeError "[enforce fail at inline_container.cc] unexpected pos ..."
    while handling the OSError that says why)."""
    cause = error_in_chain(error, lambda candidate: isinstance(candidate, OSError))
    return cause if isinstance(cause, OSError) else None


def write_error(path: Path, cause: OSError, kept: str | None = None) -> FileWriteError:
    """``kept``: what became of the file (default: a replaced file's, unchanged, or none written)."""
    reason = cause.strerror or str(cause)
    if kept is None:
        kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    return FileWriteError(
        f"cannot write {path} ({reason}): {kept}; free disk space or fix the folder's permissions, "
        "then rerun the same command (it resumes from the run's last checkpoint, or starts over where none was written yet)"
    )


def resume_note(run_dir: Path) -> str:
    """What a run stopped from outside has saved, for its message."""
    last = run_dir / "checkpoints" / "last.pt"
    return f"its last checkpoint, {last}, is where the same command resumes" if last.is_file() else "no checkpoint was written yet"


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of writes that a kill interrupted (each as large as its checkpoint).
    Only while no other process writes into ``folder`` (the caller holds the run folder's lock)."""
    for temporary in folder.glob(TEMPORARY_GLOB):
        temporary.unlink(missing_ok=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file (e.g. {path / 'checkpoints' / 'last.pt'})")
    state = read_torch_file(path, map_location, expected="a checkpoint file such as <run>/checkpoints/last.pt or best.pt")
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is a torch file but not a zipfls-train checkpoint (no 'model' entry)")
    return state


def read_torch_file(path: Path, map_location: str | torch.device = "cpu", expected: str = "a torch file",
                    allowed: Sequence[Any] = (), if_corrupt: str | None = None) -> Any:  # fmt: skip
    """What ``torch.save`` wrote to ``path``, read as data only (``weights_only``, plus the classes in
    ``allowed``); a CheckpointError naming the file, and ``expected`` (what it should have been),
    when it is missing, not a torch file, corrupt (``if_corrupt``: what to do then, by default the
    advice for a run's own checkpoint), or holds objects other than data."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    kind = _file_kind(path)
    if kind == "other":
        raise CheckpointError(f"{path} is not a torch checkpoint (neither the zip archive nor the pickle torch.save writes); expected {expected}")
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings, containers); unpickling any
        # other object could run code from whatever file a user points at (a BAN teacher, zipf_fit's
        # argument, model.init_from). The numpy classes are those of the numpy RNG state earlier versions stored.
        with torch.serialization.safe_globals([*_legacy_numpy_globals(), *allowed]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:
            raise _corrupt(path, error, if_corrupt) from error
        raise CheckpointError(
            f"{path} holds a Python object that zipfls-train checkpoints do not ({refused.group(1)}); "
            "it is not loaded, since unpickling it could run arbitrary code. Only if you trust the file and know "
            "where it comes from: torch.load(path, weights_only=False), then torch.save the plain tensors you need"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise _corrupt(path, error, if_corrupt) from error


def _corrupt(path: Path, error: BaseException, advice: str | None = None) -> CheckpointError:
    advice = advice or (
        "restore a copy; a run whose last.pt this is starts over with trainer.resume=never (deleting the "
        "file is not enough once it has recorded epochs: the run then refuses to overwrite them)"
    )
    return CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(error).__name__}: {error}); {advice}")


def _legacy_numpy_globals() -> list[Any]:
    """What ``weights_only`` loading must allow, and no more, for the checkpoints of earlier versions:
    their ``rng`` entries held ``np.random.get_state()``, a uint32 numpy array (pickled as numpy's
    ``_reconstruct`` of an ``ndarray`` with a ``dtype``; the path of ``_reconstruct`` is
    ``numpy.core.multiarray`` in files written with numpy 1, ``numpy._core.multiarray`` with numpy 2)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),  # numpy >= 1.25: numpy.dtypes.UInt32DType (its state is set on load)
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
    ]


def _file_kind(path: Path) -> str:
    """'torch' when the file starts as torch.save's output does (a zip archive, or a pickle for the
    legacy format; an empty file counts: a truncated checkpoint), else 'other'."""
    with path.open("rb") as stream:
        head = stream.read(4)
    return "torch" if not head or head.startswith((b"PK\x03\x04", b"\x80")) else "other"


def seed_rngs(seed: int) -> None:
    """Seeds every generator :func:`capture_rng_state` saves: torch's (CPU and every CUDA device),
    Python's ``random`` and numpy's global one. The shipped methods and loaders draw only from their
    own seeded generators, but a method a user adds may call ``random`` or ``np.random``; unseeded,
    its runs would differ for the same ``seed``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds; config seeds are unbounded


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random state: Python, numpy, torch's CPU generator and the generator of its
    own CUDA device (not every device's: asking for those would open a context on each GPU)."""
    return {
        "python": random.getstate(),
        "numpy": numpy_rng_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def numpy_rng_state() -> dict[str, Any]:
    """``np.random.get_state()`` as ``torch.load(weights_only=True)`` reads it without numpy's
    classes: the 624 uint32 words of the Mersenne Twister's key as an int64 tensor (exact), the
    rest as a string, ints and a float."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "bit_generator": str(name),
        "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def set_numpy_rng_state(state: dict[str, Any] | tuple) -> None:
    """Restores a :func:`numpy_rng_state`, or the ``np.random.get_state()`` tuple earlier checkpoints stored."""
    if isinstance(state, dict):
        key = state["key"].cpu().numpy().astype(np.uint32)
        state = (state["bit_generator"], key, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))
    np.random.set_state(state)


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    set_numpy_rng_state(state["numpy"])
    # .cpu(): the checkpoint may have been loaded onto the training device, and torch takes RNG states
    # only as CPU ByteTensors (a CUDA generator's too).
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints that stored every device's state
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)


def rank_rng_state(saved: dict[str, Any] | list[dict[str, Any]], rank: int) -> dict[str, Any] | None:
    """A rank's state from a checkpoint's ``rng``: one per rank (in rank order), or a single state
    (written before states were kept per rank: rank 0's). None for a rank the checkpoint has no
    state of (a run resumed on more processes than it was saved from): it keeps the stream its own
    seed (seed + rank) started, since a copy of another rank's state would repeat that rank's draws
    (random soft labels, dropout masks) on different samples."""
    if isinstance(saved, dict):
        return saved if rank == 0 else None
    return saved[rank] if rank < len(saved) else None
