"""zipfls_train.load_trained_model: a finished run's model, for inference or fine-tuning."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from zipfls_train import load_trained_model
from zipfls_train.data import LoaderOptions, build_data
from zipfls_train.engine.checkpoint import CheckpointError, load_checkpoint
from zipfls_train.engine.metrics import topk_correct


def val_top1(model, run_dir) -> float:  # noqa: ANN001
    """The model's top-1 (%) on the run's val set, read as the run read it (config.yaml's dataset)."""
    cfg = OmegaConf.load(run_dir / "config.yaml")
    options = LoaderOptions(batch_size=int(cfg.trainer.batch_size), eval_batch_size=int(cfg.trainer.eval_batch_size),
                            device=torch.device("cpu"), seed=int(cfg.seed))  # fmt: skip
    val = build_data(OmegaConf.to_container(cfg.dataset, resolve=True), options).val
    correct = total = 0
    with torch.no_grad():
        for batch in val.epoch(0):
            correct += int(topk_correct(model(batch.inputs).logits.float(), batch.targets)[0])
            total += batch.size
    assert total == 60  # 6 classes x 10 val images
    return 100.0 * correct / total


def test_a_subset_runs_best_model_scores_the_logged_best_val_top1(run_tiny):
    """A run on 6 of the dataset's 10 classes: the model is built for 6 (dataset.num_classes says
    10), from the run folder (its best.pt) and from the file alike, in eval mode, and scores on the
    val set exactly the val_top1 that metrics.jsonl logged for the best epoch."""
    # fp32: the reference scores in fp32 (bf16 autocast could rank near-tied logits otherwise).
    summary, run_dir = run_tiny("loss=ce", "dataset.num_classes_subset=6", "trainer.epochs=3",
                                "trainer.max_steps_per_epoch=4", "trainer.precision=fp32")  # fmt: skip
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (logged,) = [m["val_top1"] for m in metrics if m["epoch"] == summary["best_epoch"]]
    for source in (run_dir, run_dir / "checkpoints" / "best.pt", str(run_dir / "checkpoints" / "best.pt")):
        model = load_trained_model(source)
        assert not model.training and model.num_classes == 6
        assert next(model.parameters()).device == torch.device("cpu")
        assert val_top1(model, run_dir) == logged, source
    last = load_trained_model(run_dir / "checkpoints" / "last.pt", device=torch.device("cpu"))
    for name, tensor in last.state_dict().items():
        assert torch.equal(tensor, load_checkpoint(run_dir / "checkpoints/last.pt")["model"][name]), name


@pytest.mark.parametrize("loss", ["zipf_dense2", "byot"])
def test_a_run_with_auxiliary_heads_loads_with_or_without_them(loss, run_tiny):
    _, run_dir = run_tiny(f"loss={loss}", "trainer.max_steps_per_epoch=2")
    saved = load_checkpoint(run_dir / "checkpoints/best.pt")["model"]
    assert any(key.startswith("aux_heads.") for key in saved)
    model = load_trained_model(run_dir)
    assert len(model.aux_heads) == 0
    assert model(torch.zeros(2, 3, 32, 32)).logits.shape == (2, 10)
    with_heads = load_trained_model(run_dir, aux_heads=True)
    assert with_heads.state_dict().keys() == saved.keys()
    assert torch.equal(with_heads(torch.ones(2, 3, 32, 32)).logits, model(torch.ones(2, 3, 32, 32)).logits)


def test_a_folder_without_best_pt_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"without checkpoints/best\.pt"):
        load_trained_model(tmp_path)


def test_a_path_under_home_is_read_as_the_shell_reads_it(tmp_path, monkeypatch):
    """'~/runs/x' from Python: the run folder under $HOME (it was 'checkpoint ~/runs/x does not exist')."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "runs" / "x").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/runs/x is a folder without checkpoints/best\.pt"):
        load_trained_model("~/runs/x")


def test_a_run_folder_gives_the_best_epochs_model_not_the_last(run_tiny, monkeypatch):
    """Val top-1 50 then 10 (Trainer.evaluate replaced): best.pt holds epoch 1, last.pt epoch 2;
    the run folder's model is epoch 1's."""
    from zipfls_train.engine.trainer import Trainer

    scores = iter([(50.0, 90.0, 100), (10.0, 90.0, 100)])
    monkeypatch.setattr(Trainer, "evaluate", lambda self, stoppable=False: next(scores))
    _, run_dir = run_tiny("loss=ce", "trainer.epochs=2", "trainer.max_steps_per_epoch=2", "trainer.zipf_fit_at_end=false")
    best, last = (load_checkpoint(run_dir / f"checkpoints/{name}.pt")["model"] for name in ("best", "last"))
    assert not all(torch.equal(best[key], last[key]) for key in best)
    loaded = load_trained_model(run_dir).state_dict()
    assert all(torch.equal(loaded[key], best[key]) for key in loaded)


def test_a_checkpoint_whose_config_lacks_the_class_count_takes_it_from_the_classifier(run_tiny, tmp_path):
    from zipfls_train.trained import model_from_checkpoint

    _, run_dir = run_tiny("loss=ce", "dataset.num_classes_subset=6", "trainer.max_steps_per_epoch=1")
    state = load_checkpoint(run_dir / "checkpoints/best.pt")
    del state["config"]["dataset"]["num_classes"], state["config"]["dataset"]["num_classes_subset"]
    model = model_from_checkpoint(state)
    assert model.num_classes == 6 and model(torch.zeros(2, 3, 32, 32)).logits.shape == (2, 6)
