"""The LEVI-style foundation teacher on tiny synthetic data (real MiniLM, a few hundred items)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.teachers.fit import build_teacher

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("foundation")
    raw = yaml.safe_load((REPO / "feature_specs/synthetic.yaml").read_text())
    raw["source"]["kwargs"] = {"n_users": 200, "n_items": 120, "n_interactions": 6000, "seed": 3}
    # ids, id lists and dense features all reach the id model
    raw["visibility"]["foundation"] = ["user_id", "item_id", "genres", "text", "year", "age"]
    raw["split"] = {"by": "cold_item", "valid": 0.1, "test": 0.15, "seed": 0}
    spec = FeatureSpecSet.from_dict(raw)
    ds = Dataset.build(spec)
    t = build_teacher("foundation", {"layers": [3], "epochs": 12, "batch_size": 256, "lr": 5e-3, "d_a": 16, "head": [8], "patience": 3,
                                     "feat_dropout": 0.3}, spec, "foundation")
    t.store_root = tmp / "store"
    t.progress = False
    t.fit(ds)
    return tmp, spec, ds, t


def test_taps_heads_and_mixture(fitted) -> None:
    _, _, ds, t = fitted
    rows = ds.splits["test"][:64]
    out = t.predict(ds, rows)
    assert out.logits.shape == (64,)
    assert set(out.hidden) == {"text:final", "text:layer3"} == set(t.hidden_dims())
    mix = torch.softmax(t.net.mix, 0)
    # the prediction is the mixture of each layer's frozen head on its adapted state
    z = sum(w * t.head(n)(out.hidden[n]) for w, n in zip(mix, t.layer_names))
    torch.testing.assert_close(z, out.logits, atol=1e-5, rtol=1e-5)
    h = out.hidden["text:final"].clone().requires_grad_()
    t.head("text:final")(h).sum().backward()
    assert h.grad is not None and all(p.grad is None for p in t.head("text:final").parameters())
    assert t.params() > 20_000_000  # MiniLM (encoder) included
    assert t.size() == {"params": t.params(), "frozen_encoder_params": t.encoder_params} and t.encoder_params > 20_000_000
    assert [f.name for f in t.dense_features] == ["year", "age"] and t.dense_inputs(ds, rows).shape == (64, 2)
    # the id-list feature (genres) is pooled by an EmbeddingBag of the id model and moves the output
    assert [f.name for f in t.list_features] == ["genres"] and len(t.net.bags) == 1
    ids, feats, dense, lists = t._inputs(ds, rows)
    (values, offsets), = lists
    assert offsets.shape == (64,) and values.numel() == int(ds.lists["genres"].lengths[ds.table_rows["items"][rows]].sum())
    with torch.no_grad():
        other = [(torch.zeros_like(values), offsets)]
        assert not torch.allclose(t.net(ids, feats, dense, lists)[0], t.net(ids, feats, dense, other)[0])


def test_text_knows_cold_items(fitted) -> None:
    """Test items never occur in training; the teacher still ranks them through their text."""
    _, _, ds, t = fitted
    rows = ds.splits["test"]
    assert ds.cold[rows].all()
    from appdistill.eval.metrics import auc

    assert auc(t.predict_all(ds, rows).logits.numpy(), ds.labels[rows]) > 0.6


def test_save_load_round_trip(fitted, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp, spec, ds, t = fitted
    from appdistill.teachers.foundation import FoundationTeacher

    t.save(tmp / "t")
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp))  # the loaded teacher opens the same store
    t2 = FoundationTeacher.load(tmp / "t", spec, ds)
    # loaded for its heads and identity (a student training from the cache), it computes no user vectors
    assert t2._users_for is None and t2.identity() == t.identity()
    rows = ds.splits["valid"][:50]
    np.testing.assert_allclose(t2.predict(ds, rows).logits.numpy(), t.predict(ds, rows).logits.numpy(), atol=1e-6)
    assert t2.identity_hash() == t.identity_hash()
    assert t2.net.feat_dropout.p == 0.3  # the feature dropout acts in training only (predictions agree)


def test_teacher_saved_before_a_new_setting_gets_a_refit_message(fitted, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from appdistill.teachers.fit import TeacherError, load_teacher

    tmp, spec, ds, t = fitted
    t.save(tmp / "old" / "teachers" / "foundation")
    meta_path = tmp / "old" / "teachers" / "foundation" / "teacher.json"
    meta = json.loads(meta_path.read_text())
    del meta["kwargs"]["feat_dropout"]  # as written by a version without that setting
    meta_path.write_text(json.dumps(meta))
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp))
    with pytest.raises(TeacherError, match=r"older appdistill.*feat_dropout.*teachers fit"):
        load_teacher(tmp / "old", "foundation", spec, ds)


def test_dropout_settings_out_of_range_are_refused(fitted) -> None:
    from appdistill.errors import ConfigError

    _, spec, _, _ = fitted
    with pytest.raises(ConfigError, match=r"teacher 'f': feat_dropout must be in \[0, 1\), got 1.0"):
        build_teacher("foundation", {"feat_dropout": 1.0}, spec, "f")
    with pytest.raises(ConfigError, match="id_dropout"):
        build_teacher("foundation", {"id_dropout": -0.1}, spec, "f")


def test_grouped_sums_match_add_at_in_bounded_chunks() -> None:
    from appdistill.teachers.foundation import grouped_sums

    rng = np.random.default_rng(0)
    m = rng.normal(size=(30, 5)).astype(np.float32)
    groups = np.sort(rng.integers(0, 12, 500))
    idx = rng.integers(0, 30, 500)
    want = np.zeros((14, 5), np.float32)
    np.add.at(want, groups, m[idx])
    for chunk in (7, 64, 1 << 16):  # a group split across chunks is summed once per chunk
        np.testing.assert_allclose(grouped_sums(groups, m, idx, 14, chunk), want, rtol=1e-5, atol=1e-5)


def test_max_train_rows_fits_the_foundation_teacher_on_a_sample(fitted) -> None:
    from appdistill.eval.metrics import auc

    tmp, spec, ds, t = fitted
    kw = {**t.kwargs, "epochs": 2, "max_train_rows": len(ds.splits["train"]) // 3}
    small = build_teacher("foundation", kw, spec, "foundation")
    assert small.identity_hash() != build_teacher("foundation", {**kw, "max_train_rows": None}, spec,
                                                  "foundation").identity_hash()
    small.store_root, small.progress = tmp / "store", False
    seen = []
    real = small._inputs
    small._inputs = lambda d, rows, *a, **k: (seen.append(rows) if a and a[0] else None) or real(d, rows, *a, **k)
    small.fit(ds)
    trained = np.unique(np.concatenate(seen))
    assert len(trained) == kw["max_train_rows"] and np.isin(trained, ds.splits["train"]).all()
    rows = ds.splits["test"]
    assert 0.5 < auc(small.predict_all(ds, rows).logits.numpy(), ds.labels[rows]) <= 1
