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


def evaluate(logits: np.ndarray, labels: np.ndarray, users: np.ndarray | None = None,
             cold: np.ndarray | None = None, k: int = 10, full: bool = True) -> dict[str, object]:
    """The ``metrics.json`` block of one split.

    Args:
        logits / labels: ``[N]``.
        users: ``[N]`` user codes (GAUC, NDCG@k, recall@k need them).
        cold: ``[N]`` bool, rows whose item never occurs in training.
        full: also compute the per-user metrics (skip for cheap per-epoch validation).
    """
    out: dict[str, object] = {"auc": auc(logits, labels), "logloss": logloss(logits, labels), "n": int(len(labels))}
    if full and users is not None:
        out["gauc"] = gauc(logits, labels, users)
        out.update(ranking(logits, labels, users, k))
    if cold is not None:
        c = cold.astype(bool)
        out["cold"] = {"auc": auc(logits[c], labels[c]) if c.any() else float("nan"), "n": int(c.sum())}
    return out
