"""``taid``: Temporally Adaptive Interpolated Distillation (arXiv 2501.16937), binary form.

Target ``p_t = σ((1 - t)·sg(z_s) + t·z_T)``; loss ``BCE(z_s, p_t)`` (+ ``label_weight·BCE(z_s, y)``).
After every optimiser step, with ``J`` the step's loss **all-reduced over ranks** (so every rank holds
the same ``t``; the official code does not do this)::

    δ = (J_prev - J) / (J_prev + 1e-15);  m = β·m + (1 - β)·δ
    t = min(t_end, max(t_lin(step), t + α·σ(m)·(1 - t)))

``t_lin`` rises linearly from ``t_start`` to ``t_end`` over training. On the first step there is no
``J_prev`` yet: only the linear floor applies and ``J`` is recorded.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from appdistill.errors import ConfigError
from appdistill.features.batch import Batch
from appdistill.methods.base import METHODS, Method, label_bce, soft_bce
from appdistill.student.model import RankingModel, StudentOutput


class TAIDSchedule:
    """The adaptive ``t`` of TAID, separate from the loss so DiverseDistill can reuse it."""

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99) -> None:
        if not (0 <= t_start < t_end <= 1):
            raise ConfigError(f"taid: need 0 <= t_start < t_end <= 1, got {t_start}, {t_end}")
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t, self.m, self.prev = t_start, 0.0, None

    def update(self, loss: float, step: int, total_steps: int) -> float:
        """Update ``t`` after step ``step`` (0-based) of ``total_steps``; ``loss`` already all-reduced."""
        t_lin = self.t_start + (self.t_end - self.t_start) * min(1.0, (step + 1) / max(1, total_steps))
        if self.prev is None:
            self.t = min(self.t_end, max(t_lin, self.t))
        else:
            delta = (self.prev - loss) / (self.prev + 1e-15)
            self.m = self.beta * self.m + (1 - self.beta) * delta
            sig = 1.0 / (1.0 + math.exp(-self.m))
            self.t = min(self.t_end, max(t_lin, self.t + self.alpha * sig * (1 - self.t)))
        self.prev = loss
        return self.t

    def state(self) -> dict[str, Any]:
        return {"t": self.t, "m": self.m, "prev": self.prev}

    def load_state(self, s: dict[str, Any]) -> None:
        self.t, self.m, self.prev = float(s["t"]), float(s["m"]), s["prev"]


def global_mean(x: torch.Tensor) -> float:
    """Mean of a scalar over all ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        y = x.detach().float().clone().reshape(1)
        dist.all_reduce(y)
        return float(y) / dist.get_world_size()
    return float(x.detach())


def taid_loss(z_s: torch.Tensor, z_t: torch.Tensor, t: float) -> torch.Tensor:
    """``BCE(z_s, σ((1 - t)·sg(z_s) + t·sg(z_t)))``."""
    return soft_bce(z_s, torch.sigmoid((1 - t) * z_s.detach() + t * z_t.detach()))


@METHODS.register("taid")
class TAID(Method):
    """Args:
        teacher: one teacher; or ``teachers`` (several) whose mean logit is the target.
        t_start, t_end, alpha, beta: the schedule (paper defaults).
        label_weight: weight of an extra ``BCE(z_s, y)`` term (0 = pure TAID).
    """

    # label_weight 1 / 0.25: the same target-to-label ratios (1, 4) as kd's alpha grid
    grid = {"label_weight": [1.0, 0.25], "t_start": [0.2, 0.4]}

    kwarg_ranges = {"t_start": {"ge": 0, "lt": 1}, "t_end": {"gt": 0, "le": 1}, "alpha": {"ge": 0, "le": 1},
                    "beta": {"ge": 0, "lt": 1}, "label_weight": {"ge": 0, "le": 100}}

    def __init__(self, committee: dict[str, Any] | None = None, teacher: str | None = None,
                 teachers: list[str] | None = None, t_start: float = 0.4, t_end: float = 1.0,
                 alpha: float = 5e-4, beta: float = 0.99, label_weight: float = 0.5) -> None:
        super().__init__(committee)
        self.teachers = self.pick(teachers if teachers is not None else (teacher or None))
        self.requires = tuple(self.teachers)
        self.schedule = TAIDSchedule(t_start, t_end, alpha, beta)
        self.label_weight = label_weight

    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        z_t = torch.stack([batch.teacher[n].logits for n in self.teachers], 1).mean(1)
        terms = {"taid": taid_loss(out.logits, z_t, self.schedule.t)}
        if self.label_weight:
            terms["bce"] = self.label_weight * label_bce(out.logits, batch.labels)
        return terms

    def on_step_end(self, loss: torch.Tensor, step: int, total_steps: int) -> None:
        self.schedule.update(global_mean(loss), step, total_steps)

    def state(self) -> dict[str, Any]:
        return self.schedule.state()

    def load_state(self, state: dict[str, Any]) -> None:
        self.schedule.load_state(state)

    def logs(self) -> dict[str, float]:
        return {"taid_t": self.schedule.t}
