"""Entry point after Hydra: one process, N spawned ranks, or ranks started by torchrun.

Hydra composes the config once, in the parent process; ranks get the resolved config and the run
folder, so multirun and DDP never fight over output folders.
"""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from .config_checks import validate_config
from .distributed import barrier, init_distributed, launched_by_torchrun, shutdown
from .trainer import Trainer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(local_rank: int, container: dict[str, Any], run_dir: str, world_size: int, base_rank: int) -> dict[str, Any]:
    cfg = OmegaConf.create(container)
    rank = base_rank + local_rank
    ctx = init_distributed(str(cfg.trainer.device), rank, world_size, local_rank)
    try:
        trainer = Trainer(cfg, ctx, Path(run_dir))
        summary = trainer.fit()
        # Release the DDP model (its reducer holds the process group) and let every rank finish
        # before any tears the group down: otherwise gloo can abort at exit ("terminate called
        # without an active exception"). Not on errors, where the other ranks may never arrive.
        del trainer
        gc.collect()
        barrier()
        return summary
    finally:
        shutdown()


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Train one run in ``run_dir``; returns the summary (rank 0 / single process)."""
    validate_config(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return _worker(int(os.environ["LOCAL_RANK"]), container, str(run_dir), world, rank - int(os.environ["LOCAL_RANK"]))
    devices = int(cfg.trainer.devices)
    if devices == 1:
        return _worker(0, container, str(run_dir), 1, 0)
    # The ranks are this machine's own processes: loopback, whatever MASTER_ADDR the shell carries
    # (a cluster's address there would make them wait for a peer that never comes).
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    mp.spawn(_worker, args=(container, str(run_dir), devices, 0), nprocs=devices, join=True)
    from .metrics import read_metrics

    metrics = read_metrics(run_dir)
    return {"status": "finished", "best_val_top1": max((m["val_top1"] for m in metrics), default=None), "run_dir": str(run_dir)}
