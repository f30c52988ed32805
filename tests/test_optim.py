"""The optimiser (SGD by hand, lr scaling) and the learning-rate schedule from the sched config."""

from __future__ import annotations

import pytest
import torch

from zipfls_train.engine.optim import build_optimizer, build_scheduler, milestone_epochs


def test_milestone_fractions_round_half_up_and_never_to_epoch_zero():
    assert milestone_epochs([0.5, 0.75], 200) == [100, 150]
    assert milestone_epochs([0.3, 0.6, 0.9], 100) == [30, 60, 90]
    assert milestone_epochs([0.5, 0.75], 2) == [1, 2]
    assert milestone_epochs([0.5, 0.75], 1) == [1, 1]  # a 1-epoch run trains at the base lr
    assert milestone_epochs([0.5, 0.3], 5) == [3, 2]  # 2.5 rounds half up (not to even), 1.5 to 2
    assert milestone_epochs([100, 150], 200) == [100, 150]
    with pytest.raises(ValueError, match="sched.milestones"):
        milestone_epochs([0.5, 150], 200)


@pytest.mark.parametrize(("warmup_epochs", "steps_per_epoch", "expected"), [
    (0, 3, [1.0, 1.0, 1.0, 0.1, 0.1, 0.1]),  # no warm-up (the paper); x 0.1 from epoch 1 (step 3) on
    (1, 3, [1 / 3, 2 / 3, 1.0, 0.1, 0.1, 0.1]),  # 3 steps: lr x (k + 1) / 3
    (0.5, 3, [1 / 2, 1.0, 1.0, 0.1, 0.1, 0.1]),  # 1.5 steps round up to 2 (down to 1 was no warm-up)
    (0.3, 10, [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),  # 0.3 x 10 is 3 steps, not 4 (3.0000000000000004 in floats)
])
def test_the_schedule_warms_up_linearly_over_whole_steps_then_decays_at_the_milestones(warmup_epochs, steps_per_epoch, expected):
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    cfg = {"name": "multistep", "milestones": [0.25], "gamma": 0.1, "warmup_epochs": warmup_epochs}
    scheduler = build_scheduler(cfg, optimizer, epochs=4, steps_per_epoch=steps_per_epoch)  # milestone: epoch 1
    factors = [scheduler.lr_lambdas[0](step) for step in range(6)]
    assert factors == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_takes_the_papers_steps_by_hand(nesterov):
    # SGD, momentum 0.9, weight decay 1e-4 (PyTorch's form, as the released code): d = g + wd w;
    # buf = d at the first step, then 0.9 buf + d; w -= lr buf, or with optim.nesterov=true
    # w -= lr (d + 0.9 buf).
    cfg = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": nesterov, "base_batch_size": None}
    weight = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    optimizer = build_optimizer(cfg, [weight], global_batch=128, device=torch.device("cpu"))
    expected, buf = 2.0, None
    for grad in (0.5, -0.25):
        weight.grad = torch.tensor([grad], dtype=torch.float64)
        optimizer.step()
        d = grad + 1e-4 * expected
        buf = d if buf is None else 0.9 * buf + d
        expected -= 0.1 * (d + 0.9 * buf if nesterov else buf)
        assert weight.item() == pytest.approx(expected, rel=1e-12)


def test_base_batch_size_scales_the_lr_linearly():
    cfg = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "base_batch_size": 256}
    for global_batch, lr in ((512, 0.2), (256, 0.1), (64, 0.025)):
        optimizer = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(1))], global_batch, torch.device("cpu"))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    unscaled = build_optimizer({**cfg, "base_batch_size": None}, [torch.nn.Parameter(torch.zeros(1))], 512, torch.device("cpu"))
    assert unscaled.param_groups[0]["lr"] == 0.1


def test_backbone_lr_factor_puts_the_backbone_in_a_group_of_its_own_at_a_multiple_of_the_lr():
    from zipfls_train.engine.optim import parameter_groups
    from zipfls_train.models import build_model

    model = build_model("cifar_resnet18", 10, aux_stages=("penultimate",), width=8)
    method_weight = torch.nn.Parameter(torch.zeros(3))  # a method's own parameter (CS-KD has none; a user's may)
    cfg = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "base_batch_size": 128}

    (single,) = parameter_groups(model, [method_weight], None)
    assert len(single["params"]) == len(list(model.parameters())) + 1

    heads, backbone = parameter_groups(model, [method_weight], 0.1)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    expected_heads = [*model.classifier.parameters(), *model.aux_heads.parameters(), method_weight]
    assert {id(p) for p in heads["params"]} == {id(p) for p in expected_heads}
    # lr 0.1 at batch 128, scaled to the global batch of 256: 0.2 for the heads, 0.02 for the backbone.
    optimizer = build_optimizer(cfg, parameter_groups(model, [method_weight], 0.1), global_batch=256, device=torch.device("cpu"))
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.2, 0.02])
    scheduler = build_scheduler({"name": "multistep", "milestones": [1], "gamma": 0.1}, optimizer, epochs=2, steps_per_epoch=1)
    optimizer.step()
    scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.02, 0.002])  # the ratio survives the decay


def test_a_backbone_at_factor_zero_keeps_its_weights_while_the_classifier_trains(run_tiny, tmp_path):
    from zipfls_train.engine.checkpoint import load_checkpoint

    _, source = run_tiny("loss=ce", "trainer.max_steps_per_epoch=2", run_dir=tmp_path / "source")
    start = load_checkpoint(source / "checkpoints" / "best.pt")["model"]
    _, probe = run_tiny("loss=ce", "trainer.max_steps_per_epoch=3", f"model.init_from={source}", "optim.backbone_lr_factor=0",
                        run_dir=tmp_path / "probe")  # fmt: skip
    trained = load_checkpoint(probe / "checkpoints" / "last.pt")["model"]
    for key, value in start.items():
        if key.startswith("backbone.") and not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(trained[key], value), key
    assert not torch.equal(trained["classifier.weight"], start["classifier.weight"])
    # BatchNorm's statistics follow the new data (a linear probe of the backbone's features otherwise).
    assert not torch.equal(trained["backbone.stem.1.running_mean"], start["backbone.stem.1.running_mean"])
    import json

    assert [json.loads(line)["lr"] for line in (probe / "metrics.jsonl").read_text().splitlines()] == pytest.approx([0.1])


@pytest.mark.parametrize("loss", ["ce", "zipf", "byot"])
def test_at_factor_zero_no_backbone_gradient_is_computed_and_an_earlier_optimiser_state_still_loads(loss, tmp_path):
    from conftest import compose
    from zipfls_train.engine.distributed import DistContext
    from zipfls_train.engine.trainer import Trainer

    cfg = compose(["dataset=synthetic", "dataset.image_size=32", "dataset.num_classes=10", "model.options.width=8", "trainer.device=cpu",
                   "trainer.batch_size=8", "trainer.precision=fp32", f"loss={loss}", "optim.backbone_lr_factor=0"])  # fmt: skip
    trainer = Trainer(cfg, DistContext(), tmp_path)
    backbone = list(trainer.model.backbone.parameters())
    heads = [p for name, p in trainer.model.named_parameters() if not name.startswith("backbone.")]
    batches = trainer.data.train.epoch(0)
    # The graph stops at the heads: the backbone's output is a leaf, so its backward never runs.
    output = trainer.model(next(trainer.data.train.epoch(1)).inputs, features=("final",))
    assert output.logits.requires_grad and not output.features["final"].requires_grad
    trainer.train_step(batches)
    assert all(p.grad is None for p in backbone)
    assert all(p.grad is not None for p in heads)  # the classifier (and BYOT's heads) train
    # The backbone keeps its group (one optimiser layout at every factor). A state written when its
    # gradients were computed at lr 0 holds momentum for it: it loads, and moves nothing.
    assert [len(group["params"]) for group in trainer.optimizer.param_groups] == [len(heads), len(backbone)]
    state = trainer.optimizer.state_dict()
    for index in state["param_groups"][1]["params"]:
        state["state"][index] = {"momentum_buffer": torch.ones_like(backbone[index - len(heads)])}
    trainer.optimizer.load_state_dict(state)
    before = [p.detach().clone() for p in backbone]
    trainer.train_step(batches)
    assert all(torch.equal(p, b) for p, b in zip(backbone, before))


def test_a_negative_backbone_lr_factor_is_refused():
    from conftest import compose
    from zipfls_train.engine.config_checks import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"optim.backbone_lr_factor must be null \(the backbone at optim.lr\) or a number >= 0 \(0 freezes it\), got -0.1"):
        validate_config(compose(["optim.backbone_lr_factor=-0.1"]))
