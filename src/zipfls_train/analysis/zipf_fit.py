"""Figure 2 of the paper: a trained model's softmax, sorted and averaged over its val set, follows
Zipf's law. We plot it on log-log axes with the least-squares line log p = -alpha log r + c.

Two curves per model:
* ``all``: the plain softmax over all C classes, sorted descending and averaged (rank 1 is mostly
  the target): the curve the paper's Figure 2 plots. The exponent is fitted on it.
* ``non_target``: per image, the softmax over the non-target classes (the distribution Zipf's LS
  shapes), sorted descending and averaged, ranks 1..C-1; drawn beside it, with its own exponent
  logged as ``zipf_fit/alpha_non_target``.

The model is the run's final one (``checkpoints/last.pt``, what the end-of-training figure shows),
in float32.

    python -m zipfls_train.analysis.zipf_fit outputs/demo/<run>            # run folder (last.pt)
    python -m zipfls_train.analysis.zipf_fit outputs/demo/<run>/checkpoints/best.pt   # another checkpoint
    python -m zipfls_train.analysis.zipf_fit path/to/checkpoint.pt --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..engine.distributed import all_reduce_sum
from ..loss_options import IMPLEMENTATION_OPTIONS
from .figures import save
from .run_loading import evaluated, load_run


@dataclass
class ZipfFit:
    alpha: float  # fitted exponent (the slope is -alpha)
    intercept: float  # c in log p = -alpha log r + c (natural logs)
    r_squared: float  # of the fit in log-log space


def fit_zipf(mean_sorted: Tensor, max_rank: int | None = None) -> ZipfFit:
    """Least squares of log p_r on log r over ranks 1..max_rank (all by default), in float64."""
    p = mean_sorted.double().flatten()[: max_rank or None]
    ranks = torch.arange(1, p.numel() + 1, dtype=torch.float64)
    keep = p > 0
    x, y = torch.log(ranks[keep]), torch.log(p[keep])
    x_mean, y_mean = x.mean(), y.mean()
    slope = ((x - x_mean) * (y - y_mean)).sum() / ((x - x_mean) ** 2).sum()
    intercept = y_mean - slope * x_mean
    residual = ((y - (slope * x + intercept)) ** 2).sum()
    total = ((y - y_mean) ** 2).sum()
    return ZipfFit(alpha=float(-slope), intercept=float(intercept), r_squared=float(1 - residual / total))


def sorted_softmax_sums(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per batch: sums over samples of the sorted softmax (C) and of the sorted non-target softmax (C-1)."""
    logits = logits.float()
    probabilities = torch.softmax(logits, dim=1)
    masked = logits.scatter(1, targets[:, None], float("-inf"))
    non_target = torch.softmax(masked, dim=1).sort(dim=1, descending=True).values[:, :-1]  # drop the 0 at y
    return probabilities.sort(dim=1, descending=True).values.sum(0), non_target.sum(0)


@torch.no_grad()
def mean_sorted_softmax(model: nn.Module, loader, device: torch.device) -> dict[str, Tensor]:  # noqa: ANN001
    """Mean sorted softmax (``all``) and non-target softmax (``non_target``) over ``loader``'s epoch,
    in float32 whatever autocast is on, summed across DDP ranks when a process group is up (a rank
    whose val shard is empty adds zeros)."""
    from ..models import unwrap

    num_classes = unwrap(model).num_classes
    total_all = torch.zeros(num_classes, dtype=torch.float64, device=device)
    total_non = torch.zeros(num_classes - 1, dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for batch, outputs in evaluated(model, loader):
        part_all, part_non = sorted_softmax_sums(outputs.logits, batch.targets)
        total_all += part_all.double()
        total_non += part_non.double()
        count += batch.size
    for tensor in (total_all, total_non, count):
        all_reduce_sum(tensor)
    return {"all": (total_all / count).cpu(), "non_target": (total_non / count).cpu()}


def plot(curves: dict[str, Tensor], fit: ZipfFit, title: str, path: Path):  # noqa: ANN201 - a Figure
    # A Figure of its own, not pyplot's: pyplot would need a backend, and switching this process's
    # (a notebook's) to Agg sent its later plt.show() nowhere. savefig renders PNG with Agg anyway.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.2))
    axis = figure.subplots()
    for name, style in (("non_target", "o"), ("all", ".")):
        values = curves[name]
        ranks = torch.arange(1, values.numel() + 1)
        axis.loglog(ranks, values, style, markersize=3, label=f"mean sorted softmax ({name.replace('_', '-')})")
    ranks = torch.arange(1, curves["all"].numel() + 1, dtype=torch.float64)
    axis.loglog(ranks, torch.exp(fit.intercept - fit.alpha * torch.log(ranks)), "-", color="black",
                label=f"Zipf fit (all classes): alpha = {fit.alpha:.2f} (R^2 {fit.r_squared:.3f})")
    axis.set_xlabel("rank")
    axis.set_ylabel("probability")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    return save(figure, path, dpi=120)


# Loss options that say how a run computes, not what (or, the name, are in the title already): left
# out of the figure's title.
_UNTITLED_LOSS_OPTIONS = frozenset({"name", "teacher_checkpoint", *IMPLEMENTATION_OPTIONS})


def figure_title(cfg, where: str) -> str:  # noqa: ANN001 - a run's DictConfig
    """'<dataset> / <model> / seed <s> / <where>' over the loss and its options, so that the PNGs of
    a method's variants (zipf_dense2, zipf_constant, ...) tell themselves apart."""
    from omegaconf import OmegaConf

    options = {k: v for k, v in OmegaConf.to_container(cfg.loss, resolve=True).items() if k not in _UNTITLED_LOSS_OPTIONS}
    loss = ", ".join(f"{k}={'+'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in options.items())
    head = f"{cfg.dataset.name} / {cfg.model.name} / seed {cfg.seed} / {where}"
    return head + "\n" + textwrap.fill(f"loss={cfg.loss.name}" + (f" ({loss})" if loss else ""), width=72)


def report_fit(curves: dict[str, Tensor], title: str, png: Path, writer=None, step: int = 0) -> ZipfFit:  # noqa: ANN001
    """Fit of the all-class curve + PNG (+ TensorBoard figure and scalars when ``writer`` is given)."""
    fit = fit_zipf(curves["all"])
    figure = plot(curves, fit, title, png)
    if writer is not None:
        writer.add_figure("zipf_fit/mean_sorted_softmax", figure, step)
        writer.add_scalar("zipf_fit/alpha", fit.alpha, step)
        writer.add_scalar("zipf_fit/r_squared", fit.r_squared, step)
        writer.add_scalar("zipf_fit/alpha_non_target", fit_zipf(curves["non_target"]).alpha, step)
    return fit


def default_png(checkpoint: Path) -> Path:
    """``<run>/zipf_fit.png`` for a run's last.pt (the end-of-training figure, redrawn the same),
    ``<run>/zipf_fit_<name>.png`` for its other checkpoints, ``<file>.zipf_fit.png`` elsewhere."""
    if checkpoint.parent.name != "checkpoints":
        return checkpoint.with_suffix(".zipf_fit.png")
    run = checkpoint.parent.parent
    return run / "zipf_fit.png" if checkpoint.name == "last.pt" else run / f"zipf_fit_{checkpoint.stem}.png"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run folder (uses checkpoints/last.pt) or a checkpoint file")
    parser.add_argument("--data-root", default=None, help="override dataset.root stored in the checkpoint's config")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <run>/zipf_fit.png for last.pt, <run>/zipf_fit_<name>.png for another checkpoint)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from ..engine.distributed import resolve_device

    from ..errors import user_errors

    try:
        device = resolve_device(args.device)
        run = load_run(args.path, args.data_root, device)
    except user_errors() as error:
        raise SystemExit(f"error: {error}") from None
    png = args.out or default_png(run.checkpoint)
    fit = report_fit(mean_sorted_softmax(run.model, run.val, device), figure_title(run.cfg, run.checkpoint.name), png)
    print(f"Zipf fit of the mean sorted softmax: alpha = {fit.alpha:.3f}, R^2 = {fit.r_squared:.4f}")
    print(f"plot: {png}")
    if not math.isfinite(fit.alpha):
        raise SystemExit("the fit is not finite (all probabilities zero?)")


if __name__ == "__main__":
    main()
