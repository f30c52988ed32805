"""The baselines of Tables 1-3 (TF-KD, CS-KD, PS-KD, BYOT, DDGSD, BAN): each loss against a value
computed independently from SPEC.md's formula (float64, plain tensor ops or by hand), the machinery
each needs (pairs, memory, heads, teacher) and two real training steps of each."""

from __future__ import annotations

import copy
import gc
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import compose
from omegaconf import OmegaConf

from zipfls_train.data.batch import Batch
from zipfls_train.data.class_pairs import SameClassPartners
from zipfls_train.data.images import ImageTensors
from zipfls_train.data.bundle import LoaderOptions
from zipfls_train.data.tensor_loader import TensorLoader
from zipfls_train.losses import Method, build_method
from zipfls_train.models import build_model, unwrap
from zipfls_train.models.aux_heads import BottleneckAuxHead
from zipfls_train.models.outputs import ModelOutput

@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Tiny CPU batches gain nothing from intra-op threads, and OpenMP threads on a busy 2-core
    machine stall each other (a two-step run took 15-30 s instead of ~1 s); restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- independent float64 references (written from SPEC.md, not from the code under test) ---------


def log_softmax64(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    shifted = z - z.max(dim=1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def ce64(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -log_softmax64(z)[torch.arange(len(y)), y].mean()


def kl_rows64(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """Per-sample KL(softmax(teacher/T) || softmax(student/T))."""
    log_q = log_softmax64(teacher_logits / t)
    return (log_q.exp() * (log_q - log_softmax64(student_logits / t))).sum(dim=1)


def close(value: torch.Tensor, expected: torch.Tensor | float, tol: float = 1e-5) -> bool:
    value, expected = float(torch.as_tensor(value).detach()), float(torch.as_tensor(expected).detach())
    return abs(value - expected) <= tol * max(1.0, abs(float(expected)))


def outputs_of(logits: torch.Tensor, pooled: torch.Tensor | None = None) -> ModelOutput:
    return ModelOutput(logits=logits, pooled=pooled)


def make_batch(targets: list[int], **extra) -> Batch:  # noqa: ANN003
    y = torch.tensor(targets)
    return Batch(inputs=torch.zeros(len(y), 3, 8, 8), targets=y, indices=torch.arange(len(y)), **extra)


class FlatLinear(torch.nn.Module):
    """Toy model without BatchNorm (a sample's output does not depend on the rest of its batch):
    pooled = tanh(W1 x + b1), logits = W2 pooled + b2, on flattened 3 x 4 x 4 inputs."""

    def __init__(self, num_classes: int, dim: int = 6, scale: float = 3.0) -> None:
        super().__init__()
        self.body, self.head = torch.nn.Linear(48, dim), torch.nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.head.weight.mul_(scale)  # confident enough that KL terms are far from 0

    def forward(self, x: torch.Tensor, features=(), aux: bool = False) -> ModelOutput:  # noqa: ANN001
        pooled = torch.tanh(self.body(x.flatten(1)))
        return ModelOutput(logits=self.head(pooled), pooled=pooled)

    def forward64(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled) in float64, from the weights with plain matrix ops."""
        w1, b1 = self.body.weight.detach().double(), self.body.bias.detach().double()
        w2, b2 = self.head.weight.detach().double(), self.head.bias.detach().double()
        pooled = torch.tanh(x.double().flatten(1) @ w1.T + b1)
        return pooled @ w2.T + b2, pooled


# --- TF-KD ---------------------------------------------------------------------------------------


def test_tfkd_hand_value_one_sample():
    # C = 3, y = 0, z = [1, 0, -1], T = 2, correct_prob 0.9: q = [0.9, 0.05, 0.05].
    z = [1.0, 0.0, -1.0]
    log_z = math.log(sum(math.exp(v) for v in z))
    log_p = [v - log_z for v in z]
    e = [math.exp(0.45), math.exp(0.025), math.exp(0.025)]
    teacher = [v / sum(e) for v in e]
    kl_sum = sum(t * (math.log(t) - lp) for t, lp in zip(teacher, log_p))
    ce = -log_p[0]
    method = build_method({"name": "tfkd", "alpha": 0.3, "temperature": 2.0, "multiplier": 5.0, "correct_prob": 0.9}, 3)
    terms = method.loss_terms(outputs_of(torch.tensor([z])), make_batch([0]), None)
    # reduction 'mean' divides the summed KL by N * C = 3.
    assert close(terms["tfkd_kl"], kl_sum / 3)
    assert close(terms["loss"], 0.7 * ce + 0.3 * 5.0 * kl_sum / 3)


def test_tfkd_refuses_a_teacher_whose_correct_class_is_not_its_most_likely():
    """correct_prob = 1/C makes the virtual teacher uniform (1/C on every class); below it the target
    is the least likely class. Both are refused, naming C; just above 1/C the target leads."""
    from zipfls_train.losses.tfkd import virtual_teacher

    uniform = virtual_teacher(torch.tensor([2]), 4, 0.25, 1.0)
    assert torch.allclose(uniform, torch.full((1, 4), 0.25))
    for correct_prob in (0.25, 0.1):
        with pytest.raises(ValueError, match=rf"^loss.correct_prob must be > 1/4 .*got {correct_prob}$"):
            build_method({"name": "tfkd", "correct_prob": correct_prob}, 4)
    method = build_method({"name": "tfkd", "correct_prob": 0.26}, 4)
    assert virtual_teacher(torch.tensor([2]), 4, method.correct_prob, 1.0).argmax().item() == 2


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
def test_tfkd_matches_float64_reference(reduction):
    torch.manual_seed(0)
    n, c, t, a, m = 6, 7, 20.0, 0.1, 100.0
    z, y = torch.randn(n, c) * 3, torch.randint(0, c, (n,))
    q = torch.full((n, c), 0.01 / (c - 1), dtype=torch.float64)
    q[torch.arange(n), y] = 0.99
    kl_rows = kl_rows64(q / t, z, 1.0)  # teacher softmax(q / T), untempered student
    kl = kl_rows.sum() / (n * c if reduction == "mean" else n)
    method = build_method({"name": "tfkd", "alpha": a, "temperature": t, "multiplier": m, "reduction": reduction}, c)
    terms = method.loss_terms(outputs_of(z), make_batch(y.tolist()), None)
    assert close(terms["tfkd_kl"], kl, 1e-5)
    assert close(terms["loss"], (1 - a) * ce64(z, y) + a * m * kl, 1e-5)


def test_tfkd_config_defaults_and_model_dependent_overrides():
    # SPEC.md: T 20 (ResNet) / 40 (DenseNet); m 100 for the CIFAR ResNet-18, 1 otherwise.
    resnet = compose(["loss=tfkd", "model=cifar_resnet18"]).loss
    assert (resnet.temperature, resnet.multiplier, resnet.alpha, resnet.reduction) == (20, 100, 0.1, "mean")
    densenet = compose(["loss=tfkd", "model=cifar_densenet121"]).loss
    assert (densenet.temperature, densenet.multiplier) == (40, 1)
    imagenet = compose(["loss=tfkd", "model=resnet50", "dataset=imagenet"]).loss
    assert (imagenet.temperature, imagenet.multiplier) == (20, 1.0)
    tuned = compose(["loss=tfkd", "model.tfkd.temperature=30", "model.tfkd.multiplier=7"]).loss
    assert (tuned.temperature, tuned.multiplier) == (30, 7)
    with pytest.raises(ValueError, match="reduction"):
        build_method({"name": "tfkd", "reduction": "sum"}, 10)


class _GammaOnly(Method):
    """A new method whose constructor takes its one option and not the class count."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma


class _AnyKeywords(Method):
    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options


def test_the_class_count_goes_to_the_methods_that_name_it(monkeypatch):
    import zipfls_train.losses as losses

    monkeypatch.setitem(losses.METHODS, "gamma_only", f"{__name__}:_GammaOnly")
    monkeypatch.setitem(losses.METHODS, "any_keywords", f"{__name__}:_AnyKeywords")
    assert build_method({"name": "gamma_only", "gamma": 1.0}, 10).gamma == 1.0
    with pytest.raises(ValueError, match=r"loss=gamma_only has no option\(s\) \['alpha'\]; its options are \['gamma'\]"):
        build_method({"name": "gamma_only", "alpha": 1.0}, 10)
    assert build_method({"name": "any_keywords"}, 7, 64).options == {"num_classes": 7}
    # The global batch goes only to a constructor that names it, and is not a loss option.
    assert build_method({"name": "byot"}, 10, 256).global_batch_size == 256
    with pytest.raises(ValueError, match=r"loss=byot has no option\(s\) \['global_batch_size'\]"):
        build_method({"name": "byot", "global_batch_size": 8}, 10)
    assert build_method({"name": "ce"}, 5).num_classes == 5


# --- CS-KD ---------------------------------------------------------------------------------------


def test_cskd_matches_float64_reference():
    torch.manual_seed(1)
    n, c, t, lam = 5, 6, 4.0, 1.5
    za, zb, y = torch.randn(n, c) * 2, torch.randn(n, c) * 2, torch.randint(0, c, (n,))
    method = build_method({"name": "cskd", "temperature": t, "weight": lam}, c)
    terms = method._terms(za, zb, y)
    expected = ce64(za, y) + lam * t**2 * kl_rows64(zb, za, t).mean()
    assert close(terms["loss"], expected)
    assert close(terms["cskd_kl"], t**2 * kl_rows64(zb, za, t).mean())


def test_cskd_training_step_gives_no_gradient_to_the_pair():
    model = build_model("cifar_resnet18", 4, width=4)
    method = build_method({"name": "cskd"}, 4)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    pair = torch.randn(4, 3, 16, 16, requires_grad=True)
    batch = Batch(inputs=x, targets=torch.tensor([0, 1, 2, 3]), indices=torch.arange(4), pair_inputs=pair)
    method.training_step(model, batch)["loss"].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert pair.grad is None


def test_cskd_training_step_distils_from_the_pair_forward():
    # Guards the wiring: the KL target must come from model(pair_inputs), not model(inputs).
    torch.manual_seed(11)
    n, c, t, lam = 4, 5, 4.0, 1.5
    model = FlatLinear(c)
    x, pair, y = torch.randn(n, 3, 4, 4), torch.randn(n, 3, 4, 4), torch.tensor([0, 3, 1, 3])
    method = build_method({"name": "cskd", "temperature": t, "weight": lam}, c)
    terms = method.training_step(model, Batch(inputs=x, targets=y, indices=torch.arange(n), pair_inputs=pair))
    za, zb = model.forward64(x)[0], model.forward64(pair)[0]
    kl = t**2 * kl_rows64(zb, za, t).mean()
    assert kl > 0.05
    assert close(terms["cskd_kl"], kl)
    assert close(terms["ce"], ce64(za, y))
    assert close(terms["loss"], ce64(za, y) + lam * kl)


def test_cskd_pairs_are_same_class_and_cover_the_dataset():
    # 3 classes with 5, 3 and 4 images; each image's pixels hold its dataset index, so the pair
    # drawn for a sample can be read back from the pixels (augment=none keeps them exact).
    targets = torch.tensor([0] * 5 + [1] * 3 + [2] * 4)
    images = torch.arange(len(targets), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 8, 8).contiguous()
    data = ImageTensors(images=images, targets=targets, classes=["a", "b", "c"])
    options = LoaderOptions(batch_size=4, eval_batch_size=4, device=torch.device("cpu"), seed=0, pairs=True)
    loader = TensorLoader(data, options, train=True, augment="none", image_size=8, mean=[0.0] * 3, std=[1.0] * 3)
    drawn: set[int] = set()
    for epoch in range(30):
        for batch in loader.epoch(epoch):
            pair_index = (batch.pair_inputs[:, 0, 0, 0] * 255).round().long()
            own_index = (batch.inputs[:, 0, 0, 0] * 255).round().long()
            assert torch.equal(own_index, batch.indices)
            assert torch.equal(targets[pair_index], batch.targets)
            # SPEC.md: *another* sample of the same class, never the sample itself.
            assert not torch.any(pair_index == own_index), (own_index, pair_index)
            drawn.update(pair_index.tolist())
    assert drawn == set(range(len(targets)))


def test_cskd_partner_draw_is_uniform_over_the_other_samples_of_the_class():
    # Class 0 holds dataset indices 0, 2, 5 (interleaved with class 1); class 2 has one sample.
    targets = torch.tensor([0, 1, 0, 1, 1, 0, 2])
    partners = SameClassPartners(targets, 3)
    # u in [0, 1/2) picks the first other sample of the class, [1/2, 1) the second.
    index = torch.tensor([0, 0, 2, 2, 5, 5, 1, 4, 6])
    u = torch.tensor([0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.49, 0.999, 0.7])
    expected = torch.tensor([2, 5, 0, 5, 0, 2, 3, 3, 6])  # a lone sample can only pair with itself
    assert torch.equal(partners.draw(index, targets[index], u), expected)


# --- PS-KD ---------------------------------------------------------------------------------------


def test_pskd_alpha_schedule():
    method = build_method({"name": "pskd", "final_alpha": 0.8}, 5)
    seen = []
    for epoch in range(4):
        method.on_epoch_start(epoch, 4)
        seen.append(method.alpha)
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_pskd_epoch0_is_onehot_then_uses_last_epochs_softmax():
    torch.manual_seed(2)
    n, c = 4, 5
    method = build_method({"name": "pskd", "memory_dtype": "float32"}, c)
    method.setup(num_classes=c, dataset_size=10, model_factory=None)
    y = torch.randint(0, c, (n,))
    batch = Batch(inputs=torch.zeros(n, 3, 8, 8), targets=y, indices=torch.tensor([7, 1, 3, 9]))
    first = torch.randn(n, c)
    method.on_epoch_start(0, 10)
    terms = method.loss_terms(outputs_of(first), batch, None)
    assert close(terms["loss"], ce64(first, y))  # epoch 0: one-hot targets (released code)
    assert not method.seen.any()  # stored after the backward pass, not during the step
    method.after_backward()
    second = torch.randn(n, c)
    method.on_epoch_start(1, 10)
    a = 0.8 * 2 / 10
    target = (1 - a) * torch.nn.functional.one_hot(y, c).double() + a * log_softmax64(first).exp()
    expected = -(target * log_softmax64(second)).sum(dim=1).mean()
    assert close(method.loss_terms(outputs_of(second), batch, None)["loss"], expected)
    assert method.seen.nonzero().flatten().tolist() == [1, 3, 7, 9]


@pytest.mark.parametrize(("memory", "bytes_in_float32"), [("full", 20 * 12 * 4), ("topk", 20 * 3 * 4)])
def test_pskd_auto_memory_dtype_is_float32_up_to_the_size_limit(memory, bytes_in_float32, monkeypatch):
    from zipfls_train.losses import pskd

    for limit, expected in [(bytes_in_float32, torch.float32), (bytes_in_float32 - 1, torch.float16)]:
        monkeypatch.setattr(pskd, "AUTO_FLOAT32_BYTES", limit)
        method = build_method({"name": "pskd", "memory": memory, "topk": 3}, 12)
        method.setup(num_classes=12, dataset_size=20, model_factory=None)
        stored = method.memory if memory == "full" else method.memory_values
        assert stored.dtype == expected, (limit, stored.dtype)
    monkeypatch.setattr(pskd, "AUTO_FLOAT32_BYTES", 1 << 30)
    method = build_method({"name": "pskd"}, 12)
    method.setup(num_classes=12, dataset_size=20, model_factory=None)
    method.on_epoch_start(0, 5)
    logits = torch.randn(4, 12) * 3
    batch = Batch(inputs=torch.zeros(4, 3, 8, 8), targets=torch.zeros(4, dtype=torch.long), indices=torch.arange(4))
    method.loss_terms(outputs_of(logits), batch, None)
    method.after_backward()
    assert torch.equal(method.memory[:4], torch.softmax(logits, dim=1))  # float32, as the released code keeps it


@pytest.mark.parametrize("memory", ["full", "topk"])
def test_pskd_memory_survives_a_checkpoint_round_trip(memory, tmp_path):
    torch.manual_seed(3)
    c = 12
    method = build_method({"name": "pskd", "memory": memory, "topk": 3}, c)
    method.setup(num_classes=c, dataset_size=20, model_factory=None)
    method.on_epoch_start(0, 5)
    batch = Batch(inputs=torch.zeros(6, 3, 8, 8), targets=torch.randint(0, c, (6,)), indices=torch.arange(6) * 3)
    logits = torch.randn(6, c) * 3
    method.loss_terms(outputs_of(logits), batch, None)
    method.after_backward()
    torch.save(method.state_dict(), tmp_path / "method.pt")
    fresh = build_method({"name": "pskd", "memory": memory, "topk": 3}, c)
    fresh.setup(num_classes=c, dataset_size=20, model_factory=None)
    fresh.load_state_dict(torch.load(tmp_path / "method.pt"))
    for name, tensor in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    prev = fresh.previous_predictions(batch.indices, batch.targets)
    probs = torch.softmax(logits, dim=1)
    if memory == "full":
        assert torch.allclose(prev, probs, atol=1e-3)
    else:  # the top 3, renormalised
        top = probs.topk(3, dim=1)
        expected = torch.zeros_like(probs).scatter_(1, top.indices, top.values)
        assert torch.allclose(prev, expected / expected.sum(1, keepdim=True), atol=2e-3)
    unseen = fresh.previous_predictions(torch.tensor([1]), torch.tensor([4]))
    assert unseen.tolist() == [[0, 0, 0, 0, 1.0] + [0] * 7]


# --- BYOT ----------------------------------------------------------------------------------------


def test_byot_loss_matches_float64_reference():
    torch.manual_seed(4)
    method = build_method({"name": "byot", "alpha": 0.3, "temperature": 3.0, "feature_weight": 1e-3}, 6)
    model = build_model("cifar_resnet18", 6, aux_stages=method.needs.aux_stages, aux_head=method.needs.aux_head, width=4)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 5, 2, 2])
    terms = method.training_step(model, Batch(inputs=x, targets=y, indices=torch.arange(4)))
    # Reference: the same forward (same BN batch statistics), losses in float64 from SPEC's formula.
    maps = model.backbone.forward_stages(x)
    final_features = maps[-1].mean(dim=(2, 3)).double()
    final_logits = model.classifier(maps[-1].mean(dim=(2, 3))).double()
    ce_sum, kd_sum, l2_sum = ce64(final_logits, y), 0.0, 0.0
    for i, name in enumerate(("stage1", "stage2", "stage3")):
        head = model.aux_heads[name]
        features = head.bottleneck(maps[i]).mean(dim=(2, 3)).double()
        logits = features @ head.fc.weight.double().T + head.fc.bias.double()
        ce_sum = ce_sum + ce64(logits, y)
        kd_sum = kd_sum + 9.0 * kl_rows64(final_logits, logits, 3.0).mean()
        l2_sum = l2_sum + ((features - final_features) ** 2).sum()
    expected = 0.7 * ce_sum + 0.3 * kd_sum + 1e-3 * l2_sum
    assert close(terms["loss"], expected, 1e-4)
    assert close(terms["byot_feature_l2"], l2_sum, 1e-4)
    assert close(terms["byot_kl"], kd_sum, 1e-4)


@pytest.mark.parametrize("loss", ["ce", "byot"])
def test_an_accumulated_step_has_the_whole_batch_gradient(tiny_pack_root, tmp_path, loss):
    """trainer.accumulate_steps=4 must give one optimiser step the gradient of the global batch taken
    at once (BatchNorm frozen: its batch statistics are the one thing a split changes). BYOT's feature
    term is a sum over the batch: averaged over micro-batches as batch means are, it was a quarter
    of the global batch's sum (its weight, and its logged value, divided by the micro-batches)."""
    from zipfls_train.engine.distributed import DistContext
    from zipfls_train.engine.trainer import Trainer

    options = {"ce": ["loss=ce"], "byot": ["loss=byot", "loss.feature_weight=1.0"]}[loss]
    gradients, terms, weights = [], [], None
    for steps in (1, 4):
        cfg = compose(["dataset=tinyimagenet", "dataset.format=pack", "dataset.num_classes=10", f"dataset.root={tiny_pack_root}",
                       "model.options.width=8", "trainer.device=cpu", "trainer.batch_size=16", "trainer.precision=fp32",
                       f"trainer.accumulate_steps={steps}", *options])  # fmt: skip
        torch.manual_seed(0)
        trainer = Trainer(cfg, DistContext(), tmp_path / str(steps))
        weights = weights or copy.deepcopy(trainer.model.state_dict())
        trainer.model.load_state_dict(weights)
        trainer.model.eval()
        terms.append(trainer.train_step(trainer.data.train.epoch(0)))
        gradients.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None]))
    whole, accumulated = gradients
    assert (accumulated - whole).norm() <= 1e-4 * whole.norm()
    if loss != "ce":  # the logged term: the global batch's sum, however the batch was split
        assert close(terms[1]["byot_feature_l2"], terms[0]["byot_feature_l2"], 1e-4)


def test_byot_heads_follow_the_stage_layout_and_vanish_from_the_evaluated_model():
    method = build_method({"name": "byot"}, 10)
    model = build_model("cifar_resnet18", 10, aux_stages=method.needs.aux_stages, aux_head=method.needs.aux_head, width=8)
    plain = build_model("cifar_resnet18", 10, width=8)
    for index, name in enumerate(("stage1", "stage2", "stage3")):
        head = model.aux_heads[name]
        assert isinstance(head, BottleneckAuxHead) and head.feature_channels == 64  # the final width
        assert head.bottleneck[3].stride == (2 ** (3 - index),) * 2  # down to the final resolution
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    assert before.aux_logits == {}  # the eval forward never runs the heads
    evaluated = model.without_aux_heads()
    assert len(evaluated.aux_heads) == 0
    assert sum(p.numel() for p in evaluated.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not any(k.startswith("aux_heads.") for k in evaluated.state_dict())
    with torch.no_grad():
        assert torch.equal(evaluated(x).logits, before.logits)


# --- DDGSD ---------------------------------------------------------------------------------------


def test_ddgsd_matches_float64_reference():
    torch.manual_seed(6)
    n, c, d, lam, mu = 4, 5, 7, 1.0, 5e-4
    z, f, y = torch.randn(2 * n, c) * 2, torch.rand(2 * n, d) * 3, torch.randint(0, c, (n,))
    method = build_method({"name": "ddgsd", "weight": lam, "mmd_weight": mu}, c)
    terms = method.loss_terms(outputs_of(z, f), make_batch(y.tolist()), None)
    z1, z2 = z[:n], z[n:]
    kl = kl_rows64(z2, z1, 1.0).mean() + kl_rows64(z1, z2, 1.0).mean()
    mmd = ((f[:n].double().mean(0) - f[n:].double().mean(0)) ** 2).sum()
    assert close(terms["ddgsd_kl"], kl)
    assert close(terms["ddgsd_mmd"], mmd)
    assert close(terms["loss"], ce64(z1, y) + ce64(z2, y) + lam * kl + mu * mmd)



def test_a_teacher_class_at_minus_infinity_is_a_probability_of_zero():
    """tempered_kl (CS-KD, BYOT, DDGSD, BAN) with a teacher logit of -inf (a masked class): that
    class's term is 0 (it was 0 * -inf = NaN), the rest as the float64 KL without it."""
    from zipfls_train.losses.distill import tempered_kl

    torch.manual_seed(3)
    student, teacher, t = torch.randn(2, 5), torch.randn(2, 5), 4.0
    teacher[:, 1] = float("-inf")
    kept = [0, 2, 3, 4]
    q = torch.softmax(teacher[:, kept].double() / t, dim=1)
    log_p = torch.log_softmax(student.double() / t, dim=1)[:, kept]
    expected = t**2 * (q * (q.log() - log_p)).sum(1).mean()
    assert close(tempered_kl(student, teacher, t), expected)
    # The student masked alike (a model distilled into itself): the class drops out of both.
    student[:, 1] = float("-inf")
    log_p = torch.log_softmax(student[:, kept].double() / t, dim=1)
    assert close(tempered_kl(student, teacher, t), t**2 * (q * (q.log() - log_p)).sum(1).mean())


def test_ddgsd_tempered_kl_is_t_squared_times_the_kl_of_the_tempered_softmaxes():
    """DDGSD at T = 3 (the other DDGSD tests run at the default T = 1, where the T^2 factor is 1):
    the module's equation, T^2 [KL(sg(p2) || p1) + KL(sg(p1) || p2)] with p_v = softmax(z_v / T),
    from the float64 reference; and its gradient T (p1 - p2) / N on z1 (the direction whose target
    is sg(p1) gives z1 nothing), T (p2 - p1) / N on z2."""
    torch.manual_seed(7)
    n, c, d, lam, mu, t = 4, 5, 3, 1.5, 5e-4, 3.0
    z, f, y = (torch.randn(2 * n, c) * 4).requires_grad_(), torch.rand(2 * n, d), torch.randint(0, c, (n,))
    method = build_method({"name": "ddgsd", "weight": lam, "mmd_weight": mu, "temperature": t}, c)
    terms = method.loss_terms(outputs_of(z, f), make_batch(y.tolist()), None)
    z1, z2 = z.detach()[:n], z.detach()[n:]
    kl = t**2 * (kl_rows64(z2, z1, t).mean() + kl_rows64(z1, z2, t).mean())
    mmd = ((f[:n].double().mean(0) - f[n:].double().mean(0)) ** 2).sum()
    assert kl > 0.05
    assert close(terms["ddgsd_kl"], kl)
    assert close(terms["loss"], ce64(z1, y) + ce64(z2, y) + lam * kl + mu * mmd)
    terms["ddgsd_kl"].backward()
    # d/dz1 of T^2 KL(sg(p2^T) || p1^T), batch mean: T (p1^T - p2^T) / N; and symmetrically for z2.
    p1, p2 = softmax64(z1, t), softmax64(z2, t)
    expected = torch.cat([p1 - p2, p2 - p1]) * t / n
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-7)

def test_ddgsd_kl_targets_are_stop_gradient():
    z = torch.randn(4, 3, requires_grad=True)
    method = build_method({"name": "ddgsd", "mmd_weight": 0.0}, 3)
    terms = method.loss_terms(outputs_of(z, torch.zeros(4, 2)), make_batch([0, 1]), None)
    terms["ddgsd_kl"].backward()
    # d/dz1 of KL(sg(p2)||p1) = p1 - p2 (batch mean over 2): only the student side gets gradient.
    p = torch.softmax(z.detach(), dim=1)
    expected = torch.cat([p[:2] - p[2:], p[2:] - p[:2]]) / 2
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_ddgsd_training_step_uses_both_views():
    # Guards the wiring: the second forward must see batch.second_view (else KL and MMD are ~0).
    torch.manual_seed(12)
    n, c, lam, mu = 4, 5, 1.5, 0.5
    model = FlatLinear(c)
    x1, x2, y = torch.randn(n, 3, 4, 4), torch.randn(n, 3, 4, 4), torch.tensor([2, 0, 4, 2])
    method = build_method({"name": "ddgsd", "weight": lam, "mmd_weight": mu}, c)
    terms = method.training_step(model, Batch(inputs=x1, targets=y, indices=torch.arange(n), second_view=x2))
    (z1, f1), (z2, f2) = model.forward64(x1), model.forward64(x2)  # two separate forwards
    ce = ce64(z1, y) + ce64(z2, y)
    kl = kl_rows64(z2, z1, 1.0).mean() + kl_rows64(z1, z2, 1.0).mean()  # T = 1 (default)
    mmd = ((f1.mean(0) - f2.mean(0)) ** 2).sum()
    assert kl > 0.05 and mmd > 0.01
    assert close(terms["ce"], ce)
    assert close(terms["ddgsd_kl"], kl)
    assert close(terms["ddgsd_mmd"], mmd)
    assert close(terms["loss"], ce + lam * kl + mu * mmd)


# --- BAN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature_squared", [False, True])
def test_ban_distillation_matches_float64_reference(temperature_squared):
    # a T^2 KL(teacher^T || p^T) + (1 - a) CE, or without the T^2 when asked.
    torch.manual_seed(7)
    n, c, a, t = 5, 6, 0.2, 20.0
    z, teacher, y = torch.randn(n, c) * 4, torch.randn(n, c) * 4, torch.randint(0, c, (n,))
    method = build_method({"name": "ban", "temperature_squared": temperature_squared}, c)
    terms = method._distil_terms(z, teacher, y)
    kd_scale = t**2 if temperature_squared else 1.0
    expected = (1 - a) * ce64(z, y) + a * kd_scale * kl_rows64(teacher, z, t).mean()
    assert close(terms["loss"], expected)


def test_ban_default_distils_at_hinton_scale():
    """loss=ban as composed: at T = 20 the KL must carry T^2, or its gradient is ~1e-4 of CE's and
    generation 2 trains as CE (the paper's BAN cells gain +0.5 to +2.2 over CE)."""
    loss = compose(["loss=ban"]).loss
    assert (loss.alpha, loss.temperature) == (0.2, 20.0)
    torch.manual_seed(8)
    n, c = 6, 10
    z = (torch.randn(n, c, dtype=torch.float64) * 3).requires_grad_()
    teacher, y = torch.randn(n, c, dtype=torch.float64) * 3, torch.randint(0, c, (n,))
    student = z.detach().float().requires_grad_()
    terms = build_method(OmegaConf.to_container(loss), c)._distil_terms(student, teacher.float(), y)
    expected = 0.8 * ce64(z, y) + 0.2 * 400.0 * kl_rows64(teacher, z, 20.0).mean()
    assert close(terms["loss"], expected)
    # The distillation part of the loss's gradient (all of it but the CE part) is a sizeable share
    # of the CE part, not a rounding error: without T^2 it would be 400x smaller.
    terms["loss"].backward()
    grad_ce = 0.8 * ce_grad64(z.detach(), y)
    assert (student.grad.double() - grad_ce).norm() > 0.01 * grad_ce.norm()


def test_ban_requires_an_existing_teacher_and_names_the_path(tmp_path):
    missing = tmp_path / "gen1" / "checkpoints" / "best.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_method({"name": "ban", "generation": 2, "teacher_checkpoint": str(missing)}, 10)
    with pytest.raises(ValueError, match="teacher_checkpoint"):
        build_method({"name": "ban", "generation": 2}, 10)
    with pytest.raises(ValueError, match="generation=1"):
        build_method({"name": "ban", "generation": 1, "teacher_checkpoint": str(missing)}, 10)


def test_ban_distils_from_the_checkpointed_teacher(tmp_path):
    # Guards the wiring: the KL target must be the loaded teacher's logits (not the student's own).
    from zipfls_train.engine.checkpoint import save_atomic

    n, c, a, t = 4, 5, 0.2, 4.0
    torch.manual_seed(13)
    saved = FlatLinear(c)
    save_atomic({"model": saved.state_dict()}, tmp_path / "best.pt")
    torch.manual_seed(14)
    student = FlatLinear(c)
    reference_teacher = FlatLinear(c)
    reference_teacher.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=False)["model"])
    method = build_method({"name": "ban", "generation": 2, "teacher_checkpoint": str(tmp_path / "best.pt"),
                           "alpha": a, "temperature": t}, c)
    method.setup(num_classes=c, dataset_size=n, model_factory=lambda: FlatLinear(c))
    x, y = torch.randn(n, 3, 4, 4), torch.tensor([1, 1, 0, 4])
    terms = method.training_step(student, Batch(inputs=x, targets=y, indices=torch.arange(n)))
    z, teacher_z = student.forward64(x)[0], reference_teacher.forward64(x)[0]
    kl = kl_rows64(teacher_z, z, t).mean()
    assert kl > 0.01
    assert close(terms["ban_kl"], kl)
    assert close(terms["loss"], (1 - a) * ce64(z, y) + a * t**2 * kl)


@torch.no_grad()
def test_ban_teacher_from_a_run_with_auxiliary_heads_loads_without_them(tmp_path):
    # A teacher trained with heads (Zipf's Dense2, BYOT) has aux_heads.* weights; they never affect the
    # logits, so the student's head-less model takes the rest and gives the trained model's logits.
    from zipfls_train.engine.checkpoint import save_atomic
    from zipfls_train.losses.ban import load_teacher
    from zipfls_train.models import build_model

    torch.manual_seed(3)
    trained = build_model("cifar_resnet18", 5, aux_stages=("penultimate",), width=4).eval()
    assert any(key.startswith("aux_heads.") for key in trained.state_dict())
    save_atomic({"model": trained.state_dict()}, tmp_path / "best.pt")
    teacher = load_teacher(tmp_path / "best.pt", lambda: build_model("cifar_resnet18", 5, width=4))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(x).logits, trained(x).logits)


def test_ban_trains_generation_2_from_a_real_best_checkpoint(run_tiny, tmp_path):
    _, teacher_dir = run_tiny("loss=ce", "trainer.max_steps_per_epoch=2", run_dir=tmp_path / "gen1")
    best = teacher_dir / "checkpoints" / "best.pt"
    assert best.is_file()
    cfg = compose(["loss=ban", "loss.generation=2", f"loss.teacher_checkpoint={best}", "model=cifar_resnet18", "model.options.width=8"])
    method = build_method(dict(cfg.loss), 10)
    method.setup(num_classes=10, dataset_size=400, model_factory=lambda: build_model("cifar_resnet18", 10, width=8))
    teacher = method.teacher
    saved = torch.load(best, weights_only=False)["model"]
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in saved.items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert list(method.parameters()) == [] and method.state_dict() == {}  # out of optimiser and checkpoints
    summary, run_dir = run_tiny(
        "loss=ban", "loss.generation=2", f"loss.teacher_checkpoint={best}", "trainer.max_steps_per_epoch=2",
        run_dir=tmp_path / "gen2",
    )
    assert summary["status"] == "finished"
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(record[f"train_{term}"]) for term in ("loss", "ce", "ban_kl"))
    assert record["train_ban_kl"] >= 0


# --- DDP (gloo, 2 processes): BYOT's heads are all-reduced, PS-KD's memory is all-gathered -------


def _ddp_worker(rank: int, world: int, store: str, run_dir: str) -> None:
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # The Trainer hands BYOT the global batch (both ranks' 8 samples together), not a rank's 8.
        from zipfls_train.engine.distributed import DistContext
        from zipfls_train.engine.trainer import Trainer

        cfg = compose(["dataset=synthetic", "dataset.num_classes=10", "dataset.image_size=32", "model=cifar_resnet18",
                       "model.options.width=4", "trainer.device=cpu", "trainer.batch_size=16", "loss=byot"])  # fmt: skip
        trainer = Trainer(cfg, DistContext(rank=rank, world_size=world), Path(run_dir))
        assert len(trainer.data.train.batch.targets) == 8 and trainer.method.global_batch_size == 16
        del trainer
        byot = build_method({"name": "byot"}, 10)
        torch.manual_seed(0)  # identical initial weights on both ranks, as DDP requires
        model = build_model("cifar_resnet18", 10, aux_stages=byot.needs.aux_stages, aux_head=byot.needs.aux_head, width=4)
        local = copy.deepcopy(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # different data per rank
        batch = Batch(inputs=torch.randn(4, 3, 32, 32), targets=torch.randint(0, 10, (4,)), indices=torch.arange(4) + 4 * rank)
        byot.training_step(ddp, batch)["loss"].backward()
        byot.training_step(local, batch)["loss"].backward()  # this rank's own gradient, no DDP
        for name in ("stage1", "stage2", "stage3"):
            grad = unwrap(ddp).aux_heads[name].fc.weight.grad
            mean_local = local.aux_heads[name].fc.weight.grad.clone()
            dist.all_reduce(mean_local)
            torch.testing.assert_close(grad, mean_local / world, rtol=1e-4, atol=1e-6, msg=f"{name} head not all-reduced")
        # BYOT's summed feature term over the global batch (2 ranks x 4): DDP's mean of the ranks'
        # gradients is one process's gradient of the whole batch (BatchNorm frozen), feature term too.
        torch.manual_seed(0)
        model = build_model("cifar_resnet18", 10, aux_stages=byot.needs.aux_stages, aux_head=byot.needs.aux_head, width=4).eval()
        whole_model = copy.deepcopy(model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        options = {"name": "byot", "feature_weight": 1.0}
        build_method(options, 10, 4 * world).training_step(ddp, batch)["loss"].backward()
        batches = []
        for other in range(world):
            torch.manual_seed(100 + other)
            batches.append((torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))))
        whole = Batch(inputs=torch.cat([b[0] for b in batches]), targets=torch.cat([b[1] for b in batches]), indices=torch.arange(8))
        build_method(options, 10, 4 * world).training_step(whole_model, whole)["loss"].backward()
        for (name, parameter), expected in zip(unwrap(ddp).named_parameters(), whole_model.parameters()):
            if expected.grad is not None:
                torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)
        pskd = build_method({"name": "pskd", "memory_dtype": "float32"}, 10)
        pskd.setup(num_classes=10, dataset_size=8, model_factory=None)
        logits = torch.randn(4, 10)
        pskd.loss_terms(ModelOutput(logits=logits), batch, None)
        pskd.after_backward()
        assert pskd.seen.all(), "PS-KD did not store the other rank's predictions"
        everyone = [torch.zeros_like(logits) for _ in range(world)]
        dist.all_gather(everyone, logits)
        torch.testing.assert_close(pskd.memory, torch.softmax(torch.cat(everyone), dim=1))
        # As engine/run.py does: release the DDP reducer (it holds the process group) and meet the
        # other rank before the group goes, or gloo may abort at exit ("terminate called ...").
        del ddp
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_all_reduces_byot_heads_and_all_gathers_pskd_memory(tmp_path):
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2, join=True)


# --- the shipped defaults are SPEC.md section 2's ------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss=ls"], {"epsilon": 0.1}),
        (["loss=cskd", "model=cifar_resnet18"], {"temperature": 4.0, "weight": 1.0}),
        (["loss=cskd", "model=resnet50", "dataset=imagenet"], {"temperature": 4.0, "weight": 3.0}),  # lam 3 at ImageNet scale
        (["loss=cskd", "model=resnet50", "dataset=inat21"], {"temperature": 4.0, "weight": 3.0}),
        (["loss=pskd"], {"final_alpha": 0.8}),
        (["loss=byot"], {"alpha": 0.1, "temperature": 3.0, "feature_weight": 1e-6}),
        # T = 1: DDGSD distils the plain softmaxes (SPEC lists no temperature for it).
        (["loss=ddgsd"], {"weight": 1.0, "mmd_weight": 5e-4, "temperature": 1.0}),
        # The virtual teacher: 0.99 on y; the KL reduced as the released code ('mean', over N x C).
        (["loss=tfkd"], {"alpha": 0.1, "correct_prob": 0.99, "reduction": "mean"}),
        (["loss=ban"], {"alpha": 0.2, "temperature": 20.0}),
        # Zipf's reference options (SPEC section 1); lambda, upsample and beta are per dataset
        # (tests/test_experiment_configs.py's DATASET_RECIPES).
        (["loss=zipf"], {"alpha": 1.0, "distribution": "zipf", "rank_by": "dense", "stages": ["final"]}),
    ],
    ids=lambda value: ",".join(value) if isinstance(value, list) else None,
)
def test_composed_loss_defaults_are_the_spec_values(overrides, expected):
    loss = OmegaConf.to_container(compose(overrides).loss, resolve=True)
    assert {key: loss[key] for key in expected} == expected  # YAML reads 0.99 and 5.0e-4 as these floats


# --- gradients: every distillation term trains the student, and only the student ----------------
# Analytic gradients of SPEC's formulas with respect to the student logits z (batch means over N):
#   d CE / dz = (softmax(z) - onehot(y)) / N
#   d [T^2 KL(softmax(t/T) || softmax(z/T))] / dz = T (softmax(z/T) - softmax(t/T)) / N
# A term whose student side were detached would leave the loss values above unchanged and fail here.


def softmax64(z: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    return log_softmax64(z / t).exp()


def ce_grad64(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (softmax64(z) - torch.nn.functional.one_hot(y, z.shape[1]).double()) / len(y)


def student_logits(n: int, c: int, seed: int) -> torch.Tensor:
    return (torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3).requires_grad_()


def test_tfkd_gradient_is_the_virtual_teachers_pull():
    n, c, t, a, m = 5, 6, 20.0, 0.1, 100.0
    z, y = student_logits(n, c, 21), torch.tensor([0, 5, 2, 2, 1])
    method = build_method({"name": "tfkd", "alpha": a, "temperature": t, "multiplier": m, "reduction": "mean"}, c)
    method.loss_terms(outputs_of(z), make_batch(y.tolist()), None)["loss"].backward()
    q = torch.full((n, c), 0.01 / (c - 1), dtype=torch.float64)
    q[torch.arange(n), y] = 0.99
    teacher = softmax64(q, t)  # softmax(q / T); the student has no temperature; 'mean' divides by N * C
    expected = (1 - a) * ce_grad64(z.detach(), y) + a * m * (softmax64(z.detach()) - teacher) / (n * c)
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-4, atol=1e-7)


def test_cskd_gradient_reaches_the_sample_and_not_its_pair():
    n, c, t, lam = 5, 6, 4.0, 1.5
    za, zb, y = student_logits(n, c, 22), student_logits(n, c, 23), torch.tensor([3, 0, 1, 5, 5])
    method = build_method({"name": "cskd", "temperature": t, "weight": lam}, c)
    method._terms(za, zb, y)["loss"].backward()
    za64, zb64 = za.detach().double(), zb.detach().double()
    expected = ce_grad64(za64, y) + lam * t * (softmax64(za64, t) - softmax64(zb64, t)) / n
    torch.testing.assert_close(za.grad.double(), expected, rtol=1e-4, atol=1e-7)
    assert zb.grad is None  # the pair's prediction is a constant target


@pytest.mark.parametrize("temperature_squared", [False, True])
def test_ban_gradient_reaches_the_student_and_not_the_teacher(temperature_squared):
    n, c, a, t = 5, 6, 0.2, 20.0
    z, teacher, y = student_logits(n, c, 24), student_logits(n, c, 25), torch.tensor([1, 1, 0, 4, 2])
    method = build_method({"name": "ban", "temperature_squared": temperature_squared}, c)
    method._distil_terms(z, teacher, y)["loss"].backward()
    z64, t64 = z.detach().double(), teacher.detach().double()
    kd_scale = t**2 if temperature_squared else 1.0
    expected = (1 - a) * ce_grad64(z64, y) + a * kd_scale * (softmax64(z64, t) - softmax64(t64, t)) / (t * n)
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-4, atol=1e-9)
    assert teacher.grad is None


def test_byot_gradients_teach_the_heads_and_leave_the_deepest_classifier_to_the_labels():
    """The KD and L2 terms pull each head's logits and features toward the final ones (their
    analytic gradients below); the final logits, the heads' constant target, get only the CE
    gradient (1 - a) (softmax - onehot) / N, and the final features only what flows back through
    the classifier (the L2 term's target is constant too)."""
    from zipfls_train.losses.byot import AUX_STAGES

    a, t, b = 0.3, 3.0, 1e-2
    method = build_method({"name": "byot", "alpha": a, "temperature": t, "feature_weight": b}, 6)
    model = build_model("cifar_resnet18", 6, aux_stages=method.needs.aux_stages, aux_head=method.needs.aux_head, width=4)
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(26)), torch.tensor([0, 5, 2, 2])
    outputs = model(x, features=AUX_STAGES)
    for tensor in (outputs.logits, outputs.pooled):
        tensor.retain_grad()
    heads = unwrap(model).aux_heads
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # head -> (features, logits) of the loss's own forward

    def keep(name: str):  # noqa: ANN202
        def hook(_fc, inputs, logits):  # noqa: ANN001, ANN202
            inputs[0].retain_grad()
            logits.retain_grad()
            seen[name] = (inputs[0], logits)

        return hook

    handles = [heads[name].fc.register_forward_hook(keep(name)) for name in AUX_STAGES]
    try:
        method.loss_terms(outputs, Batch(inputs=x, targets=y, indices=torch.arange(4)), model)["loss"].backward()
    finally:
        for handle in handles:
            handle.remove()
    final_logits, final_features = outputs.logits.detach().double(), outputs.pooled.detach().double()
    final_grad = (1 - a) * ce_grad64(final_logits, y)
    torch.testing.assert_close(outputs.logits.grad.double(), final_grad, rtol=1e-4, atol=1e-8)
    classifier = unwrap(model).classifier.weight.detach().double()
    torch.testing.assert_close(outputs.pooled.grad.double(), final_grad @ classifier, rtol=1e-4, atol=1e-8)
    for name in AUX_STAGES:
        features, logits = seen[name]
        logits64, features64 = logits.detach().double(), features.detach().double()
        expected = (1 - a) * ce_grad64(logits64, y) + a * t * (softmax64(logits64, t) - softmax64(final_logits, t)) / len(y)
        torch.testing.assert_close(logits.grad.double(), expected, rtol=1e-4, atol=1e-8)
        head_weight = heads[name].fc.weight.detach().double()
        # the features' gradient: what the head's logits send back through its fc, plus the L2 pull
        expected_features = expected @ head_weight + 2 * b * (features64 - final_features)
        torch.testing.assert_close(features.grad.double(), expected_features, rtol=1e-4, atol=1e-8)


# --- two real training steps of every method ---------------------------------------------------

EXPECTED_TERMS = {  # "top1": the batch's training accuracy, which every method reports
    "tfkd": {"loss", "ce", "tfkd_kl", "top1"},
    "cskd": {"loss", "ce", "cskd_kl", "top1"},
    "pskd": {"loss", "pskd_ce", "alpha_t", "top1"},
    "byot": {"loss", "ce", "ce_stage1", "ce_stage2", "ce_stage3", "byot_kl", "byot_feature_l2", "top1"},
    "ddgsd": {"loss", "ce", "ddgsd_kl", "ddgsd_mmd", "top1"},
    # ban: generation 1 is plain CE; generation 2's steps run in test_ban_trains_generation_2_...
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TERMS))
def test_two_training_steps_log_finite_terms(run_tiny, name):
    summary, run_dir = run_tiny(f"loss={name}", "trainer.max_steps_per_epoch=2", "trainer.epochs=1")
    assert summary["status"] == "finished"
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    logged = {key[len("train_"):] for key in record if key.startswith("train_")}
    assert EXPECTED_TERMS[name] <= logged, logged
    assert all(math.isfinite(record[f"train_{term}"]) for term in EXPECTED_TERMS[name])
    if name == "pskd":
        state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["method"]
        assert int(state["seen"].sum()) == 2 * 16  # two steps of 16 samples were stored
        # a_t = a_T (t + 1) / E with the trainer's epoch t = 0 of E = 1: the configured a_T = 0.8
        assert record["train_alpha_t"] == pytest.approx(0.8, rel=1e-6)
