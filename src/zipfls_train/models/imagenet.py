"""ImageNet-scale backbones (paper Table 4): the torchvision-style architectures, built by timm.

timm's ``resnet*``, ``resnext*``, ``densenet121`` and ``mobilenetv2_100`` are the same networks as
torchvision's (same layers, same parameter counts), and they share one API,
``forward_intermediates``, so every architecture here is a row in :data:`ARCHITECTURES` and a
config file, not a code path.

Stages (the wrapper's contract, see wrapper.py): the outputs timm reports in ``feature_info`` at
stride >= 4 (the stem at stride 2 is not a stage), the last tap replaced by the final map where
they have one shape (ResNetV2's final BN + ReLU) and followed by it otherwise (MobileNetV2's
``conv_head`` + BN + ReLU6, 1280 channels). Token models and models whose head has layers after
global pooling are refused (:func:`_check_head_and_final`). The last stage is always exactly
what timm's ``forward_features`` returns, i.e. the map the classifier is applied to after pooling:

* ResNet / ResNeXt: layer1 .. layer4 (post-ReLU block outputs; 7 x 7 at 224 px);
* DenseNet-121: denseblock1 .. denseblock3 (before their transitions, timm's taps) and
  ``norm5`` = ReLU(BN(denseblock4)) (timm's ``BatchNormAct2d``), 1024 x 7 x 7. The first three are
  concatenations of un-normalised convolutions (values down to -2.4e5 after MSRA init), so an
  auxiliary linear head there (Zipf's Dense2) has its own BN + ReLU, as on the CIFAR DenseNet
  (``aux_heads_normalise``, :data:`NORMALISED_AUX_HEADS`);
* MobileNetV2: the last block at strides 4, 8, 16, 32 (24, 32, 96, 320 channels) and
  ReLU6(BN(conv_head)), 1280 x 7 x 7.

So the dense votes of Zipf's LS always use the trained classifier of the model (the paper's
released code used an untrained layer for DenseNet and MobileNetV2; we do not).

Initialisation: MSRA (Kaiming normal, fan_out, ReLU gain) for every convolution and BN gamma = 1,
beta = 0, through :func:`zipfls_train.models.wrapper.kaiming_init` (timm's own inits differ per
family: fan_in for DenseNet, zero-initialised last BN gamma for ResNets; neither is the paper's).
The wrapper's classifier is initialised as torchvision initialises each model's: PyTorch's default
Linear init for the ResNets and ResNeXts, a zero bias for DenseNet-121, N(0, 0.01) weights and a
zero bias for MobileNetV2 (:data:`CLASSIFIER_INITS`, applied through ``init_classifier``).

Dropout before the classifier: timm's ``drop_rate`` acts in timm's head, which the wrapper replaces,
so the backbone takes it over as ``classifier_dropout`` and the wrapper applies it to the pooled
features in training (dense votes, under ``no_grad``, classify the map without it). MobileNetV2
defaults to 0.2, as torchvision's; the others to 0, as theirs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import timm
import torch
from torch import Tensor, nn

from . import TIMM_PREFIX, register_backbone
from .wrapper import kaiming_init

# Our model name -> (timm model name, timm keyword arguments). Published parameter counts at 1000
# classes (torchvision's model docs; timm's are identical) are checked in tests/test_imagenet_models.py.
ARCHITECTURES: Mapping[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("resnet18", {"zero_init_last": False}),
    "resnet50": ("resnet50", {"zero_init_last": False}),
    "resnet101": ("resnet101", {"zero_init_last": False}),
    "resnext50_32x4d": ("resnext50_32x4d", {"zero_init_last": False}),
    "resnext101_32x8d": ("resnext101_32x8d", {"zero_init_last": False}),
    "densenet121": ("densenet121", {}),
    "mobilenetv2": ("mobilenetv2_100", {"drop_rate": 0.2}),
}


def _zero_bias(classifier: nn.Linear) -> None:
    nn.init.zeros_(classifier.bias)


def _normal_weights_zero_bias(classifier: nn.Linear) -> None:
    nn.init.normal_(classifier.weight, 0.0, 0.01)
    nn.init.zeros_(classifier.bias)


# torchvision's own initialisation of each model's classifier (the others: PyTorch's default).
CLASSIFIER_INITS: Mapping[str, Callable[[nn.Linear], None]] = {
    "densenet121": _zero_bias,
    "mobilenetv2": _normal_weights_zero_bias,
}

# Models whose intermediate stage outputs are not normalised: their auxiliary heads apply BN + ReLU first.
NORMALISED_AUX_HEADS = frozenset({"densenet121"})

# The first timm whose every built-in architecture has forward_intermediates (DenseNet's came last);
# pyproject.toml asks for it.
MIN_TIMM_VERSION = "1.0.31"
BUILT_IN_TIMM_NAMES = frozenset(timm_name for timm_name, _ in ARCHITECTURES.values())

# feature_info entries below this stride belong to the stem, not to a stage.
MIN_STAGE_REDUCTION = 4


class NotWrappableError(ValueError):
    """A timm model the wrapper cannot take as it is (its message says why)."""


class TimmBackbone(nn.Module):
    """A timm classifier without its head, exposing its stages to :class:`ClassifierWrapper`."""

    def __init__(
        self,
        timm_name: str,
        init_classifier: Callable[[nn.Linear], None] | None = None,
        aux_heads_normalise: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.aux_heads_normalise = aux_heads_normalise  # read by the wrapper
        if init_classifier is not None:  # the wrapper calls it on the classifier it builds
            self.init_classifier = init_classifier
        # Read by the wrapper, which owns the classifier (timm's head, where drop_rate acts, is removed).
        self.classifier_dropout = float(timm_kwargs.pop("drop_rate", 0.0))
        # What built the network, for model.init_from=timm (timm's published weights for it).
        self.timm_name, self.timm_kwargs = timm_name, dict(timm_kwargs)
        # num_classes=0 and global_pool="": no pooling, no classifier (the wrapper owns both).
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="", **timm_kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            missing = f"timm {timm.__version__}'s {timm_name} has no forward_intermediates, which the wrapper reads its stages from"
            if timm_name in BUILT_IN_TIMM_NAMES:  # an older timm than pyproject.toml asks for
                raise NotWrappableError(f"{missing}; timm >= {MIN_TIMM_VERSION} has it: pip install 'timm>={MIN_TIMM_VERSION}'")
            raise NotWrappableError(f"{missing}; take a CNN that has it, or wrap it as README's 'Adding a model' says")
        info = self.model.feature_info
        self.feature_indices = [i for i, f in enumerate(info) if int(f["reduction"]) >= MIN_STAGE_REDUCTION]
        channels = [int(info[i]["num_chs"]) for i in self.feature_indices]
        # The final stage is always forward_intermediates' final output, i.e. what forward_features
        # returns (the map timm pools). It replaces the last tap when it has that tap's shape (ResNets,
        # DenseNet; ResNetV2's and NF-ResNet's final norm / activation come after that tap), and is an
        # extra stage otherwise (MobileNetV2's conv_head).
        self.final_is_extra = _check_head_and_final(timm_name, timm_kwargs, self.feature_indices)
        if self.final_is_extra is None:  # the probe could not run (an op without a meta kernel): by width
            self.final_is_extra = int(info[-1]["num_chs"]) != int(self.model.num_features)
        if self.final_is_extra:
            channels.append(int(self.model.num_features))
        self.stage_channels: list[int] = channels
        kaiming_init(self.model)

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        final, maps = self.model.forward_intermediates(x, indices=self.feature_indices)
        maps = list(maps)
        if self.final_is_extra:
            maps.append(final)
        else:
            maps[-1] = final
        return maps


def _check_head_and_final(timm_name: str, timm_kwargs: Mapping[str, Any], indices: list[int]) -> bool | None:
    """Whether the final map is a stage beyond the last feature tap (a different shape), from one
    forward + backward of the architecture on the meta device (no memory, no arithmetic). Raises
    NotWrappableError for a model whose forward_features returns tokens, and for one whose head has
    layers after global pooling (GAP + the wrapper's linear classifier would drop them: another network, and
    parameters no gradient reaches, which DDP refuses). None where the probe cannot run."""
    # Models are also built under no_grad / inference_mode (notebooks, evaluation): the probe's
    # backward needs autograd, on meta tensors only.
    with torch.random.fork_rng(devices=[]), torch.device("meta"), torch.inference_mode(False), torch.enable_grad():
        twin = timm.create_model(timm_name, pretrained=False, num_classes=0, global_pool="", **timm_kwargs)
        patch_embed = getattr(twin, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None) or twin.pretrained_cfg.get("input_size", (3, 224, 224))[-2:]
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        try:
            final, taps = twin.eval().forward_intermediates(torch.empty(2, 3, *size), indices=indices)
        except NotImplementedError:
            return None
        if final.ndim != 4:
            raise NotWrappableError(
                f"forward_features returns {final.ndim}-d tokens {tuple(final.shape)}, not an N x C x H x W map "
                "(a token model: its head pools or picks tokens after a final norm, not the global average of a map)"
            )
        final.float().sum().backward()
    dead = sorted({name.rsplit(".", 1)[0] for name, p in twin.named_parameters() if p.grad is None})
    if dead:
        raise NotWrappableError(
            f"its head applies {dead} after global pooling; the wrapper classifies the "
            "pooled map linearly, so it would train another network (and leave those parameters without "
            "gradients, which DDP refuses). Take a model whose classifier is linear on the pooled map"
            + (" (ConvNeXt-style heads: model.options.head_norm_first=true puts the norm before pooling)"
               if any(name.endswith("norm") for name in dead) else "")
        )
    return tuple(final.shape[1:]) != tuple(taps[-1].shape[1:])


def _builder(name: str, timm_name: str, defaults: Mapping[str, Any]):  # noqa: ANN202

    def build(**options: Any) -> TimmBackbone:
        """Model options from the config (``model.options``) are passed to timm (e.g. drop_path_rate),
        except ``drop_rate``, the dropout before the classifier (see the module docstring)."""
        return TimmBackbone(timm_name, CLASSIFIER_INITS.get(name), name in NORMALISED_AUX_HEADS, **{**defaults, **options})

    def check_options(**options: Any) -> None:
        """ValueError naming ``model.options.<key>`` when timm refuses the options (or, for a
        ``timm.<architecture>``, the architecture itself): the model is built on the meta device (no
        memory, ~0.1 s), before any data is read."""
        if not options and name in ARCHITECTURES:
            return
        drop_rate = options.get("drop_rate", 0.0)
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)) or not 0 <= drop_rate < 1:
            raise ValueError(f"model.options.drop_rate (dropout before the classifier) must be a number in [0, 1), got {drop_rate!r}")
        try:
            with torch.device("meta"):
                build(**options)
        except TypeError as error:
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
            if unknown:
                raise ValueError(
                    f"model.options.{unknown.group(1)} is not an option of model={name} (timm's {timm_name}: {error}); "
                    "model.options are keyword arguments of timm.create_model, e.g. drop_path_rate: 0.05"
                ) from error
            raise ValueError(f"model.options {options} do not fit model={name} (timm's {timm_name}): {error}") from error
        except NotWrappableError as error:
            raise ValueError(f"model.name={name}: timm's {timm_name} cannot be wrapped: {error}") from error
        except (ValueError, AssertionError, RuntimeError) as error:
            raise ValueError(f"model.options {options} do not fit model={name} (timm's {timm_name}): {error}") from error
        except (AttributeError, NotImplementedError) as error:  # no feature_info / forward_intermediates
            raise ValueError(
                f"model.name={name}: timm's {timm_name} does not expose its stages (feature_info and "
                f"forward_intermediates: {error}); take a CNN that does, or wrap it as README's 'Adding a model' says"
            ) from error

    build.__name__ = name
    build.check_options = check_options  # type: ignore[attr-defined]
    return build


for _name, (_timm_name, _defaults) in ARCHITECTURES.items():
    register_backbone(_name, _builder(_name, _timm_name, _defaults))


def register_timm_model(name: str) -> None:
    """Registers ``timm.<architecture>`` if timm has that architecture."""
    architecture = name.removeprefix(TIMM_PREFIX)
    if timm.is_model(architecture):
        register_backbone(name, _builder(name, architecture, {}))


def similar_timm_models(name: str, limit: int = 5) -> list[str]:
    """timm architectures named most like ``name`` (for an error message: a typo's intended name)."""
    import difflib

    close = difflib.get_close_matches(name.removeprefix(TIMM_PREFIX), timm.list_models(), n=limit, cutoff=0.8)
    return [f"{TIMM_PREFIX}{model}" for model in close]
