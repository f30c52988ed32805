"""Figure 5 of the paper: t-SNE of trained models' features on the val images of 50 randomly chosen
TinyImageNet classes, one panel per method (CE, LS, Zipf's LS), and the numbers behind the paper's
reading of it ("the intra-class distance in feature space learned from Zipf's label smoothing is
more compact and the inter-class distance is more separate").

The features are what the classifier reads: the pooled final map (``ModelOutput.pooled``), in
float32, eval mode. The numbers are computed on those features, in float64, not on the 2-D
embedding (t-SNE keeps neighbourhoods, not distances):

* ``intra``: the mean distance of a feature to its class's centroid;
* ``inter``: the mean distance between two class centroids (over all pairs);
* ``ratio``: intra / inter, which a rescaling of the features leaves unchanged, so that runs of
  different methods (whose features have different scales) compare: lower is more separable.

t-SNE is the exact algorithm of van der Maaten and Hinton (2008), in torch (no extra dependency):
the features are reduced to at most 50 dimensions by PCA, each point's Gaussian bandwidth is set by
bisection to the perplexity asked for, the embedding starts from the first two principal components
(scaled to std 1e-4) and follows 1,000 steps of gradient descent with momentum, per-coordinate
gains and early exaggeration (12, for the first 250 steps). Every panel is computed from the same
seed; the figure is for looking at, the numbers are the measurement.

    python -m zipfls_train.analysis.feature_space RUN_CE RUN_LS RUN_ZIPF                  # 50 classes, seed 0
    python -m zipfls_train.analysis.feature_space RUN... --classes 20 --out fig5.png --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .figures import output_path, save, without_ticks
from .run_loading import AnalysisError, add_run_arguments, load_runs, run_title

PERPLEXITY = 30.0
STEPS = 1000
EXAGGERATION, EXAGGERATED_STEPS = 12.0, 250
PCA_DIMENSIONS = 50


class FeatureSpaceError(AnalysisError):
    """Runs, classes or images that cannot make the figure; the message says which."""


@dataclass
class Separation:
    intra: float  # mean distance of a feature to its class centroid
    inter: float  # mean distance between two class centroids
    classes: int
    samples: int

    @property
    def ratio(self) -> float:
        return self.intra / self.inter


def class_separation(features: Tensor, labels: Tensor) -> Separation:
    """Intra- and inter-class distances of N x D ``features`` with integer ``labels`` (float64);
    FeatureSpaceError for non-finite features, fewer than 2 classes, or centroids that all coincide
    (collapsed features: no ratio)."""
    features = features.double()
    if not torch.isfinite(features).all():
        raise FeatureSpaceError("the features hold NaN or infinite values (a diverged model?)")
    classes, index = torch.unique(labels, return_inverse=True)
    if classes.numel() < 2:
        raise FeatureSpaceError(f"class separation needs images of at least 2 classes, got {classes.numel()}")
    counts = torch.bincount(index, minlength=classes.numel()).double()
    centroids = torch.zeros(classes.numel(), features.shape[1], dtype=torch.float64).index_add_(0, index, features) / counts[:, None]
    intra = (features - centroids[index]).norm(dim=1).mean()
    pairs = torch.triu_indices(classes.numel(), classes.numel(), offset=1)
    inter = (centroids[pairs[0]] - centroids[pairs[1]]).norm(dim=1).mean()
    if not inter > 0:
        raise FeatureSpaceError("every class has the same mean feature (collapsed features: a dead or untrained model?)")
    return Separation(float(intra), float(inter), int(classes.numel()), int(features.shape[0]))


# --- t-SNE ------------------------------------------------------------------------------------------
def squared_distances(points: Tensor) -> Tensor:
    """N x N squared Euclidean distances in ``points``' dtype (exact zeros on the diagonal, no negatives)."""
    norms = (points * points).sum(1)
    distances = (norms[:, None] + norms[None, :] - 2 * points @ points.T).clamp_min_(0)
    return distances.fill_diagonal_(0)


def conditional_affinities(distances: Tensor, perplexity: float = PERPLEXITY, iterations: int = 64) -> Tensor:
    """P(j | i) = exp(-beta_i d_ij) / sum_k exp(-beta_i d_ik) (k != i), each row's beta_i found by
    bisection so that the row's perplexity exp(H_i) is ``perplexity`` (all rows at once)."""
    n = distances.shape[0]
    if not 1 <= perplexity < n - 1:
        raise FeatureSpaceError(
            f"t-SNE's perplexity must be in [1, {n - 1}) for {n} images, got {perplexity:g}: lower --perplexity, "
            "or draw more --classes"
        )
    target = math.log(perplexity)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    # Bisect log(beta) per row: entropy falls as beta rises. Distances scaled by their row's mean
    # make the bracket [-50, 50] wide enough for any feature scale.
    scale = (distances.sum(1) / (n - 1)).clamp_min(torch.finfo(torch.float64).tiny)[:, None]
    scaled = distances / scale
    low = torch.full((n, 1), -50.0, dtype=torch.float64)
    high = torch.full((n, 1), 50.0, dtype=torch.float64)
    for _ in range(iterations):
        log_beta = (low + high) / 2
        logits = -scaled * log_beta.exp()
        # Shifted by the row's largest (as softmax does) and floored at -700: exp of less is a
        # subnormal float64, whose arithmetic is many times slower on the CPU (and weighs nothing).
        logits = (logits - logits.masked_fill(~off_diagonal, -math.inf).amax(1, keepdim=True)).clamp_min(-700.0)
        unnormalised = logits.exp().masked_fill(~off_diagonal, 0.0)
        p = unnormalised / unnormalised.sum(1, keepdim=True)
        entropy = -(p * logits).sum(1, keepdim=True) + unnormalised.sum(1, keepdim=True).log()
        too_flat = entropy > target  # beta too small
        low = torch.where(too_flat, log_beta, low)
        high = torch.where(too_flat, high, log_beta)
    return p


def joint_affinities(features: Tensor, perplexity: float = PERPLEXITY) -> Tensor:
    conditional = conditional_affinities(squared_distances(features.double()), perplexity)
    return (conditional + conditional.T) / (2 * conditional.shape[0])


def principal_components(features: Tensor, count: int) -> Tensor:
    """The centred features projected on their first ``count`` principal directions (float64),
    each direction's sign fixed so that its largest loading is positive (deterministic output)."""
    centred = features.double() - features.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    directions = vh[:count]
    signs = torch.sign(directions.gather(1, directions.abs().argmax(1, keepdim=True)))
    return centred @ (directions * signs).T


@dataclass
class Embedding:
    points: Tensor  # N x 2
    kl: float  # KL(P || Q) at the end
    kl_at_start: float


def tsne(features: Tensor, perplexity: float = PERPLEXITY, steps: int = STEPS) -> Embedding:
    """A 2-D t-SNE embedding of N x D ``features`` (see the module docstring)."""
    n = features.shape[0]
    reduced = principal_components(features, min(PCA_DIMENSIONS, features.shape[1], n))
    # The descent in float32 (half the time of float64 at 2,500 points; the embedding is a picture).
    p = joint_affinities(reduced, perplexity).clamp_min_(1e-12).float()
    start = principal_components(reduced, 2)
    spread = start[:, 0].std()
    if not spread > 0:  # every feature the same: no direction to start along, a seeded random start
        start, spread = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 1.0
    y = (start / spread * 1e-4).float()
    learning_rate = max(n / EXAGGERATION / 4, 50.0)  # scikit-learn's "auto"
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    kl_at_start = _kl(p, y)
    for step in range(steps):
        exaggeration, momentum = (EXAGGERATION, 0.5) if step < EXAGGERATED_STEPS else (1.0, 0.8)
        inverse, q = _embedding_affinities(y)
        weights = (exaggeration * p - q) * inverse
        gradient = 4 * (weights.sum(1, keepdim=True) * y - weights @ y)
        same_sign = (gradient > 0) == (update > 0)
        gains = torch.where(same_sign, gains * 0.8, gains + 0.2).clamp_min_(0.01)
        update = momentum * update - learning_rate * gains * gradient
        y = y + update
        y = y - y.mean(0)
    return Embedding(y, _kl(p, y), kl_at_start)


def _embedding_affinities(y: Tensor) -> tuple[Tensor, Tensor]:
    """The Student-t kernel 1 / (1 + |y_i - y_j|^2) of the embedding (0 on the diagonal) and Q, its
    normalisation, floored at 1e-12, in ``y``'s dtype."""
    inverse = 1.0 / (1.0 + squared_distances(y))
    inverse.fill_diagonal_(0)
    return inverse, (inverse / inverse.sum()).clamp_min_(1e-12)


def _kl(p: Tensor, y: Tensor) -> float:
    """KL(P || Q) of the embedding ``y``, in float64."""
    p, q = p.double(), _embedding_affinities(y.double())[1]
    return float((p * (p / q).log()).sum())


# --- runs ----------------------------------------------------------------------------------------------
def chosen_classes(num_classes: int, count: int | None, seed: int) -> Tensor:
    """``count`` classes drawn at random (a seeded permutation, sorted), or all of them."""
    if count is None or count >= num_classes:
        return torch.arange(num_classes)
    if count < 2:
        raise FeatureSpaceError(f"--classes must be at least 2, got {count}")
    return torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))[:count].sort().values


@torch.no_grad()
def pooled_features(model: nn.Module, loader, classes: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    """The pooled features (float32, on the CPU) and labels of ``loader``'s images of ``classes``."""
    model.eval()
    features, labels = [], []
    for batch in loader.epoch(0):
        targets = batch.targets.cpu()
        keep = torch.isin(targets, classes)
        if not keep.any():
            continue
        with torch.autocast(device.type, enabled=False):
            pooled = model(batch.inputs).pooled.float().cpu()
        features.append(pooled[keep])
        labels.append(targets[keep])
    if not features:
        raise FeatureSpaceError("the val set holds no image of the chosen classes")
    return torch.cat(features), torch.cat(labels)


def plot(panels: list[tuple[str, Tensor, Tensor, Separation]], path: Path):  # noqa: ANN201 - a Figure
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(panels), 4.4))
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, points, labels, separation) in zip(axes, panels):
        axis.scatter(points[:, 0], points[:, 1], c=labels, cmap="gist_ncar", s=3, linewidths=0)
        axis.set_title(f"{title}\nintra/inter {separation.ratio:.3f}", fontsize=9)
    without_ticks(axes)
    return save(figure, path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, ", one panel each")
    parser.add_argument("--classes", type=int, default=50, help="classes drawn at random (default 50, as the paper; all if the runs have fewer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the class draw")
    parser.add_argument("--perplexity", type=float, default=PERPLEXITY)
    parser.add_argument("--out", type=Path, default=Path("feature_space.png"), help="PNG path (default: feature_space.png)")
    args = parser.parse_args(argv)
    from ..errors import user_errors

    try:
        out = output_path(args.out)
        device, runs = load_runs(args)  # (runs of other classes are refused there)
        classes = chosen_classes(len(runs[0].classes), args.classes, args.seed)
        panels = []
        for path, run in zip(args.runs, runs):
            features, labels = pooled_features(run.model, run.val, classes, device)
            try:
                separation = class_separation(features, labels)
            except FeatureSpaceError as error:
                raise FeatureSpaceError(f"{path}: {error}") from None
            absent = len(classes) - separation.classes
            print(f"{path}: loss={run.cfg.loss.name}  {separation.samples} images of {separation.classes} classes"
                  + (f" ({absent} of the {len(classes)} drawn have no val image)" if absent else "")
                  + f"  intra {separation.intra:.4f}  inter {separation.inter:.4f}  intra/inter {separation.ratio:.4f}", flush=True)
            embedding = tsne(features, args.perplexity)
            print(f"  t-SNE: KL {embedding.kl_at_start:.3f} -> {embedding.kl:.3f}", flush=True)
            panels.append((run_title(path, run), embedding.points, labels, separation))
        plot(panels, out)
    except (*user_errors(), AnalysisError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
