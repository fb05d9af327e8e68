"""The LightGBM teacher: a GBDT over the tabular features it may see.

Columns of the design matrix, per visible feature:

- ``sparse_id``: the encoded id (``ds.sparse``, 0 = OOV) as a LightGBM *categorical* column, its
  codes renumbered by training frequency (``cat_rank``: the most frequent id is category 0);
- ``id_list``: one 0/1 column per id when the vocabulary is small (``multi_hot_max``), else the
  first ``list_first_k`` ids as categorical columns (NaN when the list is shorter), renumbered the same way;

Why the renumbering: a categorical split stores a bitset up to the largest category in its set.
Splits only ever hold ids frequent enough to earn a bin, but the vocabulary numbers ids by value,
so a split on a popular item of a 200k catalogue stored a 25 KB bitset, and every tree walk of
every row read one; ranked by frequency, the same splits need a few words and stay in the CPU
caches however large the catalogue (the fit is the same up to the order of equal categories).
- ``dense``: the transformed value (``ds.dense`` gathered through ``ds.table_rows``);
- ``text``: a ``text_dim``-dimensional PCA projection of the feature's embedding matrix, *if* one is
  given (``teacher.text_embeddings = {"title": [n_table_rows, d]}``, set by the pipeline from the
  foundation store); otherwise the feature is skipped with a logged note. The projected rows are
  saved with the model (keyed by item id), so a loaded teacher predicts without the store.

Outputs: ``logits`` = raw margin ``[B]``; ``hidden["leaves"]`` = leaf index per tree ``[B, n_trees]``
int64 (methods turn them into learned leaf embeddings: every index is below ``num_leaves``, and tree
``t`` has ``tree_num_leaves[t]`` leaves); ``hidden["parts"]`` = the margin in ``K = min(TREE_PARTS,
n_trees)`` pieces ``[B, K]`` float32, the sums of the reached leaves' values over contiguous groups
of trees in boosting order (DiverseDistill's tree term regresses them: the first groups hold the
main effects, the later ones the corrections).

Example:
    >>> t = TEACHERS.build("lightgbm", {"num_leaves": 31}, spec=spec).fit(ds)
    >>> out = t.predict(ds, ds.splits["test"][:512])
    >>> out.logits.shape, out.hidden["leaves"].shape      # [512], [512, n_trees]
"""

from __future__ import annotations

import hashlib
import inspect
import io
import logging
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import torch

from appdistill.features.batch import TeacherOutput
from appdistill.features.content import pca_projection
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpec, FeatureSpecSet
from appdistill.io import atomic_write_bytes, atomic_write_text, digest_problem, file_digests
from appdistill.teachers.base import TEACHERS, Tap, Teacher, fit_rows
from appdistill.teachers.fit import TeacherError, encoding_fingerprint, jsonable, restore, write_teacher_json

log = logging.getLogger("appdistill.teachers")
MODEL_FILE = "model.txt"
#: groups of trees in the ``parts`` tap (8 float32 per row: a cache 2-60x smaller than the leaves')
TREE_PARTS = 8
CAT_FILE = "categories.npz"  # the frequency rank of each categorical feature's codes


@TEACHERS.register("lightgbm")
class LightGBMTeacher(Teacher):
    """LightGBM booster over ``spec.visible("lightgbm")``.

    Args:
        spec / name: see :class:`~appdistill.teachers.base.Teacher`.
        num_leaves, learning_rate, min_data_in_leaf, feature_fraction, bagging_fraction,
            bagging_freq, lambda_l2, cat_smooth, cat_l2, max_cat_threshold, min_data_per_group,
            max_bin: LightGBM parameters of the same name.
        num_boost_round: at most this many trees; ``early_stopping_rounds`` on the validation
            ``metric`` picks the best iteration (the saved model holds only those trees).
        multi_hot_max: ``id_list`` vocabularies up to this size become multi-hot columns.
        list_first_k: larger ``id_list`` vocabularies: their first k ids as categorical columns.
        use_text: use text features whose embeddings are given (``False``: ignore them; on
            ML-100K's random split they cost ~0.003 validation AUC, ids already cover every item).
        text_dim: PCA dimensions of each text feature's embedding.
        n_jobs: LightGBM threads (fit and predict).
        seed: LightGBM seed (bagging, feature fraction) and of the ``max_train_rows`` sample.
        max_train_rows: fit on a uniform sample of at most this many training rows (``None``: all);
            the fit's cost stops growing with the data, its leaves are still cached for every row.
        params: extra raw LightGBM parameters (override the above).
    """

    key = "lightgbm"

    kwarg_ranges = {"num_leaves": {"ge": 2, "le": 131072}, "learning_rate": {"gt": 0, "le": 1},
                    "num_boost_round": {"ge": 1, "le": 1_000_000}, "early_stopping_rounds": {"ge": 0},
                    "min_data_in_leaf": {"ge": 0}, "feature_fraction": {"gt": 0, "le": 1},
                    "bagging_fraction": {"gt": 0, "le": 1}, "bagging_freq": {"ge": 0}, "lambda_l2": {"ge": 0},
                    "max_bin": {"ge": 2}, "n_jobs": {"ge": 1, "le": 1024}, "text_dim": {"ge": 1, "le": 4096},
                    "max_train_rows": {"ge": 100}}

    def __init__(self, spec: FeatureSpecSet, name: str | None = None, *, num_leaves: int = 63,
                 learning_rate: float = 0.05, num_boost_round: int = 1000, early_stopping_rounds: int = 50,
                 metric: str = "auc", min_data_in_leaf: int = 20, feature_fraction: float = 0.8,
                 bagging_fraction: float = 0.8, bagging_freq: int = 1, lambda_l2: float = 1.0,
                 cat_smooth: float = 10.0, cat_l2: float = 10.0, max_cat_threshold: int = 64,
                 min_data_per_group: int = 50, max_bin: int = 255, multi_hot_max: int = 64,
                 list_first_k: int = 4, use_text: bool = True, text_dim: int = 16, n_jobs: int = 2, seed: int = 0,
                 max_train_rows: int | None = None, params: dict[str, Any] | None = None) -> None:
        kwargs = {k: v for k, v in locals().items() if k not in ("self", "spec", "name", "__class__")}
        passed = {k: v for k, v in kwargs.items() if v != _DEFAULTS.get(k, object())}
        super().__init__(spec, name, **jsonable(passed))
        self.config: dict[str, Any] = jsonable(kwargs)
        self.features = spec.visible(self.visibility)
        #: optional ``{text feature: [n_table_rows(+1), d]}`` embeddings, set by the pipeline before fit
        self.booster: lgb.Booster | None = None
        self.model_text = ""
        self.columns: list[dict[str, Any]] = []  # the design-matrix plan, fixed at fit time
        self.text: dict[str, dict[str, np.ndarray]] = {}  # feature -> mean, components, keys, values
        self.text_hashes: dict[str, str] = {}
        self.tree_num_leaves: list[int] = []  # leaves of each tree
        self.best_iteration = 0
        self.data_fingerprint = ""
        self.encoding = ""
        self._lookup_cache: dict[tuple[Any, ...], Any] = {}
        #: per categorical feature: ``[num_embeddings]`` int32 category of each code (by training frequency)
        self.cat_rank: dict[str, np.ndarray] = {}
        self.cat_rank_hash = ""

    # ------------------------------------------------------------------ design matrix
    def _plan(self, ds: Dataset) -> list[dict[str, Any]]:
        cols: list[dict[str, Any]] = []
        for f in self.features:
            if f.kind == "sparse_id":
                cols.append({"name": f.name, "feature": f.name, "kind": "cat"})
            elif f.kind == "id_list":
                v = ds.processor.vocabs[f.name].num_embeddings
                if v <= self.config["multi_hot_max"]:
                    cols += [{"name": f"{f.name}__{j}", "feature": f.name, "kind": "hot", "j": j} for j in range(v)]
                else:
                    cols += [{"name": f"{f.name}__first{j}", "feature": f.name, "kind": "cat", "j": j}
                             for j in range(self.config["list_first_k"])]
            elif f.kind == "dense":
                cols.append({"name": f.name, "feature": f.name, "kind": "num"})
            elif f.kind == "text" and f.name in self.text:
                k = self.text[f.name]["components"].shape[1]
                cols += [{"name": f"{f.name}__pc{j}", "feature": f.name, "kind": "num", "j": j} for j in range(k)]
        return cols

    def design(self, ds: Dataset, rows: np.ndarray) -> np.ndarray:
        """The design matrix ``[B, n_columns]`` float64 of interaction rows ``rows`` ``[B]``."""
        rows = np.asarray(rows, np.int64)
        x = np.full((len(rows), len(self.columns)), np.nan)
        by_feature: dict[str, list[int]] = {}
        for c, col in enumerate(self.columns):
            by_feature.setdefault(col["feature"], []).append(c)
        for fname, idx in by_feature.items():
            f = self.spec.feature(fname)
            if f.kind == "sparse_id":
                x[:, idx[0]] = self._category(f.name, ds.sparse[f.name][rows])
            elif f.kind == "dense":
                x[:, idx[0]] = ds.dense[f.name][ds.table_rows[f.table][rows]]
            elif f.kind == "id_list":
                lengths, values = ds.lists[f.name].take(ds.table_rows[f.table][rows])
                who = np.repeat(np.arange(len(rows)), lengths)
                if self.columns[idx[0]]["kind"] == "hot":
                    x[:, idx] = 0.0
                    ok = values < len(idx)
                    x[who[ok], np.asarray(idx)[values[ok]]] = 1.0
                else:  # rank of each value within its row; keep the first k
                    rank = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
                    keep = rank < len(idx)
                    x[who[keep], np.asarray(idx)[rank[keep]]] = self._category(f.name, values[keep])
            else:
                x[:, idx] = self._text_rows(ds, f, rows)
        return x

    def _category(self, feature: str, codes: np.ndarray) -> np.ndarray:
        """LightGBM's category of each vocabulary code (a code beyond the fitted vocabulary: -1, missing)."""
        rank = self.cat_rank.get(feature)
        if rank is None:  # saved before the renumbering: codes are the categories
            return codes
        codes = np.asarray(codes, np.int64)
        return np.where(codes < len(rank), rank[np.minimum(codes, len(rank) - 1)], -1)

    def _fit_cat_rank(self, ds: Dataset, rows: np.ndarray) -> None:
        """Number each categorical feature's codes by their count in ``rows`` (descending, ties by code)."""
        self.cat_rank = {}
        for fname in sorted({c["feature"] for c in self.columns if c["kind"] == "cat"}):
            f = self.spec.feature(fname)
            n = ds.processor.vocabs[fname].num_embeddings
            codes = ds.sparse[fname][rows] if f.kind == "sparse_id" \
                else ds.lists[fname].take(ds.table_rows[f.table][rows])[1]
            counts = np.bincount(np.asarray(codes, np.int64), minlength=n)
            order = np.argsort(-counts, kind="stable")
            rank = np.empty(len(counts), np.int32)
            rank[order] = np.arange(len(counts), dtype=np.int32)
            self.cat_rank[fname] = rank

    # ------------------------------------------------------------------ text projection
    def input_fingerprint(self, ds: Dataset) -> dict[str, str]:
        """Hashes of the text embeddings this fit would use (part of the fit fingerprint)."""
        emb = (self.text_embeddings or {}) if self.config["use_text"] else {}
        return {f.name: hashlib.sha256(np.ascontiguousarray(emb[f.name]).tobytes()).hexdigest()[:16]
                for f in self.features if f.kind == "text" and f.name in emb}

    def _fit_text(self, ds: Dataset, f: FeatureSpec) -> None:
        emb = np.asarray(self.text_embeddings[f.name], np.float64)  # type: ignore[index]
        n = len(ds.tables[f.table])
        if f.table == "interactions" or emb.ndim != 2 or emb.shape[0] not in (n, n + 1):
            raise TeacherError(f"teacher '{self.name}': text embeddings of '{f.name}' must be "
                               f"[{n} rows of table '{f.table}', d], got {emb.shape}")
        used = ds.train_rows_of(f.table)  # fit the projection on items seen in training only
        mean, comps = pca_projection(emb[used], self.config["text_dim"])  # [d], [d, k]
        keys = ds.tables[f.table][self.spec.tables[f.table].keys[0]].to_numpy()
        keys = keys.astype(str) if keys.dtype == object else keys
        values = ((emb[:n] - mean) @ comps).astype(np.float32)
        self.text[f.name] = {"mean": mean, "components": comps, "keys": keys, "values": values}

    def _text_rows(self, ds: Dataset, f: FeatureSpec, rows: np.ndarray) -> np.ndarray:
        t, trow = self.text[f.name], ds.table_rows[f.table][rows]
        emb = (self.text_embeddings or {}).get(f.name)
        n = len(ds.tables[f.table])
        if emb is not None and emb.shape[1] == t["mean"].shape[0]:  # fresh embeddings: project them
            # once per table row, then gather: projecting per interaction row materialised [B, 384]
            # float64 twice (2.5 GB each at 800k training rows) for what is [n_items, k]
            key = (f.name, "fresh", id(emb))
            hit = self._lookup_cache.get(key)
            if hit is None or hit[0] is not emb:
                m = min(n, emb.shape[0])
                proj = np.full((n + 1, t["values"].shape[1]), np.nan)  # last row: missing item
                proj[:m] = (np.asarray(emb[:m], np.float64) - t["mean"]) @ t["components"]
                hit = self._lookup_cache[key] = (emb, proj, m)  # emb kept alive: its id stays unique
            _, proj, m = hit
            return proj[np.where(trow < m, trow, n)]
        # saved projection: map this data set's table rows to the saved rows by item key (once per data set)
        cache_key = (f.name, ds.fingerprint or str(id(ds)))
        if cache_key not in self._lookup_cache:
            keys = ds.tables[f.table][self.spec.tables[f.table].keys[0]].to_numpy()
            keys = keys.astype(str) if t["keys"].dtype.kind == "U" else keys
            self._lookup_cache[cache_key] = np.append(pd.Index(t["keys"]).get_indexer(keys), -1)
        src = self._lookup_cache[cache_key][trow]
        out = np.full((len(rows), t["values"].shape[1]), np.nan)  # unknown item: missing for the trees
        out[src >= 0] = t["values"][src[src >= 0]]
        return out

    # ------------------------------------------------------------------ fit / predict
    def _params(self) -> dict[str, Any]:
        c = self.config
        p = {"objective": "binary", "metric": c["metric"], "learning_rate": c["learning_rate"],
             "num_leaves": c["num_leaves"], "min_data_in_leaf": c["min_data_in_leaf"],
             "feature_fraction": c["feature_fraction"], "bagging_fraction": c["bagging_fraction"],
             "bagging_freq": c["bagging_freq"], "lambda_l2": c["lambda_l2"], "cat_smooth": c["cat_smooth"],
             "cat_l2": c["cat_l2"], "max_cat_threshold": c["max_cat_threshold"],
             "min_data_per_group": c["min_data_per_group"], "max_bin": c["max_bin"], "num_threads": c["n_jobs"],
             "seed": c["seed"], "deterministic": True, "force_row_wise": True, "verbose": -1}
        return {**p, **(c["params"] or {})}

    def fit(self, ds: Dataset) -> LightGBMTeacher:
        """Fit on ``ds.splits["train"]``; early stopping on ``ds.splits["valid"]``."""
        self.text = {}
        for f in self.features:
            if f.kind == "text" and self.config["use_text"] and f.name in (self.text_embeddings or {}):
                self._fit_text(ds, f)
            elif f.kind in ("text", "image"):
                why = "use_text: false" if f.kind == "text" and not self.config["use_text"] else "no embeddings given"
                log.info("teacher %s: %s feature '%s' skipped (%s)", self.name, f.kind, f.name, why)
        self.columns = self._plan(ds)
        if not self.columns:
            raise TeacherError(f"teacher '{self.name}': no usable feature in visibility '{self.visibility}'")
        names = [c["name"] for c in self.columns]
        cats = [c["name"] for c in self.columns if c["kind"] == "cat"]
        tr, va = fit_rows(ds, self.config["max_train_rows"], self.config["seed"]), ds.splits["valid"]
        self._fit_cat_rank(ds, tr)
        params = self._params()
        dtrain = lgb.Dataset(self.design(ds, tr), ds.labels[tr], feature_name=names, categorical_feature=cats,
                             params=params, free_raw_data=True)
        dvalid = lgb.Dataset(self.design(ds, va), ds.labels[va], reference=dtrain)
        c = self.config
        booster = lgb.train(params, dtrain, num_boost_round=c["num_boost_round"], valid_sets=[dvalid],
                            valid_names=["valid"],
                            callbacks=[lgb.early_stopping(c["early_stopping_rounds"], first_metric_only=True,
                                                          verbose=False)])
        best = booster.best_iteration or booster.current_iteration()
        self._set_booster(booster.model_to_string(num_iteration=best))
        self.best_iteration = best
        self.data_fingerprint, self.encoding = ds.fingerprint, encoding_fingerprint(ds, self.features)
        return self

    def _set_booster(self, model_text: str) -> None:
        self.booster = lgb.Booster(model_str=model_text)
        self.model_text = model_text
        self.artifact_hash = hashlib.sha256(model_text.encode()).hexdigest()
        self.tree_num_leaves = [int(t["num_leaves"]) for t in self.booster.dump_model()["tree_info"]]
        self.text_hashes = {k: hashlib.sha256(v["values"].tobytes()).hexdigest()[:16] for k, v in self.text.items()}
        self.cat_rank_hash = hashlib.sha256(b"".join(k.encode() + v.tobytes() for k, v in sorted(
            self.cat_rank.items()))).hexdigest()[:16] if self.cat_rank else ""

    def predict(self, ds: Dataset, rows: np.ndarray) -> TeacherOutput:
        """``logits`` ``[B]`` float32 raw margins, ``hidden["leaves"]`` ``[B, n_trees]`` int64."""
        if self.booster is None:
            raise TeacherError(f"teacher '{self.name}' is not fitted")
        x = self.design(ds, rows)
        # one pass over the trees: the margin is the sum of the reached leaves' values (LightGBM
        # folds the initial score into the first tree's leaves). Scoring raw and leaves separately
        # walked every tree twice, and on id-categorical trees a walk costs ~1 us per tree and row.
        leaves = self.booster.predict(x, pred_leaf=True, num_threads=self.config["n_jobs"]).reshape(len(x), -1)
        values = self.leaf_values()
        reached = values[np.arange(values.shape[0]), leaves] if values.size else np.zeros((len(x), 0))
        # the trees in TREE_PARTS groups of boosting order (np.add.reduceat sums each group's columns)
        parts = np.add.reduceat(reached, self._part_starts(), axis=1) if reached.shape[1] else \
            np.zeros((len(x), 1))
        margin = parts.sum(1)
        return TeacherOutput(torch.from_numpy(np.asarray(margin, np.float32)),
                             {"leaves": torch.from_numpy(leaves.astype(np.int64)),
                              "parts": torch.from_numpy(parts.astype(np.float32))})

    def _part_starts(self) -> np.ndarray:
        """First tree of each of the ``min(TREE_PARTS, n_trees)`` contiguous groups of trees."""
        n = len(self.tree_num_leaves)
        k = min(TREE_PARTS, n)
        return np.searchsorted(np.arange(n) * k // n, np.arange(k))

    def leaf_values(self) -> np.ndarray:
        """``[n_trees, max_leaves]`` float64 leaf outputs (zero beyond a tree's leaves), built once per booster."""
        hit = self._lookup_cache.get(("leaf_values", self.artifact_hash))
        if hit is None:
            values = np.zeros((len(self.tree_num_leaves), self.num_leaves))
            for i, n_leaves in enumerate(self.tree_num_leaves):
                for j in range(n_leaves):
                    values[i, j] = self.booster.get_leaf_output(i, j)
            hit = self._lookup_cache[("leaf_values", self.artifact_hash)] = values
        return hit

    def size(self) -> dict[str, int]:
        """Trees and leaves (a leaf is one value; a tree of ``L`` leaves also holds ``L - 1`` splits)."""
        return {"trees": len(self.tree_num_leaves), "leaves": int(sum(self.tree_num_leaves))} \
            if self.booster is not None else {}

    def hidden_dims(self) -> dict[str, int]:
        """``{"leaves": n_trees, "parts": K}``; leaf values of tree ``t`` lie in ``[0, tree_num_leaves[t])``."""
        return {"leaves": len(self.tree_num_leaves), "parts": max(1, min(TREE_PARTS, len(self.tree_num_leaves)))}

    def taps(self) -> dict[str, Tap]:
        """A leaf tap, ``[B, n_trees]`` leaf indices, each below :attr:`num_leaves`, and a parts tap,
        ``[B, K]`` the sums of the reached leaves' values over ``K = min(TREE_PARTS, n_trees)``
        contiguous groups of trees in boosting order (row sums: the logits); no frozen head."""
        dims = self.hidden_dims()
        return {"leaves": Tap("leaves", dims["leaves"], "leaves", self.num_leaves),
                "parts": Tap("parts", dims["parts"], "parts")}

    @classmethod
    def wants_text_embeddings(cls, kwargs: dict[str, Any]) -> bool:
        return bool(kwargs.get("use_text", True))

    @property
    def num_leaves(self) -> int:
        """Bound on every leaf index (``max(tree_num_leaves)``): rows per tree of a leaf-embedding table."""
        return max(self.tree_num_leaves, default=1)

    def identity(self) -> dict[str, Any]:
        ident = {**super().identity(), "config": self.config, "fitted_on": self.data_fingerprint,
                 "text": self.text_hashes}
        if self.cat_rank:  # what the categories mean is part of the model (absent: saved before ranks)
            ident["categories"] = self.cat_rank_hash
        return ident

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> None:
        """``model.txt`` (LightGBM text), ``text_<feature>.npz`` (projections), ``teacher.json``."""
        if self.booster is None:
            raise TeacherError(f"teacher '{self.name}' is not fitted")
        path = Path(path)
        atomic_write_text(path / MODEL_FILE, self.model_text)
        for stale in path.glob("text_*.npz"):  # from an earlier fit with other text features
            if stale.name[len("text_"):-len(".npz")] not in self.text:
                stale.unlink()
        for fname, t in self.text.items():
            buf = io.BytesIO()
            np.savez(buf, **t)
            atomic_write_bytes(path / f"text_{fname}.npz", buf.getvalue())
        extra = [CAT_FILE] if self.cat_rank else []
        if self.cat_rank:
            buf = io.BytesIO()
            np.savez(buf, **self.cat_rank)
            atomic_write_bytes(path / CAT_FILE, buf.getvalue())
        elif (path / CAT_FILE).exists():
            (path / CAT_FILE).unlink()
        # the sha256 of every artefact, checked before LightGBM parses anything (see load)
        files = file_digests(path, [MODEL_FILE, *(f"text_{f}.npz" for f in self.text), *extra])
        write_teacher_json(self, path, columns=self.columns, best_iteration=self.best_iteration,
                           encoding=self.encoding, fitted_on=self.data_fingerprint, files=files)

    @classmethod
    def load(cls, path: str | Path, spec: FeatureSpecSet, ds: Dataset) -> LightGBMTeacher:
        path = Path(path)
        t, meta = restore(cls, path, spec, ds)
        t.columns, t.best_iteration = meta["columns"], int(meta["best_iteration"])
        _verify_files(path, meta, t.name)
        for fname in sorted({c["feature"] for c in t.columns if spec.feature(c["feature"]).kind == "text"}):
            with np.load(path / f"text_{fname}.npz", allow_pickle=False) as z:
                t.text[fname] = {k: z[k] for k in z.files}
        # checked above with the other files; a save without checksums is checked through its identity
        if CAT_FILE in (meta.get("files") or {}) or "categories" in (meta.get("identity") or {}):
            with np.load(path / CAT_FILE, allow_pickle=False) as z:
                t.cat_rank = {k: z[k].astype(np.int32) for k in z.files}
        t.data_fingerprint, t.encoding = meta["fitted_on"], meta["encoding"]
        t._set_booster((path / MODEL_FILE).read_text())
        return t


def _verify_files(path: Path, meta: dict[str, Any], name: str) -> None:
    """Check the saved artefacts against the checksums in ``teacher.json`` *before* LightGBM reads them.

    Why: LightGBM's parser aborts the whole process (SIGABRT, no message) on a truncated or
    length-changed ``model.txt``. Saves from before ``files`` was recorded are checked against the
    identity's ``artifact`` hash, which is the sha256 of the model text.
    """
    want = dict(meta.get("files") or {})
    artifact = (meta.get("identity") or {}).get("artifact")
    if MODEL_FILE not in want and isinstance(artifact, str) and len(artifact) == 64:
        want[MODEL_FILE] = artifact
    if MODEL_FILE not in want:
        raise TeacherError(f"teacher '{name}': '{path / 'teacher.json'}' records no checksum of {MODEL_FILE}; "
                           "refit it with 'appdistill teachers fit'")
    problem = digest_problem(path, want)
    if problem:
        raise TeacherError(f"teacher '{name}': {problem}; refit it with 'appdistill teachers fit'")


_DEFAULTS = {k: p.default for k, p in inspect.signature(LightGBMTeacher.__init__).parameters.items()
             if p.kind == p.KEYWORD_ONLY}
