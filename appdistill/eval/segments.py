"""Where the knowledge is: metrics per segment and two upper bounds for per-sample teacher weighting.

Segments bucket each evaluated row by how often its item (or user) occurs in the *training* split:

- ``cold``: never (the entity is new at evaluation time);
- ``tail`` / ``torso`` / ``head``: the warm entities ranked by training frequency and cut where the
  cumulative share of training rows reaches 20% (from the rarest up: the tail) and 50% (from the most
  frequent down: the head). The cut points are reported as training-count edges.

Shares, not fixed counts, so the same rule works for a 100k-row movie log and a 10M-row click log.

Bounds (labelled as bounds in every report; neither is a model anyone can serve):

- segment oracle: per segment, the teacher with the best *validation* AUC in that segment scores
  that segment's test rows;
- per-sample oracle: per test row, the committee member whose probability is closest to the label.
  If even this bound is level with the best single teacher, no per-sample weighting can help.

Example:
    >>> seg = Segmenter.fit(np.array([0, 0, 0, 1, 2]), "item")
    >>> seg.assign(np.array([0, 2, 3]))
    array(['head', 'tail', 'cold'], dtype='<U5')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appdistill.eval.metrics import auc, sigmoid

BUCKETS = ("cold", "tail", "torso", "head")
TAIL_SHARE, HEAD_SHARE = 0.2, 0.5


@dataclass
class Segmenter:
    """Frequency buckets of one entity kind, fitted on the training rows' entity codes.

    Args:
        counts: ``[n_entities]`` training rows per entity code.
        tail_max / head_min: training-count edges (tail: ``1..tail_max``, head: ``>= head_min``).
        kind: ``"item"`` or ``"user"`` (for messages).
    """

    counts: np.ndarray
    tail_max: int
    head_min: int
    kind: str = "item"
    reason: str | None = field(default=None)  # why the segmentation says nothing on this data

    @classmethod
    def fit(cls, train_codes: np.ndarray, kind: str = "item", n_codes: int | None = None) -> Segmenter:
        return cls.from_counts(np.bincount(np.asarray(train_codes, np.int64), minlength=n_codes or 0), kind)

    @classmethod
    def from_counts(cls, counts: np.ndarray, kind: str = "item") -> Segmenter:
        """The segments of ``counts`` ``[n_entities]`` (training rows per entity code)."""
        counts = np.asarray(counts, np.int64)
        warm = np.sort(counts[counts > 0])  # rarest first
        if len(warm) == 0:
            return cls(counts, 0, 1, kind, f"no {kind} occurs in training")
        share = np.cumsum(warm) / warm.sum()
        # tail: the rarest entities whose rows add up to at most TAIL_SHARE; head: the fewest most
        # frequent ones holding at least HEAD_SHARE (ties in count fall on the same side)
        i_tail = int(np.searchsorted(share, TAIL_SHARE, side="right")) - 1
        tail_max = int(warm[i_tail]) if i_tail >= 0 else 0
        head_min = int(warm[min(int(np.searchsorted(share, 1 - HEAD_SHARE, side="right")), len(warm) - 1)])
        tail_max = min(tail_max, head_min - 1)
        reason = None
        if warm.max() == 1:
            reason = f"every {kind} occurs at most once in training (one row per entity): no frequency segments"
        return cls(counts, tail_max, head_min, kind, reason)

    def assign(self, codes: np.ndarray) -> np.ndarray:
        """Bucket name per row ``[N]``; codes beyond the training vocabulary are cold."""
        return np.asarray(BUCKETS, dtype="<U5")[self.index(codes)]

    def index(self, codes: np.ndarray) -> np.ndarray:
        """Bucket index into :data:`BUCKETS` per row ``[N]`` int64 (``0`` = cold)."""
        codes = np.asarray(codes, np.int64)
        c = np.zeros(len(codes), np.int64)
        known = (codes >= 0) & (codes < len(self.counts))
        c[known] = self.counts[codes[known]]
        out = np.full(len(codes), BUCKETS.index("torso"), np.int64)
        out[c == 0] = BUCKETS.index("cold")
        out[(c > 0) & (c <= self.tail_max)] = BUCKETS.index("tail")
        out[c >= self.head_min] = BUCKETS.index("head")
        return out

    def edges(self) -> dict[str, str]:
        return {"cold": "0 training rows", "tail": f"1-{self.tail_max}",
                "torso": f"{self.tail_max + 1}-{self.head_min - 1}", "head": f">= {self.head_min}"}


def auc_standard_error(a: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC ``a`` over ``n_pos`` positive and ``n_neg``
    negative rows: how far the same model's AUC moves between test sets of that size (an AUC over 25
    rows: about ±0.1), which no spread over student seeds on one fixed test set shows."""
    if n_pos < 1 or n_neg < 1 or np.isnan(a):
        return float("nan")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return float(np.sqrt(max(var, 0.0)))


def segment_metrics(logits: np.ndarray, labels: np.ndarray, buckets: np.ndarray) -> dict[str, dict[str, Any]]:
    """``{bucket: {"auc", "auc_se", "n", "positive_rate"}}`` for the buckets present (AUC null with one
    class; ``auc_se``: :func:`auc_standard_error`)."""
    out: dict[str, dict[str, Any]] = {}
    for b in BUCKETS:
        m = buckets == b
        if m.any():
            a = auc(logits[m], labels[m])
            pos = int(np.count_nonzero(labels[m] > 0.5))
            se = auc_standard_error(a, pos, int(m.sum()) - pos)
            out[b] = {"auc": None if np.isnan(a) else a, "auc_se": None if np.isnan(se) else round(se, 4),
                      "n": int(m.sum()), "positive_rate": round(float(labels[m].mean()), 4)}
    return out


def segment_oracle(valid: dict[str, np.ndarray], valid_labels: np.ndarray, valid_buckets: np.ndarray,
                   test: dict[str, np.ndarray], test_labels: np.ndarray, test_buckets: np.ndarray
                   ) -> dict[str, Any]:
    """Per segment, the teacher best on validation scores the segment's test rows.

    Args:
        valid / test: ``{teacher: logits [N]}`` on the validation / test rows.
    Returns ``{"auc": overall AUC of the composite, "choice": {bucket: teacher}, "segments": {...}}``.
    """
    names = list(test)
    choice: dict[str, str] = {}
    composite = np.zeros(len(test_labels))
    for b in BUCKETS:
        mt = test_buckets == b
        if not mt.any():
            continue
        mv = valid_buckets == b
        scores = {n: auc(valid[n][mv], valid_labels[mv]) if mv.any() else float("nan") for n in names}
        # no validation rows of this segment (or one class): fall back to overall validation AUC
        if all(np.isnan(s) for s in scores.values()):
            scores = {n: auc(valid[n], valid_labels) for n in names}
        best = max(names, key=lambda n: -np.inf if np.isnan(scores[n]) else scores[n])
        choice[b] = best
        composite[mt] = test[best][mt]
    return {"auc": auc(composite, test_labels), "choice": choice,
            "segments": segment_metrics(composite, test_labels, test_buckets)}


def sample_oracle(test: dict[str, np.ndarray], labels: np.ndarray,
                  buckets: np.ndarray | None = None) -> dict[str, Any]:
    """Per test row, the member whose probability is closest to the label (an upper bound)."""
    p = sigmoid(np.stack([test[n] for n in test], 1))  # [N, n]
    y = labels.astype(np.float64)[:, None]
    pick = np.abs(p - y).argmin(1)
    best = p[np.arange(len(p)), pick]
    z = np.log(np.clip(best, 1e-7, 1 - 1e-7)) - np.log(np.clip(1 - best, 1e-7, 1 - 1e-7))
    out: dict[str, Any] = {"auc": auc(z, labels),
                           "share": {n: round(float((pick == i).mean()), 4) for i, n in enumerate(test)}}
    if buckets is not None:
        out["segments"] = segment_metrics(z, labels, buckets)
    return out


def segmenters(ds: Any) -> dict[str, Segmenter]:
    """Item segments, and user segments where a user table exists, fitted on ``ds``'s training split.

    Args:
        ds: a :class:`~appdistill.features.dataset.Dataset` (``item_ids``/``user_ids`` ``[N]`` codes).
    """
    out = {"items": Segmenter.from_counts(ds.train_counts("items"), "item")}
    spec = ds.spec
    if "users" in spec.tables and spec.user_key != spec.item_key:
        out["users"] = Segmenter.from_counts(ds.train_counts("users"), "user")
    return out


def split_buckets(ds: Any, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``{"items": [N] bucket names, "users": ...}`` of ``rows``; kinds with no information dropped."""
    codes = {"items": ds.item_ids, "users": ds.user_ids}
    return {k: s.assign(ds.gather(codes[k], rows)) for k, s in segmenters(ds).items() if s.reason is None}
