"""model=timm model.name=timm.<architecture>: the wrapped network is timm's own classification network
(GAP + linear on what forward_features returns), or the architecture is refused by name."""

from __future__ import annotations

import pytest
import timm
import torch

from zipfls_train.models import build_model, check_model_options


@pytest.mark.parametrize("architecture", ["resnetv2_18", "nf_resnet26", "efficientnet_b0"])
def test_the_wrapped_timm_model_computes_timms_own_logits(architecture):
    # resnetv2 closes its last stage with a BN + ReLU (`norm`), nf_resnet with an activation
    # (`final_act`), both after the last feature tap and of its width; efficientnet_b0's conv_head
    # widens it. The reference is timm's own 10-class network with the wrapper's weights.
    torch.manual_seed(0)
    model = build_model(f"timm.{architecture}", num_classes=10).double().eval()
    reference = timm.create_model(architecture, pretrained=False, num_classes=10).double().eval()
    missing, unexpected = reference.load_state_dict(model.backbone.model.state_dict(), strict=False)
    assert not unexpected
    head = reference.get_classifier()
    head.weight.data.copy_(model.classifier.weight.reshape(head.weight.shape))  # resnetv2's fc is a 1x1 conv
    head.bias.data.copy_(model.classifier.bias)
    head_name = next(name for name, m in reference.named_modules() if m is head)
    assert set(missing) == {f"{head_name}.weight", f"{head_name}.bias"}  # every other weight is the wrapper's
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = model(x, features=["final"])
        expected = reference(x)
    torch.testing.assert_close(out.logits, expected, rtol=1e-10, atol=1e-10)
    # Zipf's dense logits (the classifier on every pixel of the final map) average to the logits.
    weight = head.weight.reshape(10, -1)
    dense = torch.einsum("ndhw,cd->nchw", out.features["final"], weight) + head.bias[:, None, None]
    torch.testing.assert_close(dense.mean(dim=(2, 3)), expected, rtol=1e-10, atol=1e-10)


def test_every_parameter_of_a_wrapped_timm_model_gets_a_gradient():
    # DDP (find_unused_parameters=False, as the trainer wraps) stops at the second step otherwise.
    model = build_model("timm.resnetv2_18", num_classes=10)
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize(("architecture", "message"), [
    # conv_head (1x1 conv 576 -> 1024) + hardswish act on the pooled features, before the classifier.
    ("mobilenetv3_small_100", r"model.name=timm.mobilenetv3_small_100: .*\['conv_head'\] after global pooling"),
    # a LayerNorm on the pooled features (NormMlpClassifierHead).
    ("convnext_atto", r"model.name=timm.convnext_atto: .*\['head.norm'\] after global pooling.*head_norm_first=true"),
    # a token model: forward_features returns N x 197 x 192 (class token + 14 x 14 patches).
    ("vit_tiny_patch16_224", r"model.name=timm.vit_tiny_patch16_224: .*tokens \(2, 197, 192\), not an N x C x H x W map"),
])  # fmt: skip
def test_a_timm_model_the_wrapper_would_change_is_refused_by_name(architecture, message):
    with pytest.raises(ValueError, match=message):
        check_model_options(f"timm.{architecture}", {})
    with pytest.raises(ValueError):
        build_model(f"timm.{architecture}", num_classes=10)


def test_convnext_with_its_norm_before_pooling_is_taken():
    model = build_model("timm.convnext_atto", num_classes=10, head_norm_first=True)
    model(torch.randn(2, 3, 64, 64)).logits.sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


def test_a_timm_model_is_built_under_inference_mode():
    with torch.inference_mode():
        model = build_model("timm.resnetv2_18", num_classes=10)
    assert model.backbone.stage_channels == [64, 128, 256, 512]  # resnetv2_18's widths (timm's model card)


@pytest.mark.parametrize(("architecture", "module", "channels"), [
    # efficientnet_b0's conv_head widens the last tap (320) to 1280: an extra stage. resnetv2_18's
    # final norm keeps the last tap's 512: the last stage itself. (timm's model cards.)
    ("efficientnet_b0", timm.models.efficientnet.EfficientNet, [24, 40, 112, 320, 1280]),
    ("resnetv2_18", timm.models.resnetv2.ResNetV2, [64, 128, 256, 512]),
])  # fmt: skip
def test_a_model_the_meta_probe_cannot_run_gets_its_stages_by_width(architecture, module, channels, monkeypatch):
    """An op without a meta kernel stops the probe (NotImplementedError): the final map is then an
    extra stage where its width differs from the last tap's, and the model still builds and runs."""
    original = module.forward_intermediates

    def without_meta_kernel(self, x, *args, **kwargs):
        if x.is_meta:
            raise NotImplementedError("an op without a meta kernel")
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(module, "forward_intermediates", without_meta_kernel)
    model = build_model(f"timm.{architecture}", num_classes=10)
    assert model.backbone.stage_channels == channels
    out = model(torch.randn(2, 3, 64, 64), features=["final"])
    assert out.features["final"].shape[1] == channels[-1] and out.logits.shape == (2, 10)


def test_a_timm_model_is_built_under_no_grad():
    with torch.no_grad():
        model = build_model("timm.efficientnet_b0", num_classes=10)
    assert model.backbone.stage_channels == [24, 40, 112, 320, 1280]  # efficientnet_b0's widths (timm's model card)


def test_the_head_norm_first_hint_is_given_only_for_a_norm_after_pooling():
    # mobilenetv3's layers after pooling are conv_head + its activation: no norm to move before pooling.
    with pytest.raises(ValueError, match=r"\['conv_head'\] after global pooling") as refused:
        check_model_options("timm.mobilenetv3_small_100", {})
    assert "head_norm_first" not in str(refused.value)


def test_a_timm_older_than_pyproject_asks_for_is_named_with_the_fix(monkeypatch):
    # timm < 1.0.31's DenseNet (and < 1.0.3's ResNet) has no forward_intermediates: the build would
    # otherwise stop with an AttributeError inside the first forward pass.
    from zipfls_train.models import imagenet

    monkeypatch.setattr(imagenet.timm, "create_model", lambda *args, **kwargs: torch.nn.Conv2d(3, 8, 1))
    monkeypatch.setattr(imagenet.timm, "__version__", "1.0.29")
    with pytest.raises(ValueError, match=r"timm 1\.0\.29's densenet121 has no forward_intermediates.*pip install 'timm>=1\.0\.31'"):
        build_model("densenet121", num_classes=10)
    # Another timm architecture without it: no upgrade would help.
    with pytest.raises(ValueError, match=r"timm 1\.0\.29's vgg11 has no forward_intermediates.*take a CNN that has it") as refused:
        build_model("timm.vgg11", num_classes=10)
    assert "pip install" not in str(refused.value)


def test_pyproject_asks_for_the_timm_the_wrapper_needs():
    import pathlib
    import re

    from zipfls_train.models.imagenet import MIN_TIMM_VERSION

    pyproject = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"timm>=([\d.]+)"', pyproject).group(1) == MIN_TIMM_VERSION == "1.0.31"
