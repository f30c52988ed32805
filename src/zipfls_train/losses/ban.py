"""Born-again networks, BAN (Furlanello et al., ICML 2018): generation k is trained from scratch to
match the frozen generation k - 1 of the same architecture.

    generation 1:   L = CE(z, y)                                  (the born-again teacher)
    generation k>1: L = (1 - a) CE(z, y) + a T^2 KL(softmax(t / T) || softmax(z / T))

t: logits of generation k - 1 (frozen, eval mode, under ``no_grad``). KL: batch mean, times T^2
(Hinton's scale correction, as CS-KD and BYOT use it; ``temperature_squared: false`` drops it, the
formula as the paper's BAN baseline is often written). Without T^2, at T = 20 the distillation
gradient is 1/400 of its usual size (~1e-4 of the CE gradient's): generation 2 would train as CE
scaled by 1 - a and could not show the paper's BAN gains (up to +2.24 over CE in Tables 1 and 2), so the default
keeps it, as the KD codes BAN is run with do (e.g. TF-KD's self-training loss). Defaults a = 0.2,
T = 20; experiment=ban_generations trains generations 1-3 (the paper calls its BAN baseline "one
step", sec. 4.2: generation 2).

Teacher: ``teacher_checkpoint`` is a zipfls-train checkpoint (``<run>/checkpoints/best.pt`` or
``last.pt``) of generation k - 1. ``setup`` builds a fresh model with the run's ``model_factory()``,
loads the checkpoint's ``model`` state (auxiliary-head entries, if the teacher run had any, are
ignored: they never affect the logits), freezes it (``requires_grad_(False)``, eval mode); the trainer's factory
builds it on the training device and in its layout (a teacher built elsewhere is moved at the first
step). It is deliberately *not* a registered submodule: it stays
out of the optimiser (the trainer optimises ``method.parameters()``), out of ``train()`` calls and out
of this method's ``state_dict`` (checkpoints stay small; the teacher is reloaded from its path on
resume).

Chaining generations: ``python train.py -m experiment=ban_generations ...`` trains generations 1-3
in one sweep: the basic launcher runs its jobs in order, and each generation's
``teacher_checkpoint`` is the previous one's ``checkpoints/best.pt`` in the sibling job (the
``ban_teacher`` resolver, ``engine/naming.previous_generation_checkpoint``). Launchers that run jobs
at once (SLURM) chain them by path instead, one generation at a time, e.g. ``scripts/run_ban.sh``::

    python train.py loss=ban loss.generation=1 hydra.run.dir=outputs/ban/gen1
    python train.py loss=ban loss.generation=2 loss.teacher_checkpoint=outputs/ban/gen1/checkpoints/best.pt \
        hydra.run.dir=outputs/ban/gen2
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..data.bundle import configured_num_classes
from ..engine.checkpoint import load_checkpoint
from ..models.outputs import ModelOutput
from ..trained import model_weights
from .base import Method, fraction, positive, switch
from .ce import cross_entropy
from .distill import tempered_kl


class TeacherCheckpointError(FileNotFoundError):
    """BAN's teacher checkpoint is missing or does not fit the run's model (a user error: train.py
    prints its message alone; see zipfls_train.errors)."""


def load_teacher(path: Path, model_factory) -> nn.Module:  # noqa: ANN001
    """A frozen, eval-mode model of the run's architecture with the checkpoint's weights."""
    checkpoint = load_checkpoint(path)
    state = checkpoint["model"]
    teacher = model_factory()
    weights = model_weights(state)  # auxiliary heads, if the teacher run had any, left out
    problems = _state_mismatch(weights, teacher.state_dict())
    if problems:
        raise TeacherCheckpointError(
            f"BAN teacher checkpoint {path} does not fit this run's model: {problems}. The teacher must be "
            f"trained with the student's model, model.options and number of classes{_teacher_model(checkpoint)}"
        )
    teacher.load_state_dict(weights)  # fits: _state_mismatch found every key and shape as expected
    teacher.requires_grad_(False)
    return teacher.eval()


def _state_mismatch(weights: dict[str, Tensor], expected: dict[str, Tensor], show: int = 3) -> str:
    """The first few differences between a checkpoint's weights and a model's, one phrase; '' if none."""
    shapes = [
        f"{key} is {list(value.shape)} in the checkpoint, {list(expected[key].shape)} in this model"
        for key, value in weights.items()
        if key in expected and tuple(value.shape) != tuple(expected[key].shape)
    ]
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    parts = []
    if shapes:
        more = f" (and {len(shapes) - show} more)" if len(shapes) > show else ""
        parts.append(f"{len(shapes)} weight(s) of another shape: " + "; ".join(shapes[:show]) + more)
    if missing:
        parts.append(f"{len(missing)} weight(s) of this model missing from the checkpoint, e.g. {missing[:show]}")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) this model does not have, e.g. {unexpected[:show]}")
    return "; ".join(parts)


def _teacher_model(checkpoint: dict) -> str:
    """' (the checkpoint: model=..., model.options=...)' from the teacher run's config, when it has one."""
    config = checkpoint.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return ""
    dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    classes = configured_num_classes(dataset)
    return f" (the checkpoint's run: model={model.get('name')}, model.options={model.get('options') or {}}, {classes} classes)"


class BornAgainNetwork(Method):
    def __init__(
        self,
        num_classes: int,
        generation: int = 1,
        teacher_checkpoint: str | None = None,
        alpha: float = 0.2,
        temperature: float = 20.0,
        temperature_squared: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(generation, int) or generation < 1:
            raise ValueError(f"loss.generation must be an integer >= 1, got {generation!r}")
        fraction("alpha", alpha)
        positive("temperature", temperature)
        if generation == 1 and teacher_checkpoint:
            raise ValueError(
                f"loss.generation=1 is the born-again teacher (plain CE) and takes no teacher, but "
                f"loss.teacher_checkpoint={teacher_checkpoint!r}; use loss.generation=2 to distil from it"
            )
        if generation > 1:
            if not teacher_checkpoint:
                raise ValueError(
                    f"loss.generation={generation} distils from generation {generation - 1}: set "
                    "loss.teacher_checkpoint to its checkpoints/best.pt (scripts/run_ban.sh chains generations)"
                )
            if Path(teacher_checkpoint).is_dir():
                raise TeacherCheckpointError(
                    f"loss.teacher_checkpoint={str(teacher_checkpoint)!r} is a folder; give generation "
                    f"{generation - 1}'s checkpoint file, e.g. {Path(teacher_checkpoint) / 'checkpoints' / 'best.pt'}"
                )
            if not Path(teacher_checkpoint).is_file():
                raise TeacherCheckpointError(
                    f"BAN generation {generation} needs the checkpoint of generation {generation - 1}, but "
                    f"loss.teacher_checkpoint={str(teacher_checkpoint)!r} does not exist (resolved: "
                    f"{Path(teacher_checkpoint).resolve()}); train generation {generation - 1} first"
                )
        self.num_classes = num_classes
        self.generation = generation
        self.teacher_checkpoint = Path(teacher_checkpoint) if teacher_checkpoint else None
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.kd_scale = self.temperature**2 if switch("temperature_squared", temperature_squared) else 1.0
        # Not a submodule (see the module docstring): object.__setattr__ bypasses registration.
        object.__setattr__(self, "_teacher", None)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher

    def setup(self, *, num_classes: int, dataset_size: int, model_factory) -> None:  # noqa: ANN001
        if self.teacher_checkpoint is not None:
            object.__setattr__(self, "_teacher", load_teacher(self.teacher_checkpoint, model_factory))

    def _teacher_logits(self, inputs: Tensor) -> Tensor:
        teacher = self._teacher
        if teacher is None:
            raise RuntimeError(f"BAN generation {self.generation}: setup() has not loaded the teacher")
        parameter = next(teacher.parameters())
        if parameter.device != inputs.device:
            teacher.to(inputs.device)
            if inputs.is_contiguous(memory_format=torch.channels_last) and inputs.dim() == 4:
                teacher.to(memory_format=torch.channels_last)
        with torch.no_grad():
            return teacher(inputs).logits

    def loss_terms(self, outputs: ModelOutput, batch: Batch, model: nn.Module) -> dict[str, Tensor]:
        if self.generation == 1:
            ce = cross_entropy(outputs.logits, batch.targets)
            return {"loss": ce, "ce": ce}
        return self._distil_terms(outputs.logits, self._teacher_logits(batch.inputs), batch.targets)

    def _distil_terms(self, logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        ce = cross_entropy(logits, targets)
        kd = tempered_kl(logits, teacher_logits, self.temperature, times_t_squared=False)
        loss = (1.0 - self.alpha) * ce + self.alpha * self.kd_scale * kd
        return {"loss": loss, "ce": ce, "ban_kl": kd}
