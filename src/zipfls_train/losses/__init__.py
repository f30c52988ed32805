"""Method registry: ``loss=<name>`` in the config picks ``METHODS[name]``.

Each method is one module; the registry imports it lazily (by dotted path) so a broken or slow
method never costs the others. To add a method: write ``losses/<name>.py`` with a :class:`Method`
subclass, add one line here and a ``configs/loss/<name>.yaml`` whose keys are its constructor's
keyword arguments.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from .base import Method, Needs

METHODS: dict[str, str] = {
    "ce": "zipfls_train.losses.ce:CrossEntropy",
    "ls": "zipfls_train.losses.ls:LabelSmoothing",
    "zipf": "zipfls_train.losses.zipf:ZipfLabelSmoothing",
    "tfkd": "zipfls_train.losses.tfkd:TeacherFreeKD",
    "cskd": "zipfls_train.losses.cskd:ClassWiseSelfKD",
    "pskd": "zipfls_train.losses.pskd:ProgressiveSelfKD",
    "byot": "zipfls_train.losses.byot:BeYourOwnTeacher",
    "ddgsd": "zipfls_train.losses.ddgsd:DataDistortionGuidedSelfDistillation",
    "ban": "zipfls_train.losses.ban:BornAgainNetwork",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(
            f"unknown loss {name!r}; expected one of {sorted(METHODS)} (a new method registers its class in "
            "METHODS, losses/__init__.py)"
        )
    module_name, class_name = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


# What the run gives a method's constructor when it names the argument, rather than a loss option.
RUN_ARGUMENTS = ("num_classes", "global_batch_size")


def build_method(config: Mapping[str, Any], num_classes: int, global_batch_size: int | None = None) -> Method:
    """Instantiate the method named by ``config["name"]`` with the other keys as keyword arguments.

    An option the method does not take is an error that names it and lists the ones it does take.
    ``global_batch_size`` (trainer.batch_size: the samples of one optimiser step over every process
    and micro-batch) goes to a constructor that names it: a term *summed* over the batch needs it
    (see :class:`~zipfls_train.losses.byot.BeYourOwnTeacher`).
    """
    options = dict(config)
    name = options.pop("name", None)
    if name is None:
        raise KeyError("loss config has no 'name' key")
    cls = method_class(str(name))
    parameters = inspect.signature(cls.__init__).parameters
    accepted = [p for p in parameters if p != "self" and p not in RUN_ARGUMENTS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"loss={name} has no option(s) {unknown}; its options are {accepted} "
            f"(see configs/loss/{name}.yaml and {cls.__module__})"
        )
    # The run's class count, for the methods that ask for it by name.
    wants_classes = "num_classes" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    run_arguments: dict[str, Any] = {"num_classes": num_classes} if wants_classes else {}
    if "global_batch_size" in parameters:
        run_arguments["global_batch_size"] = global_batch_size
    return cls(**options, **run_arguments)


__all__ = ["METHODS", "Method", "Needs", "build_method", "method_class"]
