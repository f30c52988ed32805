"""Page-locking existing host memory for the GPU (``cudaHostRegister``), so copies from it are
asynchronous DMAs without a pinned staging copy.

The driver may refuse (WSL does not support it; a locked-memory limit can stop it). torch's binding
returns the error code but, unlike its own checked calls, does not consume it: the CUDA runtime keeps
it as the thread's "last error", and torch reads that after every kernel launch, so the next,
unrelated kernel would fail with "CUDA error: ..." and stop training. A refusal is therefore cleared
here, and the caller carries on with synchronous copies.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

CUDA_SUCCESS = 0


def page_lock(tensor: Tensor) -> int:
    """Page-lock ``tensor``'s (contiguous, CPU) memory in place. Returns the CUDA error code: 0 when
    locked (undo with :func:`page_unlock`), otherwise the refusal, already cleared."""
    error = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.nbytes, 0))
    if error != CUDA_SUCCESS:
        clear_last_cuda_error()
    return error


def page_unlock(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


def cuda_error_text(error: int) -> str:
    """E.g. "operation not supported (801)"."""
    return str(torch.cuda.CudaError(error))


def clear_last_cuda_error() -> None:
    """Reset the CUDA runtime's last error of this thread. torch's ``cudart()`` module has no
    ``cudaGetLastError``, but torch loads the runtime library into the global symbol scope (the same
    instance it uses), so the symbol resolves there. Should a build link the runtime statically, a
    tiny kernel launch lets torch's own launch check read (and so clear) the error instead."""
    try:
        get_last_error = ctypes.CDLL(None).cudaGetLastError
    except AttributeError:
        try:
            torch.zeros(1, device="cuda")
        except RuntimeError:
            pass  # that was the stale error, now consumed
        return
    get_last_error.restype = ctypes.c_int
    get_last_error()
