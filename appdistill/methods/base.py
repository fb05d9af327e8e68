"""The distillation-method interface (DESIGN.md section 7).

A method turns the student's output and a batch (with teacher outputs) into *named* loss terms;
the training loop sums and logs them. Its own parameters (question/answer nets, gates, message
encoders) are training-only: they live in the method, never in the student, so export never sees
them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from appdistill.features.batch import Batch
from appdistill.registry import Registry
from appdistill.student.model import RankingModel, StudentOutput

METHODS: Registry = Registry("method")


class Method(nn.Module):
    """Base class.

    Attributes:
        requires: teacher names whose outputs each batch must carry (cached or live).
    """

    requires: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def on_step_end(self, loss: torch.Tensor, step: int, total_steps: int) -> None:
        """Hook after the optimiser step (TAID updates ``t`` here)."""

    def logs(self) -> dict[str, float]:
        """Scalars to log besides the loss terms (e.g. the fraction of teacher passes skipped)."""
        return {}
