"""Teachers (LightGBM, DLRM) and ``fit_teachers`` on a tiny synthetic data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from appdistill.config import config_from_dict
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.pipeline import fit_teachers
from appdistill.teachers import TEACHERS, TeacherError, load_teacher
from appdistill.teachers.dlrm import DLRMTeacher
from appdistill.teachers.lightgbm import LightGBMTeacher

REPO = Path(__file__).resolve().parent.parent
SMALL_LGB = {"num_leaves": 15, "num_boost_round": 60, "early_stopping_rounds": 10, "learning_rate": 0.1,
             "n_jobs": 1}  # one thread: OpenMP barriers stall on a shared, oversubscribed CPU
SMALL_DLRM = {"embedding_dim": 8, "dense_arch": [8], "over_arch": [32, 16], "epochs": 2, "batch_size": 512,
              "interaction": {"key": "dcn", "kwargs": {"num_layers": 2, "low_rank": 8}}}


def tiny_spec_dict() -> dict:
    spec = yaml.safe_load((REPO / "feature_specs/synthetic.yaml").read_text())
    spec["source"]["kwargs"] = {"n_users": 300, "n_items": 150, "n_interactions": 20000, "seed": 1}
    return spec


@pytest.fixture(scope="module")
def spec() -> FeatureSpecSet:
    return FeatureSpecSet.from_dict(tiny_spec_dict())


@pytest.fixture(scope="module")
def ds(spec: FeatureSpecSet) -> Dataset:
    return Dataset.build(spec)


@pytest.fixture(scope="module")
def lgb_teacher(spec: FeatureSpecSet, ds: Dataset) -> LightGBMTeacher:
    return TEACHERS.build("lightgbm", SMALL_LGB, spec=spec).fit(ds)


@pytest.fixture(scope="module")
def dlrm_teacher(spec: FeatureSpecSet, ds: Dataset) -> DLRMTeacher:
    t = TEACHERS.build("dlrm", SMALL_DLRM, spec=spec)
    t.progress = False
    return t.fit(ds)


def _auc(t, ds: Dataset) -> float:
    from sklearn.metrics import roc_auc_score

    rows = ds.splits["test"]
    return roc_auc_score(ds.labels[rows], t.predict_all(ds, rows).logits.numpy())


# ------------------------------------------------------------------------------------ LightGBM
def test_lightgbm_predicts_logits_and_leaves(lgb_teacher: LightGBMTeacher, ds: Dataset) -> None:
    rows = ds.splits["test"][:100]
    out = lgb_teacher.predict(ds, rows)
    n_trees = lgb_teacher.hidden_dims()["leaves"]
    assert out.logits.shape == (100,) and out.logits.dtype == torch.float32
    assert out.hidden["leaves"].shape == (100, n_trees) and out.hidden["leaves"].dtype == torch.int64
    assert 0 < n_trees <= SMALL_LGB["num_boost_round"] and len(lgb_teacher.tree_num_leaves) == n_trees
    leaves = out.hidden["leaves"]
    assert (leaves >= 0).all() and (leaves < torch.tensor(lgb_teacher.tree_num_leaves)).all()
    assert isinstance(lgb_teacher.num_leaves, int) and (leaves < lgb_teacher.num_leaves).all()
    assert lgb_teacher.num_leaves == max(lgb_teacher.tree_num_leaves) <= SMALL_LGB["num_leaves"]
    # the margin summed from the reached leaves (one tree walk) is LightGBM's own raw score
    x = lgb_teacher.design(ds, rows)
    np.testing.assert_allclose(out.logits.numpy(), lgb_teacher.booster.predict(x, raw_score=True), rtol=1e-5, atol=1e-5)
    # raw margin: the sigmoid of the logits is LightGBM's probability; the teacher learnt something
    assert _auc(lgb_teacher, ds) > 0.6
    # id_list genres (small vocabulary) -> multi-hot columns; the text feature is skipped without embeddings
    kinds = {c["feature"]: c["kind"] for c in lgb_teacher.columns}
    assert kinds["genres"] == "hot" and kinds["user_id"] == "cat" and "text" not in kinds


def test_lightgbm_save_load_identical(lgb_teacher: LightGBMTeacher, spec: FeatureSpecSet, ds: Dataset,
                                      tmp_path: Path) -> None:
    lgb_teacher.save(tmp_path)
    assert (tmp_path / "model.txt").read_text().startswith("tree")
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.tmp"))
    back = LightGBMTeacher.load(tmp_path, spec, ds)
    rows = ds.splits["valid"][:300]
    a, b = lgb_teacher.predict(ds, rows), back.predict(ds, rows)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden["leaves"], b.hidden["leaves"])
    assert back.identity() == lgb_teacher.identity()
    import hashlib
    assert back.artifact_hash == hashlib.sha256((tmp_path / "model.txt").read_bytes()).hexdigest()


def _bitset_words(model_text: str) -> int:
    """Words of every categorical split's bitset in a LightGBM model (its ``cat_boundaries`` lines)."""
    return sum(int(line.split("=")[1].split()[-1]) for line in model_text.splitlines()
               if line.startswith("cat_boundaries="))


def test_lightgbm_numbers_id_categories_by_training_frequency(lgb_teacher: LightGBMTeacher, spec: FeatureSpecSet,
                                                              ds: Dataset, tmp_path: Path) -> None:
    train = ds.splits["train"]
    for f in ("user_id", "item_id"):
        rank = lgb_teacher.cat_rank[f]
        counts = np.bincount(ds.sparse[f][train], minlength=len(rank))
        assert sorted(rank.tolist()) == list(range(len(rank)))  # a renumbering: no two codes share a category
        assert (np.diff(counts[np.argsort(rank)]) <= 0).all()  # category 0 is the most frequent id
        col = [c["name"] for c in lgb_teacher.columns].index(f)
        rows = ds.splits["test"][:50]
        assert np.array_equal(lgb_teacher.design(ds, rows)[:, col], rank[ds.sparse[f][rows]])
    # the point of it: a split's bitset reaches the largest category in its set, and frequent ids are small
    # numbers now. Without the renumbering (codes by id value) the same data gives larger bitsets.
    plain = TEACHERS.build("lightgbm", SMALL_LGB, spec=spec)
    plain._fit_cat_rank = lambda ds, rows: None  # type: ignore[method-assign]  # codes as the vocabulary numbers them
    plain.fit(ds)
    assert _bitset_words(lgb_teacher.model_text) < _bitset_words(plain.model_text)
    assert abs(_auc(lgb_teacher, ds) - _auc(plain, ds)) < 0.02  # the same model up to the order of ties
    # saved with a checksum, part of the identity; a changed file is refused before anything reads it
    lgb_teacher.save(tmp_path)
    assert "categories" in lgb_teacher.identity() and "categories" not in plain.identity()
    back = LightGBMTeacher.load(tmp_path, spec, ds)
    assert {k: v.tolist() for k, v in back.cat_rank.items()} == {k: v.tolist() for k, v in lgb_teacher.cat_rank.items()}
    import io
    buf = io.BytesIO()
    np.savez(buf, **{k: v[::-1].copy() for k, v in lgb_teacher.cat_rank.items()})
    (tmp_path / "categories.npz").write_bytes(buf.getvalue())
    with pytest.raises(TeacherError, match="categories.npz"):
        LightGBMTeacher.load(tmp_path, spec, ds)


def test_lightgbm_text_embeddings_are_projected(spec: FeatureSpecSet, ds: Dataset, tmp_path: Path) -> None:
    n_items = len(ds.tables["items"])
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n_items, 24)).astype(np.float32)
    t = TEACHERS.build("lightgbm", {**SMALL_LGB, "text_dim": 4}, spec=spec)
    t.text_embeddings = {"text": emb}
    t.fit(ds)
    assert [c["name"] for c in t.columns if c["feature"] == "text"] == [f"text__pc{j}" for j in range(4)]
    rows = ds.splits["test"][:200]
    fresh = t.predict(ds, rows).logits
    t.save(tmp_path)
    back = LightGBMTeacher.load(tmp_path, spec, ds)  # no embeddings: the saved projection is used
    assert back.text_embeddings is None
    torch.testing.assert_close(back.predict(ds, rows).logits, fresh)
    assert back.identity()["text"] == t.identity()["text"] != {}
    off = TEACHERS.build("lightgbm", {**SMALL_LGB, "use_text": False}, spec=spec)
    off.text_embeddings = {"text": emb}
    assert off.input_fingerprint(ds) == {} and "text" not in {c["feature"] for c in off.fit(ds).columns}


# ------------------------------------------------------------------------------------ DLRM
def test_dlrm_predicts_taps(dlrm_teacher: DLRMTeacher, ds: Dataset) -> None:
    rows = ds.splits["test"][:64]
    out = dlrm_teacher.predict(ds, rows)
    dims = dlrm_teacher.hidden_dims()
    assert out.logits.shape == (64,) and out.logits.dtype == torch.float32
    assert out.hidden["h"].shape == (64, dims["h"]) and out.hidden["over"].shape == (64, 16)
    assert _auc(dlrm_teacher, ds) > 0.6
    assert 1 <= dlrm_teacher.best_epoch <= 2 and len(dlrm_teacher.history) >= 1


def test_dlrm_head_reproduces_logits_and_is_frozen(dlrm_teacher: DLRMTeacher, ds: Dataset) -> None:
    out = dlrm_teacher.predict(ds, ds.splits["valid"][:128])
    head = dlrm_teacher.head("h")
    head.train()  # a method calling .train() must not switch dropout on
    assert not head.training
    h = out.hidden["h"].clone().requires_grad_(True)
    z = head(h)
    torch.testing.assert_close(z.detach(), out.logits, atol=1e-5, rtol=1e-5)
    z.sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in head.parameters())
    torch.testing.assert_close(dlrm_teacher.head("over")(out.hidden["over"]), out.logits, atol=1e-5, rtol=1e-5)


def test_dlrm_save_load_identical(dlrm_teacher: DLRMTeacher, spec: FeatureSpecSet, ds: Dataset,
                                  tmp_path: Path) -> None:
    dlrm_teacher.save(tmp_path)
    back = DLRMTeacher.load(tmp_path, spec, ds)
    rows = ds.splits["test"][:200]
    a, b = dlrm_teacher.predict(ds, rows), back.predict(ds, rows)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.hidden["h"], b.hidden["h"])
    assert back.identity_hash() == dlrm_teacher.identity_hash()
    meta = json.loads((tmp_path / "teacher.json").read_text())
    assert meta["key"] == "dlrm" and meta["kwargs"] == dlrm_teacher.kwargs
    # a data set whose ids are encoded differently is refused, not silently mis-indexed
    meta["encoding"] = "0" * 16
    (tmp_path / "teacher.json").write_text(json.dumps(meta))
    with pytest.raises(TeacherError, match="encoded differently"):
        DLRMTeacher.load(tmp_path, spec, ds)


def test_identity_changes_with_kwargs(spec: FeatureSpecSet) -> None:
    for key, kw, other in (("lightgbm", SMALL_LGB, {"num_leaves": 7}), ("dlrm", SMALL_DLRM, {"lr": 0.01})):
        a, b = TEACHERS.build(key, kw, spec=spec), TEACHERS.build(key, {**kw, **other}, spec=spec)
        assert a.identity() != b.identity() and a.identity_hash() != b.identity_hash()
        assert TEACHERS.build(key, kw, spec=spec).identity_hash() == a.identity_hash()
    with pytest.raises(Exception, match="bad kwargs for teacher 'dlrm'"):
        TEACHERS.build("dlrm", {"no_such_option": 1}, spec=spec)


# ------------------------------------------------------------------------------------ fit_teachers
def test_fit_teachers_reuses_and_writes_metrics(tmp_path: Path, ds: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec_dict()))
    cfg = config_from_dict({"spec": str(tmp_path / "spec.yaml"), "teachers": {
        "gbdt": {"key": "lightgbm", "kwargs": SMALL_LGB}, "dlrm": {"key": "dlrm", "kwargs": SMALL_DLRM}}})
    fits: list[str] = []
    for cls in (LightGBMTeacher, DLRMTeacher):
        orig = cls.fit
        monkeypatch.setattr(cls, "fit", lambda self, d, _o=orig: (fits.append(self.name), _o(self, d))[1])
    first = fit_teachers(cfg, tmp_path / "run", ds=ds, progress=False)
    assert sorted(fits) == ["dlrm", "gbdt"] and not any(m["reused"] for m in first.values())
    for name in ("gbdt", "dlrm"):
        m = json.loads((tmp_path / "run" / "teachers" / name / "metrics.json").read_text())
        assert {"test", "valid", "fit_seconds"} <= set(m)
        assert {"auc", "logloss", "cold"} <= set(m["test"]) and {"auc", "n"} <= set(m["test"]["cold"])
        assert m["test"]["auc"] == pytest.approx(first[name]["test"]["auc"]) and m["test"]["auc"] > 0.6
    second = fit_teachers(cfg, tmp_path / "run", ds=ds, progress=False)
    assert len(fits) == 2 and all(m["reused"] for m in second.values())
    assert second["dlrm"]["identity"] == first["dlrm"]["identity"]
    # a changed config entry refits only that teacher
    cfg.teachers["gbdt"].kwargs["num_leaves"] = 7
    third = fit_teachers(cfg, tmp_path / "run", ds=ds, progress=False, names=["gbdt"])
    assert fits[2:] == ["gbdt"] and not third["gbdt"]["reused"]
    # loadable by name; a corrupt artefact is detected (and refitted by fit_teachers)
    t = load_teacher(tmp_path / "run", "dlrm", cfg.load_spec(), ds)
    assert t.identity_hash() == first["dlrm"]["identity_hash"]
    (tmp_path / "run" / "teachers" / "gbdt" / "model.txt").write_text("garbage")
    with pytest.raises(TeacherError):
        load_teacher(tmp_path / "run", "gbdt", cfg.load_spec(), ds)
    fit_teachers(cfg, tmp_path / "run", ds=ds, progress=False, names=["gbdt"])
    assert fits[3:] == ["gbdt"]



def test_a_crash_while_saving_a_refit_teacher_leaves_the_previous_one(tmp_path: Path, ds: Dataset,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Teacher directories are written through the store kernel: all files swapped in at once or none."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(tiny_spec_dict()))
    cfg = config_from_dict({"spec": str(tmp_path / "spec.yaml"),
                            "teachers": {"gbdt": {"key": "lightgbm", "kwargs": SMALL_LGB}}})
    fit_teachers(cfg, tmp_path / "run", ds=ds, progress=False)
    tdir = tmp_path / "run" / "teachers" / "gbdt"
    before = {p.name: p.read_bytes() for p in tdir.iterdir() if p.is_file()}
    orig = LightGBMTeacher.save

    def crash(self: LightGBMTeacher, path: Path) -> None:
        orig(self, path)  # every file written, then the process dies before the directory is swapped in
        raise KeyboardInterrupt

    monkeypatch.setattr(LightGBMTeacher, "save", crash)
    cfg.teachers["gbdt"].kwargs["num_leaves"] = 7
    with pytest.raises(KeyboardInterrupt):
        fit_teachers(cfg, tmp_path / "run", ds=ds, progress=False)
    assert {p.name: p.read_bytes() for p in tdir.iterdir() if p.is_file()} == before
    assert [p.name for p in tdir.parent.iterdir()] == ["gbdt"]  # no stage left behind
    monkeypatch.setattr(LightGBMTeacher, "save", orig)
    cfg.teachers["gbdt"].kwargs = dict(SMALL_LGB)
    assert fit_teachers(cfg, tmp_path / "run", ds=ds, progress=False)["gbdt"]["reused"]


def test_teachers_plug_into_method_ports(lgb_teacher: LightGBMTeacher, dlrm_teacher: DLRMTeacher,
                                         ds: Dataset) -> None:
    """The methods' view of a teacher (hidden taps, leaf table size, frozen head) fits these teachers."""
    committee = pytest.importorskip("appdistill.methods.committee")
    from appdistill.features.batch import BatchBuilder

    rows = ds.splits["test"][:32]
    batch = BatchBuilder(ds, ds.spec.visible("student")).build(rows)
    batch.teacher = {"lightgbm": lgb_teacher.predict(ds, rows), "dlrm": dlrm_teacher.predict(ds, rows)}
    leaves = committee.TeacherPort("lightgbm", lgb_teacher, leaf_dim=4)
    assert leaves.is_leaves and leaves.state(batch).shape == (32, 4)
    port = committee.TeacherPort("dlrm", dlrm_teacher)
    assert port.tap == "h" and port.has_head
    ans = port.answer(port.state(batch))
    torch.testing.assert_close(ans[:, -1], batch.teacher["dlrm"].logits, atol=1e-5, rtol=1e-5)


def test_lightgbm_parts_split_its_logit_in_boosting_order(lgb_teacher: LightGBMTeacher, ds: Dataset) -> None:
    """The parts tap is the teacher's own function in pieces: their sum is its logit, and part k
    sums the k-th contiguous group of trees."""
    from appdistill.methods.trees import TreeParts, parts_tap
    from appdistill.teachers.lightgbm import TREE_PARTS

    rows = ds.splits["test"][:64]
    out = lgb_teacher.predict(ds, rows)
    n_trees = lgb_teacher.hidden_dims()["leaves"]
    tap = lgb_teacher.taps()["parts"]
    k = min(TREE_PARTS, n_trees)
    assert tap.kind == "parts" and tap.width == k and parts_tap(lgb_teacher) == tap
    c, leaves = out.hidden["parts"], out.hidden["leaves"].numpy()
    assert c.shape == (64, k) and c.dtype == torch.float32
    torch.testing.assert_close(c.sum(1), out.logits, atol=1e-4, rtol=1e-4)
    values = lgb_teacher.leaf_values()
    group = np.arange(n_trees) * k // n_trees
    for j in (0, k - 1):
        manual = sum(values[t, leaves[:, t]] for t in np.flatnonzero(group == j))
        np.testing.assert_allclose(c[:, j].numpy(), manual, rtol=1e-4, atol=1e-4)
    head = TreeParts(tap, student_dim=5)
    h = torch.randn(64, 5, requires_grad=True)
    loss = head.loss(h, c)
    loss.backward()
    assert torch.isfinite(loss) and h.grad is not None and h.grad.abs().sum() > 0 and (head.var > 0).all()
    # a constant part (trees of one leaf) is left out rather than divided by a zero variance
    const = c.clone()
    const[:, 0] = 3.0
    fresh = TreeParts(tap, student_dim=5)
    with torch.no_grad():
        assert 0 < float(fresh.loss(h, const)) < 1e3 and fresh.var[0] == 0


def test_max_train_rows_fits_on_a_sample_and_is_part_of_the_identity(spec: FeatureSpecSet, ds: Dataset) -> None:
    from appdistill.eval.metrics import auc
    from appdistill.teachers.base import fit_rows

    n = len(ds.splits["train"])
    assert fit_rows(ds, None, 0) is ds.splits["train"] and fit_rows(ds, n + 5, 0) is ds.splits["train"]
    sample = fit_rows(ds, n // 4, 3)
    assert len(sample) == n // 4 and np.isin(sample, ds.splits["train"]).all() and (np.diff(sample) > 0).all()
    np.testing.assert_array_equal(sample, fit_rows(ds, n // 4, 3))
    for key, kw in (("lightgbm", SMALL_LGB), ("dlrm", SMALL_DLRM)):
        full, small = TEACHERS.build(key, kw, spec=spec), TEACHERS.build(key, {**kw, "max_train_rows": n // 4}, spec=spec)
        assert full.identity_hash() != small.identity_hash()
        small.fit(ds)
        test = ds.splits["test"]
        assert 0.55 < auc(small.predict(ds, test).logits.numpy(), ds.labels[test]) < 1
    from appdistill.registry import kwargs_errors

    assert "max_train_rows" in kwargs_errors(LightGBMTeacher, {"max_train_rows": 5}, "kw")[0]
