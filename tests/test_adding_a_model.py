"""README's "Adding a model", followed as a researcher would: a backbone of their own (the
StagedBackbone contract), registered, trains under every kind of method that reads more than the
logits (Zipf's dense votes, Dense2's auxiliary head, BYOT's heads on every stage)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import TINY_RUN, compose
from zipfls_train.engine.config_checks import ConfigError
from zipfls_train.engine.run import run_training
from zipfls_train.models import BACKBONES, build_model, register_backbone
from zipfls_train.models.wrapper import StagedBackbone


def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class TinyNet(StagedBackbone):
    """Four stages at strides 1, 2, 4, 8: 32 px in, a 4 x 4 final map, as the paper's CIFAR models."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = conv_bn_relu(3, width, 1)
        self.stages = nn.ModuleList(conv_bn_relu(width * 2 ** max(i - 1, 0), width * 2**i, 1 if i == 0 else 2) for i in range(4))
        self.final_norm = None
        self.stage_channels = [width * 2**i for i in range(4)]


@pytest.fixture
def tinynet(monkeypatch):
    monkeypatch.setattr("zipfls_train.models.BACKBONES", dict(BACKBONES))
    register_backbone("tinynet", TinyNet)
    return "tinynet"


def test_the_contract_the_wrapper_relies_on_holds_for_a_new_backbone(tinynet):
    model = build_model(tinynet, num_classes=10, aux_stages=["penultimate"]).train()
    out = model(torch.randn(2, 3, 32, 32), features=["final", "penultimate"], aux=True)
    assert out.features["final"].shape == (2, 64, 4, 4) and out.features["penultimate"].shape == (2, 32, 8, 8)
    # The logits are the classifier of the pooled final map, so the same classifier applied to each
    # pixel (Zipf's dense votes) averages to them: GAP and FC are linear.
    dense = torch.einsum("ndhw,cd->nchw", out.features["final"], model.classifier.weight) + model.classifier.bias[:, None, None]
    torch.testing.assert_close(dense.mean(dim=(2, 3)), out.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss", ["zipf", "zipf_dense2", "byot"])
def test_a_registered_backbone_trains_under_methods_that_read_its_stages(tinynet, tiny_pack_root, tmp_path, loss):
    cfg = compose([*TINY_RUN, f"dataset.root={tiny_pack_root}", f"model.name={tinynet}", "~model.options.norm", f"loss={loss}",
                   "trainer.epochs=1", "trainer.max_steps_per_epoch=3"])  # fmt: skip
    summary = run_training(cfg, tmp_path / "run")
    assert summary["status"] == "finished" and 0 <= summary["best_val_top1"] <= 100


def test_a_stage_the_new_backbone_lacks_is_refused_naming_its_stages(tinynet, tiny_pack_root, tmp_path):
    cfg = compose([*TINY_RUN, f"dataset.root={tiny_pack_root}", f"model.name={tinynet}", "~model.options.norm", "loss=zipf",
                   "loss.stages=[final,stage5]"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"stage5.*\['stage1', 'stage2', 'stage3', 'stage4'\]"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- any other timm CNN: model=timm model.name=timm.<architecture> -----------------------------------

TINY_DATA = [override for override in TINY_RUN if not override.startswith("model")]

def test_a_timm_architecture_without_a_config_of_its_own_trains_with_dense2(tiny_pack_root, tmp_path):
    from zipfls_train.models import build_model

    model = build_model("timm.resnet10t", num_classes=10)
    # resnet10t's four stages have ResNet-18's widths (timm's model card), the last pooled into the logits.
    assert model.backbone.stage_channels == [64, 128, 256, 512]
    out = model.eval()(torch.randn(2, 3, 64, 64), features=["final"])
    dense = torch.einsum("ndhw,cd->nchw", out.features["final"], model.classifier.weight) + model.classifier.bias[:, None, None]
    torch.testing.assert_close(dense.mean(dim=(2, 3)), out.logits, rtol=1e-4, atol=1e-5)

    cfg = compose([*TINY_DATA, f"dataset.root={tiny_pack_root}", "model=timm", "model.name=timm.resnet10t", "dataset.image_size=64",
                   "loss=zipf_dense2", "trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.zipf_fit_at_end=false"])  # fmt: skip
    summary = run_training(cfg, tmp_path / "run")
    assert summary["status"] == "finished"


@pytest.mark.parametrize(("name", "message"), [
    ("timm.efficentnet_b0", r"model.name='timm.efficentnet_b0': timm has no architecture 'efficentnet_b0'; similar: \['timm.efficientnet_b0'"),
    ("timm.not_a_network", r"timm has no architecture 'not_a_network' \(timm.list_models\(\) lists them\)"),
    (None, r"model.name must be given \(model=timm takes any timm architecture as model.name=timm.<architecture>"),
])  # fmt: skip
def test_a_timm_architecture_that_does_not_exist_or_is_not_given_is_named(tiny_pack_root, tmp_path, name, message):
    overrides = [*TINY_DATA, f"dataset.root={tiny_pack_root}", "model=timm", *([f"model.name={name}"] if name else [])]
    with pytest.raises(ConfigError, match=message):
        run_training(compose(overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()
