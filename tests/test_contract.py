"""The teacher contract, as peft tests its adapters: every registered teacher with every registered
method on tiny data. A teacher's declared ``taps()`` must match what ``predict`` returns, and each
method must train a student from each teacher through the cache join alone (no key names)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from appdistill.cache import CacheJoin, get_or_build_cache
from appdistill.features.batch import BatchBuilder, BatchLoader
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.methods import METHODS
from appdistill.student.model import StudentConfig, build_student
from appdistill.teachers import TEACHERS
from appdistill.teachers.base import Tap, Teacher
from appdistill.teachers.fit import build_teacher
from appdistill.train.loop import make_method

REPO = Path(__file__).resolve().parent.parent
#: tiny settings per registered teacher (a new teacher adds one line here)
TINY = {
    "lightgbm": {"num_leaves": 7, "num_boost_round": 20, "early_stopping_rounds": 5, "n_jobs": 1, "use_text": False},
    "dlrm": {"embedding_dim": 4, "dense_arch": [4], "over_arch": [8], "epochs": 1, "batch_size": 512,
             "interaction": {"key": "dcn", "kwargs": {"num_layers": 1, "low_rank": 4}}},
    "foundation": {"layers": [3], "epochs": 1, "batch_size": 512, "d_a": 8, "head": [8]},
}
#: a method's own kwargs that name teachers (filled with the teacher under test)
ONE_TEACHER = {"kd", "taid"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("contract")
    mp = pytest.MonkeyPatch()
    mp.setenv("APPDISTILL_CACHE", str(tmp / "cache"))
    raw = yaml.safe_load((REPO / "feature_specs/synthetic.yaml").read_text())
    raw["source"]["kwargs"] = {"n_users": 120, "n_items": 80, "n_interactions": 3000, "seed": 5}
    raw["visibility"]["foundation"] = ["user_id", "item_id", "text"]  # no image: no CLIP weights here
    spec = FeatureSpecSet.from_dict(raw)
    ds = Dataset.build(spec)
    import appdistill.teachers.foundation  # noqa: F401 - built-in, registered on first use elsewhere

    teachers = {}
    for key in sorted(TEACHERS.names()):
        if key not in TINY:
            pytest.fail(f"registered teacher '{key}' has no tiny setting in tests/test_contract.py")
        t = build_teacher(key, TINY[key], spec, key)
        if hasattr(t, "store_root"):
            t.store_root = tmp / "store"
        t.progress = False
        teachers[key] = t.fit(ds)
    yield {"tmp": tmp, "spec": spec, "ds": ds, "teachers": teachers}
    mp.undo()


def test_every_teacher_declares_what_it_predicts(fitted: dict) -> None:
    ds = fitted["ds"]
    rows = ds.splits["valid"][:64]
    for key, t in fitted["teachers"].items():
        assert isinstance(t, Teacher) and t.kind in ("foundation", "complementary"), key
        taps = t.taps()
        assert taps and all(isinstance(v, Tap) for v in taps.values()), key
        out = t.predict(ds, rows)
        assert out.logits.shape == (len(rows),) and torch.isfinite(out.logits).all(), key
        assert set(out.hidden) == set(taps), (key, set(out.hidden), set(taps))
        for name, tap in taps.items():
            h = out.hidden[name]
            assert h.shape == (len(rows), tap.width), (key, name, h.shape, tap)
            if tap.kind == "leaves":
                assert not h.dtype.is_floating_point and int(h.max()) < tap.cardinality, (key, name)
            else:
                assert h.dtype.is_floating_point, (key, name)
            head = t.head(name)
            assert (head is not None) == tap.has_head, (key, name)
            if head is not None:  # the frozen head maps the tap to the teacher's own logit
                with torch.no_grad():
                    z = head(h.float()).reshape(-1)
                assert z.shape == (len(rows),) and torch.isfinite(z).all(), (key, name)
    kinds = {t.kind for t in fitted["teachers"].values()}
    assert kinds == {"foundation", "complementary"}


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_every_method_trains_from_every_teacher(fitted: dict, method: str) -> None:
    ds, spec = fitted["ds"], fitted["spec"]
    root = fitted["tmp"] / "caches"
    for key, teacher in fitted["teachers"].items():
        kwargs = {"teacher": key} if method in ONE_TEACHER else {}
        torch.manual_seed(0)
        student = build_student(spec, ds.processor, StudentConfig(dense_arch=[4], over_arch=[8]))
        committee = {} if method == "none" else {key: teacher}
        m = make_method(method, kwargs, committee, student.over_arch.in_dim)
        caches = {key: get_or_build_cache(teacher, ds, root, progress=False)} if committee else {}
        hooks = [CacheJoin(caches).select(m.cache_taps())] if committee else []
        loader = BatchLoader(BatchBuilder(ds, spec.visible("student")), ds.splits["train"], 256, hooks=hooks,
                             prefetch=0)
        params = list(student.parameters()) + [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-2)
        frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
        before = [p.detach().clone() for p in student.parameters()]
        for i, batch in enumerate(loader):
            if i == 3:
                break
            out = student(batch.sparse, batch.dense)
            terms = m(out, batch, student)
            loss = sum(terms.values())
            assert torch.isfinite(loss), (method, key, terms)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters())), (method, key)
        for n, p in m.named_parameters():  # a teacher's frozen head stays frozen
            if n in frozen:
                assert torch.equal(p, frozen[n]), (method, key, n)


def test_foundation_only_ablation_reads_the_declared_kind(fitted: dict) -> None:
    """The bench's sub-committees (``dd_foundation_only``) keep the teachers whose class declares
    ``kind = "foundation"``; the old ``complementary: false`` switch says where it went."""
    from appdistill.registry import kwargs_errors

    t = fitted["teachers"]
    assert {n: t[n].kind for n in ("lightgbm", "foundation", "dlrm")} == {
        "lightgbm": "complementary", "foundation": "foundation", "dlrm": "complementary"}
    m = METHODS.build("diverse_distill", {"teachers": ["foundation"]}, "method", committee=t, student_dim=8)
    assert list(m.names) == ["foundation"]
    errs = kwargs_errors(METHODS.get("diverse_distill"), {"complementary": False}, "method.kwargs")
    assert errs == ["method.kwargs.complementary: removed: list the teachers to keep under `teachers:` instead"]


def test_text_columns_and_foundation_layers_encode_each_item_once(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """LightGBM's text columns (final output only) and the foundation teacher (final + layer 3) share
    one store slot: the committee's encoders run first with every output, so no item is encoded twice."""
    from appdistill.config import config_from_dict
    from appdistill.foundation.text import SentenceTransformerEncoder
    from appdistill.pipeline import text_embeddings_for

    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp_path / "cache"))
    seen: list[int] = []
    orig = SentenceTransformerEncoder.encode_batches

    def counting(self, inputs):  # noqa: ANN001, ANN202 - the patched method's own signature
        seen.append(len(inputs))
        yield from orig(self, inputs)

    monkeypatch.setattr(SentenceTransformerEncoder, "encode_batches", counting)
    raw = yaml.safe_load((REPO / "feature_specs/synthetic.yaml").read_text())
    raw["source"]["kwargs"] = {"n_users": 60, "n_items": 40, "n_interactions": 800, "seed": 2}
    raw["visibility"]["foundation"] = ["user_id", "item_id", "text"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    cfg = config_from_dict({"spec": str(tmp_path / "spec.yaml"),
                            "teachers": {"gbdt": {"key": "lightgbm", "kwargs": {"use_text": True}},
                                         "fm": {"key": "foundation", "kwargs": {"layers": [3]}}}})
    ds = Dataset.build(cfg.load_spec())
    emb = text_embeddings_for(cfg, ds)
    assert emb is not None and emb["text"].shape[0] == len(ds.tables["items"])
    first = sum(seen)
    assert 0 < first <= len(ds.tables["items"])
    build_teacher("foundation", {"layers": [3]}, ds.spec, "fm").encode_items(ds)  # what its fit reads
    assert sum(seen) == first, "the foundation teacher's layers were already in the store"
