"""Checks that fail before any work, with the key and the allowed values in the message."""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    pass


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def validate_config(cfg: DictConfig) -> None:
    for key, minimum in [
        ("trainer.epochs", 1),
        ("trainer.batch_size", 1),
        ("trainer.eval_batch_size", 1),
        ("trainer.devices", 1),
        ("trainer.accumulate_steps", 1),
        ("trainer.log_every", 1),
        ("trainer.checkpoint_every_steps", 0),
        ("dataset.image_size", 8),
        ("dataset.num_classes", 2),
    ]:
        _positive_int(cfg, key, minimum)
    choices = {
        "trainer.device": ("auto", "cpu", "cuda"),
        "trainer.precision": ("auto", "fp32", "bf16", "fp16"),
        "trainer.resume": ("auto", "never", "must"),
        "trainer.data_on": ("auto", "cpu"),
    }
    for key, allowed in choices.items():
        value = cfg.trainer[key.split(".", 1)[1]]
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    if float(cfg.optim.lr) <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    # Under torchrun the world comes from its environment; otherwise trainer.devices ranks are spawned.
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else int(cfg.trainer.devices)
    parts = world * int(cfg.trainer.accumulate_steps)
    if int(cfg.trainer.batch_size) % parts:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} (the global batch) must be divisible by the number of "
            f"processes ({world}) x trainer.accumulate_steps ({cfg.trainer.accumulate_steps})"
        )
    # Constructing the method checks every loss option (unknown keys, bad values) before any work.
    from ..losses import build_method

    try:
        build_method(OmegaConf.to_container(cfg.loss, resolve=True), int(cfg.dataset.get("num_classes_subset") or cfg.dataset.num_classes))
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(str(error).strip("'\"")) from error
