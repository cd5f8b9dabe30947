"""The Distiller contract every method follows (see docs/design.md, "Distillation methods").

A Distiller owns the student, the frozen teacher and any training-only modules as
siblings, so `student.state_dict()` never gains a key. The trainer calls
`forward(x, y, progress)`, sums the returned named losses and knows nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from dskd.errors import UserError
from dskd.methods.options import Opt


def _num_classes(model: nn.Module) -> int | None:
    fc = getattr(model, "fc", None)
    return fc.out_features if isinstance(fc, nn.Linear) else None


class Distiller(nn.Module):
    """Base class: teacher freezing, train/eval handling, parameter bookkeeping.

    Subclasses set `name`, `OPTIONS` (and `needs_teacher`), build their training-only
    modules in `__init__` and implement `forward`.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    OPTIONS: ClassVar[dict[str, Opt]] = {}

    def __init__(self, student: nn.Module, teacher: nn.Module | None, options: Mapping[str, Any]) -> None:
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise UserError(f"method {self.name} needs a teacher: pass --teacher TEACHER_DIR_OR_model.pt")
        for role, model in (("student", student), ("teacher", teacher)):
            if model is None:
                continue
            missing = [a for a in ("forward_features", "forward_head", "num_features") if not hasattr(model, a)]
            if missing:
                raise TypeError(f"{role} lacks {missing}: use a model from dskd.models")
        if teacher is not None and None not in (_num_classes(student), _num_classes(teacher)):
            if _num_classes(student) != _num_classes(teacher):
                raise UserError(
                    f"teacher predicts {_num_classes(teacher)} classes but the student "
                    f"{_num_classes(student)}: distil on the data the teacher was trained on"
                )
        self.options = dict(options)
        self.student = student
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    # -- train/eval -------------------------------------------------------------------
    def train(self, mode: bool = True) -> Distiller:
        """Switch student and training-only modules; the teacher stays in eval mode always."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # -- parameters -------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student + training-only parameters for the optimizer; never the teacher's."""
        for name, param in self.named_parameters():
            if not name.startswith("teacher.") and param.requires_grad:
                yield param

    def training_only_modules(self) -> dict[str, nn.Module]:
        """Modules that exist only for training (dropped at export)."""
        return {
            name: module
            for name, module in self.named_children()
            if name not in ("student", "teacher")
        }

    def count_training_only_params(self) -> int:
        """Parameters the method adds on top of the student and teacher (buffers excluded), as
        summary.json reports them: those of training-only modules and any held directly."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("student.", "teacher.")))

    def resume_state_dict(self) -> dict[str, torch.Tensor]:
        """What to save for resume: everything except the (fixed, separately stored) teacher."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    # -- shared steps -----------------------------------------------------------------
    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher logits, teacher feature map) without building a graph."""
        assert self.teacher is not None
        with torch.no_grad():
            feats = self.teacher.forward_features(x)
            logits = self.teacher.forward_head(feats)
        return logits.detach(), feats.detach()

    def student_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(student logits, student feature map), both in the graph."""
        feats = self.student.forward_features(x)
        return self.student.forward_head(feats), feats

    def cost_report(self, input_size: int = 32, in_chans: int = 3) -> dict[str, int]:
        """Training-only parameter count (subclasses add MACs of their extra modules)."""
        return {"training_only_params": self.count_training_only_params()}

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, y: torch.Tensor, progress: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def ramp(progress: float, warmup: float) -> float:
    """Linear warm-up factor in [0, 1]: progress/warmup, or 1 when warmup is 0."""
    if warmup <= 0:
        return 1.0
    return float(min(max(progress, 0.0) / warmup, 1.0))
