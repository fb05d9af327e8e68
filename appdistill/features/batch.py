"""``Batch`` and the loader that builds batches from a :class:`Dataset`.

Batches are built a block at a time (one numpy gather per feature for ~32k rows, no per-row
Python; each batch is a zero-copy slice), optionally on a background thread so that building
overlaps the training step (``train()`` turns the thread on only when a core is free for it).

Under ``torchrun`` every rank walks the same global permutation and takes its own slice of each
global batch, so the effective batch and the number of steps match a single-process run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from appdistill.errors import ConfigError
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpec

#: block shuffle (``BatchLoader(block_shuffle=True)``, the default for streamed data sets): rows are
#: visited in windows of SHUFFLE_WINDOW_BLOCKS blocks of SHUFFLE_BLOCK_ROWS consecutive rows, blocks
#: drawn at random, rows shuffled within a window. A window (4M rows) is 64 random places in the data,
#: so batches mix as under a full shuffle, while a window reads ~64 contiguous runs of each
#: memory-mapped column (a full shuffle touches every page of every column within a few batches).
SHUFFLE_BLOCK_ROWS = 1 << 16
SHUFFLE_WINDOW_BLOCKS = 64
#: a loader over a streamed data set unmaps the columns' pages every RELEASE_ROWS rows it builds: the
#: resident file pages stay near a quarter of a window's; re-mapping a page from the page cache is a
#: minor fault (well under a second per window against ~45 s of training steps on 2 cores)
RELEASE_ROWS = 1 << 20


@dataclass
class TeacherOutput:
    """What a teacher says about a batch.

    Attributes:
        logits: ``[B]`` raw margins.
        hidden: named tap points, each ``[B, d]`` (float) or ``[B, T]`` int64 (LightGBM leaf indices).
    """

    logits: torch.Tensor
    hidden: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """One mini-batch.

    Attributes:
        sparse: ``KeyedJaggedTensor`` with one key per sparse feature (``sparse_id``: length 1).
        dense: ``[B, D]`` float32 transformed dense features (``D`` may be 0).
        labels: ``[B]`` float32 0/1.
        row_ids: ``[B]`` int64 rows of the interactions table (the teacher-cache join key).
        user_ids / item_ids: ``[B]`` int64 dense key codes (grouping for GAUC / NDCG).
        teacher: teacher outputs for these rows, filled from the cache or live.
    """

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    labels: torch.Tensor
    row_ids: torch.Tensor
    user_ids: torch.Tensor
    item_ids: torch.Tensor
    teacher: dict[str, TeacherOutput] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        dev = torch.device(device)
        if dev.type == "cpu":
            return self
        mv = lambda t: t.to(dev, non_blocking=non_blocking)  # noqa: E731
        return replace(self, sparse=self.sparse.to(dev, non_blocking=non_blocking), dense=mv(self.dense),
                       labels=mv(self.labels), row_ids=mv(self.row_ids), user_ids=mv(self.user_ids),
                       item_ids=mv(self.item_ids),
                       teacher={k: TeacherOutput(mv(v.logits), _hidden_to(v.hidden, dev, non_blocking))
                                for k, v in self.teacher.items()})


def _hidden_to(hidden: Mapping[str, torch.Tensor], dev: torch.device, non_blocking: bool) -> Mapping[str, torch.Tensor]:
    # a lazy mapping (the cache join's) moves each tap when it is read, so unread taps are never gathered
    to = getattr(hidden, "to", None)
    if to is not None:
        return to(dev, non_blocking=non_blocking)
    return {n: h.to(dev, non_blocking=non_blocking) for n, h in hidden.items()}


class BatchBuilder:
    """Builds :class:`Batch` objects for a fixed feature list (e.g. the student's visible set).

    Args:
        dataset: the encoded data set.
        features: features to include (text/image features are skipped: they reach teachers
            through the foundation store, not the batch).
        content: ``(table, vectors [rows of table + 1, C])``: the student's content table looked up for
            every row of ``table`` (last row: a missing join), appended after the dense features.
    """

    def __init__(self, dataset: Dataset, features: list[FeatureSpec],
                 content: tuple[str, np.ndarray] | None = None) -> None:
        self.ds = dataset
        self.content = content
        self.sparse_features = [f for f in features if f.kind in ("sparse_id", "id_list")]
        self.dense_features = [f for f in features if f.kind == "dense"]
        self.keys = [f.name for f in self.sparse_features]
        self._units: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dense_dim(self) -> int:
        return len(self.dense_features) + (self.content[1].shape[1] if self.content else 0)

    def build(self, rows: np.ndarray) -> Batch:
        """One :class:`Batch` of ``rows`` (interaction-table row indices, ``[B]`` int64)."""
        return self.build_many([rows])[0]

    def build_many(self, row_groups: list[np.ndarray]) -> list[Batch]:
        """One :class:`Batch` per array of ``row_groups``, from one gather per feature.

        Why blocks: a batch costs a dozen numpy gathers of ~1k rows each, and between two training
        steps their fixed cost (and cold caches) is most of it. Gathering a block of batches at once
        and handing out zero-copy slices makes that cost per block, not per batch. What is left per
        batch is the ``KeyedJaggedTensor`` and its per-key ``JaggedTensor`` s, built here with the
        offsets already known, so the EBC's ``to_dict()`` finds them cached instead of splitting
        the values itself on the training thread.
        """
        ds = self.ds
        sizes = [len(r) for r in row_groups]
        # a copy either way: ``row_ids`` must not share memory with the caller's array
        rows = np.concatenate(row_groups).astype(np.int64, copy=False) if len(row_groups) > 1 \
            else np.array(row_groups[0], np.int64)
        bounds = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=bounds[1:])
        # per feature: (values, lengths, offsets) of the block; lengths/offsets None = one id per row
        cols: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        for f in self.sparse_features:
            if f.kind == "sparse_id":
                cols.append((ds.sparse[f.name][rows], None, None))
            else:
                ln, v = ds.lists[f.name].take(ds.table_rows[f.table][rows])
                off = np.zeros(len(ln) + 1, np.int64)
                np.cumsum(ln, out=off[1:])
                cols.append((v, ln, off))
        if self.dense_features or self.content is not None:
            n_d = len(self.dense_features)
            dense = np.empty((len(rows), self.dense_dim), np.float32)
            for j, f in enumerate(self.dense_features):
                dense[:, j] = ds.dense[f.name][ds.table_rows[f.table][rows]]
            if self.content is not None:
                dense[:, n_d:] = self.content[1][ds.table_rows[self.content[0]][rows]]
        else:
            dense = np.zeros((len(rows), 0), np.float32)
        labels, users, items = ds.labels[rows], ds.user_ids[rows], ds.item_ids[rows]
        out = []
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            # a batch's slice of each feature; list offsets rebased to the batch's first value
            per = [(v[lo:hi], None, None) if ln is None else (v[off[lo]:off[hi]], ln[lo:hi], off[lo:hi + 1] - off[lo])
                   for v, ln, off in cols]
            out.append(Batch(
                sparse=self._kjt(per, hi - lo),
                dense=torch.from_numpy(dense[lo:hi]),
                labels=torch.from_numpy(labels[lo:hi]),
                row_ids=torch.from_numpy(rows[lo:hi]),
                user_ids=torch.from_numpy(users[lo:hi]),
                item_ids=torch.from_numpy(items[lo:hi]),
            ))
        return out

    def _kjt(self, cols: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]],
             batch: int) -> KeyedJaggedTensor:
        """KJT (with its ``to_dict()`` cache filled) of one batch's per-feature (values, lengths, offsets)."""
        if not cols:
            return KeyedJaggedTensor(keys=[], values=torch.zeros(0, dtype=torch.int64),
                                     lengths=torch.zeros(0, dtype=torch.int64), stride=batch)
        ones, arange = self._unit(batch)
        per_key = [int(v.shape[0]) for v, _, _ in cols]
        values = torch.from_numpy(np.concatenate([v for v, _, _ in cols]))
        jt, lengths, start = {}, [], 0
        for key, (_, ln, off), n in zip(self.keys, cols, per_key):
            lt, ot = (ones, arange) if ln is None else (torch.from_numpy(ln), torch.from_numpy(off))
            jt[key] = JaggedTensor(values=values[start:start + n], lengths=lt, offsets=ot)
            lengths.append(lt)
            start += n
        return KeyedJaggedTensor(keys=self.keys, values=values, lengths=torch.cat(lengths), stride=batch,
                                 length_per_key=per_key, offset_per_key=[0, *np.cumsum(per_key).tolist()],
                                 jt_dict=jt)

    def _unit(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared ``lengths = 1`` / ``offsets = 0..B`` tensors of single-id features (read-only)."""
        u = self._units.get(batch)
        if u is None:
            u = self._units[batch] = (torch.ones(batch, dtype=torch.int64), torch.arange(batch + 1))
        return u


class BatchLoader:
    """Iterates over one split in mini-batches.

    Args:
        builder: what goes in a batch.
        rows: row indices of the split.
        batch_size: *global* batch size; each of ``world_size`` ranks gets ``batch_size // world_size``.
        shuffle: reshuffle each epoch with ``seed + epoch``.
        drop_last: drop the last incomplete global batch (training); evaluation pads instead.
        rank / world_size: this process's slice (``torchrun``).
        prefetch: batches built ahead on a background thread (0 = build inline).
        start_step: skip this many batches of the first epoch (resume).
        hooks: callables ``(batch) -> batch`` applied on the loader thread (e.g. teacher-cache join).
        block_rows: rows gathered at once (:meth:`BatchBuilder.build_many`); batches are slices of
            a block, so per-batch work is small. Does not change which rows a batch holds.
        block_shuffle: shuffle by windows of random blocks (:func:`block_order`) instead of a full
            permutation: bounded memory on memory-mapped (streamed) columns.

    On a streamed data set the loader releases the columns' mapped pages every :data:`RELEASE_ROWS`
    rows it builds (:meth:`Dataset.release_pages`).

    Example:
        >>> loader = BatchLoader(BatchBuilder(ds, spec.visible("student")), ds.splits["train"], 1024)
        >>> for batch in loader: ...
    """

    def __init__(self, builder: BatchBuilder, rows: np.ndarray, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 prefetch: int = 4, hooks: list[Any] | None = None, block_rows: int = 32768,
                 block_shuffle: bool = False) -> None:
        if batch_size % world_size:
            raise ConfigError(f"train.batch_size {batch_size} must be divisible by the number of ranks ({world_size}): "
                              "it is the global batch, split evenly over them")
        self.builder, self.rows, self.batch_size = builder, np.asarray(rows, np.int64), batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.hooks = list(hooks or [])
        self.block = max(1, block_rows // max(1, batch_size // world_size))
        self.epoch, self.start_step = 0, 0
        self.block_shuffle = block_shuffle
        streamed = bool(getattr(builder.ds, "streamed", ""))
        self.release_rows = RELEASE_ROWS // world_size if streamed else 0

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _order(self) -> np.ndarray | None:
        """Positions into ``self.rows`` in this epoch's visiting order (``None``: in order). Positions,
        int32 below 2^31 rows, not a shuffled copy of the rows: half the memory of an int64 copy."""
        if not self.shuffle:
            return None
        rng = np.random.default_rng(self.seed + self.epoch)
        n = len(self.rows)
        if self.block_shuffle:
            return block_order(n, rng)
        # the same permutation as ``rng.permutation(n)``: shuffling depends on the length only
        return rng.permutation(np.arange(n, dtype=_index_dtype(n)))

    def _slices(self) -> Iterator[np.ndarray]:
        order, b, w = self._order(), self.batch_size, self.world_size
        for k in range(self.start_step, len(self)):
            g = self.rows[k * b:(k + 1) * b] if order is None else self.rows[order[k * b:(k + 1) * b]]
            if len(g) < b and not self.drop_last:
                # ragged last batch: split as evenly as possible so every rank steps together
                yield np.array_split(g, w)[self.rank]
            else:
                yield g[self.rank * (b // w):(self.rank + 1) * (b // w)]

    def _batches(self) -> Iterator[Batch]:
        """This rank's batches in order, built a block of slices at a time."""
        block: list[np.ndarray] = []
        built = 0
        for rows in self._slices():
            block.append(rows)
            built += len(rows)
            if len(block) == self.block:
                yield from self._make(block)
                block = []
            if self.release_rows and built >= self.release_rows:
                self.builder.ds.release_pages()  # built batches hold copies: safe to unmap
                built = 0
        if block:
            yield from self._make(block)

    def _make(self, block: list[np.ndarray]) -> Iterator[Batch]:
        for batch in self.builder.build_many(block):
            for h in self.hooks:
                batch = h(batch)
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        if self.prefetch <= 0:
            yield from self._batches()
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                for batch in self._batches():
                    if stop.is_set():
                        return
                    q.put(batch)
                q.put(done)
            except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
                q.put(e)

        t = threading.Thread(target=work, daemon=True, name="appdistill-loader")
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():  # drain so the producer can exit
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(timeout=0.05)


def _index_dtype(n: int) -> type:
    return np.int32 if n < 2**31 else np.int64


def block_order(n: int, rng: np.random.Generator, block: int = SHUFFLE_BLOCK_ROWS,
                window: int = SHUFFLE_WINDOW_BLOCKS) -> np.ndarray:
    """Positions ``0..n-1`` in block-shuffled order: blocks of ``block`` consecutive positions in random
    order, taken ``window`` blocks at a time and shuffled within that window. Every position once.

    Example:
        >>> order = block_order(10, np.random.default_rng(0), block=2, window=2)
        >>> sorted(order.tolist()) == list(range(10))
        True
    """
    dtype = _index_dtype(n)
    blocks = rng.permutation(-(-n // block))
    out = np.empty(n, dtype)
    pos = 0
    for w in range(0, len(blocks), window):
        idx = np.concatenate([np.arange(b * block, min(n, (b + 1) * block), dtype=dtype) for b in blocks[w:w + window]])
        out[pos:pos + len(idx)] = idx[rng.permutation(len(idx))]
        pos += len(idx)
    return out
