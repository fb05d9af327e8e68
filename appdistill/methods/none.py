"""``none``: the plain student, ``BCE(z_s, y)``."""

from __future__ import annotations

import torch

from appdistill.features.batch import Batch
from appdistill.methods.base import METHODS, Method, label_bce
from appdistill.student.model import RankingModel, StudentOutput


@METHODS.register("none")
class NoDistillation(Method):
    # the plain student has no distillation knob; its budget goes to its own regularisation, so the
    # baseline every gain is measured against is tuned as hard as the methods
    grid = {"student.dropout": [0.0, 0.1, 0.2, 0.3]}

    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        return {"bce": label_bce(out.logits, batch.labels)}
