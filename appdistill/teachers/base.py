"""The teacher interface.

A teacher is fitted on the training split only (early stopping on validation), predicts
:class:`~appdistill.features.batch.TeacherOutput` for rows of the interactions table, and has an
``identity()`` (name, config, hash of its fitted artefact) that keys every cache entry and every
student checkpoint. Teachers are frozen during distillation.

Register one class per file::

    @TEACHERS.register("lightgbm")
    class LightGBMTeacher(Teacher): ...

Example:
    >>> t = TEACHERS.build("dlrm", {"epochs": 3}, spec=spec).fit(ds)
    >>> out = t.predict(ds, ds.splits["test"][:1024])     # logits [B], hidden {"h": [B, d]}
    >>> t.save(run_dir / "teachers" / "dlrm")
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from appdistill.features.batch import TeacherOutput
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.registry import Registry

TEACHERS: Registry = Registry("teacher")


class Teacher(ABC):
    """Base class of every teacher.

    Args:
        spec: the feature spec; the teacher sees ``spec.visible(self.visibility)`` only.
        name: instance name (the key under ``teachers:`` in the config); defaults to the registry key.
        kwargs: the teacher's own hyper-parameters (recorded in ``identity()``).
    """

    key: str = ""  # registry key, set by subclasses

    def __init__(self, spec: FeatureSpecSet, name: str | None = None, **kwargs: Any) -> None:
        self.spec = spec
        self.name = name or self.key
        self.kwargs = kwargs
        self.artifact_hash = ""

    @property
    def visibility(self) -> str:
        """Which ``visibility`` entry of the spec applies (the registry key by default)."""
        return self.key

    @abstractmethod
    def fit(self, ds: Dataset) -> Teacher:
        """Fit on ``ds.splits['train']`` (validation for early stopping only)."""

    @abstractmethod
    def predict(self, ds: Dataset, rows: np.ndarray) -> TeacherOutput:
        """Outputs for interaction rows ``rows`` ``[B]``: logits ``[B]``, hidden taps ``[B, d]``."""

    def hidden_dims(self) -> dict[str, int]:
        """Width of each hidden tap (``{"h": 64}``)."""
        return {}

    def head(self, tap: str) -> nn.Module | None:
        """Frozen, differentiable upper layers mapping hidden tap ``tap`` ``[B, d]`` to a logit ``[B]``.

        ``None`` when the teacher has none (LightGBM); methods then learn an answer net instead.
        """
        return None

    def identity(self) -> dict[str, Any]:
        """Name, registry key, config and fitted-artefact hash: equal identities = equal outputs."""
        return {"name": self.name, "key": self.key, "kwargs": self.kwargs,
                "spec": self.spec.fingerprint(), "artifact": self.artifact_hash}

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the fitted teacher to directory ``path`` (atomic files, no pickle)."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, spec: FeatureSpecSet, ds: Dataset) -> Teacher:
        """Load a teacher saved by :meth:`save`."""

    def predict_all(self, ds: Dataset, rows: np.ndarray, batch_size: int = 8192) -> TeacherOutput:
        """:meth:`predict` over many rows in chunks, concatenated."""
        outs = [self.predict(ds, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        return TeacherOutput(torch.cat([o.logits for o in outs]),
                             {k: torch.cat([o.hidden[k] for o in outs]) for k in outs[0].hidden})
