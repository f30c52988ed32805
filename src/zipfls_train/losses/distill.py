"""The distillation term the self-distillation baselines share (CS-KD, BYOT, DDGSD, BAN): the KL
from a teacher's tempered softmax to a student's. A new distilling method uses it too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def tempered_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float, times_t_squared: bool = True) -> Tensor:
    """Batch mean of KL(softmax(teacher / T) || softmax(student / T)), in float32, the teacher a
    constant (detached); times T^2 (Hinton et al.'s factor, which keeps the gradient's scale as T
    changes) unless ``times_t_squared`` is False (BAN scales its term itself)."""
    if student_logits.shape != teacher_logits.shape:  # (a 1 x C teacher would broadcast over the batch)
        raise ValueError(f"student and teacher logits must have one shape (N x C), got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    # A -inf logit (a masked class) is a probability of 0: clamped to the most negative float, its term
    # is 0 (not 0 * -inf = NaN), in the teacher and in a student masked alike (a model distilled into itself).
    floor = torch.finfo(torch.float32).min
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1).clamp_min(floor)
    log_q = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1).clamp_min(floor)
    kl = (log_q.exp() * (log_q - log_p)).sum(dim=1).mean()
    return kl * temperature**2 if times_t_squared else kl
