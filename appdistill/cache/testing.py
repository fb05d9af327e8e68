"""A deterministic stand-in teacher for tests and benchmarks of the cache and of methods.

Its outputs are a pure function of the interaction row ids, so a cached value can be compared
with a live one bit for bit, and it counts its ``predict`` calls (to prove a cache was reused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from appdistill.features.batch import TeacherOutput
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.teachers.base import Tap, Teacher


class FakeTeacher(Teacher):
    """Outputs computed from row ids only: no fitting, no data access.

    Args:
        spec: the feature spec (part of the identity, as for a real teacher).
        name: teacher name (cache directory).
        float_taps: ``{tap: d}`` float32 taps ``[B, d]``: ``sin(row * (j + 1) * 1e-3 + seed)``.
        int_taps: ``{tap: T}`` int64 taps ``[B, T]`` like LightGBM leaves: ``(row * 31 + 7 * t + seed) % leaves``.
        leaves: range of the integer taps.
        seed: changes every output (and the identity's artefact hash), like refitting a teacher.

    Attributes:
        calls: ``predict`` calls so far; ``rows_predicted``: rows predicted so far.
    """

    key = "fake"

    def __init__(self, spec: FeatureSpecSet, name: str | None = None, float_taps: dict[str, int] | None = None,
                 int_taps: dict[str, int] | None = None, leaves: int = 63, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(spec, name, **kwargs)
        self.float_taps = dict(float_taps if float_taps is not None else {"h": 8})
        self.int_taps = dict(int_taps or {})
        self.leaves, self.seed = leaves, seed
        self.artifact_hash = f"fake-{seed}-{sorted(self.float_taps.items())}-{sorted(self.int_taps.items())}-{leaves}"
        self.calls = 0
        self.rows_predicted = 0
        self.fail_after: int | None = None  # raise on the call after this many (crash tests)

    def fit(self, ds: Dataset) -> FakeTeacher:
        return self

    def hidden_dims(self) -> dict[str, int]:
        return {**self.float_taps, **self.int_taps}

    def taps(self) -> dict[str, Tap]:
        return {**{n: Tap(n, d) for n, d in self.float_taps.items()},
                **{n: Tap(n, t, "leaves", self.leaves) for n, t in self.int_taps.items()}}

    def predict(self, ds: Dataset, rows: np.ndarray) -> TeacherOutput:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError(f"FakeTeacher: simulated crash on call {self.calls + 1}")
        self.calls += 1
        r = np.asarray(rows, np.int64)
        self.rows_predicted += len(r)
        rf = r.astype(np.float64)[:, None]
        logits = np.cos(rf[:, 0] * 0.01 + self.seed).astype(np.float32) * 3
        hidden: dict[str, torch.Tensor] = {}
        for tap, d in self.float_taps.items():
            hidden[tap] = torch.from_numpy(np.sin(rf * (np.arange(d) + 1) * 1e-3 + self.seed).astype(np.float32))
        for tap, t in self.int_taps.items():
            hidden[tap] = torch.from_numpy((r[:, None] * 31 + 7 * np.arange(t) + self.seed) % self.leaves)
        return TeacherOutput(torch.from_numpy(logits), hidden)

    def save(self, path: str | Path) -> None:  # nothing fitted: nothing to save
        Path(path).mkdir(parents=True, exist_ok=True)

    @classmethod
    def load(cls, path: str | Path, spec: FeatureSpecSet, ds: Dataset) -> FakeTeacher:
        return cls(spec)
