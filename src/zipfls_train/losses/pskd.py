"""Progressive self-knowledge distillation, PS-KD (Kim et al., ICCV 2021).

    target_i = (1 - a_t) onehot(y_i) + a_t p_prev(x_i),    a_t = a_T (t + 1) / E  (t: 0-based epoch)
    L = batch mean of -sum_c target_ic log softmax(z_i)_c                  (soft cross-entropy)

p_prev(x_i) is the softmax this sample got when it was last trained on, i.e. in the previous epoch,
kept in a per-sample memory indexed by ``batch.indices``. After each step the batch's detached
softmax (of the same forward that the loss used, as in the released code) overwrites its rows: the
step keeps it aside and ``after_backward`` writes it, outside the compiled step (``trainer.compile``
traces the step into one graph whose backward may recompute the targets from the memory after the
graph's own writes: it then trained on the step's own predictions).

Epoch 0 (checked against the released code, lgcnsai/PS-KD-Pytorch ``main.py``): before building the
targets of a batch in epoch 0 the code writes the one-hot labels into ``all_predictions`` for that
batch, so epoch-0 targets are exactly one-hot (plain CE), *not* the current detached prediction. We
generalise this with a ``seen`` flag per sample: a sample whose prediction was never stored uses its
one-hot label. In an ordinary run that is precisely every sample of epoch 0 (each sample is drawn
once per epoch); it also covers samples a run never drew (``trainer.max_steps_per_epoch``, the
remainder dropped by full batches), where the released code would read a zero row.

Memory (a registered buffer, so it goes into checkpoints and is restored on resume; sized in
``setup`` from the dataset size):
* ``memory: full``: N x C in ``memory_dtype``. ``auto`` (the default) keeps float32, as the released
  code does, while that takes at most :data:`AUTO_FLOAT32_BYTES` (CIFAR-100: 50k x 100 x 4 B = 20 MB;
  TinyImageNet 80 MB), and float16 above it (ImageNet: 1.28M x 1000 x 2 B = 2.6 GB instead of 5.1 GB;
  float16 keeps ~3 significant digits of each probability).
* ``memory: topk``: the top ``topk`` probabilities and their class indices per sample (INAT21
  train_mini: 500k x 10,000 would be 10 GB in float16; top-10 is 30 MB). The stored probabilities
  are renormalised to sum to 1 when read back (the dropped tail mass is spread over the kept
  classes, which keeps the target a distribution).

Under DDP every rank trains on a different shard, so each step all-gathers (indices, predictions)
from every rank before writing, and every rank keeps the whole memory (as the released code does).
The memory lives on the device of the method (the training device).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.batch import Batch
from ..models.outputs import ModelOutput
from .base import Method, fraction, one_of

MEMORY_KINDS = ("full", "topk")
MEMORY_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# memory_dtype=auto stores float32 up to this size of the whole memory, float16 beyond.
AUTO_FLOAT32_BYTES = 1 << 30


def pskd_alpha(final_alpha: float, epoch: int, num_epochs: int) -> float:
    """a_t = a_T * (t + 1) / E for the 0-based epoch t (the released code's schedule)."""
    return max(0.0, final_alpha * (epoch + 1) / num_epochs)


def one_hot(targets: Tensor, num_classes: int) -> Tensor:
    """N x C float32 one-hot by scatter (``F.one_hot`` validates its input on the host on some devices)."""
    return torch.zeros(targets.shape[0], num_classes, device=targets.device).scatter_(1, targets.unsqueeze(1), 1.0)


def soft_cross_entropy(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """Batch mean of -sum_c t_c log softmax(z)_c, in float32. A -inf logit (an fp16 logit below -65504
    overflows to it under autocast) is a probability of 0: its log is clamped to the most negative
    float, so a class the target gives 0 adds 0 (not 0 * -inf = NaN), as in ``distill.tempered_kl``."""
    log_p = F.log_softmax(logits.float(), dim=1).clamp_min(torch.finfo(torch.float32).min)
    return -(soft_targets * log_p).sum(dim=1).mean()


def all_gather_rows(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate each tensor's rows from every rank (rank order); identity outside DDP."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    world = dist.get_world_size()
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (the older name: torch < 2.14)
    gathered = []
    for tensor in tensors:
        tensor = tensor.contiguous()
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        gather_into(out, tensor)
        gathered.append(out)
    return tuple(gathered)


class ProgressiveSelfKD(Method):
    def __init__(
        self,
        num_classes: int,
        final_alpha: float = 0.8,
        memory: str = "full",
        topk: int = 10,
        memory_dtype: str = "auto",
    ) -> None:
        super().__init__()
        fraction("final_alpha", final_alpha)
        one_of("memory", memory, MEMORY_KINDS)
        one_of("memory_dtype", memory_dtype, ("auto", *MEMORY_DTYPES))
        if isinstance(topk, bool) or not isinstance(topk, int):  # (2.5 was truncated to 2)
            raise ValueError(f"loss.topk (classes kept per sample) must be an integer, got {topk!r}")
        if memory == "topk" and not 1 <= topk <= num_classes:
            raise ValueError(f"loss.topk must be in [1, {num_classes}] (the number of classes), got {topk}")
        self.num_classes = num_classes
        self.final_alpha = float(final_alpha)
        self.memory_kind = memory
        self.topk = topk
        self.memory_dtype = memory_dtype
        self.dtype = MEMORY_DTYPES.get(memory_dtype, torch.float32)  # auto: final once setup knows N
        self.alpha = 0.0
        self.pending: tuple[Tensor, Tensor] | None = None  # (indices, softmax) of the last step, not yet stored
        # The same value as a device tensor, updated in place: under trainer.compile a Python float
        # would be a guard, and every epoch's new alpha_t a recompilation (dynamo stops recompiling
        # after 8 and runs the step eagerly).
        self.register_buffer("alpha_tensor", torch.zeros((), dtype=torch.float32), persistent=False)
        # Empty until setup() knows the dataset size; registered now so .to(device) places them.
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))
        if memory == "full":
            self.register_buffer("memory", torch.zeros(0, num_classes, dtype=self.dtype))
        else:
            self.register_buffer("memory_values", torch.zeros(0, self.topk, dtype=self.dtype))
            self.register_buffer("memory_indices", torch.zeros(0, self.topk, dtype=torch.int32))

    # --- lifecycle --------------------------------------------------------------------------
    def setup(self, *, num_classes: int, dataset_size: int, model_factory) -> None:  # noqa: ANN001
        if num_classes != self.num_classes:
            raise ValueError(f"PS-KD was built for {self.num_classes} classes but the data has {num_classes}")
        device = self.seen.device
        if self.memory_dtype == "auto":
            per_sample = num_classes if self.memory_kind == "full" else self.topk
            self.dtype = torch.float32 if dataset_size * per_sample * 4 <= AUTO_FLOAT32_BYTES else torch.float16
        self.seen = torch.zeros(dataset_size, dtype=torch.bool, device=device)
        if self.memory_kind == "full":
            self.memory = torch.zeros(dataset_size, num_classes, dtype=self.dtype, device=device)
        else:
            self.memory_values = torch.zeros(dataset_size, self.topk, dtype=self.dtype, device=device)
            self.memory_indices = torch.zeros(dataset_size, self.topk, dtype=torch.int32, device=device)

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        self.alpha = pskd_alpha(self.final_alpha, epoch, num_epochs)
        self.alpha_tensor.fill_(self.alpha)

    # --- memory -----------------------------------------------------------------------------
    def previous_predictions(self, indices: Tensor, targets: Tensor) -> Tensor:
        """p_prev for these samples (N x C, float32): the stored softmax, or one-hot if never stored."""
        onehot = one_hot(targets, self.num_classes)
        if self.memory_kind == "full":
            stored = self.memory.index_select(0, indices).float()
        else:
            values = self.memory_values.index_select(0, indices).float()
            classes = self.memory_indices.index_select(0, indices).long()
            stored = torch.zeros_like(onehot).scatter_(1, classes, values)
            stored = stored / stored.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        return torch.where(self.seen.index_select(0, indices).unsqueeze(1), stored, onehot)

    @torch.no_grad()
    def store(self, indices: Tensor, probabilities: Tensor) -> None:
        """Write this step's predictions (all ranks' under DDP) into the memory (device-side
        index_copy_/index_fill_: no host synchronisation)."""
        if self.memory_kind == "full":
            indices, values = all_gather_rows(indices, probabilities.to(self.dtype))
            self.memory.index_copy_(0, indices, values)
        else:
            top = probabilities.topk(self.topk, dim=1)
            indices, values, classes = all_gather_rows(indices, top.values.to(self.dtype), top.indices.to(torch.int32))
            self.memory_values.index_copy_(0, indices, values)
            self.memory_indices.index_copy_(0, indices, classes)
        self.seen.index_fill_(0, indices, True)

    # --- loss -------------------------------------------------------------------------------
    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        if self.seen.shape[0] == 0:
            raise RuntimeError("PS-KD's memory is empty: setup(dataset_size=...) must run before training")
        logits = outputs.logits
        alpha = self.alpha_tensor
        onehot = one_hot(batch.targets, self.num_classes)
        targets = torch.lerp(onehot, self.previous_predictions(batch.indices, batch.targets), alpha)  # (1 - a) onehot + a prev
        loss = soft_cross_entropy(logits, targets)
        self.pending = (batch.indices, F.softmax(logits.detach().float(), dim=1))
        return {"loss": loss, "pskd_ce": loss, "alpha_t": alpha.clone()}

    def after_backward(self) -> None:
        if self.pending is not None:
            self.store(*self.pending)
            self.pending = None
