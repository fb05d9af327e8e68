"""``avg_kd``: multi-teacher KD against the (weighted) mean committee probability.

``(1 - a)·BCE(z_s, y) + a·T²·BCE(z_s / T, Σ_i w_i σ(z_i / T))`` with fixed weights ``w`` (uniform by
default). The naive multi-teacher baseline: it can fall below single-teacher KD when teachers disagree.
"""

from __future__ import annotations

from typing import Any

import torch

from appdistill.errors import ConfigError
from appdistill.features.batch import Batch
from appdistill.methods.base import METHODS, Method, label_bce, soft_bce
from appdistill.student.model import RankingModel, StudentOutput


@METHODS.register("avg_kd")
class AvgKD(Method):
    """Args:
        teachers: committee members to average (default: all).
        weights: fixed non-negative weights, one per teacher (normalised); default uniform.
        alpha: weight of the distillation term.
        temperature: ``T``.
    """

    grid = {"alpha": [0.5, 0.8], "temperature": [1.0, 2.0]}

    kwarg_ranges = {"alpha": {"ge": 0, "le": 1}, "temperature": {"gt": 0, "le": 100}}

    def __init__(self, committee: dict[str, Any] | None = None, teachers: list[str] | None = None,
                 weights: list[float] | None = None, alpha: float = 0.5, temperature: float = 1.0) -> None:
        super().__init__(committee)
        self.teachers = self.pick(teachers)
        self.requires = tuple(self.teachers)
        w = torch.tensor(weights if weights is not None else [1.0] * len(self.teachers), dtype=torch.float32)
        if len(w) != len(self.teachers) or (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"avg_kd: weights {weights} must be {len(self.teachers)} non-negative numbers")
        self.register_buffer("w", w / w.sum(), persistent=False)
        self.alpha, self.T = alpha, temperature

    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        z = torch.stack([batch.teacher[n].logits for n in self.teachers], 1).detach()  # [B, n]
        p = (torch.sigmoid(z / self.T) * self.w).sum(1)
        return {"bce": (1 - self.alpha) * label_bce(out.logits, batch.labels),
                "kd": self.alpha * self.T ** 2 * soft_bce(out.logits / self.T, p)}
