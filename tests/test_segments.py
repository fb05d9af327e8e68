"""Segments, oracle bounds and the per-user / cold-item rules of the evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from appdistill.eval.metrics import auc, evaluate
from appdistill.eval.segments import Segmenter, auc_standard_error, sample_oracle, segment_metrics, segment_oracle


def test_frequency_buckets_by_share_of_training_rows() -> None:
    # item 0: 50 rows, 1: 30, 2..11: 2 each (20 rows): head holds >= 50% of rows, tail the rarest 20%
    train = np.concatenate([np.zeros(50), np.ones(30), np.repeat(np.arange(2, 12), 2)]).astype(np.int64)
    seg = Segmenter.fit(train, "item")
    assert seg.reason is None
    got = seg.assign(np.array([0, 1, 5, 99]))
    assert list(got) == ["head", "torso", "tail", "cold"]
    assert seg.edges()["head"] == ">= 50" and seg.edges()["tail"] == "1-2"


def test_one_row_per_entity_has_no_frequency_segments() -> None:
    seg = Segmenter.fit(np.arange(100), "item")
    assert seg.reason and "at most once" in seg.reason


def test_segment_metrics_count_rows_and_skip_one_class_auc() -> None:
    z = np.array([0.1, 0.9, 0.2, 0.8, 0.5])
    y = np.array([0, 1, 0, 1, 1])
    b = np.array(["head", "head", "tail", "tail", "cold"])
    m = segment_metrics(z, y, b)
    assert m["head"] == {"auc": 1.0, "auc_se": 0.0, "n": 2, "positive_rate": 0.5}
    assert m["cold"]["auc"] is None and m["cold"]["n"] == 1  # one class: undefined, not NaN or 1.0
    assert "torso" not in m


def test_oracles_are_bounds_chosen_without_test_labels() -> None:
    rng = np.random.default_rng(0)
    n = 2000
    y = rng.integers(0, 2, n)
    buckets = np.where(np.arange(n) < n // 2, "head", "tail")
    signal = (2 * y - 1).astype(float)
    # teacher a knows the head, teacher b the tail (on valid and on test alike)
    def teachers():
        a = np.where(buckets == "head", signal, 0) + rng.normal(0, 1, n)
        b = np.where(buckets == "tail", signal, 0) + rng.normal(0, 1, n)
        return {"a": a, "b": b}
    va, te = teachers(), teachers()
    so = segment_oracle(va, y, buckets, te, y, buckets)
    assert so["choice"] == {"tail": "b", "head": "a"}
    assert so["auc"] > max(auc(te["a"], y), auc(te["b"], y)) + 0.05
    po = sample_oracle(te, y, buckets)
    assert po["auc"] >= so["auc"] and set(po["share"]) == {"a", "b"}


def test_per_user_metrics_only_where_users_have_both_labels() -> None:
    z = np.linspace(-1, 1, 40)
    y = np.tile([0, 1], 20)
    one_row_each = evaluate(z, y, np.arange(40), np.ones(40, bool), full=True)
    assert "gauc" not in one_row_each and "ndcg@10" not in one_row_each
    assert one_row_each["per_user"].startswith("omitted")
    assert one_row_each["cold"]["share"] == 1.0 and "every row" in one_row_each["cold"]["covers"]
    grouped = evaluate(z, y, np.repeat(np.arange(8), 5), np.zeros(40, bool), full=True)
    assert 0 <= grouped["gauc"] <= 1 and "ndcg@10" in grouped and "omitted" not in grouped["per_user"]


def test_run_metrics_carry_segments(tmp_path) -> None:
    from appdistill.config import load_config
    from appdistill.pipeline import train
    from tests.test_train import tiny_config

    m = train(load_config(tiny_config(tmp_path), ["train.epochs=1"]), tmp_path / "run", progress=False)
    segs = m["test"]["segments"]["items"]
    assert sum(v["n"] for v in segs.values()) == m["test"]["n"]
    assert set(segs) <= {"cold", "tail", "torso", "head"} and "head" in segs
    assert "users" in m["test"]["segments"]
    assert m["test"]["cold"]["covers"].startswith("rows whose item")
    assert pytest.approx(m["test"]["cold"]["n"]) == segs.get("cold", {}).get("n", 0)


@pytest.mark.parametrize("n", [25, 400])
def test_auc_standard_error_matches_the_spread_between_test_sets(n: int) -> None:
    # one model, many test sets of n rows drawn from the same population: the AUC's spread between
    # them is what Hanley & McNeil's formula predicts from one set
    rng = np.random.default_rng(0)
    aucs, ses = [], []
    for _ in range(600):
        y = rng.random(n) < 0.4
        z = rng.normal(size=n) + 1.0 * y
        if 0 < y.sum() < n:
            a = auc(z, y.astype(float))
            aucs.append(a)
            ses.append(auc_standard_error(a, int(y.sum()), int(n - y.sum())))
    assert np.std(aucs) == pytest.approx(np.median(ses), rel=0.2)
    assert np.isnan(auc_standard_error(0.7, 0, 10))
