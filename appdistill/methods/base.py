"""The distillation-method interface.

A method turns the student's output and a batch (with teacher outputs) into *named* loss terms;
the training loop sums and logs them. Its own parameters (question/answer nets, gates, message
encoders) are training-only: they live in the method, never in the student, so export never sees
them.
"""

from __future__ import annotations

from typing import Any, ClassVar

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
    #: the method's tuning grid for ``appdistill bench``: ``{kwarg or config.path: [values]}``, crossed.
    #: Every method declares the same number of settings (the same tuning budget); keys with a dot
    #: are config paths (``student.dropout``), the rest method kwargs.
    grid: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self, committee: dict[str, Any] | None = None) -> None:
        """Args:
            committee: ``{name: Teacher}`` of the fitted teachers (frozen); methods that use only
                cached logits need just the names.
        """
        super().__init__()
        self.committee_names: list[str] = list(committee or {})

    def pick(self, names: list[str] | str | None) -> list[str]:
        """Resolve a ``teachers:`` kwarg (None = the whole committee), checking the names."""
        if names is None:
            names = self.committee_names
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.committee_names]
        if unknown or not names:
            from appdistill.errors import ConfigError

            raise ConfigError(f"method '{type(self).__name__}': teachers {unknown or names} are not in the "
                              f"committee {self.committee_names} (configure them under `teachers:`)")
        return names

    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def reads_hidden(cls, kwargs: dict[str, Any]) -> bool | tuple[str, ...]:
        """Whether the method built with ``kwargs`` reads teachers' hidden taps (its :meth:`cache_taps`
        name any), decided from the config before the caches are built: ``False`` gets logits-only
        caches, ``True`` every tap, a tuple of tap kinds (``("parts",)``) the taps of those kinds only."""
        return False

    def cache_taps(self) -> dict[str, list[str]]:
        """``{teacher: hidden taps}`` each batch must carry. The cache join gathers nothing else: a
        GBDT's leaf indices are by far the widest tap, and a method that reads logits only needs none.
        Methods that answer through teachers' hidden states hold ``TeacherPort``s (``self.ports``)."""
        ports = getattr(self, "ports", None)
        if ports is not None:
            return {n: [p.tap] for n, p in ports.items()}
        return {n: [] for n in self.requires}

    def on_step_end(self, loss: torch.Tensor, step: int, total_steps: int) -> None:
        """Hook after the optimiser step (TAID updates ``t`` here)."""

    def state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint (TAID's ``t``, momentum...)."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""

    def logs(self) -> dict[str, float]:
        """Scalars to log besides the loss terms (e.g. the fraction of teacher passes skipped)."""
        return {}


def label_bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE of logits ``z`` ``[B]`` against labels ``y`` ``[B]``, averaged over the labelled rows only.

    Transfer-set rows (:mod:`appdistill.features.transfer`) carry NaN labels: they train the
    teacher terms, never this one. Masked arithmetic, not boolean indexing: no host sync on GPU.
    """
    m = ~torch.isnan(y)
    per = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.where(m, y, 0.0), reduction="none")
    return (per * m).sum() / m.sum().clamp_min(1)


def soft_bce(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of logits ``z`` ``[B]`` against soft targets ``p`` ``[B]`` in [0, 1] (mean)."""
    return torch.nn.functional.binary_cross_entropy_with_logits(z, p)


def kd_loss(z_s: torch.Tensor, z_t: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Hinton KD, binary form: ``T² · BCE(z_s / T, σ(z_t / T))`` (teacher side detached)."""
    return T * T * soft_bce(z_s / T, torch.sigmoid(z_t.detach() / T))
