"""Checks that fail before any work, with the key and the allowed values in the message."""

from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue

from .naming import WINDOWS_REFUSED

if TYPE_CHECKING:
    import torch


class ConfigError(ValueError):
    pass


def _is_int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(f"{key} must be given (its config file leaves it to you: ???): {key}=<an integer >= {minimum}>") from None
    if not _is_int_at_least(value, minimum):
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


# On/off keys (where the config has them). A string is refused: bool("no") is True, so a value
# like trainer.deterministic=yes or progress_bar=off would silently mean "on".
SWITCHES = ("trainer.channels_last", "trainer.progress_bar", "trainer.deterministic", "trainer.sync_batchnorm",
            "trainer.zipf_fit_at_end", "optim.nesterov", "dataset.download", "dataset.decode_draft")


def _check_switches(cfg: DictConfig) -> None:
    for key in SWITCHES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")


def _check_run_folder_name_parts(cfg: DictConfig) -> None:
    """tag and experiment_name are pieces of the run folder's path (configs/hydra/default.yaml)."""
    for key in ("tag", "experiment_name"):
        value = str(cfg.get(key) or "")
        if "/" in value or "\\" in value or value in (".", ".."):
            raise ConfigError(f"{key}={value!r} names a part of the run folder and must not contain a path separator or be . or ..")
        refused = sorted(set(value) & set(WINDOWS_REFUSED))
        if refused:
            raise ConfigError(
                f"{key}={value!r} names a part of the run folder and must not contain {' '.join(refused)}: "
                "Windows (and a Windows share the runs are copied to) refuses them in folder names"
            )


# trainer.precision's explicit values (their autocast dtypes: precision.PRECISIONS, which needs torch).
PRECISION_NAMES = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: Any, device: torch.device | None = None, distributed: bool = False) -> str | None:
    """trainer.compile: false | true | one of COMPILE_MODES. ``true`` is the fast path for the run:
    with CUDA graphs (reduce-overhead) on one CUDA process, where a small-image step is bound by
    kernel launches that only CUDA graphs remove (H100, cifar_resnet18 batch 128: 46.1k images/s,
    against 9.2k for Inductor alone and 10.8k eager); Inductor alone (default) on the CPU, which has
    no CUDA graphs, and under DDP, whose gradient hooks run between the backward's graphs."""
    if value is False or value is None or value == "false":
        return None
    if value is True or value == "true":
        one_gpu = device is not None and device.type == "cuda" and not distributed
        return "reduce-overhead" if one_gpu else "default"
    if value in COMPILE_MODES:
        return str(value)
    raise ConfigError(f"trainer.compile must be false, true or one of {list(COMPILE_MODES)}, got {value!r}")


def validate_config(cfg: DictConfig) -> None:
    for key, minimum in [
        ("seed", 0),
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
        "trainer.precision": ("auto", *PRECISION_NAMES),
        "trainer.eval_precision": ("fp32", "train"),
        "trainer.resume": ("auto", "never", "must"),
        "trainer.data_on": ("auto", "cpu"),
    }
    for key, allowed in choices.items():
        value = cfg.trainer[key.split(".", 1)[1]]
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
    _check_switches(cfg)
    _check_run_folder_name_parts(cfg)
    limit = cfg.trainer.get("max_steps_per_epoch")
    if limit is not None and not _is_int_at_least(limit, 1):
        raise ConfigError(f"trainer.max_steps_per_epoch must be >= 1, or null for full epochs; got {limit!r}")
    if not _number(cfg, "trainer.stop_check_s") > 0:
        raise ConfigError(f"trainer.stop_check_s must be > 0 (seconds between DDP stop votes), got {cfg.trainer.stop_check_s}")
    loader_workers(cfg.trainer.num_workers)  # validates it
    compile_mode(cfg.trainer.compile)  # validates it (what true means waits for the device)
    _check_optimiser(cfg)
    try:
        name = OmegaConf.select(cfg, "model.name", throw_on_missing=True)
    except MissingMandatoryValue:  # configs/model/timm.yaml leaves the architecture to the command line
        raise ConfigError(f"model.name must be given ({MODEL_NAME_HINT})") from None
    _check_model_name(str(name))
    _check_model_options(cfg)
    _check_initial_weights(cfg)
    _check_dataset_subsets(cfg)
    _check_normalisation(cfg)
    device = _check_devices(cfg)
    # Under torchrun the world comes from its environment; otherwise trainer.devices ranks are spawned.
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else int(cfg.trainer.devices)
    parts = world * int(cfg.trainer.accumulate_steps)
    if int(cfg.trainer.batch_size) % parts:
        raise ConfigError(
            f"trainer.batch_size={cfg.trainer.batch_size} (the global batch) must be divisible by the number of "
            f"processes ({world}) x trainer.accumulate_steps ({cfg.trainer.accumulate_steps})"
        )
    # Constructing the method checks every loss option (unknown keys, bad values) before any work.
    from ..data.bundle import configured_num_classes
    from ..losses import build_method

    try:
        loss = OmegaConf.to_container(cfg.loss, resolve=True)
    except InterpolationKeyError as error:
        raise ConfigError(_missing_interpolation(cfg, error)) from None
    try:
        method = build_method(loss, int(configured_num_classes(cfg.dataset)), int(cfg.trainer.batch_size))
        method.check_run(device)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(_message(error)) from error
    _check_method_stages(cfg, method.needs)


def _check_method_stages(cfg: DictConfig, needs: Any) -> None:
    """The stages a method reads (Zipf's loss.stages, BYOT's heads) exist in the model and are
    different maps: an unknown one failed when the model was built, after the run folder was made,
    and one that is the final map under another name (stage4 of cifar_resnet18) counted the final
    map's votes twice through an extra head."""
    stages = list(dict.fromkeys([*needs.feature_stages, *needs.aux_stages]))
    if not stages:
        return
    from ..models import stage_positions

    name = str(cfg.model.name)
    options = cfg.model.get("options")
    options = OmegaConf.to_container(options, resolve=True) if options is not None else {}
    where = f"loss.stages={stages}" if "stages" in cfg.loss else f"loss={cfg.loss.name} reads the stages {stages}, but"
    try:
        positions, count = stage_positions(name, stages, **options)
    except KeyError as error:
        raise ConfigError(f"{where}: {_message(error)} (model={name})") from None
    for stage, position in positions.items():
        same = [other for other, other_position in positions.items() if other_position == position]
        if len(same) > 1:
            raise ConfigError(
                f"{where}: {' and '.join(repr(s) for s in same)} are the same map of model={name} (stage{position + 1} "
                f"of its {count} stages), whose votes would count twice; list each map once"
            )


def _missing_interpolation(cfg: DictConfig, error: InterpolationKeyError) -> str:
    """A loss option that reads a dataset default the dataset config lacks (a new dataset's config
    without the zipf: block, typically)."""
    found = re.search(r"Interpolation key '([^']+)' not found", str(error))
    key = found.group(1) if found else "?"
    if key.startswith("dataset."):
        return (
            f"loss={cfg.loss.name} reads {key}, which configs/dataset/{_chosen('dataset', cfg.dataset.name)}.yaml does not define: every "
            "dataset config has a zipf: block (weight, upsample, aux_weight; configs/dataset/imagefolder.yaml "
            "explains each), or give it on the command line (+" + key + "=...)"
        )
    return f"loss={cfg.loss.name} reads {key}, which the config does not define"


def _chosen(group: str, fallback: str) -> str:
    """The option file chosen for a config group (dataset=<this>), when Hydra composed the config."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().runtime.choices.get(group, fallback)) if HydraConfig.initialized() else fallback


def loader_workers(value: Any, processes_per_node: int = 1) -> int:
    """trainer.num_workers: an integer >= 0, or auto = this process's share of the CPU cores it may
    use (cores / training processes on the node), at least 1 and at most 8."""
    if value == "auto":
        from .cpu_cores import usable_cpu_cores

        return max(1, min(8, usable_cpu_cores() // max(1, processes_per_node)))
    if not _is_int_at_least(value, 0):
        raise ConfigError(f"trainer.num_workers must be auto or an integer >= 0, got {value!r}")
    return value


def _message(error: Exception) -> str:
    # str(KeyError("...")) adds quotes around the message; the message alone is what to show.
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def _number(cfg: DictConfig, key: str) -> float:
    value = OmegaConf.select(cfg, key)
    if not _is_real(value):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def _check_optimiser(cfg: DictConfig) -> None:
    from .optim import check_names

    check_names(cfg.optim.name, cfg.sched.name)
    if not 0 < _number(cfg, "optim.lr") < math.inf:
        raise ConfigError(f"optim.lr must be > 0 and finite, got {cfg.optim.lr}")
    if not 0 <= _number(cfg, "optim.momentum") < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1) (the paper: 0.9), got {cfg.optim.momentum}")
    if cfg.optim.get("nesterov") is True and float(cfg.optim.momentum) == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0 (Nesterov's step is a momentum step)")
    if not _number(cfg, "optim.weight_decay") >= 0:
        raise ConfigError(f"optim.weight_decay must be >= 0 (the paper: 1e-4), got {cfg.optim.weight_decay}")
    factor = cfg.optim.get("backbone_lr_factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor < math.inf):
        raise ConfigError(f"optim.backbone_lr_factor must be null (the backbone at optim.lr) or a number >= 0 (0 freezes it), got {factor!r}")
    base_batch = cfg.optim.get("base_batch_size")
    if base_batch is not None and not _is_int_at_least(base_batch, 1):
        raise ConfigError(f"optim.base_batch_size must be null (lr as given) or an integer >= 1 (the batch lr is for), got {base_batch!r}")
    if "warmup_epochs" in cfg.sched and not 0 <= _number(cfg, "sched.warmup_epochs") < math.inf:
        raise ConfigError(f"sched.warmup_epochs must be >= 0 (0: no warm-up, the paper), got {cfg.sched.warmup_epochs}")
    if not 0 < _number(cfg, "sched.gamma") <= 1:
        raise ConfigError(f"sched.gamma (the lr factor at each milestone) must be in (0, 1], got {cfg.sched.gamma}")
    from .optim import milestone_epochs

    given = list(cfg.sched.milestones)
    if any(isinstance(m, bool) or not isinstance(m, (int, float)) for m in given):
        raise ConfigError(f"sched.milestones must be numbers (fractions of the run or epoch numbers), got {given}")
    try:
        epochs = milestone_epochs(given, int(cfg.trainer.epochs))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error
    if given != sorted(given):
        raise ConfigError(f"sched.milestones must be in increasing order, got {given}")
    given_as_epochs = all(m >= 1 for m in given)  # (fractions follow trainer.epochs by design)
    late = [m for m in epochs if m >= int(cfg.trainer.epochs)] if given_as_epochs else []
    if late:  # e.g. a recipe's [100, 150] kept when a run is shortened
        warnings.warn(
            f"sched.milestones {given}: epoch(s) {late} are not before the run's end (trainer.epochs="
            f"{cfg.trainer.epochs}), so the lr never decays there; fractions of the run (e.g. [0.5, 0.75]) "
            "follow trainer.epochs",
            UserWarning,
            stacklevel=2,
        )


MODEL_NAME_HINT = "model=timm takes any timm architecture as model.name=timm.<architecture>, e.g. timm.efficientnet_b0"


def _check_model_name(name: str) -> None:
    from ..models import BACKBONES, TIMM_PREFIX, find_backbone

    if find_backbone(name) is None:
        if name.startswith(TIMM_PREFIX):
            from ..models.imagenet import similar_timm_models

            similar = similar_timm_models(name)
            raise ConfigError(f"model.name={name!r}: timm has no architecture {name.removeprefix(TIMM_PREFIX)!r}"
                              + (f"; similar: {similar}" if similar else " (timm.list_models() lists them)"))
        raise ConfigError(f"model.name={name!r} is not a known model; expected one of {sorted(BACKBONES)}, "
                          "timm.<any timm architecture> (model=timm), or model=<one of configs/model/>")


def _check_model_options(cfg: DictConfig) -> None:
    from ..models import check_model_options

    options = cfg.model.get("options")
    if options is None:
        return
    if not OmegaConf.is_dict(options):
        raise ConfigError(f"model.options must be a mapping of option: value (e.g. width: 64), got {options!r}")
    try:
        check_model_options(str(cfg.model.name), OmegaConf.to_container(options, resolve=True))
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error


def _check_initial_weights(cfg: DictConfig) -> None:
    from ..initial_weights import InitialWeightsError, check_source

    try:
        check_source(cfg.model.get("init_from"), str(cfg.model.name))
    except InitialWeightsError as error:
        raise ConfigError(str(error)) from error


def _check_normalisation(cfg: DictConfig) -> None:
    """dataset.mean / dataset.std (0-1 scale, one per RGB channel), where the dataset has them."""
    for key, wanted, lowest in (("mean", "3 finite numbers", -math.inf), ("std", "3 numbers > 0", 0.0)):
        values = cfg.dataset.get(key)
        if values is None:
            continue
        values = OmegaConf.to_container(values) if OmegaConf.is_list(values) else values
        numbers = isinstance(values, list) and len(values) == 3 and all(_is_real(v) and lowest < v < math.inf for v in values)
        if not numbers:
            raise ConfigError(f"dataset.{key} must be {wanted}, one per RGB channel on a 0-1 scale, got {values!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_dataset_subsets(cfg: DictConfig) -> None:
    """Quick-run subsets: null (everything) or a whole number (classes >= 2, images per class >= 1)."""
    for key, minimum, meaning in [
        ("num_classes_subset", 2, "the first K classes"),
        ("train_per_class", 1, "at most N training images per class"),
        ("val_per_class", 1, "at most N val images per class"),
    ]:
        value = cfg.dataset.get(key)
        if value is not None and not _is_int_at_least(value, minimum):
            raise ConfigError(f"dataset.{key} ({meaning}) must be null (all) or an integer >= {minimum}, got {value!r}")


def _check_devices(cfg: DictConfig) -> torch.device:
    """The device the run will train on (the trainer's rule, and its error), checked against
    trainer.devices, sync_batchnorm and precision."""
    import torch

    from .distributed import resolve_device

    devices = int(cfg.trainer.devices)
    device = resolve_device(str(cfg.trainer.device))
    uses_cuda = device.type == "cuda"
    if uses_cuda and "WORLD_SIZE" not in os.environ and torch.cuda.device_count() < devices:
        raise ConfigError(f"trainer.devices={devices} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if bool(cfg.trainer.get("sync_batchnorm", False)) and devices > 1 and not uses_cuda:
        raise ConfigError("trainer.sync_batchnorm=true needs CUDA devices (torch's SyncBatchNorm has no CPU implementation)")
    if str(cfg.trainer.precision) == "fp16" and not uses_cuda:
        warnings.warn("trainer.precision=fp16 on the CPU runs many times slower than fp32 (no fast float16 kernels); use fp32 or bf16", stacklevel=2)
    return device


# --- keys added on the command line with + or ++ --------------------------------------------------

def check_added_keys(overrides: Sequence[str], compose: Callable[[list[str]], DictConfig]) -> None:
    """Reject a key that a ``+key=value`` (or ``++key=value``) override adds to the config but that
    nothing reads: a typo (``+trainer.epoch=5``) would otherwise train with the default silently.

    ``overrides`` are the command line's (Hydra's ``overrides.task``); ``compose(overrides)`` composes
    the config from them (``hydra.compose``). The valid keys are those of the config composed without
    the ``+`` overrides: the selected option file of each group (configs/dataset/<name>.yaml,
    configs/model/<name>.yaml, ...) with whatever the experiment file adds, plus the optional keys the
    selected files read through ``${oc.select:...}`` (e.g. model.cskd.weight). Not checked here:
    ``loss.*`` (the method rejects options it does not take, naming them), ``hydra.*``, and
    ``model.options.*`` of the models whose options are timm's keyword arguments (checked when the
    options are validated)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    adds = [o for o in parsed if o.is_add() or o.is_force_add()]
    checked = [o for o in adds if "/" not in o.key_or_group and o.package is None and o.key_or_group.split(".")[0] not in ("hydra", "loss")]
    if not checked:
        return
    base_cfg = compose([str(o.input_line) for o in parsed if not (o.is_add() or o.is_force_add())])
    base = OmegaConf.to_container(base_cfg, resolve=False)
    # Keys the selected files read: through ${oc.select:key,default} (optional ones) or ${key} (e.g. the
    # loss's ${dataset.zipf.weight}, which a dataset config without its zipf: block may get this way).
    text = OmegaConf.to_yaml(base_cfg, resolve=False)
    optional = set(re.findall(r"\$\{oc\.select:\s*([\w.]+)", text)) | set(re.findall(r"\$\{([\w.]+)\}", text))
    for override in checked:
        key = override.key_or_group
        if key in optional or _has_key(base, key):
            continue
        if key.startswith("model.options.") and _options_are_free_form(base):
            continue
        parts = key.split(".")
        node, depth = base, 0
        while depth < len(parts) - 1 and isinstance(node.get(parts[depth]), dict):
            node, depth = node[parts[depth]], depth + 1
        where = ".".join(parts[:depth])
        valid = sorted(str(k) for k in node)
        group = where if where else "the top level of the config"
        close = difflib.get_close_matches(parts[depth], valid, n=1, cutoff=0.75) or [
            k for k in valid if len(parts[depth]) >= 3 and k.startswith(parts[depth])
        ][:1]
        hint = f"; did you mean {'.'.join([*parts[:depth], close[0]])}?" if close else ""
        raise ConfigError(
            f"unknown key {key} (from {override.input_line}): {group} has no key {parts[depth]!r}; "
            f"its keys are {valid}{hint}"
        )


def _has_key(container: Any, key: str) -> bool:
    node = container
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _options_are_free_form(base: dict[str, Any]) -> bool:
    from ..models import find_backbone, takes_any_option

    name = str((base.get("model") or {}).get("name"))
    return find_backbone(name) is not None and takes_any_option(name)

