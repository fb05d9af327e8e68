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

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import nn

from appdistill.features.batch import TeacherOutput
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.io import json_digest
from appdistill.registry import Registry

TEACHERS: Registry = Registry("teacher")


@dataclass(frozen=True)
class Tap:
    """One hidden tap a teacher exposes (what it writes into the cache and methods read).

    Args:
        name: tap name (``"h"``, ``"over"``, ``"leaves"``, ``"title:final"``).
        width: ``d`` of a float tap ``[B, d]``; number of trees ``T`` of a leaf tap ``[B, T]``.
        kind: ``float`` (a representation), ``leaves`` (int64 leaf indices, one per tree) or
            ``parts`` (float ``[B, K]`` whose row sums are the logits: the teacher's function in ``K``
            pieces, e.g. a GBDT's trees in ``K`` groups of boosting order).
        cardinality: for ``leaves``: every index is below it (rows per tree of a leaf-embedding table).
        has_head: the teacher has frozen upper layers mapping this tap to its logit (:meth:`Teacher.head`).
    """

    name: str
    width: int
    kind: Literal["float", "leaves", "parts"] = "float"
    cardinality: int = 0
    has_head: bool = False


def fit_rows(ds: Dataset, max_rows: int | None, seed: int) -> np.ndarray:
    """The training rows a teacher fits on: all of ``ds.splits["train"]``, or a uniform random
    sample of ``max_rows`` of them (sorted, fixed by ``seed``) when there are more -- a teacher's fit
    cost then stops growing with the data while its outputs are still cached for every row."""
    rows = ds.splits["train"]
    if max_rows is None or len(rows) <= max_rows:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, int(max_rows), replace=False))


class Head(nn.Module):
    """A teacher's frozen upper layers from one hidden tap to its logit: ``out(body(x))``.

    What :meth:`Teacher.head` returns. Gradients reach the input, never the parameters, and it stays
    in eval mode even when a method holding it calls ``.train()``, so ``head(H)`` always equals the
    teacher's own prediction from ``H``.

    Args:
        out: the last layer(s), ``[B, d']`` -> ``[B]`` or ``[B, 1]`` (copied and frozen).
        body: hidden layers before ``out`` (``[B, d]`` -> ``[B, d']``; ``None`` = none), exposed so a
            method can read the teacher's last hidden activation (:meth:`answer`).

    Example:
        >>> head = Head(over_arch.out, body=over_arch.body)
        >>> head(h).shape, head.answer(h).shape      # [B], [B, d' + 1]
    """

    def __init__(self, out: nn.Module, body: nn.Module | None = None) -> None:
        import copy

        super().__init__()
        self.out = copy.deepcopy(out).requires_grad_(False)
        self.body = copy.deepcopy(body).requires_grad_(False) if body is not None else None
        self.train(False)

    def train(self, mode: bool = True) -> Head:  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        """``[last hidden activation ; logit]`` ``[B, d' + 1]`` for tap states ``x`` ``[B, d]``."""
        z = self.body(x) if self.body is not None else x
        return torch.cat([z, self.out(z).reshape(-1, 1)], 1)

    def answer_dim(self, in_dim: int) -> int:
        with torch.no_grad():
            return int(self.answer(torch.zeros(1, in_dim)).shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, d]`` -> logit ``[B]``."""
        z = self.body(x) if self.body is not None else x
        return self.out(z).reshape(-1)


class Teacher(ABC):
    """Base class of every teacher.

    Args:
        spec: the feature spec; the teacher sees ``spec.visible(self.visibility)`` only.
        name: instance name (the key under ``teachers:`` in the config); defaults to the registry key.
        kwargs: the teacher's own hyper-parameters (recorded in ``identity()``).
    """

    key: str = ""  # registry key, set by subclasses
    #: the contract methods and the benchmark read (never registry key names):
    #: ``foundation`` = built on foundation encoders (text/image), ``complementary`` = everything else
    kind: ClassVar[Literal["foundation", "complementary"]] = "complementary"

    def __init__(self, spec: FeatureSpecSet, name: str | None = None, **kwargs: Any) -> None:
        self.spec = spec
        self.name = name or self.key
        self.kwargs = kwargs
        self.artifact_hash = ""
        self.progress = True  # progress bars and per-epoch lines while fitting
        #: ``{text feature: [n_table_rows, d]}`` item encodings, set by the pipeline when
        #: :meth:`wants_text_embeddings` says so (LightGBM's text columns)
        self.text_embeddings: dict[str, Any] | None = None

    @classmethod
    def wants_text_embeddings(cls, kwargs: dict[str, Any]) -> bool:
        """Whether a teacher built with ``kwargs`` reads item text encodings from the store."""
        return False

    def encode_items(self, ds: Dataset) -> None:
        """Build the per-item encodings this teacher will read (nothing by default).

        The pipeline calls it for every teacher before any is fitted, so that one pass of each encoder
        writes every output the committee needs: an encoder computes all its layers at once, and a
        store first built with fewer outputs would encode the whole catalogue again for the rest.
        """

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

    def taps(self) -> dict[str, Tap]:
        """The declared taps of the fitted teacher (float taps of :meth:`hidden_dims` by default)."""
        return {n: Tap(n, int(d), has_head=self.head(n) is not None) for n, d in self.hidden_dims().items()}

    def head(self, tap: str) -> Head | None:
        """Frozen, differentiable upper layers mapping hidden tap ``tap`` ``[B, d]`` to a logit ``[B]``
        (a :class:`Head`). ``None`` when the teacher has none (LightGBM); methods then learn an answer
        net instead."""
        return None

    def identity(self) -> dict[str, Any]:
        """Name, registry key, config and fitted-artefact hash: equal identities = equal outputs."""
        return {"name": self.name, "key": self.key, "kwargs": self.kwargs,
                "spec": self.spec.fingerprint(), "artifact": self.artifact_hash}

    def identity_hash(self) -> str:
        return json_digest(self.identity(), 16)

    def size(self) -> dict[str, int]:
        """What the fitted teacher weighs, for reports (``{"params": N}``; subclasses add parts, e.g.
        a foundation teacher's frozen encoders, a GBDT's trees and leaves); ``{}`` when unknown."""
        return {}

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write the fitted teacher to directory ``path`` (atomic files, no pickle)."""

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, spec: FeatureSpecSet, ds: Dataset) -> Teacher:
        """Load a teacher saved by :meth:`save`."""

    def predict_all(self, ds: Dataset, rows: np.ndarray, batch_size: int = 8192) -> TeacherOutput:
        """:meth:`predict` over many rows in chunks of ``batch_size``, in the order of ``rows``.

        The rows are predicted in :meth:`~appdistill.features.dataset.Dataset.locality_order` (by
        item, then user) and the outputs put back in place."""
        rows = np.asarray(rows)
        order = ds.locality_order(rows)
        outs = [self.predict(ds, rows[order[i:i + batch_size]]) for i in range(0, len(rows), batch_size)]
        back = torch.from_numpy(np.argsort(order))
        return TeacherOutput(torch.cat([o.logits for o in outs])[back],
                             {k: torch.cat([o.hidden[k] for o in outs])[back] for k in outs[0].hidden})
