"""The ``foundation`` teacher: LEVI-style layer-wise ensemble (arXiv 2402.04644).

Frozen foundation features — several hidden layers of the text encoder (and the CLIP embedding for
image features), read from the per-item embedding store — for the candidate item and for the
user's training history (mean of the items they liked, leave-one-out on training rows so a row
never sees its own label), are combined layer by layer with a small id model trained from scratch:

    s_id  = IdNet([e_user ; e_item])                                  [B, d_a]
    H_l   = Adapter_l([x_l ; u_l ; x_l ⊙ u_l]) + s_id                 [B, d_a]   (hidden tap "l")
    z_l   = head_l(H_l);   z = Σ_l softmax(β)_l · z_l                 [B]

``head(l)`` is the frozen ``head_l`` (the foundation "adapting layers" DiverseDistill answers
through). Item ids are randomly replaced by the OOV row during training (``id_dropout``) so the
model learns to lean on the text for items the ids never saw (cold items), and the frozen features
get dropout (``feat_dropout``) so the adapters learn smooth functions of the text instead of
recognising each warm item by its title.

Example:
    >>> t = TEACHERS.build("foundation", {"layers": [3, 6]}, spec=spec).fit(ds)
    >>> t.predict(ds, rows).hidden.keys()            # {"title:final", "title:layer3", "title:layer6"}
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from appdistill.errors import AppDistillError, ConfigError
from appdistill.eval.metrics import auc
from appdistill.features.batch import TeacherOutput
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.io import atomic_write_bytes, load_checkpoint
from appdistill.progress import bar as progress_bar
from appdistill.student.model import OverArch
from appdistill.teachers.base import TEACHERS, Head, Teacher, fit_rows
from appdistill.teachers.fit import TeacherError, encoding_fingerprint, restore, write_teacher_json

MODEL_FILE = "model.pt"


def default_store_root() -> Path:
    return Path(os.environ.get("APPDISTILL_CACHE", Path.home() / ".cache" / "appdistill")) / "store"


def unit_rows(m: Any) -> np.ndarray:
    """``m`` as float32 with unit-norm rows (all-zero rows stay zero): the teacher's frozen features."""
    m = np.asarray(m, dtype=np.float32)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-6)


def grouped_sums(groups: np.ndarray, m: np.ndarray, idx: np.ndarray, n_groups: int,
                 chunk: int = 1 << 16) -> np.ndarray:
    """``[n_groups, d]`` float32: row ``g`` sums ``m[idx[k]]`` over the ``k`` with ``groups[k] == g``.

    ``groups`` must be sorted. Gathers ``chunk`` rows of ``m`` at a time, so memory stays at the
    output plus one chunk (``np.add.at`` over every liked row at once materialised ``[rows, d]``:
    gigabytes at 10M interactions).
    """
    out = np.zeros((n_groups, m.shape[1]), np.float32)
    for a in range(0, len(groups), chunk):
        g, rows = groups[a:a + chunk], m[idx[a:a + chunk]]
        starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        out[g[starts]] += np.add.reduceat(rows, starts, axis=0)  # groups unique within a chunk
    return out


class LayerwiseNet(nn.Module):
    """Per-layer adapters + id model + per-layer heads, mixed by learned weights."""

    def __init__(self, layer_dims: dict[str, int], id_vocab: list[int], id_dim: int, d_a: int,
                 head: list[int], n_dense: int = 0, list_vocab: list[int] | None = None,
                 feat_dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = list(layer_dims)
        self.ids = nn.ModuleList([nn.Embedding(n, id_dim) for n in id_vocab])
        self.bags = nn.ModuleList([nn.EmbeddingBag(n, id_dim, mode="mean") for n in list_vocab or []])
        n_in = id_dim * (len(id_vocab) + len(self.bags)) + n_dense
        self.id_net = nn.Sequential(nn.Linear(n_in, d_a), nn.GELU(), nn.Linear(d_a, d_a))
        self.adapters = nn.ModuleList([nn.Sequential(nn.Linear(3 * d, d_a), nn.GELU(), nn.Linear(d_a, d_a))
                                       for d in layer_dims.values()])
        self.heads = nn.ModuleList([OverArch(d_a, head) for _ in layer_dims])
        self.mix = nn.Parameter(torch.zeros(len(layer_dims)))
        self.feat_dropout = nn.Dropout(feat_dropout)

    def forward(self, ids: torch.Tensor, feats: list[torch.Tensor], dense: torch.Tensor | None = None,
                lists: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``ids`` ``[B, n_id]``, ``feats[l]`` ``[B, 3·d_l]``, ``dense`` ``[B, n_dense]``, ``lists`` one
        ``(values, offsets [B])`` per id-list feature -> (logit ``[B]``, states ``[B, d_a]`` per layer)."""
        parts = [e(ids[:, j]) for j, e in enumerate(self.ids)]
        parts += [bag(v, o) for bag, (v, o) in zip(self.bags, lists or [])]
        parts += [dense] if dense is not None else []
        s_id = self.id_net(torch.cat(parts, 1))
        states = [a(self.feat_dropout(x)) + s_id for a, x in zip(self.adapters, feats)]
        z = torch.stack([h(s) for h, s in zip(self.heads, states)], 1)
        return (z * torch.softmax(self.mix, 0)).sum(1), states


@TEACHERS.register("foundation")
class FoundationTeacher(Teacher):
    """Args:
        layers: text-encoder hidden layers to read besides the final embedding.
        encoder_kwargs: per feature or encoder name kwargs (e.g. ``{"clip": {"pretrained": PATH}}``).
        d_a: adapted-state width; id_dim: id embedding width; head: head hidden sizes.
        epochs, batch_size, lr, weight_decay, patience: training; early stopping on validation AUC.
        id_dropout: probability of replacing an item id by OOV during training.
        feat_dropout: dropout on the frozen foundation features entering the adapters. A title
            embedding identifies its item as well as the id does; dropout keeps the adapters from
            memorising warm items through it, which is what carries over to cold items.
        seed: initialisation, shuffling and the ``max_train_rows`` sample.
        max_train_rows: fit on a uniform sample of at most this many training rows (``None``: all);
            the users' liked-item vectors still read every training row, and every row is predicted.
    """

    key = "foundation"
    kind = "foundation"

    kwarg_ranges = {"d_a": {"ge": 1, "le": 4096}, "id_dim": {"ge": 1, "le": 4096}, "epochs": {"ge": 1},
                    "batch_size": {"ge": 1}, "lr": {"gt": 0, "le": 10}, "weight_decay": {"ge": 0},
                    "patience": {"ge": 0}, "id_dropout": {"ge": 0, "lt": 1}, "feat_dropout": {"ge": 0, "lt": 1},
                    "max_train_rows": {"ge": 100}}

    def __init__(self, spec: FeatureSpecSet, name: str | None = None, layers: list[int] | None = None,
                 encoder_kwargs: dict[str, dict[str, Any]] | None = None, d_a: int = 64, id_dim: int = 16,
                 head: list[int] | None = None, epochs: int = 10, batch_size: int = 1024, lr: float = 2e-3,
                 weight_decay: float = 1e-5, patience: int = 2, id_dropout: float = 0.1, feat_dropout: float = 0.0,
                 seed: int = 0, max_train_rows: int | None = None) -> None:
        super().__init__(spec, name, layers=layers if layers is not None else [3], encoder_kwargs=encoder_kwargs or {},
                         d_a=d_a, id_dim=id_dim, head=head or [32], epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, patience=patience, id_dropout=id_dropout,
                         feat_dropout=feat_dropout, seed=seed, max_train_rows=max_train_rows)
        self.config = dict(self.kwargs)
        for k in ("id_dropout", "feat_dropout"):
            if not 0.0 <= self.kwargs[k] < 1.0:
                raise ConfigError(f"teacher '{self.name}': {k} must be in [0, 1), got {self.kwargs[k]}")
        vis = spec.visible("foundation")
        # the small model trained from scratch reads every visible id, id-list and dense feature
        self.id_features = [f for f in vis if f.kind == "sparse_id"]
        self.list_features = [f for f in vis if f.kind == "id_list"]
        self.dense_features = [f for f in vis if f.kind == "dense"]
        self.media = [f for f in vis if f.kind in ("text", "image")]
        if not self.media:
            raise AppDistillError(f"teacher '{self.name}': visibility.foundation has no text/image feature")
        self.features = self.id_features + self.list_features + self.dense_features
        self.store_root: Path = default_store_root()
        self.net: LayerwiseNet | None = None
        self.encoder_params = 0
        self._ready_for: str | None = None
        self._users_for: str | None = None  # the data set the users' liked-item sums were computed on

    # ------------------------------------------------------------------ inputs
    def _stores(self, ds: Dataset) -> dict[str, Any]:
        from appdistill.foundation.catalog import build_foundation_stores

        enc_kw = {"minilm": {"layers": self.kwargs["layers"]}, **self.kwargs["encoder_kwargs"]}
        return build_foundation_stores(ds, self.store_root, model="foundation", encoder_kwargs=enc_kw)

    def encode_items(self, ds: Dataset) -> None:
        self._stores(ds)  # every layer the teacher reads, in one pass of each encoder

    def _prepare(self, ds: Dataset) -> None:
        """Open/build the stores, and the users' leave-one-out liked-item sums per layer."""
        if self._ready_for == ds.fingerprint:
            return
        stores = self._stores(ds)
        self.layer_names, self.mats, self.tables = [], [], []
        for f in self.media:
            for out, entry in stores[f.name].items():
                m = unit_rows(entry.matrix)
                self.layer_names.append(f"{f.name}:{out}")
                self.mats.append(np.vstack([m, np.zeros((1, m.shape[1]), np.float32)]))  # + missing row
                self.tables.append(f.table)
        # what the frozen features are: encoder identity + encoded-data fingerprint of each store
        self.store_identity = {f"{f.name}:{out}": [e.manifest.encoder, e.manifest.data_fingerprint]
                               for f in self.media for out, e in stores[f.name].items()}
        self.id_cols = [ds.sparse[f.name] for f in self.id_features]
        self.dense_cols = [(ds.dense[f.name], f.table) for f in self.dense_features]
        self._ready_for = ds.fingerprint

    def _prepare_users(self, ds: Dataset) -> None:
        """The users' liked-item sums per layer, on first use: only predictions read them, so a teacher
        loaded for its heads and identity (a student training from its cache) never pays a pass over
        every liked training row (a minute at 10M interactions)."""
        if self._users_for == ds.fingerprint:
            return
        train = ds.splits["train"]
        self.is_train = np.zeros(ds.n, bool)
        self.is_train[train] = True
        y = ds.labels
        n_users = int(ds.user_ids.max()) + 1
        pos = train[y[train] > 0]
        self.user_cnt = np.bincount(ds.user_ids[pos], minlength=n_users).astype(np.float32)
        self.user_sum = []
        order = pos[np.argsort(ds.user_ids[pos], kind="stable")]
        for m, table in zip(self.mats, self.tables):
            self.user_sum.append(np.zeros((n_users, m.shape[1]), np.float32) if table == "users" else
                                 grouped_sums(ds.user_ids[order], m, ds.table_rows[table][order], n_users))
        self._users_for = ds.fingerprint

    def _inputs(self, ds: Dataset, rows: np.ndarray, train_mode: bool = False,
                rng: np.random.Generator | None = None,
                media: list[np.ndarray] | None = None) -> tuple[Any, ...]:
        """The network's inputs for ``rows``: ``(ids, feats, dense, lists)`` (see :meth:`LayerwiseNet.forward`).

        ``media``: per entry of ``layer_names``, the rows' own encoder outputs ``[B, d_l]`` to use in
        place of the store's rows (a serving path that encodes the request's items itself); they are
        normalised as the store's are. Everything else (ids, id lists, dense, user vectors) is built
        as for ``predict``, so such a path cannot drift from the inputs the net was fitted on.
        """
        self._prepare_users(ds)
        ids = np.stack([c[rows] for c in self.id_cols], 1) if self.id_cols else np.zeros((len(rows), 0), np.int64)
        if train_mode and rng is not None and self.kwargs["id_dropout"] > 0:
            for j, f in enumerate(self.id_features):
                if f.name == self.spec.item_key:
                    ids[rng.random(len(rows)) < self.kwargs["id_dropout"], j] = 0
        u, yv, tr = ds.user_ids[rows], ds.labels[rows], self.is_train[rows]
        # leave-one-out on training rows: a liked training item is removed from its own user vector
        own = (tr & (yv > 0)).astype(np.float32)
        cnt = np.maximum(self.user_cnt[u] - own, 0)
        feats = []
        for j, (m, table, s) in enumerate(zip(self.mats, self.tables, self.user_sum)):
            x = m[ds.table_rows[table][rows]] if media is None else unit_rows(media[j])
            if table == "users":
                uvec = x
            else:
                uvec = (s[u] - own[:, None] * x) / np.maximum(cnt, 1)[:, None]
            feats.append(torch.from_numpy(np.concatenate([x, uvec, x * uvec], 1)))
        lists = []
        for f in self.list_features:
            lengths, values = ds.lists[f.name].take(ds.table_rows[f.table][rows])
            offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            lists.append((torch.from_numpy(np.asarray(values, np.int64)), torch.from_numpy(offsets)))
        return torch.from_numpy(ids), feats, self.dense_inputs(ds, rows), lists

    def dense_inputs(self, ds: Dataset, rows: np.ndarray) -> torch.Tensor | None:
        """Transformed dense features ``[B, n_dense]`` of ``rows`` (``None`` when it sees none)."""
        if not self.dense_cols:
            return None
        # side-table features carry a trailing "missing" row (Dataset), so table_rows index them directly
        return torch.from_numpy(np.stack([v[rows] if table == "interactions" else v[ds.table_rows[table][rows]]
                                          for v, table in self.dense_cols], 1).astype(np.float32))

    def _build_net(self, ds: Dataset) -> LayerwiseNet:
        """A fresh network for the prepared layers (``_prepare``) and the data set's vocabularies."""
        k, vocab = self.kwargs, ds.processor.vocabs
        dims = {n: m.shape[1] for n, m in zip(self.layer_names, self.mats)}
        return LayerwiseNet(dims, [vocab[f.name].num_embeddings for f in self.id_features], k["id_dim"], k["d_a"],
                            k["head"], len(self.dense_features), [vocab[f.name].num_embeddings for f in self.list_features],
                            k["feat_dropout"])

    # ------------------------------------------------------------------ fit / predict
    def fit(self, ds: Dataset) -> FoundationTeacher:
        self._prepare(ds)
        k = self.kwargs
        torch.manual_seed(k["seed"])
        rng = np.random.default_rng(k["seed"])
        self.net = self._build_net(ds)
        opt = torch.optim.Adam(self.net.parameters(), lr=k["lr"], weight_decay=k["weight_decay"])
        train, valid = fit_rows(ds, k["max_train_rows"], k["seed"]), ds.splits["valid"]
        best, best_state, bad = -1.0, None, 0
        self.history = []
        for epoch in range(k["epochs"]):
            self.net.train()
            perm = train[rng.permutation(len(train))]
            bar = progress_bar(range(0, len(perm), k["batch_size"]), desc=f"{self.name} epoch {epoch + 1}",
                               enabled=self.progress, leave=False)
            for i in bar:
                rows = perm[i:i + k["batch_size"]]
                z, _ = self.net(*self._inputs(ds, rows, True, rng))
                loss = F.binary_cross_entropy_with_logits(z, torch.from_numpy(ds.labels[rows]))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            v = auc(self.predict_all(ds, valid).logits.numpy(), ds.labels[valid])
            self.history.append({"epoch": epoch + 1, "valid_auc": v})
            if v > best + 1e-4:
                best, bad = v, 0
                best_state = {n: p.detach().clone() for n, p in self.net.state_dict().items()}
            else:
                bad += 1
                if bad > k["patience"]:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.encoder_params = self._encoder_params()
        self.encoding = encoding_fingerprint(ds, self.features)
        self._hash()
        return self

    @torch.no_grad()
    def predict(self, ds: Dataset, rows: np.ndarray) -> TeacherOutput:
        if self.net is None:
            raise TeacherError(f"teacher '{self.name}' is not fitted")
        self._prepare(ds)
        self.net.eval()
        z, states = self.net(*self._inputs(ds, np.asarray(rows, np.int64)))
        return TeacherOutput(z, {n: s for n, s in zip(self.layer_names, states)})

    def hidden_dims(self) -> dict[str, int]:
        return {n: self.kwargs["d_a"] for n in self.layer_names}

    def head(self, tap: str) -> Head | None:
        if self.net is None or tap not in self.layer_names:
            return None
        h = self.net.heads[self.layer_names.index(tap)]
        return Head(h.out, body=h.body)

    # ------------------------------------------------------------------ size / identity / io
    def params(self) -> int:
        """Trainable parameters plus the frozen encoders' (the whole foundation teacher)."""
        return sum(p.numel() for p in self.net.parameters()) + self.encoder_params if self.net else 0

    def size(self) -> dict[str, int]:
        return {"params": self.params(), "frozen_encoder_params": self.encoder_params} if self.net else {}

    def _encoder_params(self) -> int:
        from appdistill.foundation.catalog import make_encoder

        total = 0
        enc_kw = {"minilm": {"layers": self.kwargs["layers"]}, **self.kwargs["encoder_kwargs"]}
        for f in self.media:
            try:
                model = make_encoder(f, enc_kw).model
                total += sum(p.numel() for p in model.parameters())
            except Exception:  # noqa: BLE001 - size is informative only
                pass
        return total

    def _hash(self) -> None:
        buf = io.BytesIO()
        torch.save(self.net.state_dict(), buf)
        self._blob = buf.getvalue()
        self.artifact_hash = hashlib.sha256(self._blob).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "layers": getattr(self, "layer_names", []),
                "stores": getattr(self, "store_identity", {})}

    def save(self, path: str | Path) -> None:
        if self.net is None:
            raise TeacherError(f"teacher '{self.name}' is not fitted")
        path = Path(path)
        atomic_write_bytes(path / MODEL_FILE, self._blob)
        write_teacher_json(self, path, layer_names=self.layer_names, history=self.history,
                           encoder_params=self.encoder_params, params=self.params(),
                           encoding=getattr(self, "encoding", None))

    @classmethod
    def load(cls, path: str | Path, spec: FeatureSpecSet, ds: Dataset) -> FoundationTeacher:
        path = Path(path)
        t, meta = restore(cls, path, spec, ds)
        t._prepare(ds)
        if t.layer_names != meta["layer_names"]:
            raise TeacherError(f"teacher '{t.name}' at '{path}': layers {meta['layer_names']} vs store {t.layer_names}")
        t.net = t._build_net(ds)
        t.net.load_state_dict(load_checkpoint(path / MODEL_FILE))
        t.history, t.encoder_params = meta.get("history", []), int(meta.get("encoder_params", 0))
        t._hash()
        return t
