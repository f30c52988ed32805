"""Zipf's label smoothing (Liang et al., ECCV 2022): the method this framework reproduces.

Per training sample (paper sec. 3.2-3.3, eq. 2-5):

1. **Dense votes.** The model's own classifier is applied to every pixel of a feature map (a 1x1
   convolution with the classifier's weights; optionally after a bilinear x2 upsample), and each
   pixel's arg-max class is one vote (:func:`dense_votes`, :func:`vote_counts`). With
   ``rank_by="logits"`` the detached logits are the scores instead.
2. **Ranks.** ``rank_c = 1 + #{k : score_k > score_c}`` over all classes, target included (ties
   share the smallest rank; all classes without a vote tie at the lowest rank).
3. **Soft label.** ``P_c = w(rank_c) / sum_{k != y} w(rank_k)`` for ``c != y``, ``P_y = 0``, with
   ``w(r) = r^-alpha`` for Zipf (:func:`zipf_soft_labels`; other shapes for the Table 6 ablation).
4. **Loss.** ``KL(P || Q)`` with ``Q`` the softmax over the non-target logits
   (:func:`nontarget_kl`), added to cross-entropy with weight lambda (config key ``weight``).

Everything here stays on the inputs' device and never synchronises with the host (no ``.item()``,
``.cpu()``, ``.tolist()`` or boolean-mask indexing), so the training step runs ahead of the GPU
(the fused CUDA path of ``zipf_fused.py`` is compared with these functions once, on its first
batch: a run's only extra synchronisation).
Votes and ranks are computed under ``no_grad`` from detached tensors; only the KL is differentiated.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput
from ..models.wrapper import is_stage_name, unwrap
from .base import Method, Needs, check_targets, non_negative, one_of, positive
from .ce import cross_entropy
from .dense_logits import dense_argmax, votes_per_sample
from .zipf_fused import FUSED_DISTRIBUTIONS, DenseMap, fused_ce_zipf, unavailable_reason

UPSAMPLE_MODES = (None, "none", "bilinear")
DISTRIBUTIONS = ("zipf", "constant", "linear_decay", "random_uniform", "random_pareto")
RANK_BY = ("dense", "logits")
KERNELS = ("auto", "torch", "triton")

@torch.no_grad()
def dense_votes(feature_map: Tensor, weight: Tensor, bias: Tensor | None, upsample: str | None = None) -> Tensor:
    """Votes of the classifier ``(weight C x D, bias C)`` applied to every pixel of ``feature_map``.

    ``feature_map``: N x D x H x W (never differentiated: this runs under ``no_grad``). ``upsample``:
    ``None``/``"none"`` (use the map as is) or ``"bilinear"`` (x2, ``align_corners=False``, before
    classifying; computed by upsampling the logit maps instead, which is the same, see
    ``dense_logits.dense_argmax``). Returns a LongTensor N x (H'*W') of class indices (pixels in
    row-major order; ties go to the lowest class index, as ``argmax``). The classifier is rounded to
    the map's dtype; the logits of a bfloat16/float16 map (autocast's output) are compared in the
    float32 they are accumulated in (``dense_logits.pixel_logits``).
    """
    if feature_map.dim() != 4:
        raise ValueError(f"dense_votes expects an N x D x H x W feature map, got shape {tuple(feature_map.shape)}")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {list(UPSAMPLE_MODES)}, got {upsample!r}")
    if weight.dim() != 2 or weight.shape[1] != feature_map.shape[1]:
        raise ValueError(
            f"classifier weight must be C x {feature_map.shape[1]} (the map's channels), got {tuple(weight.shape)}"
        )
    # Under no_grad nothing here is recorded, so nothing needs detaching.
    return dense_argmax(feature_map, weight, bias, upsample=upsample == "bilinear")


@torch.no_grad()
def vote_counts(votes: Tensor, num_classes: int) -> Tensor:
    """Histogram of ``votes`` (N x V class indices) per sample: an int64 tensor N x ``num_classes``.

    One ``scatter_add_`` (O(N*V) work into an N x C buffer; no one-hot N x V x C temporary). Counts of
    several stages are pooled by adding their histograms (or by concatenating their votes)."""
    if votes.dim() != 2:
        raise ValueError(f"votes must be N x V, got shape {tuple(votes.shape)}")
    counts = torch.zeros(votes.shape[0], num_classes, dtype=torch.int64, device=votes.device)
    return counts.scatter_add_(1, votes.long(), torch.ones_like(votes, dtype=torch.int64))


@torch.no_grad()
def min_ranks(scores: Tensor) -> Tensor:
    """``rank_c = 1 + #{k : score_k > score_c}`` per row (ties share the smallest rank), int64 N x C.

    One sort plus a binary search per entry: ``#{k : s_k > v} = C - #{k : s_k <= v}`` and the latter
    is ``searchsorted(sorted_row, v, right=True)``. O(N C log C) time and O(N C) memory (never the
    N x C x C comparison), cheap for C = 10,000 on a GPU."""
    if scores.is_floating_point() and scores.dtype != torch.float64:
        scores = scores.float()  # exact for half/bfloat16 input (float64 stays: float32 could tie it)
    scores = scores.contiguous()
    ascending, _ = torch.sort(scores, dim=1)
    not_greater = torch.searchsorted(ascending, scores, right=True)
    return (scores.shape[1] + 1) - not_greater


def _log_weights(ranks: Tensor, alpha: float, distribution: str, generator: torch.Generator | None) -> Tensor:
    """Unnormalised log-weights (float32, N x C) of every class; see :func:`zipf_soft_labels`."""
    num_classes = ranks.shape[1]
    if distribution == "zipf":
        log_ranks = torch.log(ranks)  # int64 -> float32
        return log_ranks.neg_() if alpha == 1.0 else log_ranks.mul_(-alpha)
    if distribution == "constant":
        return torch.zeros(ranks.shape, dtype=torch.float32, device=ranks.device)
    if distribution == "linear_decay":
        return torch.log(num_classes + 1 - ranks)
    uniform = torch.rand(ranks.shape, dtype=torch.float32, device=ranks.device, generator=generator)
    if distribution == "random_uniform":
        return uniform.log_()  # a draw of exactly 0 is a weight of 0 (log -inf), not an error
    if distribution == "random_pareto":
        # Lomax draw X = (1 - U)^(-1/alpha) - 1 (numpy's ``random.pareto(alpha)``), in log space:
        # with x = -log(1 - U) / alpha >= 0, log X = log(e^x - 1) = x + log(1 - e^-x). Stable for
        # heavy tails (small alpha), where X itself would overflow float32.
        x = torch.log1p(-uniform).div_(-alpha)
        return x + torch.log(-torch.expm1(-x))
    raise ValueError(f"distribution must be one of {list(DISTRIBUTIONS)}, got {distribution!r}")


@torch.no_grad()
def zipf_soft_labels(
    scores: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    distribution: str = "zipf",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Soft labels P (float32, N x C) from per-class ``scores`` (vote counts or logits, N x C).

    ``rank_c = 1 + #{k : score_k > score_c}`` over all C classes, target included, ties sharing the
    smallest rank; non-target ranks are not renumbered after the target is dropped. Each class gets a
    weight ``w_c``, the target's weight is set to 0 and the row is normalised:
    ``P_c = w_c / sum_{k != y} w_k``, ``P_y = 0``. ``distribution`` picks ``w`` (Table 6):

    - ``zipf``:           ``w_c = rank_c ** -alpha`` (the method; alpha = 1 in the paper).
    - ``constant``:       ``w_c = 1``: uniform over the non-target classes.
    - ``linear_decay``:   ``w_c = C + 1 - rank_c``: linear in the rank, C at rank 1 down to 1 at rank C
      (the released code's linear decay with its smallest-probability knob at 2 / (C (C + 1)), i.e.
      the line reaching 0 at the virtual rank C + 1; tied classes share the smallest rank, as for
      zipf and as in the released code, whose ``gen_pdf`` passes no rank span to its linear decay).
    - ``random_uniform``: ``w_c ~ U[0, 1)``, independent per sample and class, fresh every call.
    - ``random_pareto``:  ``w_c ~ Lomax(alpha)`` = ``Pareto(shape alpha, scale 1) - 1`` (numpy's
      ``random.pareto(alpha)``; alpha = 1 reproduces the released code), independent per sample
      and class, fresh every call.

    The random weights ignore the ranks (they are *not* sorted so that higher-ranked classes get
    larger weights): the paper's ablation contrasts rank-following shapes ("decay style", Zipf) with
    "random style" soft labels, and the released code draws ``np.random.rand`` /
    ``np.random.pareto(1)`` per class without sorting (sorting is a separate ``sorted_pareto``
    option there). They use torch's RNG on the scores' device (or ``generator``).

    ``alpha`` is used by ``zipf`` and ``random_pareto`` only. Normalisation is a softmax of the
    log-weights with the target at -inf, so it is exact at the target (0) and cannot overflow.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be N x C, got shape {tuple(scores.shape)}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {list(DISTRIBUTIONS)}, got {distribution!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    check_targets(targets, scores, "scores")
    ranks = min_ranks(scores.detach())
    log_weights = _log_weights(ranks, float(alpha), distribution, generator)
    log_weights.scatter_(1, targets.view(-1, 1), float("-inf"))
    return torch.softmax(log_weights, dim=1)


def nontarget_kl(logits: Tensor, targets: Tensor, soft_labels: Tensor) -> Tensor:
    """Batch mean of ``KL(P || Q) = sum_{c != y} P_c (log P_c - log Q_c)``, differentiable in ``logits``.

    ``Q`` is the softmax over the non-target logits. The target logit is overwritten (a scatter, no
    boolean indexing) by the dtype's most negative finite value, so ``Q_y`` underflows to exactly 0
    while ``log Q_y`` stays finite and ``P_y log Q_y = 0`` (``-inf`` would make it NaN). Computed in
    float32 for float32 and lower-precision logits (``log_softmax(..., dtype=float32)``), in float64
    for float64 ones. Terms with ``P_c = 0``
    contribute exactly 0. Gradient (paper eq. 6): ``(Q_c - P_c) / N`` for ``c != y``, exactly 0 for
    the target, provided the rows of ``soft_labels`` sum to 1 and are 0 at the target (as
    :func:`zipf_soft_labels` makes them; a nonzero ``P_y`` would be an error in the caller).

    Written as ``(sum P log P - <P, log Q>) / N``: one log-softmax and one dot product on the graph,
    so few kernels (at small batches a GPU step is bound by kernel launches, not arithmetic).
    """
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be N x C with N >= 1 (the batch mean of no rows is undefined), got shape {tuple(logits.shape)}")
    check_targets(targets, logits, "logits")
    if soft_labels.shape != logits.shape:
        raise ValueError(f"soft_labels must be N x C as the logits, {tuple(logits.shape)}, got {tuple(soft_labels.shape)}")
    n = logits.shape[0]
    # float32 for every lower precision; float64 stays float64 (its most negative value would
    # overflow to -inf in float32, and 0 * -inf is NaN).
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    # A -inf logit (a class masked out by the caller) is clamped to the same finite floor as the
    # target: its log Q is then finite, so P_c = 0 there contributes 0, not 0 * -inf = NaN.
    floor = torch.finfo(logits.dtype).min
    masked = logits.clamp_min(floor).scatter_(1, targets.view(-1, 1), floor)
    log_q = F.log_softmax(masked, dim=1, dtype=compute)
    p = soft_labels.detach().to(compute)
    with torch.no_grad():
        mean_p_log_p = torch.xlogy(p, p).sum().div_(n)
    # mean_p_log_p - <P, log Q> / N: one node on the graph (sub with alpha) rather than sub + div.
    return torch.sub(mean_p_log_p, torch.dot(p.reshape(-1), log_q.reshape(-1)), alpha=1.0 / n)


def _stage_classifier(model: nn.Module, stage: str) -> nn.Linear:
    """The linear layer whose dense application gives ``stage``'s votes: the model's own classifier
    for ``final``, the stage's auxiliary head's ``fc`` otherwise (Dense2)."""
    wrapper = unwrap(model)
    if stage == "final":
        return wrapper.classifier
    if stage not in wrapper.aux_heads:
        raise KeyError(
            f"loss.stages has {stage!r} but the model has no auxiliary head there (heads: "
            f"{list(wrapper.aux_heads)}); build the model with aux_stages=method.needs.aux_stages"
        )
    fc = getattr(wrapper.aux_heads[stage], "fc", None)
    if not isinstance(fc, nn.Linear):
        raise TypeError(f"the auxiliary head on {stage!r} has no linear `fc` to apply densely (need aux_head=linear)")
    return fc


class ZipfLabelSmoothing(Method):
    """``loss = CE(z, y) + weight * KL(P_zipf || Q_nontarget) (+ aux_weight * CE(aux logits, y))``.

    Options (``configs/loss/zipf.yaml``): ``weight`` is the paper's lambda; ``alpha`` the Zipf
    exponent; ``distribution`` the soft-label shape; ``rank_by`` dense votes or the logits;
    ``stages`` the maps that vote (``[final]``, or ``[final, penultimate]`` = the paper's Dense2,
    where every non-final stage gets its own auxiliary linear head whose CE is weighted
    ``aux_weight``, the paper's beta, and whose classifier casts that stage's votes); ``upsample``
    of every voting map before classifying; ``kernel`` how the soft label and KL are computed:
    ``torch`` (the reference functions above), ``triton`` (``zipf_fused.py``: one kernel for the
    ranks, soft label, KL and CE, the same numbers to float rounding; eager and under
    ``torch.compile``, as a custom op) or ``auto`` (triton on CUDA where it applies, else torch: on
    the CPU the reference path is already ~free).

    Which path computes a step (:meth:`_kernel_applies`): the kernel where ``kernel`` is triton, or
    auto on a CUDA device, for ``rank_by=dense`` with a distribution of the rank (zipf, constant,
    linear_decay) and at most ``MAX_FUSED_VOTES`` (512) votes per sample; the reference functions
    otherwise (``rank_by=logits``, the random distributions, more votes than that such as Dense2 on
    upsampled 224 px maps, 196 + 784, the CPU under auto). ``triton`` where the kernel cannot run is
    an error, not a switch. Under auto, a kernel that fails to build or disagrees with the reference
    on its first call is replaced by the reference functions for the rest of the process, with a
    warning.

    Who casts the votes on the kernel's path: the kernel itself (the upsample and the arg-max of the
    classifier's dense logits, in the same launch) only for one upsampled voting map of at most
    ``MAX_CAST_VOTES`` (128) pixels after upsampling, i.e. ``stages=[final]`` with
    ``upsample=bilinear`` on the 4 x 4 maps of the 32 px recipe, where a step is bound by kernel
    launches (and only while the batch's dense logits fit one ``dense_logits.MAX_DENSE_LOGITS``
    chunk). Torch casts them (:func:`dense_votes`) and hands them to the kernel in every other case:
    Dense2 (two maps, two classifiers), ``upsample=none`` (the 224 px recipe's 7 x 7 maps) and maps
    above 128 pixels (224 px with bilinear: 14 x 14). There a step is long enough that two more
    launches do not matter, and torch's arg-max over up to 49 x 10,000 logits per sample is better
    parallelised than the kernel's one program per sample.
    """

    def __init__(
        self,
        num_classes: int,
        weight: float = 1.0,
        alpha: float = 1.0,
        distribution: str = "zipf",
        rank_by: str = "dense",
        stages: Sequence[str] = ("final",),
        upsample: str | None = "bilinear",
        aux_weight: float = 0.5,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        # Hydra hands a ListConfig; a bare string is a config mistake ("final" is not ["final"]).
        if isinstance(stages, str) or not isinstance(stages, Iterable):
            raise ValueError(f"loss.stages must be a list of stage names, e.g. [final] or [final, penultimate]; got {stages!r}")
        stages = tuple(stages)
        self.weight = non_negative("weight", weight, "the paper's lambda")
        self.alpha = positive("alpha", alpha, "the Zipf exponent")
        self.distribution = str(one_of("distribution", distribution, DISTRIBUTIONS))
        self.rank_by = str(one_of("rank_by", rank_by, RANK_BY))
        # Whether a name is a stage at all; which stages the model has is checked before the run
        # starts (engine/config_checks, through models.stage_positions).
        if not stages or "final" not in stages or not all(is_stage_name(s) for s in stages) or len(set(stages)) != len(stages):
            raise ValueError(
                "loss.stages must be a list of distinct stage names containing 'final' ('final', "
                f"'penultimate' or 'stage<i>'), e.g. [final] or [final, penultimate]; got {list(stages)!r}"
            )
        if rank_by == "logits" and stages != ("final",):
            raise ValueError(f"loss.stages only applies to rank_by=dense; with rank_by=logits leave it [final], got {list(stages)!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"loss.upsample must be one of ['none', 'bilinear'] (or null), got {upsample!r}")
        self.aux_weight = non_negative("aux_weight", aux_weight, "the paper's beta")
        self.kernel = str(one_of("kernel", kernel, KERNELS))
        fusable = rank_by == "dense" and distribution in FUSED_DISTRIBUTIONS
        if kernel == "triton" and not fusable:
            raise ValueError(
                f"loss.kernel=triton computes rank_by=dense with distribution in {list(FUSED_DISTRIBUTIONS)}; "
                f"got rank_by={rank_by!r}, distribution={distribution!r} (use loss.kernel=auto or torch)"
            )
        self.num_classes = int(num_classes)
        self.stages = tuple(str(s) for s in stages)
        self.upsample = None if upsample in (None, "none") else str(upsample)
        self.fusable = fusable  # what the fused kernel computes (rank_by=dense, a rank-based distribution)
        dense = self.rank_by == "dense"
        self.aux_stages = tuple(s for s in self.stages if s != "final") if dense else ()
        self.needs = Needs(feature_stages=self.stages if dense else (), aux_stages=self.aux_stages)

    @torch.no_grad()
    def votes(self, outputs: ModelOutput, model: nn.Module) -> Tensor:
        """Dense votes of every voting stage, N x V class indices (stages side by side)."""
        votes = []
        for stage in self.stages:
            if stage not in outputs.features:
                raise KeyError(f"model output lacks the dense map {stage!r} (Needs.feature_stages={self.needs.feature_stages})")
            classifier = _stage_classifier(model, stage)
            votes.append(dense_votes(outputs.features[stage], classifier.weight, classifier.bias, self.upsample))
        return votes[0] if len(votes) == 1 else torch.cat(votes, dim=1)

    @torch.no_grad()
    def scores(self, outputs: ModelOutput, model: nn.Module) -> Tensor:
        """Per-class scores that rank the classes: pooled vote counts of all stages, or the logits."""
        if self.rank_by == "logits":
            return outputs.logits.detach()
        return vote_counts(self.votes(outputs, model), self.num_classes)

    def check_run(self, device: torch.device) -> None:
        """loss.kernel=triton on a device the kernel cannot run on is refused before the run starts
        (else the first step fails, after the run folder is made); two classes leave no ranking to
        learn from (one non-target class: the Zipf term is 0 and the run trains as CE): a warning."""
        if self.kernel == "triton":
            reason = unavailable_reason(device, 0)
            if reason is not None:
                raise ValueError(f"loss.kernel=triton cannot run on this run's device: {reason}; use loss.kernel=auto or torch")
        if self.num_classes == 2:
            warnings.warn(
                "loss=zipf with 2 classes: the soft label has one non-target class, so the Zipf term is 0 "
                "and loss.weight has no effect (the run trains as cross-entropy)",
                UserWarning,
                stacklevel=2,
            )

    def _kernel_applies(self, outputs: ModelOutput) -> bool:
        """Whether the fused kernel computes this step's terms, rather than the reference functions
        (see the class docstring). Raises where ``kernel=triton`` asks for a kernel that cannot run."""
        if not self.fusable or self.kernel == "torch" or (self.kernel == "auto" and not outputs.logits.is_cuda):
            return False
        upsample = self.upsample == "bilinear"
        num_votes = sum(votes_per_sample(outputs.features[stage], upsample) for stage in self.stages if stage in outputs.features)
        reason = unavailable_reason(outputs.logits.device, num_votes)
        if reason is not None and self.kernel == "triton":
            raise RuntimeError(f"loss.kernel=triton, but {reason}; use loss.kernel=auto or torch")
        return reason is None

    def _kernel_terms(self, outputs: ModelOutput, targets: Tensor, model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """``(ce + weight * KL, ce, KL)`` in one launch; only the first is differentiable. (The kernel
        checks itself against the reference functions on its first call; under ``auto`` one that
        fails to build or disagrees is replaced by them, with a warning.)"""
        votes = self._kernel_votes(outputs, model)
        return fused_ce_zipf(outputs.logits, targets, votes, self.weight, self.alpha, self.distribution, fallback=self.kernel == "auto")

    def _kernel_votes(self, outputs: ModelOutput, model: nn.Module) -> Tensor | DenseMap:
        """What the kernel takes: the one upsampled voting map and its classifier (a ``DenseMap``,
        which the kernel votes itself where it has at most ``MAX_CAST_VOTES`` pixels, torch
        otherwise: ``zipf_fused._vote_source``), or, for every other configuration, the votes torch
        cast from every stage, side by side."""
        if self.stages != ("final",) or self.upsample != "bilinear":
            return self.votes(outputs, model)
        classifier = _stage_classifier(model, "final")
        return DenseMap(outputs.features["final"], classifier.weight, classifier.bias, upsample=True)

    def _reference_terms(self, outputs: ModelOutput, targets: Tensor, model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
        """``(ce + weight * KL, ce, KL)`` by the reference functions above."""
        soft = zipf_soft_labels(self.scores(outputs, model), targets, self.alpha, self.distribution)
        ce, zipf = cross_entropy(outputs.logits, targets), nontarget_kl(outputs.logits, targets, soft)
        return torch.add(ce, zipf, alpha=self.weight), ce, zipf

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        targets = batch.targets
        if self._kernel_applies(outputs):
            loss, ce, zipf = self._kernel_terms(outputs, targets, model)
        else:
            loss, ce, zipf = self._reference_terms(outputs, targets, model)
        terms = {"ce": ce, "zipf": zipf}
        if self.aux_stages:
            aux_ce = sum(cross_entropy(outputs.aux_logits[stage], targets) for stage in self.aux_stages)
            loss = loss + self.aux_weight * aux_ce
            terms["aux_ce"] = aux_ce
        return {"loss": loss, **terms}


__all__ = [
    "DISTRIBUTIONS",
    "KERNELS",
    "ZipfLabelSmoothing",
    "dense_votes",
    "min_ranks",
    "nontarget_kl",
    "vote_counts",
    "zipf_soft_labels",
]
