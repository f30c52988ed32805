"""Figure 2: the Zipf fit of a model's mean sorted softmax."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from zipfls_train.analysis.zipf_fit import default_png, figure_title, fit_zipf, main, report_fit, sorted_softmax_sums


def test_fit_recovers_the_exponent_of_an_exact_zipf_curve():
    ranks = torch.arange(1, 201, dtype=torch.float64)
    curve = ranks**-1.3
    fit = fit_zipf(curve / curve.sum())
    assert fit.alpha == pytest.approx(1.3, abs=1e-9)
    assert fit.intercept == pytest.approx(-math.log(curve.sum().item()), abs=1e-9)
    assert fit.r_squared == pytest.approx(1.0, abs=1e-12)


def test_fit_of_a_curve_that_is_not_a_power_law():
    """p = e^0, e^-1, e^-3 at ranks 1, 2, 3: least squares of y = (0, -1, -3) on x = (0, ln 2, ln 3),
    computed beside this test with numpy.polyfit: slope -2.5920208, intercept 0.2147593; the
    residuals leave R^2 = 1 - SS_res / SS_tot = 0.8886770."""
    fit = fit_zipf(torch.tensor([1.0, math.exp(-1.0), math.exp(-3.0)], dtype=torch.float64))
    assert fit.alpha == pytest.approx(2.5920208, abs=1e-6)
    assert fit.intercept == pytest.approx(0.2147593, abs=1e-6)
    assert fit.r_squared == pytest.approx(0.8886770, abs=1e-6)
    # max_rank keeps the first ranks only: ranks 1-2 lie on a line of slope -1 / ln 2
    assert fit_zipf(torch.tensor([1.0, math.exp(-1.0), math.exp(-3.0)], dtype=torch.float64), max_rank=2).alpha == pytest.approx(1 / math.log(2), abs=1e-9)


def test_sorted_softmax_sums_by_hand():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(5.0)], [math.log(3.0), 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    all_sorted, non_target = sorted_softmax_sums(logits, targets)
    # sample 0: softmax (1, 2, 5)/8 -> sorted (5, 2, 1)/8; non-target {0, 1}: (1, 2)/3 -> (2, 1)/3
    # sample 1: softmax (3, 1, 1)/5 -> (3, 1, 1)/5;           non-target {1, 2}: (1/2, 1/2)
    assert all_sorted.tolist() == pytest.approx([5 / 8 + 3 / 5, 2 / 8 + 1 / 5, 1 / 8 + 1 / 5])
    assert non_target.tolist() == pytest.approx([2 / 3 + 1 / 2, 1 / 3 + 1 / 2])


def test_the_exponent_is_fitted_on_the_all_class_curve_the_paper_plots(tmp_path):
    ranks = torch.arange(1, 101, dtype=torch.float64)
    curves = {"all": ranks**-1.3 / (ranks**-1.3).sum(), "non_target": ranks[:-1] ** -0.5 / (ranks[:-1] ** -0.5).sum()}
    assert report_fit(curves, "t", tmp_path / "f.png").alpha == pytest.approx(1.3, abs=1e-9)


def test_the_figure_leaves_the_callers_matplotlib_as_it_was(tmp_path):
    """A run's figure (PNG and TensorBoard) in a notebook: its matplotlib backend and open pyplot
    figures are the notebook's afterwards (the figure switched the process to Agg)."""
    import matplotlib
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        mine = plt.figure()
        ranks = torch.arange(1, 11, dtype=torch.float64)
        with SummaryWriter(str(tmp_path / "tb")) as writer:
            report_fit({"all": ranks**-1.0, "non_target": ranks[:-1] ** -1.0}, "t", tmp_path / "f.png", writer)
        assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        plt.close(mine)
    finally:
        matplotlib.use(before)


def test_default_figure_paths():
    run = Path("/runs/r")
    assert default_png(run / "checkpoints" / "last.pt") == run / "zipf_fit.png"  # the end-of-training figure
    assert default_png(run / "checkpoints" / "best.pt") == run / "zipf_fit_best.png"
    assert default_png(Path("/elsewhere/model.pt")) == Path("/elsewhere/model.zipf_fit.png")


def test_training_ends_with_the_figure_and_the_cli_redraws_it(run_tiny, tmp_path, capsys):
    summary, run_dir = run_tiny("loss=zipf", "trainer.epochs=2", "trainer.max_steps_per_epoch=3")
    assert (run_dir / "zipf_fit.png").stat().st_size > 1000
    assert math.isfinite(summary["zipf_alpha"])
    out = tmp_path / "again.png"
    main([str(run_dir), "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "alpha = " in printed and out.stat().st_size > 1000
    # The CLI reloads last.pt, the final model the end-of-training figure shows: the same fit.
    assert f"alpha = {summary['zipf_alpha']:.3f}" in printed


def test_cli_on_a_folder_without_a_checkpoint_names_it_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--device", "cpu"])
    assert str(stop.value) == f"error: checkpoint {tmp_path / 'checkpoints' / 'last.pt'} does not exist"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_cli_on_a_path_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "typo"), "--device", "cpu"])
    assert str(stop.value).startswith(f"error: {tmp_path / 'typo'} does not exist: expected a run folder")


def test_cli_on_a_sweep_folder_names_its_runs(tmp_path):
    for name in ("loss=ce,seed=0", "loss=zipf,seed=0"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--device", "cpu"])
    assert str(stop.value) == f"error: {tmp_path} is a folder of runs (a sweep's, say), not one run: pass one of them (loss=ce,seed=0, loss=zipf,seed=0)"


def test_the_figure_title_names_the_losss_variant():
    # Two Zipf variants (Table 5's Dense2, Table 6's constant) share loss.name; the title tells them apart.
    cfg = OmegaConf.create({
        "seed": 3, "dataset": {"name": "tinyimagenet"}, "model": {"name": "cifar_resnet18"},
        "loss": {"name": "zipf", "weight": 1.0, "distribution": "constant", "stages": ["final", "penultimate"], "kernel": "auto"},
    })  # fmt: skip
    assert figure_title(cfg, "epoch 200") == (
        "tinyimagenet / cifar_resnet18 / seed 3 / epoch 200\n"
        "loss=zipf (weight=1.0, distribution=constant, stages=final+penultimate)"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_cli_asked_for_a_missing_gpu_says_so_without_a_traceback(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path), "--device", "cuda"])
    assert "no CUDA device is available" in str(stop.value) and str(stop.value).startswith("error: ")
