"""The DLRM teacher: a bigger TorchRec ranking model over the student's ids.

Same class as the student (:class:`~appdistill.student.model.RankingModel`: EBC -> dense arch ->
DCN-v2/dot interaction -> over-arch) with a bigger default config, trained from scratch on the
training split with the student's optimiser set-up (Adagrad for embeddings, Adam for dense parts,
via :func:`~appdistill.distributed.shard_model`), early stopping on validation AUC.

Hidden taps (both ``[B, d]`` float32):

- ``h``: the interaction output = over-arch input, ``d = hidden_dims()["h"]``;
- ``over``: the last hidden activation of the over-arch, ``d = over_arch[-1]``.

``head("h")`` is a frozen copy of the over-arch (``[B, d_h] -> [B]``), ``head("over")`` its final
linear layer: differentiable w.r.t. their input, no trainable parameters, always in eval mode.

Example:
    >>> t = TEACHERS.build("dlrm", {"epochs": 8}, spec=spec).fit(ds)
    >>> out = t.predict(ds, rows)                        # logits [B], hidden {"h": [B, d_h], "over": [B, 64]}
    >>> torch.allclose(t.head("h")(out.hidden["h"]), out.logits, atol=1e-5)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from appdistill.distributed import DistContext, shard_model
from appdistill.errors import ConfigError
from appdistill.eval.metrics import auc
from appdistill.features.batch import Batch, BatchBuilder, BatchLoader, TeacherOutput
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpecSet
from appdistill.io import load_checkpoint, save_checkpoint
from appdistill.progress import bar as progress_bar, write as progress_write
from appdistill.student.model import RankingModel, StudentConfig
from appdistill.teachers.base import TEACHERS, Head, Teacher, fit_rows
from appdistill.teachers.fit import TeacherError, encoding_fingerprint, jsonable, restore, write_teacher_json

MODEL_FILE = "model.pt"
TAPS = ("h", "over")


@TEACHERS.register("dlrm")
class DLRMTeacher(Teacher):
    """A bigger :class:`RankingModel` over ``spec.visible("dlrm")``.

    Args:
        spec / name: see :class:`~appdistill.teachers.base.Teacher`.
        embedding_dim: every feature's embedding dim (``None`` = the spec's ``dim``).
        dense_arch / interaction / over_arch / dropout: as in
            :class:`~appdistill.student.model.StudentConfig`.
        epochs: at most this many epochs; ``patience`` epochs without a better validation AUC stop
            training, and the best epoch's weights are kept.
        batch_size / lr / embedding_lr / weight_decay: optimiser set-up of the student's training.
        seed: weight initialisation, shuffling and the ``max_train_rows`` sample.
        max_train_rows: fit on a uniform sample of at most this many training rows (``None``: all).
        taps: hidden taps to return from :meth:`predict` (subset of ``("h", "over")``).
        eval_batch_size: rows per forward pass when predicting.
        num_threads: torch intra-op threads while fitting/predicting (``None``: leave as is). One
            thread is the default because this small model gains little from more, and OpenMP
            threads that spin-wait on a shared/oversubscribed CPU slow a step down 5-20x.
    """

    key = "dlrm"

    kwarg_ranges = {"embedding_dim": {"ge": 1, "le": 4096}, "dropout": {"ge": 0, "lt": 1}, "epochs": {"ge": 1},
                    "patience": {"ge": 0}, "batch_size": {"ge": 1}, "lr": {"gt": 0, "le": 10},
                    "embedding_lr": {"gt": 0, "le": 10}, "weight_decay": {"ge": 0}, "eval_batch_size": {"ge": 1},
                    "max_train_rows": {"ge": 100}}

    def __init__(self, spec: FeatureSpecSet, name: str | None = None, *, embedding_dim: int | None = 32,
                 dense_arch: list[int] | None = None, interaction: dict[str, Any] | None = None,
                 over_arch: list[int] | None = None, dropout: float = 0.1, epochs: int = 12, patience: int = 2,
                 batch_size: int = 512, lr: float = 1e-3, embedding_lr: float = 0.05, weight_decay: float = 0.0,
                 seed: int = 0, taps: list[str] | None = None, eval_batch_size: int = 8192,
                 max_train_rows: int | None = None, num_threads: int | None = 1) -> None:
        passed = {k: v for k, v in locals().items()
                  if k in _DEFAULTS and v != _DEFAULTS[k] and k != "num_threads"}
        super().__init__(spec, name, **jsonable(passed))
        self.config: dict[str, Any] = jsonable({
            "embedding_dim": embedding_dim, "dense_arch": dense_arch if dense_arch is not None else [64, 32],
            "interaction": interaction or {"key": "dcn", "kwargs": {"num_layers": 3, "low_rank": 64}},
            "over_arch": over_arch if over_arch is not None else [256, 128, 64], "dropout": dropout,
            "epochs": epochs, "patience": patience, "batch_size": batch_size, "lr": lr,
            "embedding_lr": embedding_lr, "weight_decay": weight_decay, "seed": seed,
            "taps": list(taps) if taps is not None else list(TAPS), "eval_batch_size": eval_batch_size,
            "max_train_rows": max_train_rows})
        bad = [t for t in self.config["taps"] if t not in TAPS]
        if bad:
            raise ConfigError(f"dlrm: unknown taps {bad}; choose from {list(TAPS)}")
        self.features = spec.visible(self.visibility)
        # not part of the config/identity: it changes speed, not what is learnt
        self.num_threads = num_threads
        self.model: RankingModel | None = None
        self.device = torch.device("cuda") if (torch.cuda.is_available()
                                               and os.environ.get("APPDISTILL_DEVICE") == "cuda") else torch.device("cpu")
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0
        self.data_fingerprint = ""
        self.encoding = ""

    def _student_config(self) -> StudentConfig:
        c = self.config
        return StudentConfig(c["embedding_dim"], list(c["dense_arch"]), dict(c["interaction"]),
                             list(c["over_arch"]), c["dropout"])

    def _build(self, ds: Dataset) -> RankingModel:
        return RankingModel.from_spec(self.features, ds.processor, self._student_config())

    # ------------------------------------------------------------------ forward
    def _forward(self, sparse: Any, dense: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The model's forward, keeping the taps: logits ``[B]``, ``{"h": [B, d_h], "over": [B, d_o]}``."""
        m = self.model
        assert m is not None
        emb = m.embed(sparse)
        d = m.dense_arch(dense) if m.dense_arch is not None else dense
        h = m.interaction(d, emb)
        over = m.over_arch.body(h)
        return m.over_arch.out(over).squeeze(-1), {"h": h, "over": over}

    @torch.no_grad()
    def _logits(self, ds: Dataset, rows: np.ndarray) -> np.ndarray:
        builder = BatchBuilder(ds, self.features)
        bs = self.config["eval_batch_size"]
        assert self.model is not None
        self.model.eval()
        return np.concatenate([self.model(*_inputs(builder.build(rows[i:i + bs]), self.device)).logits.float().cpu()
                               .numpy() for i in range(0, len(rows), bs)])

    # ------------------------------------------------------------------ fit / predict
    def fit(self, ds: Dataset) -> DLRMTeacher:
        """Train on ``ds.splits["train"]``; keep the epoch with the best validation AUC."""
        # fork the RNG: seeding here must not change the caller's random stream
        with _threads(self.num_threads), torch.random.fork_rng(devices=[]):
            return self._fit(ds)

    def _fit(self, ds: Dataset) -> DLRMTeacher:
        c = self.config
        torch.manual_seed(c["seed"])
        self.model = self._build(ds)
        model, opt = shard_model(self.model, DistContext(device=self.device), c["lr"], c["embedding_lr"],
                                 c["weight_decay"])
        self.model = model  # type: ignore[assignment]
        tr, va = fit_rows(ds, c["max_train_rows"], c["seed"]), ds.splits["valid"]
        # batches are built inline: a loader thread competes with torch's threads on small CPUs
        loader = BatchLoader(BatchBuilder(ds, self.features), tr, c["batch_size"], shuffle=True, seed=c["seed"],
                             drop_last=len(tr) >= c["batch_size"], prefetch=0)
        best_auc, best_state, bad = -math.inf, None, 0
        self.history = []
        for epoch in range(c["epochs"]):
            loader.set_epoch(epoch)
            model.train()
            total, n = 0.0, 0
            bar = progress_bar(loader, total=len(loader), desc=f"{self.name} epoch {epoch + 1}/{c['epochs']}",
                               enabled=self.progress, leave=False, dynamic_ncols=True)
            for batch in bar:
                sparse, dense = _inputs(batch, self.device)
                out = model(sparse, dense)
                loss = nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels.to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + float(loss.detach()), n + 1
            valid_auc = auc(self._logits(ds, va), ds.labels[va])
            self.history.append({"epoch": epoch + 1, "train_loss": total / max(n, 1), "valid_auc": valid_auc})
            if self.progress:
                progress_write(f"{self.name} epoch {epoch + 1}: train_loss={total / max(n, 1):.4f} "
                           f"valid_auc={valid_auc:.4f}")
            if valid_auc > best_auc:
                best_auc, self.best_epoch, bad = valid_auc, epoch + 1, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= c["patience"]:
                    break
        assert best_state is not None
        model.load_state_dict(best_state)
        self._freeze()
        self.data_fingerprint, self.encoding = ds.fingerprint, encoding_fingerprint(ds, self.features)
        return self

    def _freeze(self) -> None:
        assert self.model is not None
        self.model.eval().requires_grad_(False)
        h = hashlib.sha256()
        for k, v in sorted(self.model.state_dict().items()):
            t = v.detach().cpu().contiguous()
            h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        self.artifact_hash = h.hexdigest()

    @torch.no_grad()
    def predict(self, ds: Dataset, rows: np.ndarray) -> TeacherOutput:
        """``logits`` ``[B]`` float32 and ``hidden`` ``{"h": [B, d_h], "over": [B, d_o]}`` (CPU)."""
        if self.model is None:
            raise TeacherError(f"teacher '{self.name}' is not fitted")
        self.model.eval()
        batch = BatchBuilder(ds, self.features).build(np.asarray(rows, np.int64))
        with _threads(self.num_threads):
            logits, taps = self._forward(*_inputs(batch, self.device))
        return TeacherOutput(logits.float().cpu(), {k: taps[k].float().cpu() for k in self.config["taps"]})

    def predict_all(self, ds: Dataset, rows: np.ndarray, batch_size: int | None = None) -> TeacherOutput:
        return super().predict_all(ds, rows, batch_size or self.config["eval_batch_size"])

    def size(self) -> dict[str, int]:
        return {"params": sum(p.numel() for p in self.model.parameters())} if self.model is not None else {}

    def hidden_dims(self) -> dict[str, int]:
        if self.model is None:
            return {}
        dims = {"h": self.model.over_arch.in_dim, "over": self.config["over_arch"][-1]
                if self.config["over_arch"] else self.model.over_arch.in_dim}
        return {k: dims[k] for k in self.config["taps"]}

    def head(self, tap: str) -> Head | None:
        """Frozen upper layers from tap ``tap`` ``[B, d]`` to the logit ``[B]`` (on the teacher's device)."""
        if self.model is None:
            raise TeacherError(f"teacher '{self.name}' is not fitted")
        if tap == "h":
            return Head(self.model.over_arch.out, body=self.model.over_arch.body)
        if tap == "over":
            return Head(self.model.over_arch.out)
        raise ConfigError(f"teacher '{self.name}' has no tap '{tap}' (taps: {list(TAPS)})")

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "config": self.config, "fitted_on": self.data_fingerprint}

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> None:
        """``model.pt`` (state dict, atomic) and ``teacher.json`` (config, identity, history)."""
        if self.model is None:
            raise TeacherError(f"teacher '{self.name}' is not fitted")
        path = Path(path)
        save_checkpoint(path / MODEL_FILE, {k: v.detach().cpu() for k, v in self.model.state_dict().items()})
        write_teacher_json(self, path, best_epoch=self.best_epoch, history=self.history, encoding=self.encoding,
                           fitted_on=self.data_fingerprint)

    @classmethod
    def load(cls, path: str | Path, spec: FeatureSpecSet, ds: Dataset) -> DLRMTeacher:
        path = Path(path)
        t, meta = restore(cls, path, spec, ds)
        t.model = t._build(ds).to(t.device)
        t.model.load_state_dict(load_checkpoint(path / MODEL_FILE))
        t.best_epoch, t.history = int(meta["best_epoch"]), meta["history"]
        t.data_fingerprint, t.encoding = meta["fitted_on"], meta["encoding"]
        t._freeze()
        return t


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads, restoring the caller's setting afterwards."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _inputs(batch: Batch, device: torch.device) -> tuple[Any, torch.Tensor]:
    """(KJT, dense ``[B, D]``) on ``device``."""
    if device.type == "cpu":
        return batch.sparse, batch.dense
    return batch.sparse.to(device), batch.dense.to(device)


#: keyword defaults: only kwargs that differ from them are recorded (the config's own view)
_DEFAULTS = {k: p.default for k, p in inspect.signature(DLRMTeacher.__init__).parameters.items()
             if p.kind == p.KEYWORD_ONLY}
