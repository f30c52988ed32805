"""The seven ImageNet-scale architectures of Table 4: published sizes, stage maps, dense-vote contract,
MSRA init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zipfls_train.models import BACKBONES, build_model, count_parameters

# Parameter counts at 1000 classes, as published in torchvision's model documentation
# (https://pytorch.org/vision/stable/models.html: "num_params"); timm reports the same numbers.
PUBLISHED_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904,
    "resnext101_32x8d": 88_791_336,
    "densenet121": 7_978_856,
    "mobilenetv2": 3_504_872,
}
# Channels of every stage (the last is the map the classifier pools) and its stride.
STAGES = {
    "resnet18": ([64, 128, 256, 512], [4, 8, 16, 32]),
    "resnet50": ([256, 512, 1024, 2048], [4, 8, 16, 32]),
    "resnet101": ([256, 512, 1024, 2048], [4, 8, 16, 32]),
    "resnext50_32x4d": ([256, 512, 1024, 2048], [4, 8, 16, 32]),
    "resnext101_32x8d": ([256, 512, 1024, 2048], [4, 8, 16, 32]),
    "densenet121": ([256, 512, 1024, 1024], [4, 8, 16, 32]),
    "mobilenetv2": ([24, 32, 96, 320, 1280], [4, 8, 16, 32, 32]),
}
MODELS = list(PUBLISHED_PARAMETERS)


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Small CPU batches gain nothing from intra-op threads, and OpenMP threads on a busy (or
    xdist-shared) 2-core machine can make a forward pass 20x slower; restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def imagenet_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build_model(name, 1000).eval() for name in MODELS}


def test_every_architecture_is_registered() -> None:
    build_model("resnet18", 10)  # triggers the lazy registration
    assert set(MODELS) <= set(BACKBONES)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_published(imagenet_models, name: str) -> None:
    assert count_parameters(imagenet_models[name]) == PUBLISHED_PARAMETERS[name]


def test_resnet50_is_25_6_million_parameters(imagenet_models) -> None:
    assert round(count_parameters(imagenet_models["resnet50"]) / 1e6, 1) == 25.6


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_stages_and_dense_final_map_feed_the_trained_classifier(imagenet_models, name: str) -> None:
    model = imagenet_models[name]
    channels, strides = STAGES[name]
    assert list(model.backbone.stage_channels) == channels
    x = torch.randn(1, 3, 64, 64)  # 64 px keeps a 2 x 2 final map at a sixth of 224 px's cost
    out = model(x, features=tuple(model.stage_names) + ("final", "penultimate"))
    shapes = [tuple(out.features[stage].shape) for stage in model.stage_names]
    assert shapes == [(1, c, 64 // s, 64 // s) for c, s in zip(channels, strides)]
    assert out.logits.shape == (1, 1000)
    final = out.features["final"]
    assert final.shape == (1, channels[-1], 2, 2)
    assert out.features["penultimate"].shape[1] == channels[-2]
    # The dense votes use the same classifier and the same map as the logits (SPEC.md 1).
    torch.testing.assert_close(model.classifier(final.mean(dim=(2, 3))), out.logits, rtol=1e-5, atol=1e-5)
    # The final map is post-activation (ReLU; ReLU6 for MobileNetV2), as the classifier sees it.
    assert float(final.min()) >= 0.0
    if name == "mobilenetv2":
        assert float(final.max()) <= 6.0


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "densenet121"])
@torch.no_grad()
def test_final_map_is_7x7_at_224_px_giving_49_votes(imagenet_models, name: str) -> None:
    from zipfls_train.losses.zipf import dense_votes

    model = imagenet_models[name]
    out = model(torch.randn(1, 3, 224, 224), features=("final",))
    final = out.features["final"]
    assert final.shape[-2:] == (7, 7)
    votes = dense_votes(final, model.classifier.weight, model.classifier.bias, upsample="none")
    assert votes.shape == (1, 49)


@pytest.mark.parametrize("name", MODELS)
def test_msra_init_and_no_zero_init_of_last_bn(imagenet_models, name: str) -> None:
    model = imagenet_models[name]
    for module in model.backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / fan_out) for the largest convolution.
    conv = max((m for m in model.backbone.modules() if isinstance(m, nn.Conv2d)), key=lambda m: m.weight.numel())
    fan_out = conv.weight.shape[0] * conv.weight.shape[2] * conv.weight.shape[3]
    expected = math.sqrt(2.0 / fan_out)
    assert abs(float(conv.weight.detach().std()) - expected) / expected < 0.05


def test_aux_head_on_penultimate_stage_and_num_classes() -> None:
    model = build_model("resnet18", 37, aux_stages=("penultimate",))
    out = model(torch.randn(2, 3, 64, 64), aux=True)
    assert out.logits.shape == (2, 37)
    assert out.aux_logits["penultimate"].shape == (2, 37)
    assert model.aux_heads["penultimate"].fc.in_features == 256


@torch.no_grad()
def test_densenet_penultimate_head_normalises_its_map_as_the_cifar_densenet_does() -> None:
    """timm's denseblock3 output is raw concatenated convolutions (strongly negative values after MSRA
    init): Dense2's head (and its votes) classify ReLU(BN(map)), as on the CIFAR DenseNet and in the
    paper's released code; the ResNets' post-ReLU stage outputs are classified as they are."""
    torch.manual_seed(0)
    inputs = torch.randn(2, 3, 64, 64)
    densenet = build_model("densenet121", 10, aux_stages=("penultimate",)).train()
    raw = densenet.backbone.forward_stages(inputs)[-2]
    assert float(raw.min()) < -1.0  # (what the head used to pool and classify)
    seen = densenet(inputs, features=("penultimate",), aux=True).features["penultimate"]
    assert isinstance(densenet.aux_heads["penultimate"].norm[0], nn.BatchNorm2d)
    assert float(seen.min()) >= 0.0 and seen.shape == raw.shape
    for cifar_like in ("cifar_densenet121", "densenet121"):
        assert build_model(cifar_like, 10).backbone.aux_heads_normalise is True
    assert isinstance(build_model("resnet18", 10, aux_stages=("penultimate",)).aux_heads["penultimate"].norm, nn.Identity)


@pytest.mark.parametrize(("name", "final_width"), [("densenet121", 1024), ("mobilenetv2", 1280), ("resnet50", 2048)])
def test_byot_heads_end_at_the_final_stage_width_of_any_backbone(name: str, final_width: int) -> None:
    # BYOT pulls each head's pooled feature towards the final stage's: same width, whether or not
    # the backbone doubles its width per stage (DenseNet-121 and MobileNetV2 do not).
    from zipfls_train.data.batch import Batch
    from zipfls_train.losses import build_method

    torch.manual_seed(0)
    method = build_method({"name": "byot"}, 10)
    model = build_model(name, 10, aux_stages=method.needs.aux_stages, aux_head=method.needs.aux_head).train()
    assert [head.feature_channels for head in model.aux_heads.values()] == [final_width] * 3
    terms = method.training_step(model, Batch(inputs=torch.randn(2, 3, 64, 64), targets=torch.tensor([1, 7]), indices=torch.arange(2)))
    assert torch.isfinite(terms["loss"]) and terms["byot_feature_l2"] > 0


def test_training_step_backward_reaches_every_parameter() -> None:
    model = build_model("mobilenetv2", 5).train()
    out = model(torch.randn(2, 3, 32, 32))
    nn.functional.cross_entropy(out.logits, torch.tensor([0, 3])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_model_options_reach_timm() -> None:
    model = build_model("resnet18", 10, drop_path_rate=0.1)
    assert any(type(m).__name__ == "DropPath" for m in model.modules())


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(KeyError, match="resnext101_32x8d"):
        build_model("resnet9000", 10)


@torch.no_grad()
def test_dropout_before_the_classifier_as_torchvision() -> None:
    # torchvision's MobileNetV2 drops 20% of the pooled features in training; ResNets drop none.
    # drop_rate (timm's name) reaches the wrapper's classifier for any of these models.
    mobilenet = build_model("mobilenetv2", 10)
    assert mobilenet.classifier_dropout.p == 0.2
    assert isinstance(build_model("resnet18", 10).classifier_dropout, nn.Identity)
    resnet = build_model("resnet18", 10, drop_rate=0.5).train()
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(1)
    out = resnet(x, features=("final",))
    pooled = out.features["final"].mean(dim=(2, 3))
    torch.manual_seed(1)
    expected = resnet.classifier(torch.nn.functional.dropout(pooled, 0.5, training=True))
    torch.testing.assert_close(out.logits, expected)
    assert not torch.allclose(out.logits, resnet.classifier(pooled))  # dropout acted
    resnet.eval()
    torch.testing.assert_close(resnet(x).logits, resnet.classifier(resnet(x, features=("final",)).features["final"].mean(dim=(2, 3))))


@torch.no_grad()
def test_classifier_init_is_torchvisions_per_model() -> None:
    # torchvision: MobileNetV2 N(0, 0.01) weights and zero bias; DenseNet zero bias; ResNets
    # PyTorch's default Linear init (uniform bias in +-1/sqrt(fan_in)).
    torch.manual_seed(0)
    mobilenet = build_model("mobilenetv2", 1000).classifier
    assert abs(float(mobilenet.weight.std()) - 0.01) < 5e-4 and not mobilenet.bias.any()
    densenet = build_model("densenet121", 1000).classifier
    assert not densenet.bias.any()
    bound = 1 / math.sqrt(1024)
    assert float(densenet.weight.abs().max()) <= bound and float(densenet.weight.std()) > bound / 3
    resnet = build_model("resnet18", 1000).classifier
    assert resnet.bias.abs().max() <= 1 / math.sqrt(512) and resnet.bias.any()


@pytest.mark.parametrize(("name", "head"), [("resnet50", "fc"), ("resnext50_32x4d", "fc"), ("densenet121", "classifier")])
@torch.no_grad()
def test_forward_is_torchvisions_network_given_its_weights(name: str, head: str) -> None:
    """torchvision's model as the independent implementation: its weights (random, with non-trivial
    BatchNorm statistics) loaded into ours give its logits, so every stride (ResNet v1.5: on the 3x3
    conv), shortcut, pool and norm is where torchvision has it."""
    import torchvision

    torch.manual_seed(3)
    reference = getattr(torchvision.models, name)(num_classes=10).eval()
    for module in reference.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.2)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0.0, 0.2)
    ours = build_model(name, num_classes=10).eval()
    state = reference.state_dict()
    ours.backbone.model.load_state_dict({k: v for k, v in state.items() if not k.startswith(f"{head}.")}, strict=True)
    ours.classifier.load_state_dict({"weight": state[f"{head}.weight"], "bias": state[f"{head}.bias"]})
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x).logits, reference(x), rtol=1e-4, atol=1e-4)
