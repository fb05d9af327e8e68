"""The student's content table: fitted from the store, looked up by item key in training and serving,
shipped in the export, refreshed offline for new items, refused when inconsistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from appdistill.cli import main
from appdistill.config import config_from_dict, load_config
from appdistill.errors import AppDistillError
from appdistill.features.content import ContentTable, content_features, pca_projection

REPO = Path(__file__).resolve().parent.parent


def content_config(tmp_path: Path, **content) -> Path:
    """A tiny synthetic interaction set with item text (review words follow item quality) and cold items."""
    spec = yaml.safe_load((REPO / "feature_specs/synthetic.yaml").read_text())
    spec["source"]["kwargs"] = {"n_users": 200, "n_items": 120, "n_interactions": 6000, "seed": 3,
                                "cold_window": 0.2, "quality_words": True, "quality_scale": 2.0}
    spec["split"] = {"by": "time", "column": "timestamp", "valid": 0.1, "test": 0.1}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cfg = {"name": "content", "spec": "spec.yaml", "seed": 0,
           "student": {"dense_arch": [8], "over_arch": [16],
                       "content": {"enabled": True, "features": ["text"], "dim": 4, **content}},
           "train": {"epochs": 2, "batch_size": 512, "num_threads": 1}}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One trained + exported content student (shared: MiniLM encodes the items once)."""
    tmp = tmp_path_factory.mktemp("content")
    mp = pytest.MonkeyPatch()
    mp.setenv("APPDISTILL_CACHE", str(tmp / "cache"))
    from appdistill.pipeline import train

    cfg = load_config(content_config(tmp))
    m = train(cfg, tmp / "run", progress=False)
    assert main(["export", str(tmp / "run"), "--out", str(tmp / "export")]) == 0
    yield {"tmp": tmp, "cfg": cfg, "metrics": m}
    mp.undo()


def raw_rows(cfg, split: str) -> tuple[pd.DataFrame, np.ndarray]:
    from appdistill.features.dataset import Dataset

    ds = Dataset.build(cfg.load_spec())
    rows = ds.splits[split]
    inter = ds.tables["interactions"].iloc[rows].reset_index(drop=True)
    df = inter.merge(ds.tables["items"], on="item_id", how="left").merge(ds.tables["users"], on="user_id", how="left")
    return df, ds.labels[rows]


def test_export_scores_reproduce_the_run_with_content(trained: dict) -> None:
    from sklearn.metrics import roc_auc_score

    from appdistill.export.artifact import Ranker

    run, export = trained["tmp"] / "run", trained["tmp"] / "export"
    assert (run / "content" / "vectors.npy").is_file()
    man = json.loads((export / "manifest.json").read_text())
    assert {"content/table.json", "content/vectors.npy", "content/projection.npz"} <= set(man["files"])
    ranker = Ranker(export)
    assert ranker.content is not None and ranker.content.dim == 4
    assert "item_id" in ranker.columns
    df, y = raw_rows(trained["cfg"], "test")
    assert roc_auc_score(y, ranker.score(df)) == pytest.approx(trained["metrics"]["test"]["auc"], abs=1e-6)
    # the student reads its content: zeroing the vectors changes the scores
    x = list(ranker.inputs(df))
    x[-1] = x[-1].clone()
    x[-1][:, -4:] = 0
    assert not np.allclose(ranker.forward(tuple(x)), ranker.forward(ranker.inputs(df)))


def test_cold_items_carry_their_content(trained: dict) -> None:
    from appdistill.features.dataset import Dataset

    ds = Dataset.build(trained["cfg"].load_spec())
    table = ContentTable.load(trained["tmp"] / "run" / "content")
    cold_items = pd.unique(ds.tables["interactions"]["item_id"].to_numpy()[ds.splits["test"][ds.cold[ds.splits["test"]]]])
    assert len(cold_items) > 0
    vec = table.lookup(cold_items)
    assert (np.abs(vec).sum(1) > 0).all(), "a cold item (never in training) still has a content vector"
    assert not np.abs(table.lookup([10**9])).any(), "an unknown key is the zero (mean) item"
    # the projection is fitted on training items only: whitened there
    train_items = np.unique(ds.table_rows["items"][ds.splits["train"]])
    z = table.vectors[table.vocab.encode(ds.tables["items"]["item_id"].to_numpy()[train_items])]
    assert np.allclose(z.std(0), 1.0, atol=1e-3)


def test_refresh_adds_new_items_all_or_nothing(trained: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from appdistill.export.artifact import Ranker

    tmp = trained["tmp"]
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp / "cache"))
    export = tmp / "export_refresh"
    shutil.copytree(tmp / "export", export)
    from appdistill.features.dataset import Dataset

    ds = Dataset.build(trained["cfg"].load_spec())
    new = ds.tables["items"].iloc[:3][["item_id", "text"]].copy()
    new["item_id"] = new["item_id"] + 10_000
    new.loc[new.index[0], "text"] = "a brand new item nobody has reviewed"
    path = tmp / "new_items.csv"
    new.to_csv(path, index=False)
    df, _ = raw_rows(trained["cfg"], "test")
    before = Ranker(export).score(df)

    # refused inputs change no byte of the export
    snapshot = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    bad = tmp / "bad.csv"
    new.drop(columns=["text"]).to_csv(bad, index=False)
    assert main(["content", "refresh", str(export), "--items", str(bad)]) == 2
    dup = tmp / "dup.csv"
    pd.concat([new, new]).to_csv(dup, index=False)
    assert main(["content", "refresh", str(export), "--items", str(dup)]) == 2
    twice = tmp / "twice.csv"  # the key column written twice (pandas alone would read 'item_id' and 'item_id.1')
    new.assign(k=new["item_id"] + 1).rename(columns={"k": "item_id"}).to_csv(twice, index=False)
    assert main(["content", "refresh", str(export), "--items", str(twice)]) == 2
    assert {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()} == snapshot

    assert main(["content", "refresh", str(export), "--items", str(path)]) == 0
    r = Ranker(export)
    assert r.content.vocab.num_embeddings == ContentTable.load(tmp / "export" / "content").vocab.num_embeddings + 3
    assert np.array_equal(r.score(df), before), "known items score exactly as before the refresh"
    # rows 1, 2 copy existing items' text: the same encoding, so the same vector under the new key
    old = r.content.lookup(new["item_id"].to_numpy()[1:] - 10_000)
    assert np.allclose(r.content.lookup(new["item_id"].to_numpy()[1:]), old)
    assert np.abs(r.content.lookup(new["item_id"].to_numpy()[:1])).sum() > 0
    # a second refresh of the same items updates, not appends
    assert main(["content", "refresh", str(export), "--items", str(path)]) == 0
    assert Ranker(export).content.vocab.num_embeddings == r.content.vocab.num_embeddings


def test_refresh_refuses_another_encoder_and_exports_without_content(trained: dict, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from appdistill.export.content import refresh_content

    tmp = trained["tmp"]
    export = tmp_path / "export"
    shutil.copytree(tmp / "export", export)
    meta = json.loads((export / "content" / "table.json").read_text())
    meta["sources"][0]["encoder"]["weights"] = "0" * 64
    (export / "content" / "table.json").write_text(json.dumps(meta))
    items = tmp_path / "i.csv"
    pd.DataFrame({"item_id": [1], "text": ["x"]}).to_csv(items, index=False)
    with pytest.raises(AppDistillError, match="checksum"):  # an edited table is never read
        refresh_content(export, items)
    # a student trained without content has nothing to refresh
    monkeypatch.setenv("APPDISTILL_CACHE", str(tmp / "cache"))
    from appdistill.pipeline import train

    cfg = load_config(content_config(tmp_path), ["student.content.enabled=false", "train.epochs=1"])
    train(cfg, tmp_path / "plain", progress=False)
    assert main(["export", str(tmp_path / "plain"), "--out", str(tmp_path / "plain_export")]) == 0
    assert not (tmp_path / "plain_export" / "content").exists()
    with pytest.raises(AppDistillError, match="no content table"):
        refresh_content(tmp_path / "plain_export", items)


def test_corrupt_content_file_is_refused(trained: dict, tmp_path: Path) -> None:
    import shutil

    from appdistill.export.artifact import Ranker

    export = tmp_path / "export"
    shutil.copytree(trained["tmp"] / "export", export)
    v = np.load(export / "content" / "vectors.npy")
    v[1, 0] += 1.0
    np.save(export / "content" / "vectors.npy", v)
    with pytest.raises(AppDistillError, match="vectors.npy' does not match its checksum"):
        Ranker(export)


def test_content_config_errors(tmp_path: Path, tiny_spec) -> None:
    with pytest.raises(AppDistillError, match="unknown features"):
        content_features(["nope"], tiny_spec)
    with pytest.raises(AppDistillError, match="not text/image"):
        content_features(["year"], tiny_spec)
    assert [f.name for f in content_features([], tiny_spec)] == ["title"]
    spec = yaml.safe_load((REPO / "feature_specs/synthetic.yaml").read_text())
    spec["features"] = [f for f in spec["features"] if f["kind"] not in ("text", "image")]
    for v in spec["visibility"].values():
        v[:] = [n for n in v if n not in ("text", "image")]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"spec": "spec.yaml", "student": {"content": {"enabled": True}}}))
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    with pytest.raises(Exception, match="dim"):
        config_from_dict({"spec": "s.yaml", "student": {"content": {"enabled": True, "dim": 0}}})


def test_default_content_section_keeps_earlier_hashes() -> None:
    cfg = config_from_dict({"spec": "s.yaml"})
    assert "content" not in cfg.stable_dump()["student"]
    on = config_from_dict({"spec": "s.yaml", "student": {"content": {"enabled": True}}})
    assert on.stable_dump()["student"]["content"]["enabled"] is True


def test_pca_projection_is_the_leading_directions() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * np.array([5.0, 1.0, 0.1])
    mean, comps = pca_projection(x, 2)
    assert comps.shape == (3, 2)
    assert abs(abs(comps[0, 0]) - 1) < 1e-2 and abs(abs(comps[1, 1]) - 1) < 1e-2
