"""Loader for datasets of image files (ImageNet, INAT21): decode + augment in DataLoader workers,
normalise on the training device.

Same protocol as :class:`TensorLoader`: ``len(loader)`` batches per epoch for this rank and
``loader.epoch(epoch, start_step)`` yields :class:`Batch` objects on ``options.device``.

* Order: a permutation drawn from (seed, epoch), cut into ``world_size`` disjoint strided shards
  (train: drop the remainder so every rank has the same number of full batches); evaluation uses
  contiguous, unpadded shards so every image is scored exactly once across ranks.
* Augmentation of sample ``i`` in epoch ``e`` is seeded by (seed, e, i, view), so it does not depend
  on which worker decodes it, and ``epoch(e, start_step=k)`` yields exactly the batches k, k+1, ...
  of an uninterrupted epoch without opening the images of the skipped batches.
* Workers produce uint8 ``H x W x 3`` crops (4x less to copy than float) and write them straight
  into a ring of shared batch buffers allocated once (page-locked in place on CUDA), sending back only
  labels: a stock DataLoader moves every batch through a fresh shared-memory segment plus a pinned
  copy, which capped a 16-core H200 host at ~1,300 images/s whatever the worker count
  (experiments/loader_bench.md). On the device the batch becomes ``N x 3 x H x W`` by a permute, which
  *is* the channels_last layout, and is normalised there. On CUDA the copy and normalisation run on a
  side stream one batch ahead (timm's PrefetchLoader idea), overlapping the previous step's compute.
* ``decode="device"``: workers only read the JPEG bytes and draw the crops; the training device decodes
  them (nvjpeg via ``torchvision.io.decode_jpeg`` on CUDA) and crops/resizes there (device_decode.py).
  For GPU hosts with few CPU cores per GPU (3.8x the training throughput of the stock path in the benchmark).
* DataLoader: ``num_workers`` from the options, persistent workers (forked once, reused every epoch:
  the batch list is swapped underneath them), ``prefetch_factor`` batches in flight per worker.
* A file that cannot be decoded raises :class:`DatasetError` naming it; DataLoader re-raises a
  worker's exception in the main process with the same type and the worker's traceback as its message,
  which the loader turns back into the original message.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import original_message
from ..stop_signals import ignore_stop_signals, release_stop_signals, stop_signals_held
from .augment import Normalizer
from .batch import Batch
from .bundle import LoaderOptions
from .class_pairs import SameClassPartners
from .device_decode import DeviceJob, decode_on_device, read_device_job, stack_device_jobs
from .file_list import FileList
from .images import DatasetError
from .page_lock import CUDA_SUCCESS, cuda_error_text, page_lock, page_unlock
from .seeds import mix_seed

# Where Linux keeps POSIX shared memory (the ring's buffers): its free space is named when they do not fit.
SHARED_MEMORY_FOLDER = "/dev/shm"

# cpu: workers decode with PIL | device: workers only read bytes and draw crops, the training device
# decodes (nvjpeg through torchvision.io.decode_jpeg on CUDA) and crops/resizes there.
DECODE_MODES = ("cpu", "device")

# Views of one sample get different augmentation seeds.
VIEW_MAIN, VIEW_SECOND, VIEW_PAIR = 0, 1, 2


# Key of one sample in a batch plan: (dataset index, index of its CS-KD pair or -1, epoch, ring slot
# of its batch or -1, position in its batch).
SampleKey = tuple[int, int, int, int, int]
VIEW_NAMES = ("images", "second_view", "pair_inputs")


class _FileDataset(Dataset):
    """Decodes one sample (and its extra views) per key; runs in the workers. With a ring, the
    pixels are written straight into the batch's shared buffer and only labels travel back."""

    def __init__(self, files: FileList, transform: Callable[..., np.ndarray], train: bool, seed: int,
                 two_views: bool, pairs: bool, decode: str = "cpu") -> None:
        self.files = files
        self.transform = transform
        self.train = train
        self.seed = seed
        self.two_views = two_views
        self.pairs = pairs
        self.decode = decode
        self.ring: list[dict[str, Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def _view(self, index: int, rng_key: tuple[int, ...]) -> Any:
        rng = random.Random(mix_seed(self.seed, *rng_key)) if self.train else None
        path = self.files.path(index)
        if self.decode == "cpu":
            return self.transform(path, rng)
        return read_device_job(path, self.transform, rng)

    def __getitem__(self, key: SampleKey) -> dict[str, Any]:
        index, pair, epoch, slot, position = key
        views = {"images": (index, VIEW_MAIN)}
        if self.two_views:
            views["second_view"] = (index, VIEW_SECOND)
        if self.pairs:
            views["pair_inputs"] = (pair, VIEW_PAIR)
        item: dict[str, Any] = {"targets": int(self.files.targets[index]), "indices": index, "slot": slot}
        for name, (source, view) in views.items():
            pixels = self._view(source, (epoch, index, view))
            if slot >= 0 and self.ring is not None:
                self.ring[slot][name][position].numpy()[...] = pixels
                pixels = None
            item[name] = pixels
        return item


def _stack_views(views: Sequence[Any]) -> Any:
    if views[0] is None:  # written into the shared ring
        return None
    if isinstance(views[0], DeviceJob):
        return stack_device_jobs(views)
    return torch.from_numpy(np.stack(views))


class LoaderWorkerKilled(RuntimeError):
    """A DataLoader worker was killed from outside the run (the kernel's out-of-memory killer, most
    often); the message names it, what uses less memory, and the checkpoint to resume from."""


# torch's words when a worker dies: its SIGCHLD handler ("... is killed by signal: Killed.", raised
# wherever the main process is then, a backward pass included) or the next fetch ("... exited
# unexpectedly").
_WORKER_DIED = re.compile(r"DataLoader worker \(pids?\(?s?\)? ?([\d, ]+)\) (?:is killed by signal: ([^.\n]+)|exited unexpectedly"
                          r"(?: with exit code (-?\d+))?)")


def loader_worker_killed(error: BaseException, workers: int, resume_note: str) -> LoaderWorkerKilled | None:
    """``error`` as a :class:`LoaderWorkerKilled` when it is torch's report of a worker that died
    (None otherwise); ``workers``: trainer.num_workers as resolved, ``resume_note``: what is saved."""
    match = _WORKER_DIED.search(str(error)) if isinstance(error, RuntimeError) else None
    if match is None:
        return None
    pids = match.group(1).strip()
    worker = f"data-loading workers (pids {pids})" if "," in pids else f"a data-loading worker (pid {pids})"
    signal_name = _SIGNAL_NAMES.get((match.group(2) or "").strip(), (match.group(2) or "").strip())
    if match.group(3) is not None:  # it exited itself: a crash of its own, not the memory's
        return LoaderWorkerKilled(f"{worker} exited with code {match.group(3)} (trainer.num_workers=0 runs the loading in "
                                  f"the training process, where its error shows); {resume_note}")  # fmt: skip
    if signal_name == "SIGBUS":
        cause = ("died of SIGBUS: shared memory (/dev/shm) ran out, most often (a container's default 64 MB: "
                 "docker run --shm-size=... or --ipc=host)")  # fmt: skip
    elif signal_name in ("", "SIGKILL"):
        cause = (f"{'was killed by SIGKILL from outside the run' if signal_name else 'ended unexpectedly'}: out of "
                 f"memory, most often (the kernel log, dmesg, says so); each of the {workers} workers holds its own "
                 "decoded images, so fewer (trainer.num_workers=N) or a smaller trainer.eval_batch_size need less")  # fmt: skip
    else:
        cause = f"died of {signal_name}"
    return LoaderWorkerKilled(f"{worker} {cause}; {resume_note}")


# strsignal's words (torch's report uses them) -> the signal's name.
def _signal_names() -> dict[str, str]:
    names = {}
    for sig in signal.Signals:
        try:
            text = signal.strsignal(sig)
        except ValueError:  # (Windows' CTRL_C_EVENT, 0, is out of strsignal's range)
            continue
        if text:
            names[text] = sig.name
    return names


_SIGNAL_NAMES = _signal_names()


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Workers ignore Ctrl-C and SIGTERM, which reach the whole process group: the training process
    then saves at the next step (engine/interrupt.py) and stops its workers itself. A worker killed
    by SIGTERM would instead make DataLoader fail the main process at once, before that save. (A
    worker is started with them held back, :func:`stop_signals_held`: one sent while it started is
    dropped here.)"""
    ignore_stop_signals()
    release_stop_signals()


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    first = items[0]
    # Labels travel as numpy arrays (pickled by value): a torch tensor from a worker travels as a
    # shared-memory file descriptor, which for a few bytes costs more than it saves.
    out: dict[str, Any] = {
        "targets": np.array([it["targets"] for it in items], dtype=np.int64),
        "indices": np.array([it["indices"] for it in items], dtype=np.int64),
        "slot": first["slot"],
        "count": len(items),
    }
    for name in VIEW_NAMES:
        if name in first:
            out[name] = _stack_views([it[name] for it in items])
    return out


class _BatchPlan:
    """The batch sampler: the current epoch's batches of keys, swapped by ``FileLoader.epoch``
    (persistent workers keep running; only the main process iterates this). With a ring of S
    shared buffers, batch number k (counted across epochs) goes to slot k % S, after
    ``before_reuse(slot)`` made sure the slot's previous batch has left it."""

    def __init__(self) -> None:
        self.indices = np.empty(0, dtype=np.int64)
        self.pairs: np.ndarray | None = None
        self.epoch = 0
        self.batch_size = 1
        self.first_step = 0
        self.num_batches = 0
        self.slots = 0
        self.dispatched = 0
        # A weak reference: the loader owns this plan, and a cycle would leave the loader (and its
        # DataLoader's workers) to the cyclic garbage collector, whose shutdown of them stalls.
        self.before_reuse: weakref.WeakMethod | None = None

    def __len__(self) -> int:
        return max(0, self.num_batches - self.first_step)

    def _wait(self, slot: int) -> None:
        # Not inlined in __iter__: a bound method kept in the suspended generator's frame would tie
        # the loader into a reference cycle again.
        wait = self.before_reuse() if self.before_reuse is not None else None
        if wait is not None:
            wait(slot)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.first_step, self.num_batches):
            chunk = slice(step * self.batch_size, (step + 1) * self.batch_size)
            index = self.indices[chunk].tolist()
            pair = self.pairs[chunk].tolist() if self.pairs is not None else [-1] * len(index)
            slot = -1
            if self.slots:
                slot = self.dispatched % self.slots
                self.dispatched += 1
                self._wait(slot)
            yield [(i, p, self.epoch, slot, position) for position, (i, p) in enumerate(zip(index, pair))]


class FileLoader:
    """Iterate ``loader.epoch(epoch, start_step)`` to get :class:`Batch` objects on the device."""

    def __init__(
        self,
        files: FileList,
        options: LoaderOptions,
        *,
        train: bool,
        transform: Callable[..., np.ndarray],
        mean: Sequence[float],
        std: Sequence[float],
        prefetch_factor: int = 2,
        decode: str = "cpu",
    ) -> None:
        self._owner_pid = os.getpid()  # __del__ does nothing in forked workers, which own none of this
        self._generation = 0  # counts epochs started and closes: an older epoch's generator stops
        if decode not in DECODE_MODES:
            raise DatasetError(f"dataset.decode must be one of {list(DECODE_MODES)}, got {decode!r}")
        if decode == "device" and not hasattr(transform, "plan"):
            raise DatasetError("decode=device needs a TrainTransform/EvalTransform (a transform with a crop plan)")
        if len(files) == 0:
            raise DatasetError(f"no images under {files.root} for the {'train' if train else 'val'} split")
        self.files = files
        self.options = options
        self.train = train
        self.normalize = Normalizer(mean, std)  # constants made once per device, not per batch
        self.batch_size = options.batch_size if train else options.eval_batch_size
        self.num_samples = len(files)
        self.two_views = train and options.two_views
        self.pairs = train and options.pairs
        self.decode = decode
        self.transform = transform
        self.dataset = _FileDataset(files, transform, train, options.seed, self.two_views, self.pairs, decode)
        self.prefetch_factor = prefetch_factor
        self._plan = _BatchPlan()
        self._loader: DataLoader | None = None
        self._ring: list[dict[str, Tensor]] | None = None
        self._registered: list[int] = []  # ring buffers page-locked with cudaHostRegister
        self._slot_events: dict[int, Any] = {}
        if self.pairs:
            self._partners = SameClassPartners(torch.from_numpy(files.targets), len(files.classes))
        # The ring is allocated now, not with the first batch: shared memory too small for it (a
        # container's 64 MB /dev/shm) is said before training, not at the first evaluation, an epoch in.
        workers = self._workers()
        if workers > 0 and self.decode == "cpu" and hasattr(self.transform, "size"):
            self._make_ring(workers)

    def _workers(self) -> int:
        return max(0, int(self.options.num_workers))

    # --- sharding (as TensorLoader) ---------------------------------------------------------
    def _shard_size(self) -> int:
        world, rank = self.options.world_size, self.options.rank
        if self.train:
            return self.num_samples // world
        return (rank + 1) * self.num_samples // world - rank * self.num_samples // world

    def __len__(self) -> int:
        shard = self._shard_size()
        if self.train:  # micro-batches of this process; an incomplete optimiser step is dropped (as TensorLoader)
            accumulate = self.options.accumulate_steps
            return shard // (self.batch_size * accumulate) * accumulate
        return (shard + self.batch_size - 1) // self.batch_size

    def shard_indices(self, epoch: int) -> tuple[np.ndarray, np.ndarray | None]:
        """This rank's dataset indices for ``epoch`` in batch order (and their CS-KD pairs)."""
        world, rank = self.options.world_size, self.options.rank
        if not self.train:
            start = rank * self.num_samples // world
            return np.arange(start, start + self._shard_size(), dtype=np.int64), None
        generator = torch.Generator().manual_seed(mix_seed(self.options.seed, epoch))
        order = torch.randperm(self.num_samples, generator=generator)
        pairs = None
        if self.pairs:
            # Another sample of the same class per position, drawn for the global order so it does
            # not depend on world_size.
            u = torch.rand(self.num_samples, generator=torch.Generator().manual_seed(mix_seed(self.options.seed, epoch, 1)))
            pairs = self._partners.draw(order, torch.from_numpy(self.files.targets)[order], u)
        usable = (self.num_samples // world) * world
        shard = order[:usable][rank::world].numpy()
        return shard, (pairs[:usable][rank::world].numpy() if pairs is not None else None)

    # --- the DataLoader ---------------------------------------------------------------------
    def _views(self) -> list[str]:
        return ["images"] + (["second_view"] if self.two_views else []) + (["pair_inputs"] if self.pairs else [])

    def _make_ring(self, workers: int) -> None:
        """Shared uint8 batch buffers, reused round-robin, for CPU decoding in worker processes.

        A DataLoader normally moves every batch through a fresh shared-memory segment and then
        copies it into pinned memory in the main process: page faults on both sides and a serial
        memcpy, which capped a 16-core H200 host at ~1,300 images/s whatever the worker count
        (experiments/loader_bench.md). Here workers write into buffers that exist (and are
        page-locked for the GPU when possible) once: only labels travel back."""
        slots = self.prefetch_factor * workers + 2  # batches in flight + the one being converted + 1
        size = int(self.transform.size)
        rows = min(self.batch_size, max(1, self._shard_size()))  # an eval batch is no larger than the shard
        try:
            self._ring = [
                {name: torch.empty((rows, size, size, 3), dtype=torch.uint8).share_memory_() for name in self._views()}
                for _ in range(slots)
            ]
        except RuntimeError as error:
            if "shared memory" not in str(error):
                raise
            raise DatasetError(self._ring_does_not_fit(slots, rows, size, workers)) from error
        if self.options.device.type == "cuda":
            self._page_lock_ring()
        self.dataset.ring = self._ring
        self._plan.slots = slots
        self._plan.before_reuse = weakref.WeakMethod(self._wait_slot)

    def _ring_does_not_fit(self, slots: int, rows: int, size: int, workers: int) -> str:
        views = len(self._views())
        need = slots * views * rows * size * size * 3
        batch_key = "trainer.batch_size" if self.train else "trainer.eval_batch_size"
        try:
            usage = shutil.disk_usage(SHARED_MEMORY_FOLDER)
            room = f"{SHARED_MEMORY_FOLDER} has {usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB"
        except OSError:
            room = "the system has less"
        return (
            f"the {'train' if self.train else 'val'} loader's batch buffers need {need / 2**20:.0f} MiB of shared memory "
            f"({slots} batches in flight, trainer.num_workers={workers} x {self.prefetch_factor} + 2, of "
            f"{f'{views} views x ' if views > 1 else ''}{rows} x {size} x {size} x 3 bytes) and {room}: give it more, enough for the "
            "train and val loaders of every training process on the machine (docker run --shm-size=<size> or "
            "--ipc=host; on Kubernetes an emptyDir of medium Memory mounted at /dev/shm), "
            f"or lower trainer.num_workers or {batch_key}"
        )

    def _page_lock_ring(self) -> None:
        """Page-lock the ring in place so each copy to the GPU is an asynchronous DMA (no pinned copy).
        If the driver refuses, say so once and go on with synchronous copies."""
        for buffers in self._ring or []:
            for buffer in buffers.values():
                error = page_lock(buffer)
                if error != CUDA_SUCCESS:
                    warnings.warn(
                        f"cudaHostRegister refused the loader's batch buffers ({cuda_error_text(error)}): "
                        "copies of batches to the GPU will be synchronous, which may slow training",
                        stacklevel=2,
                    )
                    return
                self._registered.append(buffer.data_ptr())

    def close(self) -> None:
        """Stop the worker processes now (they otherwise live as long as the loader). Keep loaders out
        of reference cycles: stopping workers from inside the cyclic garbage collector was seen to
        stall ~5 s per worker once shared buffers exist (hence the weak reference in the plan)."""
        self._generation += 1  # an unfinished epoch's batches are gone
        loader = getattr(self, "_loader", None)
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            workers = list(getattr(iterator, "_workers", []))
            try:
                iterator._shutdown_workers()
            except RuntimeError as error:
                # A worker that died (killed from outside) is reported by torch's SIGCHLD handler
                # again while the others stop: the run already stops on the first report.
                if _WORKER_DIED.search(str(error)) is None:
                    raise
            loader._iterator = None
            # torch ends a worker that does not stop in time with SIGTERM, which ours ignore (see
            # _leave_stop_signals_to_the_trainer): one stuck on a hung read would keep the process alive.
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)

    def __del__(self) -> None:
        if getattr(self, "_owner_pid", None) != os.getpid():
            return  # collected inside a forked worker: its workers and buffers belong to the parent
        self.close()
        for pointer in getattr(self, "_registered", []):
            try:
                page_unlock(pointer)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass

    def _wait_slot(self, slot: int) -> None:
        """Before a worker may overwrite ``slot``: its last batch's copies to the GPU are done."""
        event = self._slot_events.pop(slot, None)
        if event is not None:
            event.synchronize()

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self._workers()
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=self._plan,
                num_workers=workers,
                collate_fn=_collate,
                # The ring is page-locked already; device decoding reads the bytes on the host.
                pin_memory=self.options.device.type == "cuda" and self._ring is None and self.decode == "cpu",
                persistent_workers=workers > 0,
                prefetch_factor=self.prefetch_factor if workers > 0 else None,
                worker_init_fn=_leave_stop_signals_to_the_trainer,
                # Without a generator of its own, each new DataLoader iterator draws its workers'
                # base seed from torch's global RNG, which methods draw their own randomness from
                # (zipf_random_*, dropout): how often that happened (each epoch without workers,
                # once with persistent ones, again after a resume) changed a run's results with
                # trainer.num_workers. (The workers' own seeds drive nothing: the plan draws the
                # augmentation.)
                generator=torch.Generator().manual_seed(int(self.options.seed)),
            )
        return self._loader

    def _to_device(self, pixels: Tensor | dict[str, Any]) -> Tensor:
        """uint8 N x H x W x 3 (host), or a device-decode job -> normalised float N x 3 x H x W on the device."""
        if isinstance(pixels, dict):
            on_device = decode_on_device(pixels, self.options.device, self.transform)
        else:
            on_device = pixels.to(self.options.device, non_blocking=True).permute(0, 3, 1, 2)
        out = self.normalize(on_device)
        memory_format = torch.channels_last if self.options.channels_last else torch.contiguous_format
        return out.contiguous(memory_format=memory_format)

    def _resolve_ring(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Views the workers wrote into the ring become slices of its buffers (valid until the slot
        is reused, which _wait_slot/event recording in _batch guard)."""
        if raw.get("slot", -1) >= 0 and self._ring is not None:
            buffers = self._ring[raw["slot"]]
            for name in self._views():
                if raw.get(name) is None:
                    raw[name] = buffers[name][: raw["count"]]
        return raw

    def _batch(self, raw: dict[str, Any]) -> Batch:
        device = self.options.device
        batch = Batch(
            inputs=self._to_device(raw["images"]),
            targets=torch.from_numpy(raw["targets"]).to(device, non_blocking=True),
            indices=torch.from_numpy(raw["indices"]).to(device, non_blocking=True),
        )
        if "second_view" in raw:
            batch.second_view = self._to_device(raw["second_view"])
        if "pair_inputs" in raw:
            batch.pair_inputs = self._to_device(raw["pair_inputs"])
        if device.type == "cuda" and raw.get("slot", -1) >= 0:
            # The copies out of this ring slot are queued; the slot is reused only after they ran.
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._slot_events[raw["slot"]] = event
        return batch

    def raw_batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """The host-side batches (uint8 N x H x W x 3 images, labels, indices) of ``epoch`` from
        ``start_step``: what the workers deliver, before the device copy. Images written into the
        shared ring are only valid until the next batch is requested."""
        indices, pairs = self.shard_indices(epoch)
        plan = self._plan
        plan.indices, plan.pairs, plan.epoch = indices, pairs, epoch
        plan.batch_size, plan.num_batches, plan.first_step = self.batch_size, len(self), min(start_step, len(self))
        # One DataLoader iterator serves every epoch: an older epoch's generator must not go on
        # reading it (it would take the new epoch's batches, or ring slots already rewritten).
        self._generation += 1
        return self._batches_of_generation(self._generation, epoch)

    def _batches_of_generation(self, generation: int, epoch: int) -> Iterator[dict[str, Any]]:
        starting_workers = stop_signals_held() if self._workers() > 0 else contextlib.nullcontext()
        with starting_workers:  # (held while the workers start: they ignore the signals from then on)
            iterator = iter(self._dataloader())
        while True:
            if generation != self._generation:  # checked before taking a batch that is not ours
                raise RuntimeError(
                    f"the batches of epoch {epoch} were requested after the loader started another epoch "
                    "or was closed; iterate one epoch at a time"
                )
            try:
                raw = next(iterator)
            except StopIteration:
                return
            except BaseException as error:
                # A worker's error (e.g. an undecodable file) ends the epoch: stop the workers now, so
                # a loader kept alive by the error's traceback is not shut down later from inside
                # another loader's forked workers.
                self.close()
                # DataLoader re-raises a worker's DatasetError with the worker's whole traceback as its
                # message; the user sees the original message (the traceback stays in __cause__).
                if isinstance(error, DatasetError) and original_message(error) != str(error):
                    raise DatasetError(original_message(error)) from error
                raise
            yield self._resolve_ring(raw)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        raw = self.raw_batches(epoch, start_step)
        if self.options.device.type != "cuda":
            for item in raw:
                yield self._batch(item)
            return
        yield from self._prefetched(raw)

    def _prefetched(self, raw: Iterator[dict[str, Tensor]]) -> Iterator[Batch]:
        """Copy + normalise batch k+1 on a side stream while the caller computes on batch k."""
        stream = torch.cuda.Stream(device=self.options.device)
        pending: Batch | None = None
        for item in raw:
            with torch.cuda.stream(stream):
                upcoming = self._batch(item)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.options.device).wait_stream(stream)
            for tensor in (upcoming.inputs, upcoming.targets, upcoming.indices, upcoming.second_view, upcoming.pair_inputs):
                if tensor is not None:
                    # Memory allocated on the side stream is used on the main stream from here on.
                    tensor.record_stream(torch.cuda.current_stream(self.options.device))
            pending = upcoming
        if pending is not None:
            yield pending
