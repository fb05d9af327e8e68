"""Ranking and classification metrics.

All functions take numpy arrays of logits (not probabilities), labels and, where needed, the
grouping user ids. Global AUC and log loss are scikit-learn's. The per-user metrics (GAUC, NDCG@k,
recall@k) are computed for every user at once from one sort of (user, score): a Python loop over
users calling scikit-learn / torchmetrics per user costs ~0.3 ms each, minutes at the 500k test users
of a 10M-row data set. ``tests/test_metrics.py`` checks them against those per-user references.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def auc(logits: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC; NaN when only one class is present."""
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, logits))


def logloss(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(log_loss(labels, np.clip(sigmoid(logits), 1e-7, 1 - 1e-7), labels=[0, 1]))


def _by_user(users: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows sorted by (user, score ascending): ``(order [n], group [n] user index, start [n] first
    position of the row's user, n_users)`` (``n_users`` as a 0-d array)."""
    _, inv = np.unique(users, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.lexsort((score, inv))
    g = inv[order]
    first = np.r_[True, g[1:] != g[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(g)), 0))
    return order, g, start, np.asarray(int(g.max()) + 1 if len(g) else 0)


def gauc(logits: np.ndarray, labels: np.ndarray, users: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users having both classes (ties count 1/2, as
    scikit-learn's ``roc_auc_score``)."""
    if not len(labels):
        return float("nan")
    s = np.asarray(logits, np.float64)
    order, g, start, n_users = _by_user(users, s)
    ss, y = s[order], np.asarray(labels, np.float64)[order]
    # mid-ranks within each user: runs of equal (user, score) share the mean of their positions
    run = np.r_[True, (g[1:] != g[:-1]) | (ss[1:] != ss[:-1])]
    run_id = np.cumsum(run) - 1
    pos = np.arange(len(g)) - start + 1.0
    run_sum = np.bincount(run_id, weights=pos)
    run_len = np.bincount(run_id)
    rank = (run_sum / run_len)[run_id]
    n = np.bincount(g, minlength=int(n_users)).astype(np.float64)
    n_pos = np.bincount(g, weights=y, minlength=int(n_users))
    rank_pos = np.bincount(g, weights=rank * y, minlength=int(n_users))
    ok = (n_pos > 0) & (n_pos < n)
    n_neg = n - n_pos
    user_auc = (rank_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    return float((user_auc * n[ok]).sum() / n[ok].sum()) if ok.any() else float("nan")


def ranking(logits: np.ndarray, labels: np.ndarray, users: np.ndarray, k: int = 10) -> dict[str, float]:
    """Mean NDCG@k and recall@k of each user's ranking of their held-out items (users with a positive;
    binary gains, ties in score broken by row order as a stable sort). recall@k is the share of the
    user's positives among their top k, whatever the scores' sign (torchmetrics 1.9's
    ``retrieval_recall`` only counts items scored above 0, which on logits mixes calibration in)."""
    if not len(labels):
        return {f"ndcg@{k}": float("nan"), f"recall@{k}": float("nan")}
    s = np.asarray(logits, np.float64)
    # descending score within each user, stable: sort on -score, ties keep row order
    _, inv = np.unique(users, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.lexsort((np.arange(len(s)), -s, inv))
    g = inv[order]
    first = np.r_[True, g[1:] != g[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(g)), 0))
    r = np.arange(len(g)) - start  # 0-based rank in the user's list
    y = np.asarray(labels, np.float64)[order] > 0
    n_users = int(g.max()) + 1
    n_pos = np.bincount(g, weights=y, minlength=n_users)
    top = y & (r < k)
    dcg = np.bincount(g[top], weights=1.0 / np.log2(r[top] + 2.0), minlength=n_users)
    disc = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))
    has = n_pos > 0
    idcg = disc[np.minimum(n_pos[has], k).astype(int) - 1]
    hits = np.bincount(g[top], minlength=n_users)
    if not has.any():
        return {f"ndcg@{k}": float("nan"), f"recall@{k}": float("nan")}
    return {f"ndcg@{k}": float(np.mean(dcg[has] / idcg)), f"recall@{k}": float(np.mean(hits[has] / n_pos[has]))}


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

    take = ds.gather  # type: ignore[attr-defined]
    return evaluate(logits, take(ds.labels, rows), take(ds.user_ids, rows), take(ds.cold, rows), k,  # type: ignore[attr-defined]
                    full, split_buckets(ds, rows) if full else None)
