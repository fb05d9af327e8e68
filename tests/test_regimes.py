"""Benchmark regimes: the tabular generator, and every shipped config loads and its spec validates.

The configs are checked at tiny data sizes (synthetic sources get tiny ``kwargs``; MovieLens-100K is
read once per session), so the whole file takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from appdistill.config import load_config
from appdistill.data.tabular import generate_tabular, tabular_columns
from appdistill.errors import ConfigError
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.features.tables import load_tables

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
NEW_REGIMES = ("synthetic_committee.yaml", "tabular_gbdt.yaml", "ml100k_small_student.yaml")

#: tiny sizes for the synthetic sources (other kwargs of the shipped spec are kept)
TINY = {"synthetic": {"n_users": 300, "n_items": 120, "n_interactions": 6000},
        "synthetic_tabular": {"n_rows": 3000}}


# ------------------------------------------------------------------------------- tabular generator
def _hash(df: pd.DataFrame) -> int:
    return int(pd.util.hash_pandas_object(df, index=False).sum())


def test_tabular_is_deterministic():
    a, b = generate_tabular(n_rows=2000, seed=0), generate_tabular(n_rows=2000, seed=0)
    c = generate_tabular(n_rows=2000, seed=1)
    assert sorted(a) == ["interactions"]
    assert _hash(a["interactions"]) == _hash(b["interactions"])
    assert _hash(a["interactions"]) != _hash(c["interactions"])


def test_tabular_columns():
    df = generate_tabular(n_rows=5000, n_numeric=9, n_hi=50, seed=3)["interactions"]
    assert list(df.columns) == tabular_columns(9)
    assert len(df) == 5000 and (df["row_id"].to_numpy() == np.arange(5000)).all()
    for j in range(9):
        assert pd.api.types.is_float_dtype(df[f"num_{j}"].dtype) and df[f"num_{j}"].notna().all()
    assert df["cat_lo"].nunique() == 8 and df["cat_mid"].nunique() <= 64 and df["cat_hi"].nunique() <= 50
    assert set(df["label"].unique()) == {0, 1} and 0.3 < df["label"].mean() < 0.7
    with pytest.raises(ConfigError, match="n_numeric"):
        generate_tabular(n_rows=100, n_numeric=3)


def test_tabular_lightgbm_beats_a_constant():
    """A tiny tabular run: LightGBM on the shipped spec learns the label (valid AUC well above 0.5)."""
    from appdistill.teachers.lightgbm import LightGBMTeacher

    cfg = load_config(REPO / "configs" / "tabular_gbdt.yaml")
    spec = _tiny_spec(cfg.load_spec(), {"n_rows": 8000})
    ds = Dataset.build(spec)
    assert spec.user_key == spec.item_key == "row_id"
    t = LightGBMTeacher(spec, "lightgbm", num_boost_round=100, early_stopping_rounds=20, n_jobs=1).fit(ds)
    from appdistill.eval.metrics import auc

    rows = ds.splits["valid"]
    assert auc(t.predict(ds, rows).logits.numpy(), ds.labels[rows]) > 0.65


# ------------------------------------------------------------------------------- shipped configs
def _tiny_spec(spec: FeatureSpecSet, kwargs: dict | None = None) -> FeatureSpecSet:
    """``spec`` with its synthetic source shrunk to ``kwargs`` (default: :data:`TINY`)."""
    if spec.source is None or spec.source.key not in TINY:
        return spec
    raw = spec.model_dump()
    raw["source"]["kwargs"] = {**raw["source"]["kwargs"], **(kwargs or TINY[spec.source.key])}
    return FeatureSpecSet.from_dict(raw, source=spec.name, base_dir=spec.base_dir)


_TABLES: dict[str, dict[str, pd.DataFrame]] = {}


def _tables(spec: FeatureSpecSet) -> dict[str, pd.DataFrame]:
    """Tables of a non-synthetic source, read once per session (MovieLens-100K)."""
    key = repr(spec.source.model_dump() if spec.source else spec.name)
    if key not in _TABLES:
        _TABLES[key] = load_tables(spec)
    return {k: v.copy() for k, v in _TABLES[key].items()}


def test_new_regimes_are_shipped():
    assert {p.name for p in CONFIGS} >= set(NEW_REGIMES)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_spec_validates(path):
    text = path.read_text()
    assert text.startswith("#"), "a config starts with a comment block (regime + command)"
    cfg = load_config(path)
    spec = _tiny_spec(cfg.load_spec())
    tables = _tables(spec) if spec.source is None or spec.source.key not in TINY else None
    ds = Dataset.build(spec, tables)
    assert ds.n > 0 and all(len(ds.splits[k]) for k in ("train", "valid", "test"))
    # every teacher's visible features exist; the student is servable (checked by the spec itself)
    for name in cfg.teachers:
        assert spec.visible(name), f"{path.name}: teacher {name} sees nothing"
    if cfg.method.key == "diverse_distill":
        cp = cfg.method.kwargs.get("committee_path")
        top_k = cp.get("top_k") if isinstance(cp, dict) else None
        assert top_k is None or 1 <= top_k <= len(cfg.teachers), f"{path.name}: top_k {top_k} > committee"


@pytest.mark.parametrize("name", NEW_REGIMES)
def test_new_regimes_use_diverse_distill(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.method.key == "diverse_distill"
    assert cfg.train.epochs >= 10 and cfg.teachers


def test_synthetic_committee_is_text_only():
    """No model sees an image (no CLIP weights here); the foundation teacher reads the text."""
    cfg = load_config(REPO / "configs" / "synthetic_committee.yaml")
    spec = cfg.load_spec()
    assert set(cfg.teachers) == {"lightgbm", "dlrm", "foundation"}
    for model in [*spec.visibility, *cfg.teachers]:
        assert all(f.kind != "image" for f in spec.visible(model)), model
    assert [f.name for f in spec.visible("foundation") if f.kind == "text"] == ["text"]
    kw = spec.source.kwargs
    assert kw["n_interactions"] >= 1_000_000 and kw["quality_words"]


def test_tabular_regime_has_no_text_and_no_foundation():
    cfg = load_config(REPO / "configs" / "tabular_gbdt.yaml")
    spec = cfg.load_spec()
    assert set(cfg.teachers) == {"lightgbm", "dlrm"}
    assert all(f.kind in ("dense", "sparse_id") for f in spec.features)
    assert spec.tables["interactions"].keys == ["row_id"] and list(spec.tables) == ["interactions"]


def test_small_student_is_ten_times_smaller_than_the_dlrm_teacher():
    """Parameter counts from the architectures alone (no training): student <= DLRM / 10."""
    from appdistill.student.model import RankingModel, StudentConfig
    from appdistill.train.loop import student_config

    cfg = load_config(REPO / "configs" / "ml100k_small_student.yaml")
    spec = cfg.load_spec()
    ds = Dataset.build(spec, _tables(spec))
    student = RankingModel.from_spec(spec.visible("student"), ds.processor, student_config(cfg))
    k = cfg.teachers["dlrm"].kwargs
    dlrm = RankingModel.from_spec(spec.visible("dlrm"), ds.processor, StudentConfig(
        embedding_dim=k["embedding_dim"], dense_arch=k["dense_arch"], interaction=k["interaction"],
        over_arch=k["over_arch"], dropout=k["dropout"]))
    assert [f.name for f in spec.visible("student")] == ["user_id", "item_id", "genres", "year"]
    assert 10 * student.size()["params"] <= dlrm.size()["params"]
    # the committee is the one of configs/ml100k_committee.yaml
    ref = load_config(REPO / "configs" / "ml100k_committee.yaml")
    assert {n: b.model_dump() for n, b in cfg.teachers.items()} == {n: b.model_dump() for n, b in ref.teachers.items()}
