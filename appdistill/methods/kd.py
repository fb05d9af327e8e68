"""``kd``: Hinton knowledge distillation from one teacher, binary form.

``(1 - a)·BCE(z_s, y) + a·T²·BCE(z_s / T, σ(z_t / T))``.
"""

from __future__ import annotations

from typing import Any

import torch

from appdistill.features.batch import Batch
from appdistill.methods.base import METHODS, Method, kd_loss, label_bce
from appdistill.student.model import RankingModel, StudentOutput


@METHODS.register("kd")
class KD(Method):
    """Args:
        teacher: committee member to distil from (default: the first configured teacher).
        alpha: weight ``a`` of the distillation term.
        temperature: ``T``.
    """

    grid = {"alpha": [0.5, 0.8], "temperature": [1.0, 2.0]}

    kwarg_ranges = {"alpha": {"ge": 0, "le": 1}, "temperature": {"gt": 0, "le": 100}}

    def __init__(self, committee: dict[str, Any] | None = None, teacher: str | None = None,
                 alpha: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(committee)
        self.teacher = self.pick(teacher or (self.committee_names[:1] or None))[0]
        self.requires = (self.teacher,)
        self.alpha, self.T = alpha, temperature

    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        z_t = batch.teacher[self.teacher].logits
        return {"bce": (1 - self.alpha) * label_bce(out.logits, batch.labels),
                "kd": self.alpha * kd_loss(out.logits, z_t, self.T)}
