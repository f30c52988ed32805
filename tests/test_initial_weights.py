"""model.init_from: runs that start from trained weights. Expected values come from elsewhere: the
networks torchvision builds (its own ResNet and DenseNet code, its own key names, old and new), and
the tensors of the files themselves."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from conftest import REPO, TINY_RUN

# The tiny runs' settings for another model than their narrow cifar_resnet18.
TINY_RUN_ANY_MODEL = [override for override in TINY_RUN if not override.startswith("model")]
from test_tables import PAPER_TABLES, table_rows, write_run
from test_training import run_until_the_epoch_checkpoint
from zipfls_train.analysis.results import group_cells, load_runs
from zipfls_train.engine.checkpoint import load_checkpoint
from zipfls_train.engine.config_checks import ConfigError
from zipfls_train.initial_weights import InitialWeightsError, apply_initial_weights
from zipfls_train.models import build_model
from zipfls_train.tables import build_report, load_paper


def torchvision_network(name: str, seed: int = 0) -> torch.nn.Module:
    """torchvision's ``name`` with random weights and random BatchNorm statistics (so that loading
    them, or not, shows in an eval forward), in eval mode."""
    torch.manual_seed(seed)
    network = getattr(torchvision.models, name)()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return network.eval()


def penultimate(network: torch.nn.Module, head: str, images: torch.Tensor) -> torch.Tensor:
    """torchvision's pooled features: its forward with the classifier replaced by the identity."""
    setattr(network, head, torch.nn.Identity())
    with torch.no_grad():
        return network(images)


def pooled(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images).pooled


def test_torchvision_resnet_weights_give_torchvision_features_and_a_fresh_classifier(tmp_path):
    network = torchvision_network("resnet18")
    torch.save(network.state_dict(), tmp_path / "resnet18-tv.pth")
    model = build_model("resnet18", 10)
    classifier = model.classifier.weight.detach().clone()

    loaded = apply_initial_weights(model, str(tmp_path / "resnet18-tv.pth"), "resnet18")

    images = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(pooled(model, images), penultimate(network, "fc", images), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.classifier.weight, classifier)  # 10 classes: the file's fc is for 1000
    assert loaded.loaded == ["backbone"] and loaded.kept[0].startswith("classifier")
    record = loaded.record()
    assert record["file"] == str(tmp_path / "resnet18-tv.pth") and len(record["sha256"]) == 64


def test_torchvision_densenet_weights_under_their_published_names_load(tmp_path):
    # torchvision's published DenseNet files predate torch 0.4: 'norm.1' for 'norm1' inside dense
    # layers, and no BatchNorm step counters (torchvision renames them itself when it loads them).
    network = torchvision_network("densenet121")
    published = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)", r"\1.\2", key): value
                 for key, value in network.state_dict().items() if not key.endswith("num_batches_tracked")}  # fmt: skip
    assert "features.denseblock1.denselayer1.norm.1.weight" in published
    torch.save(published, tmp_path / "densenet121.pth")
    model = build_model("densenet121", 10)

    apply_initial_weights(model, str(tmp_path / "densenet121.pth"), "densenet121")

    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pooled(model, images), penultimate(network, "classifier", images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("container", ["safetensors", "timm training checkpoint of a DDP run", "compiled model's state_dict"])
def test_weights_files_in_other_containers_load(container, tmp_path):
    weights = torchvision_network("resnet18", seed=1).state_dict()
    path = tmp_path / "checkpoint-90.pth"
    if container == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({key: value.contiguous() for key, value in weights.items()}, str(path))
    elif container.startswith("timm"):
        # timm's train.py: {'state_dict': ..., 'args': its argparse.Namespace, ...}, names prefixed by DDP's 'module.'
        args = argparse.Namespace(model="resnet18", lr=0.5, epochs=90)
        torch.save({"epoch": 90, "arch": "resnet18", "args": args, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    else:
        torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, path)
    model = build_model("resnet18", 10)

    apply_initial_weights(model, str(path), "resnet18")

    own = model.state_dict()
    for key, value in weights.items():
        if not key.startswith("fc."):
            assert torch.equal(own[f"backbone.model.{key}"], value), key


def test_weights_named_as_another_library_names_them_are_refused_and_nothing_is_loaded(tmp_path):
    torch.save(torchvision_network("mobilenet_v2").state_dict(), tmp_path / "mobilenet_v2-tv.pth")
    model = build_model("mobilenetv2", 10)
    before = {key: value.clone() for key, value in model.state_dict().items()}

    with pytest.raises(InitialWeightsError) as refused:
        apply_initial_weights(model, str(tmp_path / "mobilenet_v2-tv.pth"), "mobilenetv2")

    message = str(refused.value)
    assert "do not fit timm's mobilenetv2_100 (model=mobilenetv2)" in message
    assert "missing: conv_stem.weight" in message and "not in the network: features.0.0.weight" in message
    assert "model.init_from=timm" in message
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_unreadable_weights_files_are_named_with_what_to_do(tmp_path):
    model = build_model("resnet18", 10)
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04" + bytes(20))  # a zip archive cut short
    with pytest.raises(InitialWeightsError, match=r"model.init_from=.*cut.pth: checkpoint .*cut.pth is corrupt or truncated .*; download or copy the weights again$"):
        apply_initial_weights(model, str(tmp_path / "cut.pth"), "resnet18")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "note": "trained on birds"}, tmp_path / "odd.pth")
    with pytest.raises(InitialWeightsError, match=r"odd.pth: expected a network's weights .*; its entry 'note' is a str"):
        apply_initial_weights(model, str(tmp_path / "odd.pth"), "resnet18")


def test_a_model_timm_does_not_build_takes_no_published_weights(tmp_path):
    torch.save(torchvision_network("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(InitialWeightsError, match=r"model=cifar_resnet18 is not built by timm.*zipfls-train run of the same model"):
        apply_initial_weights(build_model("cifar_resnet18", 10, width=8), str(tmp_path / "resnet18.pth"), "cifar_resnet18")
    with pytest.raises(InitialWeightsError, match=r"model=cifar_resnet18 is not built by timm"):
        apply_initial_weights(build_model("cifar_resnet18", 10, width=8), "timm", "cifar_resnet18")


def write_zipfls_run(run_dir: Path, model, name: str = "cifar_resnet18", options: dict | None = None, dataset: str = "tinyimagenet") -> Path:
    """A run folder with a checkpoint as the trainer writes one (the model's weights and the config)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    config = {"model": {"name": name, "options": options or {"width": 8}}, "dataset": {"name": dataset, "num_classes": 10},
              "loss": {"name": "ce"}, "trainer": {"epochs": 3}}  # fmt: skip
    torch.save({"model": model.state_dict(), "config": config, "progress": {"epoch": 3}}, run_dir / "checkpoints" / "best.pt")
    return run_dir


def test_a_run_gives_its_backbone_and_the_heads_that_fit(tmp_path):
    torch.manual_seed(0)
    trained = build_model("cifar_resnet18", 10, aux_stages=("penultimate",), width=8)
    run_dir = write_zipfls_run(tmp_path / "run", trained)
    weights = trained.state_dict()

    same = build_model("cifar_resnet18", 10, aux_stages=("penultimate",), width=8)
    loaded = apply_initial_weights(same, str(run_dir), "cifar_resnet18")
    assert loaded.loaded == ["backbone", "classifier", "aux_heads.penultimate"] and loaded.kept == []
    assert loaded.resolved == str(run_dir / "checkpoints" / "best.pt")
    assert all(torch.equal(value, weights[key]) for key, value in same.state_dict().items())

    # Another dataset: 7 classes. The backbone comes over, the classifier stays as initialised.
    other = build_model("cifar_resnet18", 7, width=8)
    classifier = other.classifier.weight.detach().clone()
    loaded = apply_initial_weights(other, str(run_dir / "checkpoints" / "best.pt"), "cifar_resnet18")
    assert loaded.loaded == ["backbone"]
    assert loaded.kept == ["classifier (the checkpoint's is for 10 classes, this run has 7)"]
    assert torch.equal(other.classifier.weight, classifier)
    for key, value in other.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(value, weights[key]), key
    assert loaded.cell == "a zipfls-train run (tinyimagenet, model=cifar_resnet18, loss=ce, 3 epochs)"


def test_a_runs_classifier_stays_with_its_own_dataset(tmp_path):
    # 10 classes here and there, but CIFAR-100's first ten are not TinyImageNet's.
    trained = build_model("cifar_resnet18", 10, width=8)
    run_dir = write_zipfls_run(tmp_path / "run", trained, dataset="cifar100")
    model = build_model("cifar_resnet18", 10, width=8)
    classifier = model.classifier.weight.detach().clone()
    loaded = apply_initial_weights(model, str(run_dir), "cifar_resnet18", dataset_name="tinyimagenet")
    assert loaded.kept == ["classifier (the checkpoint's is for cifar100's classes, this run trains on tinyimagenet)"]
    assert torch.equal(model.classifier.weight, classifier)
    assert torch.equal(model.backbone.stem[0].weight, trained.backbone.stem[0].weight)
    assert apply_initial_weights(build_model("cifar_resnet18", 10, width=8), str(run_dir), "cifar_resnet18", "cifar100").loaded == [
        "backbone", "classifier"]


def test_a_models_own_state_dict_loads_and_old_files_without_step_counters_too(tmp_path):
    # torch.save(load_trained_model(run).state_dict()), less BatchNorm's step counters (older files).
    trained = build_model("cifar_resnet18", 10, width=8)
    weights = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(weights, tmp_path / "exported.pt")
    model = build_model("cifar_resnet18", 10, width=8)
    loaded = apply_initial_weights(model, str(tmp_path / "exported.pt"), "cifar_resnet18")
    assert loaded.loaded == ["backbone", "classifier"]
    assert all(torch.equal(model.state_dict()[key], value) for key, value in weights.items())


def test_a_run_of_another_model_or_width_is_refused(tmp_path):
    run_dir = write_zipfls_run(tmp_path / "run", build_model("cifar_resnet18", 10, width=8))
    with pytest.raises(InitialWeightsError, match=r"that run trained model=cifar_resnet18, this one is model=resnet18"):
        apply_initial_weights(build_model("resnet18", 10), str(run_dir), "resnet18")
    with pytest.raises(InitialWeightsError, match=r"do not fit this run's model=cifar_resnet18 \(\d+ of another shape: backbone.stem.0.weight \(8, 3, 3, 3\) \(needs \(16, 3, 3, 3\)\)"):
        apply_initial_weights(build_model("cifar_resnet18", 10, width=16), str(run_dir), "cifar_resnet18")


def test_a_fresh_run_starts_from_the_weights_and_a_resumed_one_does_not_read_them_again(run_tiny, tmp_path, monkeypatch):
    torch.manual_seed(3)
    source = write_zipfls_run(tmp_path / "source", build_model("cifar_resnet18", 10, width=8))
    weights = load_checkpoint(source / "checkpoints" / "best.pt")["model"]
    args = ("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=1", "optim.lr=1e-12", f"model.init_from={source}")

    run_until_the_epoch_checkpoint(monkeypatch, run_tiny, *args, run_dir=tmp_path / "run")

    after_one_step = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    for key in ("backbone.stem.0.weight", "classifier.weight", "backbone.stages.3.1.conv2.weight"):
        torch.testing.assert_close(after_one_step[key], weights[key], rtol=1e-6, atol=1e-9)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "environment.jsonl").read_text().splitlines()]
    assert record["initial_weights"]["loaded"] == ["backbone", "classifier"]
    assert record["initial_weights"]["file"] == str(source / "checkpoints" / "best.pt")

    # The source is gone; the run resumes from its own checkpoint all the same.
    (source / "checkpoints" / "best.pt").unlink()
    run_tiny(*args, run_dir=tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "environment.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and "initial_weights" not in lines[1]
    assert [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # A fresh run cannot start without it, and says so before it writes anything (the folder its
    # lock was taken in stays empty).
    with pytest.raises(ConfigError, match=rf"model.init_from={re.escape(str(source))}: .*checkpoints/best.pt"):
        run_tiny(*args, run_dir=tmp_path / "fresh")
    assert list((tmp_path / "fresh").glob("**/*")) == []


def test_bad_values_are_refused_before_anything_is_built(tiny_pack_root, tmp_path):
    from conftest import compose
    from zipfls_train.engine.run import run_training

    def refusal(*overrides: str) -> str:
        with pytest.raises(ConfigError) as refused:
            run_training(compose([*TINY_RUN_ANY_MODEL, f"dataset.root={tiny_pack_root}", *overrides]), tmp_path / "run")
        return str(refused.value)

    unknown_tag = refusal("model=resnet18", "model.init_from=timm:in22k_nope")
    assert "timm publishes no weights 'resnet18.in22k_nope' for model=resnet18; its tags: a1_in1k" in unknown_tag
    assert "tv_in1k" in unknown_tag
    assert "model.init_from must be null (from scratch), a run folder" in refusal("model.init_from=''")
    assert not (tmp_path / "run").exists()
    # (Whether the file is there is asked when a run starts fresh: a resumed run does not read it.)
    assert "no such file or folder" in refusal(f"model.init_from={tmp_path}/absent.pth")


def fake_hugging_face_cache(cache: Path, repo: str, weights: dict[str, torch.Tensor]) -> None:
    """Hugging Face's cache layout (models--<org>--<name>/refs/main, snapshots/<commit>/) holding
    ``weights`` as the repository's model.safetensors, where timm looks for them."""
    commit = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    save_file({key: value.contiguous() for key, value in weights.items()}, str(folder / "snapshots" / commit / "model.safetensors"))


def test_train_py_starts_from_timms_published_weights_read_from_its_cache(tiny_pack_root, tmp_path):
    weights = torchvision_network("resnet18", seed=2).state_dict()  # timm's tv_in1k are torchvision's, same names
    fake_hugging_face_cache(tmp_path / "hub", "timm/resnet18.tv_in1k", weights)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [sys.executable, "train.py", *TINY_RUN_ANY_MODEL, f"dataset.root={tiny_pack_root}", "model=resnet18", "loss=ce",
         "trainer.epochs=1", "trainer.max_steps_per_epoch=1", "optim.lr=1e-12", "model.init_from=timm:tv_in1k",
         f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[zipfls-train] weights from timm resnet18.tv_in1k: backbone; as initialised: classifier" in result.stdout
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    for key in ("conv1.weight", "layer4.1.conv2.weight", "layer2.0.bn1.weight"):
        torch.testing.assert_close(trained[f"backbone.model.{key}"], weights[key], rtol=1e-6, atol=1e-9)
    assert trained["classifier.weight"].shape == (10, 512)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "environment.jsonl").read_text().splitlines()]
    assert record["initial_weights"]["cell"] == "timm resnet18.tv_in1k" and record["initial_weights"]["from"] == "timm:tv_in1k"

    # Not in the cache (offline): the error says how to do without the network.
    result = subprocess.run(
        [sys.executable, "train.py", *TINY_RUN_ANY_MODEL, f"dataset.root={tiny_pack_root}", "model=resnet18",
         "model.init_from=timm:a1_in1k", f"hydra.run.dir={tmp_path}/offline"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=environment,
    )  # fmt: skip
    assert result.returncode != 0
    assert "timm could not fetch its weights 'resnet18.a1_in1k'" in result.stderr
    assert "model.init_from=/path/to/model.safetensors" in result.stderr


def test_tables_keep_runs_from_trained_weights_apart_and_say_so(tmp_path):
    def fine_tuned(name: str, seed: int, top1: float, init_from: str, cell: str | None) -> None:
        folder = write_run(tmp_path / name, seed=seed, top1=(top1,), epochs=200, model_options={"width": 64})
        _set_model(folder, init_from=init_from)
        if cell is not None:  # what the trainer records at a fresh start
            (folder / "environment.jsonl").write_text(json.dumps({"from_step": 0, "initial_weights": {"from": init_from, "cell": cell}}) + "\n")

    write_run(tmp_path / "scratch", top1=(50.0,), epochs=200, model_options={"width": 64})
    # Each seed from its own CE run: other paths, one setting, one cell.
    for seed, top1 in ((0, 60.0), (1, 62.0)):
        fine_tuned(f"from_ce{seed}", seed, top1, f"/runs/ce_seed{seed}", "a zipfls-train run (tinyimagenet, model=cifar_resnet18, loss=ce, 200 epochs)")
    fine_tuned("from_zipf", 0, 64.0, "/runs/zipf_seed0", "a zipfls-train run (tinyimagenet, model=cifar_resnet18, loss=zipf, 200 epochs)")
    # Two files of one name (every timm download is model.safetensors), other weights: two cells.
    fine_tuned("a1", 0, 70.0, "/w/resnet18.a1_in1k/model.safetensors", "model.safetensors sha256:aaaaaaaaaaaa")
    fine_tuned("tv", 0, 72.0, "/w/resnet18.tv_in1k/model.safetensors", "model.safetensors sha256:bbbbbbbbbbbb")
    # A run without its record (environment.jsonl gone): the value as written.
    fine_tuned("unrecorded", 0, 74.0, "timm:tv_in1k", None)
    runs = load_runs([tmp_path])
    assert len(group_cells(runs)) == 6
    report = build_report(runs, load_paper(PAPER_TABLES), table="2")
    cells = {row["TinyImageNet ResNet18"][:5]: row["TinyImageNet ResNet18"]
             for label, row in table_rows(report, "Table 2").items() if label.startswith("Vanilla")}  # fmt: skip
    assert sorted(cells) == ["50.00", "61.00", "64.00", "70.00", "72.00", "74.00"], cells
    assert "initialised from" not in cells["50.00"]
    assert "n=2" in cells["61.00"] and "initialised from a zipfls-train run (tinyimagenet, model=cifar_resnet18, loss=ce, 200 epochs) (paper: from scratch)" in cells["61.00"]
    assert "loss=zipf" in cells["64.00"]
    assert "initialised from model.safetensors sha256:aaaaaaaaaaaa" in cells["70.00"] and "sha256:bbbbbbbbbbbb" in cells["72.00"]
    assert "initialised from timm:tv_in1k (paper: from scratch)" in cells["74.00"]


def _set_model(run_dir: Path, **values: object) -> None:
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"].update(values)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
