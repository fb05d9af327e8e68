"""The vectorised per-user metrics equal the per-user scikit-learn / torchmetrics references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.retrieval import retrieval_normalized_dcg, retrieval_recall

from appdistill.eval.metrics import gauc, ranking


def _groups(users: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(users, kind="stable")
    _, starts = np.unique(users[order], return_index=True)
    return np.split(order, starts[1:])


def gauc_reference(logits, labels, users) -> float:
    num = den = 0.0
    for idx in _groups(users):
        y = labels[idx]
        if 0 < y.sum() < len(y):
            num += len(idx) * roc_auc_score(y, logits[idx])
            den += len(idx)
    return num / den if den else float("nan")


def ranking_reference(logits, labels, users, k):
    ndcg, rec = [], []
    for idx in _groups(users):
        y = labels[idx]
        if y.sum() == 0:
            continue
        # probabilities, not logits: torchmetrics' recall counts only items scored above 0 as retrieved,
        # which on logits would make recall@k depend on calibration instead of the ranking
        p = torch.sigmoid(torch.from_numpy(logits[idx].astype(np.float64)))
        t = torch.from_numpy(y.astype(bool))
        ndcg.append(float(retrieval_normalized_dcg(p, t, top_k=k)))
        rec.append(float(retrieval_recall(p, t, top_k=k)))
    return np.mean(ndcg), np.mean(rec)


@pytest.mark.parametrize("seed", range(6))
def test_gauc_and_ranking_match_the_per_user_references(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    users = rng.choice(rng.integers(1, 400, size=int(rng.integers(1, 300))), n)  # sparse, unsorted ids
    labels = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(np.float32)
    logits = rng.normal(size=n) + labels * rng.uniform(0, 2)
    tied = np.round(logits * 2) / 2  # many ties: scikit-learn's mid-rank convention
    for s in (logits, tied):
        assert gauc(s, labels, users) == pytest.approx(gauc_reference(s, labels, users), abs=1e-9, nan_ok=True)
    for k in (1, 5, 10):
        got = ranking(logits, labels, users, k)
        want = ranking_reference(logits, labels, users, k)
        assert got[f"ndcg@{k}"] == pytest.approx(want[0], abs=1e-6)
        assert got[f"recall@{k}"] == pytest.approx(want[1], abs=1e-6)


def test_per_user_metrics_edge_cases() -> None:
    one = np.array([0.0, 1.0, 2.0])
    assert np.isnan(gauc(one, np.array([1.0, 1.0, 1.0]), np.array([1, 1, 1])))  # no user has both classes
    assert np.isnan(ranking(one, np.zeros(3), np.array([1, 2, 3]))["ndcg@10"])  # no positive at all
    assert gauc(np.array([0.1, 0.9]), np.array([0.0, 1.0]), np.array(["a", "a"])) == 1.0  # string ids
    assert ranking(np.array([0.9, 0.1]), np.array([1.0, 0.0]), np.array([7, 7]), 1) == {"ndcg@1": 1.0,
                                                                                        "recall@1": 1.0}
