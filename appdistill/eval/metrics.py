"""Ranking and classification metrics (scikit-learn and torchmetrics, not hand-written).

All functions take numpy arrays of logits (not probabilities), labels and, where needed, the
grouping user ids.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torchmetrics.functional.retrieval import retrieval_normalized_dcg, retrieval_recall


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def auc(logits: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, logits))


def logloss(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(sigmoid(logits), 1e-7, 1 - 1e-7), labels=[0, 1]))


def _groups(users: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(users, kind="stable")
    _, starts = np.unique(users[order], return_index=True)
    return np.split(order, starts[1:])


def gauc(logits: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users having both classes."""
    num = den = 0.0
    for idx in _groups(users):
        y = labels[idx]
        if 0 < y.sum() < len(y):
            num += len(idx) * roc_auc_score(y, logits[idx])
            den += len(idx)
    return float(num / den) if den else float("nan")


def ranking(logits: np.ndarray, labels: np.ndarray, users: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean NDCG@k and recall@k of each user's ranking of their held-out items (users with a positive)."""
    ndcg, rec = [], []
    for idx in _groups(users):
        y = labels[idx]
        if y.sum() == 0:
            continue
        p, t = torch.from_numpy(logits[idx].astype(np.float32)), torch.from_numpy(y.astype(bool))
        ndcg.append(float(retrieval_normalized_dcg(p, t, top_k=k)))
        rec.append(float(retrieval_recall(p, t, top_k=k)))
    return {f"ndcg@{k}": float(np.mean(ndcg)) if ndcg else float("nan"),
            f"recall@{k}": float(np.mean(rec)) if rec else float("nan")}


#: per-user metrics need users with several test rows of both labels; below these, they are omitted
MIN_PER_USER_SHARE, MIN_PER_USER_USERS = 0.1, 5


def per_user_coverage(labels: np.ndarray, users: np.ndarray) -> tuple[int, int]:
    """``(rows, users)`` belonging to users with at least 2 rows and both labels."""
    _, inv, n = np.unique(users, return_inverse=True, return_counts=True)
    pos = np.bincount(inv, weights=labels.astype(np.float64), minlength=len(n))
    ok = (n >= 2) & (pos > 0) & (pos < n)
    return int(n[ok].sum()), int(ok.sum())


def evaluate(logits: np.ndarray, labels: np.ndarray, users: np.ndarray | None = None,
             cold: np.ndarray | None = None, k: int = 10, full: bool = True,
             segments: dict[str, np.ndarray] | None = None) -> dict[str, object]:
    """The ``metrics.json`` block of one split.

    Args:
        logits / labels: ``[N]``.
        users: ``[N]`` user codes (GAUC, NDCG@k, recall@k need them). They are computed only when
            users with several rows of both labels hold at least ``MIN_PER_USER_SHARE`` of the rows
            (else ``per_user`` says why they are omitted: on a one-row-per-entity table they would
            be undefined, not 1.0 or NaN).
        cold: ``[N]`` bool, rows whose item never occurs in training.
        full: also compute the per-user metrics and segments (skip for cheap per-epoch validation).
        segments: ``{"items": [N] bucket names, "users": ...}`` (:mod:`appdistill.eval.segments`).
    """
    out: dict[str, object] = {"auc": auc(logits, labels), "logloss": logloss(logits, labels), "n": int(len(labels))}
    if full and users is not None:
        rows, n_users = per_user_coverage(labels, users)
        if rows >= MIN_PER_USER_SHARE * len(labels) and n_users >= MIN_PER_USER_USERS:
            out["gauc"] = gauc(logits, labels, users)
            out.update(ranking(logits, labels, users, k))
            out["per_user"] = f"{n_users} users with >= 2 rows of both labels ({rows} of {len(labels)} rows)"
        else:
            out["per_user"] = (f"omitted: only {rows} of {len(labels)} rows ({n_users} users) belong to users "
                               "with >= 2 rows of both labels")
    if cold is not None:
        c = cold.astype(bool)
        share = float(c.mean()) if len(c) else 0.0
        covers = ("every row: no item of this split occurs in training" if share == 1.0 else
                  f"rows whose item never occurs in training ({share:.1%} of the split)")
        out["cold"] = {"auc": auc(logits[c], labels[c]) if c.any() else float("nan"), "n": int(c.sum()),
                       "share": round(share, 4), "covers": covers}
    if full and segments:
        from appdistill.eval.segments import segment_metrics

        out["segments"] = {kind: segment_metrics(logits, labels, b) for kind, b in segments.items()}
    return out


def evaluate_rows(logits: np.ndarray, ds: object, rows: np.ndarray, k: int = 10, full: bool = True) -> dict[str, object]:
    """:func:`evaluate` of ``logits`` ``[len(rows)]`` on rows ``rows`` of a Dataset ``ds`` (labels,
    users, cold items and, with ``full``, frequency segments taken from it)."""
    from appdistill.eval.segments import split_buckets

    return evaluate(logits, ds.labels[rows], ds.user_ids[rows], ds.cold[rows], k, full,  # type: ignore[attr-defined]
                    split_buckets(ds, rows) if full else None)
