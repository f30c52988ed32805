"""Checks that fail before any work, with the key and the allowed values in the message."""

from __future__ import annotations

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
