"""The tree structure of a GBDT teacher as a training signal: the student regresses the teacher's
function in parts, not just its sum.

A GBDT's logit is a sum over trees, ``z = Σ_t v_t(leaf_t(x))``. Boosting builds it in order: the
first trees carry the main effects, the later ones correct what those missed. Split the trees into
``K`` contiguous groups of boosting order and each row carries ``K`` numbers
``c_k = Σ_{t ∈ group k} v_t(leaf_t(x))`` (``Σ_k c_k = z``) instead of one: which main effects it
has and which corrections apply to it. The teacher writes them into its cache once (its ``parts``
tap, :class:`~appdistill.teachers.base.Tap` kind ``parts``: 8 floats per row for LightGBM); the
student learns to predict them from its state ``h`` through a small training-only head.
GBDT-to-network distillation (DeepGBM's GBDT2NN) distils the trees' structure rather than their
output alone for the same reason: one number per row says little about which features decided it.

Example:
    >>> parts = TreeParts(parts_tap(teacher), student_dim=64)                    # doctest: +SKIP
    >>> loss = parts.loss(out.h, batch.teacher["lightgbm"].hidden["parts"])       # scalar
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def parts_tap(teacher: Any) -> Any:
    """The teacher's ``parts`` tap (a :class:`~appdistill.teachers.base.Tap`), or None."""
    taps = teacher.taps() if hasattr(teacher, "taps") else {}
    return next((spec for spec in taps.values() if spec.kind == "parts"), None)


class TreeParts(nn.Module):
    """A head regressing one teacher's parts tap ``[B, K]`` from the student's state ``h`` ``[B, d_s]``.

    Args:
        tap: the teacher's ``parts`` tap (its name and width ``K``).
        student_dim: ``d_s``, the width of ``h``.
        hidden: width of the head's hidden layer.
    """

    def __init__(self, tap: Any, student_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.tap, self.k = tap.name, int(tap.width)
        # running variance of each part: the loss is scale-free per part (the first groups of a
        # boosted ensemble are much larger than the last, which would otherwise weigh nothing)
        self.register_buffer("var", torch.zeros(self.k))
        self.head = nn.Sequential(nn.Linear(student_dim, hidden), nn.ReLU(), nn.Linear(hidden, self.k))

    def loss(self, h: torch.Tensor, parts: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over rows and parts of ``(head(h) - parts)² / var(part)``, each row's term times
        ``weight`` ``[B]`` when given (DiverseDistill: the teacher's share of the row's stack)."""
        c = parts.float()
        if self.training:
            with torch.no_grad():
                v = c.var(0, unbiased=False) if c.shape[0] > 1 else torch.ones_like(self.var)
                self.var.copy_(torch.where(self.var > 0, 0.99 * self.var + 0.01 * v, v))
        with torch.no_grad():
            # a part constant over the data (trees of one leaf) carries nothing: left out, not divided
            # by ~0. One [K] vector of 1 / (var · kept parts): the row's mean is then one matrix product
            keep = self.var > 1e-6 * self.var.max().clamp_min(1e-12)
            inv = keep / (self.var.clamp_min(1e-12) * keep.sum().clamp_min(1))
        err = self.head(h) - c
        per = (err * err) @ inv
        return (per if weight is None else per * weight).mean()
