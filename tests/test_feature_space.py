"""Figure 5 (analysis/feature_space.py): class separation against hand-computed values, t-SNE's
affinities against the perplexity they must have, its embedding against clusters known in advance,
and the command on real run folders."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from zipfls_train.analysis.feature_space import (
    FeatureSpaceError,
    chosen_classes,
    class_separation,
    conditional_affinities,
    main,
    squared_distances,
    tsne,
)
from zipfls_train.analysis.run_loading import load_run


def test_class_separation_of_a_hand_example():
    # 1-D: classes {0, 2}, {10, 12}, {30, 34}; centroids 1, 11, 32.
    features = torch.tensor([[0.0], [2.0], [10.0], [12.0], [30.0], [34.0]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    separation = class_separation(features, labels)
    assert separation.intra == pytest.approx((1 + 1 + 1 + 1 + 2 + 2) / 6)
    assert separation.inter == pytest.approx((10 + 31 + 21) / 3)
    assert separation.ratio == pytest.approx((8 / 6) / (62 / 3))
    assert (separation.classes, separation.samples) == (3, 6)
    # Labels need not be 0..K-1, nor the features one scale: the ratio does not move with a rescaling.
    rescaled = class_separation(features * 7, labels + 40)
    assert rescaled.ratio == pytest.approx(separation.ratio) and rescaled.intra == pytest.approx(7 * separation.intra)


def test_class_separation_in_two_dimensions():
    # Two classes, the corners of two unit squares centred at (0, 0) and (3, 4): every corner is
    # sqrt(0.5) from its centre, the centres are 5 apart.
    square = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])
    features = torch.cat([square, square + torch.tensor([3.0, 4.0])])
    separation = class_separation(features, torch.tensor([0] * 4 + [1] * 4))
    assert separation.intra == pytest.approx(math.sqrt(0.5)) and separation.inter == pytest.approx(5.0)
    with pytest.raises(FeatureSpaceError, match="at least 2 classes"):
        class_separation(features, torch.zeros(8, dtype=torch.long))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_affinities_have_the_perplexity_asked_for(scale):
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(120, 8, generator=generator, dtype=torch.float64) * scale
    points[:10] *= 20  # outliers: rows whose neighbours are all far
    p = conditional_affinities(squared_distances(points), perplexity=15.0).numpy()
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    np.testing.assert_allclose(np.exp(entropy), 15.0, rtol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(np.diag(p) == 0)
    # Nearer points weigh more, in each row.
    distances = squared_distances(points).numpy()
    row = 50
    others = np.argsort(distances[row])[1:]
    assert np.all(np.diff(p[row, others]) <= 1e-15)


def test_squared_distances_are_exact_on_a_hand_example():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    expected = torch.tensor([[0.0, 25.0, 2.0], [25.0, 0.0, 13.0], [2.0, 13.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(squared_distances(points), expected)


def test_tsne_keeps_clusters_apart():
    generator = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 30, generator=generator) * 6
    features = torch.cat([centre + torch.randn(30, 30, generator=generator) for centre in centres])
    labels = torch.arange(5).repeat_interleave(30)

    embedding = tsne(features, perplexity=10.0)

    assert embedding.points.shape == (150, 2) and torch.isfinite(embedding.points).all()
    distances = torch.cdist(embedding.points, embedding.points).fill_diagonal_(math.inf)
    assert (labels[distances.argmin(1)] == labels).all()  # every point's nearest neighbour is of its cluster
    assert embedding.kl < embedding.kl_at_start / 3


def test_degenerate_features_are_named_not_drawn_blank():
    same = torch.ones(40, 6)
    embedding = tsne(same, perplexity=5.0, steps=50)  # no principal direction: a random start, still finite
    assert torch.isfinite(embedding.points).all()
    with pytest.raises(FeatureSpaceError, match="collapsed features"):
        class_separation(same, torch.arange(4).repeat(10))
    nan = torch.randn(40, 6)
    nan[3, 2] = math.nan
    with pytest.raises(FeatureSpaceError, match="NaN or infinite"):
        class_separation(nan, torch.arange(4).repeat(10))
    with pytest.raises(FeatureSpaceError, match=r"perplexity must be in \[1, 39\) for 40 images, got 50: lower --perplexity"):
        tsne(torch.randn(40, 6), perplexity=50.0)


def test_classes_are_drawn_by_seed():
    drawn = chosen_classes(200, 50, seed=0)
    assert drawn.numel() == 50 and drawn.unique().numel() == 50 and bool((drawn.diff() > 0).all())
    assert int(drawn.max()) < 200 and torch.equal(drawn, chosen_classes(200, 50, seed=0))
    assert not torch.equal(drawn, chosen_classes(200, 50, seed=1))
    assert torch.equal(chosen_classes(10, 50, seed=0), torch.arange(10))
    with pytest.raises(FeatureSpaceError, match="at least 2"):
        chosen_classes(10, 1, seed=0)


def test_the_command_draws_one_panel_per_run_with_its_numbers(run_tiny, tmp_path, capsys):
    _, ce = run_tiny("loss=ce", "trainer.max_steps_per_epoch=3", run_dir=tmp_path / "ce")
    _, zipf = run_tiny("loss=zipf", "trainer.max_steps_per_epoch=3", run_dir=tmp_path / "zipf")
    png = tmp_path / "figure5.png"

    main([str(ce), str(zipf), "--classes", "4", "--seed", "3", "--out", str(png), "--device", "cpu"])

    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000
    lines = [line for line in out.splitlines() if "intra/inter" in line]
    assert [line.split(":")[0] for line in lines] == [str(ce), str(zipf)]
    assert "loss=ce" in lines[0] and "loss=zipf" in lines[1]
    # 4 classes x the tiny pack's 10 val images each.
    assert all("40 images of 4 classes" in line for line in lines)
    # The CE run's numbers, recomputed here in numpy from its model's pooled features of the val
    # images of the classes seed 3 draws.
    run = load_run(ce, None, torch.device("cpu"))
    classes = chosen_classes(10, 4, seed=3).numpy()
    features, labels = [], []
    with torch.no_grad():
        for batch in run.val.epoch(0):
            keep = np.isin(batch.targets.numpy(), classes)
            features.append(run.model.eval()(batch.inputs).pooled.double().numpy()[keep])
            labels.append(batch.targets.numpy()[keep])
    features, labels = np.concatenate(features), np.concatenate(labels)
    centroids = {c: features[labels == c].mean(axis=0) for c in classes}
    intra = np.mean([np.linalg.norm(f - centroids[c]) for f, c in zip(features, labels)])
    inter = np.mean([np.linalg.norm(centroids[a] - centroids[b]) for i, a in enumerate(classes) for b in classes[i + 1 :]])
    printed = {name: float(re.search(rf"{name} ([0-9.]+)", lines[0]).group(1)) for name in ("intra", "inter", "intra/inter")}
    assert printed["intra"] == pytest.approx(intra, abs=1e-4) and printed["inter"] == pytest.approx(inter, abs=1e-4)
    assert printed["intra/inter"] == pytest.approx(intra / inter, abs=1e-4)


def test_too_few_images_for_the_perplexity_still_prints_the_distances(run_tiny, tmp_path, capsys):
    _, ce = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "ce")
    with pytest.raises(SystemExit, match=r"error: t-SNE's perplexity must be in \[1, 19\) for 20 images, got 30"):
        main([str(ce), "--classes", "2", "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert "20 images of 2 classes  intra " in capsys.readouterr().out


def test_runs_of_different_class_counts_are_refused(run_tiny, tmp_path):
    _, ten = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", run_dir=tmp_path / "ten")
    _, five = run_tiny("loss=ce", "trainer.max_steps_per_epoch=1", "dataset.num_classes_subset=5", run_dir=tmp_path / "five")
    with pytest.raises(SystemExit, match=rf"error: {re.escape(str(five))} classifies other classes than {re.escape(str(ten))} \(5 vs 10"):
        main([str(ten), str(five), "--out", str(tmp_path / "x.png"), "--device", "cpu"])
