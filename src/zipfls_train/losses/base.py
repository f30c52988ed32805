"""The one interface every training method implements (CE, LS, Zipf's LS and the baselines).

A method is an ``nn.Module`` so that it can hold state (PS-KD's memory, BAN's frozen teacher) that
goes into checkpoints through ``state_dict``/``load_state_dict``. It declares what it needs from the
loop in :class:`Needs`; the trainer provides exactly that and never asks which method it runs.

The trainer calls, per step, ``method.training_step(model, batch)``, back-propagates
``terms["loss"]`` and then calls ``method.after_backward()``; every other entry is logged under its
name (``top1``, the batch's training accuracy, is added by ``with_train_top1``: methods that
override ``training_step`` call it too).
Methods whose forward pass is not a plain ``model(batch.inputs)`` (two views, a paired sample, a
teacher) override ``training_step``; all others only implement ``loss_terms``.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput


@dataclass(frozen=True)
class Needs:
    """What a method asks of the model and the loop.

    feature_stages: dense maps to return in ``ModelOutput.features`` (``final``, ``penultimate``, ``stage<i>``).
    aux_stages:     stages that get an auxiliary classifier head (training only), in ``aux_logits``.
    aux_head:       kind of auxiliary head (see ``models.wrapper.AUX_HEADS``).
    pairs:          each batch carries ``pair_inputs``: another sample of the same class (CS-KD).
    two_views:      each batch carries ``second_view``: a second augmentation of the same images (DDGSD).
    """

    feature_stages: tuple[str, ...] = ()
    aux_stages: tuple[str, ...] = ()
    aux_head: str = "linear"
    pairs: bool = False
    two_views: bool = False


class Method(nn.Module):
    needs: Needs = Needs()

    def check_run(self, device: torch.device) -> None:
        """Called once before a run writes anything (in the launching process), with the device it
        will train on: raise ValueError naming the loss key for an option that cannot work there,
        warn for one that does nothing there. Default: nothing to check."""

    def setup(self, *, num_classes: int, dataset_size: int, model_factory) -> None:  # noqa: ANN001
        """Called once before training, after the model exists. ``model_factory()`` builds a fresh
        model of the run's architecture (a ``ClassifierWrapper`` without auxiliary heads, not
        DDP-wrapped), on its device and in its memory layout (BAN's teacher). Default: nothing to do."""

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Called at the start of every training epoch (0-based). Default: nothing to do."""

    def after_backward(self) -> None:
        """Called after each (micro-)batch's backward pass, outside ``trainer.compile``'s graph: apply
        the state updates that the step computed. A step must not change a buffer it reads: the
        compiled backward may recompute from the buffer after the graph's in-place writes (PS-KD's
        compiled gradient used the step's own predictions as targets). Default: nothing to do."""

    def training_step(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        outputs = model(batch.inputs, features=self.needs.feature_stages, aux=bool(self.needs.aux_stages))
        return with_train_top1(self.loss_terms(outputs, batch, model), outputs.logits, batch.targets)

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        """``{"loss": total, <term>: value, ...}``; every value a 0-dim tensor (no host sync)."""
        raise NotImplementedError


def with_train_top1(terms: dict[str, Tensor], logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """``terms`` plus ``top1``: the percentage of the batch whose arg-max logit is the target, on the
    training (augmented) images with the weights before this step's update. The trainer averages it
    over the epoch like any term (``train_top1`` in metrics.jsonl): how well the model fits its
    training data, beside val top-1. Four small kernels, no host sync."""
    terms["top1"] = (logits.detach().argmax(dim=1) == targets).sum() * (100.0 / targets.shape[0])
    return terms


class MethodContractError(TypeError):
    """A method's step returned what the trainer cannot use (a user's new method, most likely)."""


def check_terms(terms: object, loss_name: str) -> None:
    """What ``training_step`` returned, checked at a run's first step (a mistake in a new method is
    then one line naming it, not a traceback from ``backward`` or the term accumulator): a dict of
    0-dim tensors with a differentiable ``loss``."""
    where = f"loss={loss_name}: its training_step (loss_terms)"
    if not isinstance(terms, dict) or "loss" not in terms:
        got = f"keys {list(terms)}" if isinstance(terms, dict) else f"a {type(terms).__name__}"
        raise MethodContractError(f"{where} must return a dict with a 'loss' entry, the value back-propagated; got {got}")
    for name, value in terms.items():
        if not isinstance(value, Tensor):
            raise MethodContractError(
                f"{where} returned {name}={value!r}, a {type(value).__name__}: every term must be a 0-dim tensor "
                "(a Python number, from .item() say, would also synchronise the device at every step)"
            )
        if value.dim() != 0:
            raise MethodContractError(
                f"{where} returned {name} of shape {tuple(value.shape)}: every term must be a 0-dim tensor, "
                "e.g. its mean over the batch"
            )
    if not terms["loss"].requires_grad:
        raise MethodContractError(f"{where} returned a 'loss' without a gradient (computed under no_grad, or detached)")


# Option checks shared by the methods' constructors: each names the config key (loss.<name>, followed
# by what it is in the paper where ``meaning`` says so) and what was expected, and returns the value as
# the type the method stores.
def _key(name: str, meaning: str | None) -> str:
    return f"loss.{name} ({meaning})" if meaning else f"loss.{name}"


def as_number(name: str, value: object, wanted: str, meaning: str | None = None) -> float:
    """``value`` as a float, or a ValueError naming the key (a string or a bool is not a number).
    Every range check of an option goes through it first: comparing a string raised Python's
    "'<=' not supported between instances of 'float' and 'str'", naming no key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{_key(name, meaning)} must be a number {wanted}, got {value!r}")
    return float(value)


def positive(name: str, value: float, meaning: str | None = None) -> float:
    number = as_number(name, value, "> 0", meaning)
    if not 0 < number < math.inf:
        raise ValueError(f"{_key(name, meaning)} must be > 0 and finite, got {value}")
    return number


def non_negative(name: str, value: float, meaning: str | None = None) -> float:
    number = as_number(name, value, ">= 0", meaning)
    if not 0 <= number < math.inf:
        raise ValueError(f"{_key(name, meaning)} must be >= 0 and finite, got {value}")
    return number


def switch(name: str, value: bool) -> bool:
    """A true/false option: ``bool("no")`` would be True, so anything but a boolean is refused."""
    if not isinstance(value, bool):
        raise ValueError(f"loss.{name} must be true or false, got {value!r}")
    return value


def fraction(name: str, value: float) -> float:
    number = as_number(name, value, "in [0, 1]")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"loss.{name} must be in [0, 1], got {value}")
    return number


def one_of(name: str, value: str, choices) -> str:  # noqa: ANN001 - any container of choices
    if value not in choices:
        raise ValueError(f"loss.{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_targets(targets: Tensor, rows: Tensor, rows_name: str) -> None:
    """``targets`` must be one integer class index per row of ``rows``, on its device. Shapes, dtypes
    and devices only: nothing is read back from the device (scatter takes a shorter index, or one
    on another device, without a word, and gives wrong numbers)."""
    if targets.shape != rows.shape[:1]:
        raise ValueError(
            f"targets must hold one class index per row of {rows_name} ({rows.shape[0]}), got shape {tuple(targets.shape)}"
        )
    if targets.dtype != torch.int64:  # (cross_entropy, one_hot and the fused kernel's reference take no other)
        raise ValueError(f"targets must be int64 class indices (torch.long), got {targets.dtype}")
    if targets.device != rows.device:
        raise ValueError(f"targets are on {targets.device} but {rows_name} on {rows.device}: put both on one device")
