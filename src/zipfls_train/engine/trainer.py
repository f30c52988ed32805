"""The training loop. It knows devices, precision, DDP, schedules, checkpoints and logging; it knows
nothing about methods beyond :class:`zipfls_train.losses.base.Method`'s interface."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from ..data import DataBundle, LoaderOptions, build_data
from ..data.bundle import configured_num_classes
from ..data.file_loader import loader_worker_killed
from ..data.images import DatasetError
from ..errors import original_message
from ..initial_weights import InitialWeights, InitialWeightsError, apply_initial_weights
from ..losses import Method, build_method
from ..losses.base import check_terms
from ..models import build_model, check_trains_on
from ..models.cpu_layout import avoid_the_strided_1x1_bug
from .checkpoint import (
    CheckpointError, capture_rng_state, load_checkpoint, rank_rng_state, remove_stale_temporaries, restore_rng_state,
    resume_note, save_atomic, seed_rngs, write_text_atomically,
)
from .config_checks import ConfigError, compile_mode, loader_workers
from .distributed import (
    DistContext, all_reduce_sum, barrier, broadcast_buffers, gather_objects, processes_on_this_node, wrap_ddp,
)
from .folder_lock import RunFolderBusy, RunFolderLock
from .interrupt import StopRequests, StopVotes, TrainingInterrupted
from .memory import peak_cpu_memory_mb, peak_gpu_memory_mb, reset_peak_memory
from .metrics import RunRecords, TermAccumulator, read_metrics, topk_correct
from .optim import build_optimizer, build_scheduler, freeze_backbone_at_factor_zero, parameter_groups
from .precision import precision_history, precision_name, resolve_precision
from .provenance import record_attempt
from .resume import (
    RESUMABLE_KEYS, ResumeError, absolute_root, check_same_config, check_same_data, refuse_to_overwrite_results,
    report_finished, warn_if_precision_changed,
)
from .run_folder import not_writable, set_aside_earlier_attempt

class NonFiniteLossError(RuntimeError):
    """Raised when a loss term, or the model's weights, become NaN/inf; the last good checkpoint is
    left in place."""


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # optimiser steps done in the current epoch (mid-epoch checkpoints)
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0
    # Seconds the current epoch's steps took before its last mid-epoch save: a resumed epoch's
    # epoch_time_s adds them, so it is the whole epoch's, not the part after the restart.
    epoch_train_s: float = 0.0
    # Steps of the current epoch whose update GradScaler skipped (fp16: inf/NaN gradients), as of the
    # last save; the epoch's record says how many (``amp_skipped_steps``).
    epoch_skipped_steps: int = 0


def per_process_batch(global_batch: int, world_size: int, accumulate_steps: int) -> int:
    """trainer.batch_size is the global batch of one optimiser step (the paper's 128 or 256, whatever
    the number of GPUs); each process loads global / (world_size * accumulate_steps) per micro-step."""
    parts = world_size * accumulate_steps
    if global_batch % parts:
        raise ConfigError(
            f"trainer.batch_size={global_batch} (the global batch) is not divisible by "
            f"{world_size} process(es) x trainer.accumulate_steps={accumulate_steps}"
        )
    return global_batch // parts


def placed_model(name: str, num_classes: int, device: torch.device, channels_last: bool, **options: Any) -> nn.Module:
    """``build_model(name, num_classes, **options)`` on ``device``, in the channels_last layout if asked."""
    model = build_model(name, num_classes, **options).to(device)
    if not channels_last:
        return model
    model = model.to(memory_format=torch.channels_last)
    if device.type == "cpu":
        avoid_the_strided_1x1_bug(model)  # (a oneDNN crash; see models/cpu_layout.py)
    return model


class Trainer:
    """One run: built from the composed config, trained by :meth:`fit` into ``run_dir``.

    Reading order: :meth:`fit` (lock, resume, epochs) -> :meth:`_train_epoch` (steps, logging,
    evaluation, the epoch's record and checkpoint) -> :meth:`train_step` (one optimiser step: the
    method's ``training_step``, backward, the optimiser and lr schedule). The trainer reaches the
    method only through ``needs`` and ``setup`` (in ``__init__``), ``on_epoch_start``,
    ``training_step``, ``after_backward`` and its state dict. Resume checks are in :mod:`.resume`,
    precision in :mod:`.precision`."""

    def __init__(self, cfg: DictConfig, ctx: DistContext, run_dir: Path) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.run_dir = run_dir
        self.device = ctx.device
        reset_peak_memory(self.device)  # before the data and model are built: their memory is this run's
        tcfg = cfg.trainer
        self.epochs = int(tcfg.epochs)
        self.autocast_dtype = resolve_precision(str(tcfg.precision), self.device)
        # On every device: cuDNN's and oneDNN's convolutions both run faster on NHWC (eager CPU steps
        # took 0.74-0.95x the NCHW time for every model family measured: experiments/cpu_speed.md).
        self.channels_last = bool(tcfg.channels_last)
        deterministic = bool(tcfg.deterministic)
        # Process-wide: set either way, or one deterministic run would leave the rest of its sweep so.
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        # cuDNN times its convolution algorithms once per shape and keeps the fastest (a run's shapes
        # are fixed: the recipe's batch and image size); a deterministic run must not pick by timing.
        torch.backends.cudnn.benchmark = not deterministic
        seed_rngs(int(cfg.seed) + ctx.rank)

        num_classes = int(configured_num_classes(cfg.dataset))
        self.method: Method = build_method(OmegaConf.to_container(cfg.loss, resolve=True), num_classes, int(tcfg.batch_size))
        needs = self.method.needs
        micro_batch = per_process_batch(int(tcfg.batch_size), ctx.world_size, int(tcfg.accumulate_steps))
        self.num_workers = loader_workers(tcfg.num_workers, processes_on_this_node(ctx.world_size))
        self.data: DataBundle = build_data(
            OmegaConf.to_container(cfg.dataset, resolve=True),
            LoaderOptions(
                batch_size=micro_batch,
                eval_batch_size=int(tcfg.eval_batch_size),
                device=self.device,
                seed=int(cfg.seed),
                rank=ctx.rank,
                world_size=ctx.world_size,
                pairs=needs.pairs,
                two_views=needs.two_views,
                channels_last=self.channels_last,
                data_device=torch.device("cpu") if tcfg.data_on == "cpu" else None,
                num_workers=self.num_workers,
                accumulate_steps=int(tcfg.accumulate_steps),
            ),
        )
        for key, value in self.data.resolved.items():  # e.g. dataset.format=auto -> tree | pack, as recorded
            cfg.dataset[key] = value
        if len(self.data.train) == 0:
            raise ConfigError(
                f"trainer.batch_size={tcfg.batch_size} is larger than the {self.data.train_size} training "
                "images: no full batch per epoch; lower trainer.batch_size or use more images"
            )
        model_options = OmegaConf.to_container(cfg.model.get("options", {}), resolve=True) or {}
        # Fresh models (BAN's teacher) placed as the run's own. A partial, not a lambda over self:
        # no reference cycle keeps the trainer (and its DDP reducer) alive past the process group's teardown.
        self.build_fresh_model = functools.partial(
            placed_model, str(cfg.model.name), self.data.num_classes, self.device, self.channels_last, **model_options
        )
        self._check_model_trains_on_the_data(needs, model_options, micro_batch)
        model = self.build_fresh_model(aux_stages=needs.aux_stages, aux_head=needs.aux_head)
        self.method.to(self.device)
        self.method.setup(num_classes=self.data.num_classes, dataset_size=self.data.train_size, model_factory=self.build_fresh_model)
        self.model: nn.Module = model
        freeze_backbone_at_factor_zero(model, cfg.optim.get("backbone_lr_factor"))  # (before DDP registers its parameters)
        self.train_model: nn.Module = self._wrap_for_training(model)
        self.step_fn = self.method.training_step  # (model, batch) -> loss terms; compiled on request
        self._compile_step()

        self.accumulate = int(tcfg.accumulate_steps)
        self.steps_per_epoch = self._steps_per_epoch()
        parameters = parameter_groups(model, self.method.parameters(), cfg.optim.get("backbone_lr_factor"))
        self.optimizer = build_optimizer(cfg.optim, parameters, int(tcfg.batch_size), self.device)
        self.scheduler = build_scheduler(cfg.sched, self.optimizer, self.epochs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        # The current epoch's skipped updates, counted on the device (no host sync per step: on CUDA the
        # fused SGD skips inside its kernel, GradScaler never learning it on the host).
        self._skipped_steps = torch.zeros((), dtype=torch.int64, device=self.device)
        self.progress = Progress()
        self.running = TermAccumulator()
        # The run's first step checks what the method returns and is timed apart (see _train_epoch).
        self._took_first_step = False
        self._stops = StopRequests(announce=ctx.is_main)  # listening only while fit() runs
        self._stop_votes = StopVotes(
            self._stops, distributed=ctx.enabled, device=self.device, world_size=ctx.world_size,
            log_every=int(tcfg.log_every), within_s=float(tcfg.stop_check_s),
        )

    # --- set-up helpers -----------------------------------------------------------------------
    def _check_model_trains_on_the_data(self, needs, model_options: dict[str, Any], batch: int) -> None:  # noqa: ANN001
        """A model too deep for the image size, or BatchNorm given one image per process on a 1 x 1
        map (``batch``: images per process and step), fails at its first step with torch's
        traceback; say so before the run starts. A dense map the method reads that is 1 x 1 (an
        ImageNet model on 32 px images) trains, but gives it one pixel per image: warned."""
        tcfg = self.cfg.trainer
        size = int(self.cfg.dataset.image_size)
        try:
            sizes = check_trains_on(str(self.cfg.model.name), self.data.num_classes, size, batch, feature_stages=needs.feature_stages,
                                    aux_stages=needs.aux_stages, aux_head=needs.aux_head, **model_options)  # fmt: skip
        except ValueError as error:
            raise ConfigError(
                f"model={self.cfg.model.name} cannot train on dataset.image_size={size} with {batch} image(s) per "
                f"process and step (trainer.batch_size={tcfg.batch_size} over {self.ctx.world_size} process(es) x "
                f"trainer.accumulate_steps={tcfg.accumulate_steps}): {error}. Use larger images or more per process."
            ) from error
        single_pixel = [stage for stage, hw in sizes.items() if hw == (1, 1)]
        if single_pixel and self.ctx.is_main:
            warnings.warn(
                f"loss={self.cfg.loss.name} reads the dense {' and '.join(single_pixel)} map(s) of model={self.cfg.model.name}, "
                f"1 x 1 at dataset.image_size={size}: one pixel per image (Zipf's LS: one vote, so its soft label "
                "ranks no other class); a model made for this size (cifar_resnet18 at 32 px) or larger images fit",
                UserWarning,
                stacklevel=2,
            )

    def _wrap_for_training(self, model: nn.Module) -> nn.Module:
        return wrap_ddp(model, self.device, bool(self.cfg.trainer.sync_batchnorm)) if self.ctx.enabled else model

    def _compile_step(self) -> None:
        """trainer.compile: one compiled graph for the model's forward and the method's loss (on
        CUDA Zipf's fused kernel sits in it as one custom op; the other methods' small operations
        fuse); "reduce-overhead" also captures CUDA graphs, for the launch-bound small-batch regime.
        Under DDP the DDP module itself is compiled, the documented path for its gradient hooks, and
        the loss runs eagerly (the fused kernel still is one launch there)."""
        mode = compile_mode(self.cfg.trainer.compile, self.device, self.ctx.enabled)
        if mode is None:
            return
        # Dynamo caches compiled code per Python function, and every run of a Hydra sweep (one
        # process) compiles the same training_step: each later run was a recompilation of the
        # earlier ones, a run of other shapes was compiled with dynamic shapes (slower kernels), and
        # past the recompile limit (8) the rest of the sweep silently ran eagerly. Measured on an
        # H100: a ResNet-50 compiled after four small models took 164 s, dynamic. A run starts from
        # empty caches instead (this also frees the previous run's CUDA-graph memory pool; another
        # compiled Trainer still in use in this process compiles again at its next step).
        torch._dynamo.reset()
        if self.device.type == "cpu":
            # Inductor's C++ build imports torch.utils.cpp_extension, which logs "No CUDA runtime is
            # found, using CUDA_HOME=..." on a machine with a CUDA toolkit but no GPU: nothing to act on.
            logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        options = {} if mode == "default" else {"mode": mode}
        if self.ctx.enabled:
            self.train_model = torch.compile(self.train_model, **options)
        else:
            self.step_fn = torch.compile(self.method.training_step, **options)

    def _steps_per_epoch(self) -> int:
        batches = len(self.data.train)
        limit = self.cfg.trainer.get("max_steps_per_epoch")  # validate_config: null or >= 1
        if limit is not None:
            batches = min(batches, int(limit) * self.accumulate)
        return max(1, batches // self.accumulate)

    def _wait_for_device(self) -> None:
        """Until the device has run what was queued (for timings; a no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        with self._run_folder_lock():
            return self._fit()

    @contextlib.contextmanager
    def _run_folder_lock(self) -> Iterator[None]:
        """Rank 0 holds the run folder's lock while the run trains (:mod:`.folder_lock`); every rank
        learns whether it got it, so that all stop together when another process holds it. Then the
        temporary files of saves a kill cut short (as large as a checkpoint each) are removed."""
        with contextlib.ExitStack() as stack:
            refusal = None
            if self.ctx.is_main:
                try:
                    stack.enter_context(RunFolderLock(self.run_dir))
                except RunFolderBusy as error:
                    refusal = str(error)
            if self.ctx.enabled:
                refusal = gather_objects(refusal)[0]
            if refusal is not None:
                raise RunFolderBusy(refusal)
            if self.ctx.is_main:
                for folder in (self.run_dir, self.checkpoint_dir):
                    remove_stale_temporaries(folder)
            yield

    def _fit(self) -> dict[str, Any]:
        state = self.maybe_resume()
        if state == "finished":
            return self._already_finished()
        resumed = state == "resumed"
        initial = None if resumed else self._start_from_initial_weights()
        if self.ctx.is_main:
            # Only once the resume check has passed: a refused rerun leaves the folder as it was.
            self._prepare_run_folder(resumed, initial)
        records = RunRecords(self.run_dir, self.progress.epoch, self.progress.global_step, enabled=self.ctx.is_main)
        if self.ctx.is_main:
            print(f"[zipfls-train] run {self._resumed_at() if resumed else 'started'}: {self.run_dir} "
                  f"({self.device.type}, {self.precision})", flush=True)
        try:
            with self._stops:
                while self.progress.epoch < self.epochs:
                    if self._stop_votes.now():  # last.pt is this epoch boundary
                        raise TrainingInterrupted(self._interrupted_message(saved=self.progress.global_step > 0))
                    self._train_epoch(records)
            summary = self._summary_of_finished_run()
            summary["zipf_alpha"] = self._zipf_fit_at_end(records)
        except DatasetError as error:
            if self.ctx.enabled:  # (the other ranks wait in a collective: no save together)
                raise
            raise DatasetError(self._saved_after_data_error(error)) from error
        except RuntimeError as error:
            # No save here: torch reports a dead worker wherever the main process is, mid-step too,
            # where a checkpoint would not be the state of a whole step. (Out of memory: run.py.)
            killed = loader_worker_killed(error, self.num_workers, resume_note(self.run_dir))
            if killed is None:
                raise
            try:
                self._close_loaders()  # now: another dead worker's report could otherwise come in its place
            finally:
                raise killed from error
        finally:
            # Closing TensorBoard's writer fails too when the disk is full or the folder went read-only:
            # then the error that stopped the run is the one to report, not the writer's.
            with contextlib.suppress(OSError) if sys.exc_info()[1] is not None else contextlib.nullcontext():
                records.close()
            self._close_loaders()
        if self.ctx.is_main:
            write_text_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    def _train_epoch(self, records: RunRecords) -> None:
        epoch = self.progress.epoch
        self.method.on_epoch_start(epoch, self.epochs)
        self.train_model.train()
        start_step = self.progress.step_in_epoch
        epoch_lr = self._lr_at(epoch * self.steps_per_epoch)  # the epoch's first step's (recorded below)
        if start_step == 0:
            self.running = TermAccumulator()
            self.progress.epoch_skipped_steps = 0
        self._skipped_steps.fill_(self.progress.epoch_skipped_steps)  # (a resumed epoch's count so far)
        started = self._epoch_started = time.perf_counter()
        batches = self.data.train.epoch(epoch, start_step=start_step * self.accumulate)
        # On a terminal a progress bar; in a log file (a cluster job's) a line at every log step instead
        # of the bar's carriage-return updates, which make one line of megabytes per epoch there.
        progress_shown = self.ctx.is_main and bool(self.cfg.trainer.progress_bar)
        on_terminal = sys.stderr.isatty()
        bar = tqdm(
            total=self.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not (progress_shown and on_terminal), leave=False, dynamic_ncols=True,
        )
        log_every = max(1, int(self.cfg.trainer.log_every))
        self._stop_votes.restart_timing(self.progress.global_step)
        first_step_s, timed_from, timed_from_step = None, started, start_step  # images/s: from here
        for step in range(start_step, self.steps_per_epoch):
            step_lr = self.optimizer.param_groups[0]["lr"]  # the lr this step applies
            first_of_run = not self._took_first_step
            terms = self.train_step(batches)
            if first_of_run:
                # The run's first step also starts the loader, compiles the step (trainer.compile),
                # tunes cuDNN and captures CUDA graphs: seconds no later step takes (a compiled
                # TinyImageNet epoch on a GPU takes less). Timed apart, with one device sync per
                # run, and left out of the epoch's images/s.
                self._wait_for_device()
                timed_from, timed_from_step = time.perf_counter(), step + 1
                first_step_s = timed_from - started
            self.running.add(terms)
            self.progress.step_in_epoch = step + 1
            self.progress.global_step += 1
            bar.update(1)
            if self.progress.global_step % log_every == 0 or step + 1 == self.steps_per_epoch:
                means = self._finite_means(self.running.window, self._window_start())  # the step loop's only host sync in one process (DDP adds StopVotes' few-second votes)
                records.scalars("train", {**means, "lr": step_lr}, self.progress.global_step)
                bar.set_postfix(loss=f"{means['loss']:.4f}")
                if progress_shown and not on_terminal:
                    print(f"epoch {epoch + 1}/{self.epochs}  step {step + 1}/{self.steps_per_epoch}  loss {means['loss']:.4f}  "
                          f"lr {step_lr:.4g}", flush=True)  # fmt: skip
                self.running.restart_window()
            window_start = self._window_start()
            # Single process: a stop request is a Python flag, checked every step. DDP: the ranks vote
            # at the log steps and every few seconds (StopVotes).
            logged = window_start == self.progress.global_step
            if self._stop_votes.at_step(self.progress.global_step, logged):
                self.save(check_finite_since=window_start)
                # No rank leaves before rank 0 has written last.pt: the launcher stops the others
                # as soon as one exits (torch's spawn and torchrun alike).
                barrier()
                raise TrainingInterrupted(self._interrupted_message())
            every = int(self.cfg.trainer.checkpoint_every_steps)
            if every and self.progress.global_step % every == 0 and step + 1 < self.steps_per_epoch:
                self.save(check_finite_since=window_start)
        bar.close()
        train_means = self.running.means(across_ranks=True)  # the running sums stay rank-local until the next save
        timed = start_step < self.steps_per_epoch  # not an epoch resumed after its last step (a stop there)
        self._wait_for_device()
        ended = time.perf_counter()
        timed_images = (self.steps_per_epoch - timed_from_step) * int(self.cfg.trainer.batch_size)
        self._check_finite_weights()  # before a non-finite model is scored (and maybe kept as best.pt)
        scores = self.evaluate(stoppable=True)
        if scores is None:  # a stop request during the evaluation: keep the trained epoch, evaluate it on resume
            self.save(weights_checked=True)  # (the epoch's last step was logged, and so checked)
            raise TrainingInterrupted(self._interrupted_message() + " (and evaluate this epoch, whose evaluation was cut short)")
        top1, top5, val_images = scores
        epoch_train_s = self.progress.epoch_train_s
        skipped = int(self._skipped_steps) if self.scaler.is_enabled() else 0  # (one sync per epoch)
        self.progress.epoch += 1
        self.progress.step_in_epoch = 0
        self.progress.epoch_train_s = 0.0
        improved = top1 > self.progress.best_top1
        if improved:
            self.progress.best_top1, self.progress.best_epoch = top1, self.progress.epoch
        record = {
            "epoch": self.progress.epoch,
            **{f"train_{name}": value for name, value in train_means.items()},
            "val_top1": top1,
            "val_top5": top5,
            "val_images": val_images,  # scored over all ranks: the val set's size, each image once
            "best_val_top1": self.progress.best_top1,
            "lr": epoch_lr,
            "precision": self.precision,  # what trainer.precision=auto chose (per epoch: a resumed run may change)
            "eval_precision": self.eval_precision,  # what val_top1/val_top5 were scored in
            # fp16: the epoch's steps whose update GradScaler skipped (inf/NaN gradients; the lr schedule moved on)
            **({"amp_skipped_steps": skipped} if self.scaler.is_enabled() else {}),
            # the epoch's training time, its part before a restart included (evaluation left out)
            "epoch_time_s": epoch_train_s + ended - self._epoch_started if timed else None,
            # training images/s of this process's steps, the run's first step left out (first_step_s)
            "images_per_s": timed_images / (ended - timed_from) if timed_images > 0 else None,
            **({} if first_step_s is None else {"first_step_s": first_step_s}),
            "peak_gpu_mem_mb": peak_gpu_memory_mb(self.device),
            "peak_cpu_mem_mb": peak_cpu_memory_mb(),
        }
        # The metrics line first, then the checkpoint: a kill in between leaves a line for an epoch the
        # checkpoint does not hold, which the resumed run drops and writes again (RunRecords).
        records.epoch(record, self.progress.global_step)
        self._skipped_steps.zero_()
        if skipped and self.ctx.is_main:
            warnings.warn(
                f"epoch {self.progress.epoch}/{self.epochs}: GradScaler skipped the update of {skipped} of its "
                f"{self.steps_per_epoch} steps (inf/NaN gradients in fp16; loss scale now {self.scaler.get_scale():g})"
                + (": the weights did not change this epoch" if skipped >= self.steps_per_epoch else ""),
                RuntimeWarning, stacklevel=2,
            )
        if improved:
            self.save_best()
        self.save(weights_checked=True)
        if self.ctx.is_main:
            tqdm.write(
                f"epoch {self.progress.epoch}/{self.epochs}  loss {train_means.get('loss', float('nan')):.4f}  "
                f"train top-1 {train_means.get('top1', float('nan')):.2f}%  "
                f"val top-1 {top1:.2f}%  top-5 {top5:.2f}%  best {self.progress.best_top1:.2f}%  "
                + ("img/s n/a" if record["images_per_s"] is None else f"{record['images_per_s']:.0f} img/s")
                + ("" if first_step_s is None else f" (first step {first_step_s:.1f} s)")
            )

    def train_step(self, batches) -> dict[str, torch.Tensor]:  # noqa: ANN001
        """One optimiser step (over ``accumulate_steps`` micro-batches drawn from ``batches``); returns
        the loss terms as device tensors (no host sync): the step's own, or the micro-batches' mean."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(self.accumulate):
            last = micro == self.accumulate - 1
            sync = contextlib.nullcontext() if last or not self.ctx.enabled else self.train_model.no_sync()
            with sync:
                with self._autocast():
                    terms = self.step_fn(self.train_model, next(batches))
                if not self._took_first_step:  # what the method returns, checked once
                    check_terms(terms, str(self.cfg.loss.name))
                loss = terms["loss"] if self.accumulate == 1 else terms["loss"] / self.accumulate
                self.scaler.scale(loss).backward()
                self.method.after_backward()  # state updates, outside the compiled step (PS-KD's memory)
            if self.accumulate == 1:  # the common case: no kernels spent combining micro-batches
                totals = terms
                continue
            for name, value in terms.items():
                value = value.detach() / self.accumulate
                totals[name] = totals[name] + value if name in totals else value
        self._optimizer_update()
        self._took_first_step = True
        return totals

    def _optimizer_update(self) -> None:
        # The schedule steps at every step, its update skipped by fp16's GradScaler or not: it is
        # indexed by the epoch (the recipe's per-epoch MultiStepLR), so milestones stay at their epochs.
        if not self.scaler.is_enabled():
            self.optimizer.step()
            self.scheduler.step()
            return
        scale = self.scaler._scale.clone()  # (GradScaler's device tensor: get_scale() would sync)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._skipped_steps += self.scaler._scale < scale  # it backs off exactly when it skipped the update
        # After a skipped first update torch warns that the schedule skips its first value: not this
        # one, whose lr is a function of the step count (the epoch's record names the skipped steps).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
            self.scheduler.step()

    def _lr_at(self, global_step: int) -> float:
        """The first parameter group's lr at an optimiser step, from the schedule itself (whatever
        step the scheduler is at now, e.g. mid-epoch after a resume)."""
        return self.scheduler.base_lrs[0] * self.scheduler.lr_lambdas[0](global_step)

    def _window_start(self) -> int:
        """The global step of the last log (the window's mark): the steps after it are not yet checked."""
        return self.progress.global_step - self.running.steps_in_window

    def _finite_means(self, window: tuple, window_start: int, across_ranks: bool = True) -> dict[str, float]:
        """Means of the terms since the last log (``window``, a mark of the running sums) over every
        rank's steps, or a NonFiniteLossError where one is NaN/inf (TensorBoard's train/* curve is the global batch's, as the epoch's record; and
        a NaN/inf on one rank stops all of them at the same step); a NaN/inf stays in the running
        sums once there, so the first log after it stops the run. ``across_ranks=False`` where the
        sums were just averaged over the ranks (a save): the same means, one collective fewer."""
        means = self.running.means(since=window, across_ranks=across_ranks)
        bad = {name: value for name, value in means.items() if not math.isfinite(value)}
        if bad:
            last = self.checkpoint_dir / "last.pt"
            raise NonFiniteLossError(
                f"non-finite loss at global step {window_start + 1}"
                + (f"..{self.progress.global_step}" if self.progress.global_step > window_start + 1 else "")
                + f" (epoch {self.progress.epoch + 1}): "
                + ", ".join(f"{k}={v}" for k, v in means.items())
                + f". Stopped; the last good checkpoint is {last if last.exists() else '(none written yet)'}."
                + (" Set trainer.log_every=1 to pin the exact step." if int(self.cfg.trainer.log_every) > 1 else "")
            )
        return means

    def _check_finite_weights(self) -> None:
        """The loss terms are checked at every log, but a step whose loss was finite can still leave
        the weights NaN/inf (an update that overflowed: an lr far too large). Checked before each
        evaluation and save (one host sync each): a non-finite model is never scored, kept as best.pt or
        saved as last.pt. The ranks decide together (their BatchNorm statistics are their own until the
        next forward), so that all stop, none waiting for the others in a collective."""
        tensors = [t for t in itertools.chain(self.model.parameters(), self.model.buffers()) if t.is_floating_point()]
        if not tensors:
            return
        bad = all_reduce_sum(torch.stack([torch.isfinite(t).all() for t in tensors]).all().logical_not().float())
        if not bool(bad):
            return
        last = self.checkpoint_dir / "last.pt"
        raise NonFiniteLossError(
            f"non-finite model weights after global step {self.progress.global_step} ({self._position()}), though "
            "the logged loss terms were finite: an update overflowed (an lr far too large, say). Stopped; the last "
            f"good checkpoint is {last if last.exists() else '(none written yet)'}."
        )

    @torch.no_grad()
    def evaluate(self, stoppable: bool = False) -> tuple[float, float, int] | None:
        """Top-1/top-5 (%) over the whole val set, and how many images were scored: each rank
        scores its own unpadded shard and the counts are summed, so every image is counted exactly
        once. Every rank first takes rank 0's buffers (BatchNorm running statistics: DDP sends them
        at the start of each training forward, and the last forward then moved each rank's own
        way), so the score is that of the weights rank 0 saves. ``stoppable``: None at once on a stop
        request (one process; an ImageNet evaluation can outlast a cluster's grace period; under DDP
        the ranks' shards differ in length, so they could not agree on a batch to stop at)."""
        model = self.model
        broadcast_buffers(model)
        model.eval()
        counts = torch.zeros(4, dtype=torch.float64, device=self.device)  # top-1, top-5, images, non-finite
        for batch in self.data.val.epoch(0):
            if stoppable and not self.ctx.enabled and self._stops.signal_name is not None:
                model.train()
                return None
            with self._eval_autocast():
                logits = model(batch.inputs).logits.float()
            counts[:2] += topk_correct(logits, batch.targets)  # (a sample with a non-finite logit is a miss)
            counts[2] += batch.size
            counts[3] += (~torch.isfinite(logits).all(dim=1)).sum()
        all_reduce_sum(counts)
        correct1, correct5, total, non_finite = counts.tolist()
        model.train()
        if non_finite:
            warnings.warn(f"{int(non_finite)} of {int(total)} val images got a NaN or infinite logit "
                          f"({self._position()}, evaluated in {self.eval_precision}); each is scored a miss", RuntimeWarning, stacklevel=2)
        return 100.0 * correct1 / max(total, 1.0), 100.0 * correct5 / max(total, 1.0), int(total)

    @property
    def eval_precision(self) -> str:
        """fp32 | bf16 | fp16: what evaluation scores the model in (trainer.eval_precision)."""
        return "fp32" if str(self.cfg.trainer.eval_precision) == "fp32" else self.precision

    def _eval_autocast(self) -> contextlib.AbstractContextManager:
        if self.eval_precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        return self._autocast()

    # --- checkpoints --------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """fp32 | bf16 | fp16: what the run trains in (trainer.precision, ``auto`` resolved)."""
        return precision_name(self.autocast_dtype)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "progress": asdict(self.progress),
            "running": self.running.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "precision": self.precision,  # what auto resolved to (per machine)
            "data": self.data.identity(),
        }

    def save(self, name: str = "last.pt", check_finite_since: int | None = None, weights_checked: bool = False) -> None:
        """Called by every rank; rank 0 writes. The epoch's running loss sums are first averaged over
        ranks (every rank then continues from that mean), so the one copy in the checkpoint is valid
        for all ranks on resume and the epoch's logged mean is unchanged. Every rank's random state
        is kept (a rank resumes with its own). ``check_finite_since``: the first global step not yet
        checked for a NaN/inf loss; checked on the averaged sums (the same on every rank) before
        anything is written, so a non-finite step never reaches ``last.pt``; so are the weights, unless
        ``weights_checked`` (since the last step: the epoch's evaluation checked them)."""
        self.running.all_reduce_mean()
        self.progress.epoch_skipped_steps = int(self._skipped_steps)
        if 0 < self.progress.step_in_epoch < self.steps_per_epoch:  # mid-epoch: the time its steps took so far
            self.progress.epoch_train_s += time.perf_counter() - self._epoch_started
            self._epoch_started = time.perf_counter()
        if check_finite_since is not None:
            self._finite_means((None, 0), check_finite_since, across_ranks=False)  # (averaged just above)
        if not weights_checked:
            self._check_finite_weights()  # (after the loss terms: a NaN loss is named as such)
        rng = gather_objects(capture_rng_state(self.device))
        if self.ctx.is_main:
            save_atomic({**self.state_dict(), "rng": rng}, self.checkpoint_dir / name)

    def save_best(self) -> None:
        if self.ctx.is_main:
            state = {
                "model": self.model.state_dict(),
                "epoch": self.progress.epoch,
                "val_top1": self.progress.best_top1,
                "config": OmegaConf.to_container(self.cfg, resolve=True),
            }
            save_atomic(state, self.checkpoint_dir / "best.pt")

    def _check_ranks_see_one_folder(self) -> None:
        """Every rank decides alone whether to resume, so all must see the same run folder: on
        several nodes it has to be on a filesystem they share (only rank 0 writes into it). Ranks
        that disagree would train different things and hang in a collective; stop instead."""
        if not self.ctx.enabled:
            return
        seen = ((self.checkpoint_dir / "last.pt").is_file(), (self.run_dir / "summary.json").is_file())
        views = gather_objects(seen)
        if any(view != views[0] for view in views):
            raise ResumeError(
                f"the ranks see different contents in {self.run_dir} (checkpoint, summary per rank: {views}): "
                "with several nodes the run folder must be on a filesystem every node shares "
                "(run from a shared directory, or set hydra.run.dir to one)"
            )

    def maybe_resume(self) -> str:
        """Returns "resumed" (from last.pt), "finished" (a finished run: from last.pt, or its
        summary.json alone when last.pt was deleted, e.g. to save disk) or "fresh"."""
        mode = str(self.cfg.trainer.resume)
        path = self.checkpoint_dir / "last.pt"
        if mode not in ("auto", "never", "must"):
            raise ConfigError(f"trainer.resume must be auto, never or must, got {mode!r}")
        self._check_ranks_see_one_folder()
        if mode == "never":
            return "fresh"
        if mode == "auto" and not path.exists():
            config = self.run_dir / "config.yaml"
            summary = self.run_dir / "summary.json"
            if summary.is_file() and config.is_file():  # finished: the same run?
                check_same_config(self.cfg, OmegaConf.to_container(OmegaConf.load(config), resolve=False), config)
                check_same_data(self._read_summary().get("data"), self.data.identity(), self.cfg.dataset.root, summary)
                return "finished"
            refuse_to_overwrite_results(self.run_dir)
            return "fresh"
        state = load_checkpoint(path, map_location=self.device)
        missing = [key for key in RESUMABLE_KEYS if key not in state]
        if missing:
            raise CheckpointError(
                f"{path} is not a checkpoint to resume from (it lacks {missing}; best.pt, for one, holds only "
                "the model): put the run's own last.pt back, or start over with trainer.resume=never"
            )
        check_same_config(self.cfg, state["config"], path, trained_in=state.get("precision"), training_in=self.precision)
        check_same_data(state.get("data"), self.data.identity(), self.cfg.dataset.root, path)
        if self.ctx.is_main:
            warn_if_precision_changed(state.get("precision"), self.precision, self.cfg.trainer.precision, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        self.progress = Progress(**state["progress"])
        self.running.load_state_dict(state["running"], self.device)
        rng = rank_rng_state(state["rng"], self.ctx.rank)
        if rng is not None:
            restore_rng_state(rng, self.device)
        return "finished" if self.progress.epoch >= self.epochs and (self.run_dir / "summary.json").is_file() else "resumed"

    # --- run folder, messages and the summary -------------------------------------------------
    def _start_from_initial_weights(self) -> InitialWeights | None:
        """model.init_from's weights into the model, on every process (a fresh run only: a resumed one
        has them in its checkpoint)."""
        source = self.cfg.model.get("init_from")
        if source is None:
            return None
        try:
            initial = apply_initial_weights(self.model, str(source), str(self.cfg.model.name), str(self.cfg.dataset.name))
        except InitialWeightsError as error:
            raise ConfigError(str(error)) from error
        if self.ctx.is_main:
            print(f"[zipfls-train] {initial.describe()}", flush=True)
        return initial

    def _prepare_run_folder(self, resumed: bool, initial: InitialWeights | None = None) -> None:
        """Create the folder, set an earlier attempt's results aside on a fresh start, write config.yaml
        and this attempt's line of environment.jsonl (with what ``initial`` weights it started from)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            earlier = None if resumed else set_aside_earlier_attempt(self.run_dir)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
            record_attempt(self.run_dir, self.device, self.ctx.world_size, self.progress.global_step, resumed,
                           {"initial_weights": initial.record()} if initial is not None else None)
        except OSError as error:
            raise not_writable(self.run_dir, error) from error
        if earlier is not None:
            print(f"[zipfls-train] starting over: the earlier attempt's results are in {earlier}", flush=True)

    def _read_summary(self) -> dict[str, Any]:
        """A finished run's summary.json, or a CheckpointError saying how to get a readable one."""
        path = self.run_dir / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            fix = ("delete it and rerun the same command: it is written again from checkpoints/last.pt"
                   if (self.checkpoint_dir / "last.pt").is_file() else "restore it, or train the run again with trainer.resume=never")
            raise CheckpointError(f"{path}, this finished run's summary, is unreadable ({error}): {fix}") from error
        if not isinstance(summary, dict):
            raise CheckpointError(f"{path} is not a run summary (a JSON object expected): restore it, or train the run again with trainer.resume=never")
        return summary

    def _summary_of_finished_run(self) -> dict[str, Any]:
        metrics = read_metrics(self.run_dir) if self.ctx.is_main else []
        return {
            "status": "finished",
            "best_val_top1": self.progress.best_top1,
            "best_epoch": self.progress.best_epoch,
            "last_val_top1": metrics[-1]["val_top1"] if metrics else None,
            "epochs": self.progress.epoch,
            "precision": precision_history(metrics, self.precision),  # what trainer.precision=auto chose
            "processes": self.ctx.world_size,  # DDP ranks, all nodes together
            "data": self.data.identity(),
            "dataset_root": absolute_root(self.cfg.dataset.get("root")),  # (a rerun is told finished from these)
            "run_dir": str(self.run_dir),
        }

    def _zipf_fit_at_end(self, records: RunRecords) -> float | None:
        """Figure 2 for this run: the final model's mean sorted softmax on the val set, its Zipf fit,
        saved as zipf_fit.png and logged to TensorBoard (every rank scores its shard)."""
        if not bool(self.cfg.trainer.get("zipf_fit_at_end", True)):
            return None
        from ..analysis.zipf_fit import figure_title, mean_sorted_softmax, report_fit

        curves = mean_sorted_softmax(self.model, self.data.val, self.device)
        self.model.train()
        if not self.ctx.is_main:
            return None
        title = figure_title(self.cfg, f"epoch {self.progress.epoch}")
        fit = report_fit(curves, title, self.run_dir / "zipf_fit.png", records.writer, self.progress.global_step)
        if not math.isfinite(fit.alpha):  # a diverged model, or a saturated one (all but one probability 0)
            warnings.warn(
                f"the Zipf fit of {self.run_dir} is not finite (the final model's val probabilities are "
                "non-finite, or all but the top one underflow to 0); summary.json has null", stacklevel=2,
            )
            return None
        return fit.alpha

    def _already_finished(self) -> dict[str, Any]:
        """A rerun of a finished run: nothing to train, evaluate or rewrite; its summary as written."""
        self._close_loaders()
        if not self.ctx.is_main:
            return {}
        summary = self._read_summary()
        report_finished(summary, self.run_dir)
        return summary

    def _saved_after_data_error(self, error: DatasetError) -> str:
        """A file the loader cannot read stops the run (an ImageNet epoch in, with
        ``trainer.checkpoint_every_steps=0``): keep what was trained until then in last.pt, at the
        last whole step, and say so after the loader's message."""
        message = original_message(error)
        if self.progress.global_step == 0 or self.progress.epoch >= self.epochs:  # nothing trained, or all saved (Figure 2's pass)
            return message
        # The epoch's running sums hold any NaN of it: check them all (the range named is the epoch's).
        self.save(check_finite_since=self.progress.global_step - self.progress.step_in_epoch)
        evaluating = " (before its evaluation)" if self.progress.step_in_epoch == self.steps_per_epoch else ""
        return f"{message}\nsaved {self.checkpoint_dir / 'last.pt'} in {self._position()}{evaluating}: once the file reads, rerun the same command to resume"

    def _resumed_at(self) -> str:
        """Where a resumed run goes on, 1-based as the progress lines count epochs."""
        if self.progress.epoch >= self.epochs:  # killed after its last epoch, before its summary
            return f"resumed after its last epoch ({self.epochs}/{self.epochs}) to write its summary"
        epoch = f"epoch {self.progress.epoch + 1}/{self.epochs}"
        if self.progress.step_in_epoch == 0:
            return f"resumed at the start of {epoch}"
        return f"resumed in {epoch} after step {self.progress.step_in_epoch}/{self.steps_per_epoch}"

    def _position(self) -> str:
        """Where the run is, 1-based: 'epoch 2/200, after step 37/390'."""
        return f"epoch {self.progress.epoch + 1}/{self.epochs}, after step {self.progress.step_in_epoch}/{self.steps_per_epoch}"

    def _interrupted_message(self, saved: bool = True) -> str:
        by = self._stops.signal_name or "a signal to another rank"
        where = self._position()
        if not saved:
            return f"interrupted ({by}) in {where}, before anything was trained; nothing to save"
        return f"interrupted ({by}) in {where}; saved {self.checkpoint_dir / 'last.pt'}: rerun the same command to resume"

    def _close_loaders(self) -> None:
        """Stop loader worker processes now rather than whenever the garbage collector gets to them."""
        for loader in (self.data.train, self.data.val):
            close = getattr(loader, "close", None)
            if close is not None:
                close()
