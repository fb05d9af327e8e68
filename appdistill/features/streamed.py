"""Interactions bigger than memory: a folder of parquet files, encoded a chunk at a time into
memory-mapped columns.

When the interactions table's ``path`` is a directory, :meth:`Dataset.build` reads it here. Every
``*.parquet`` file in it (by name; together they are one table with one schema) is read in chunks of
:data:`CHUNK_ROWS` rows, never whole:

1. the split, from the one column it needs (``time``: the time column; ``cold_item``: the item key;
   ``random``: none), by the same :func:`~appdistill.features.tables.split_rows` as a table in memory;
2. pass 1: each chunk checked like a file (errors name the part file and its row), labels, each side
   table's row of every interaction, the rows' hashes for the data fingerprint, and the training rows'
   id counts and dense moments, from which the vocabularies and transforms are fitted;
3. pass 2: the interactions' servable features encoded by that fitted processor (the one that serves),
   the side tables' ``sparse_id`` features gathered per interaction, the user and item codes.

So the same rows as one file or as a folder give the same split, processor, fingerprint and encoded
arrays (``tests/test_streamed.py`` checks it, and that training on both gives the same metrics);
only the user and item codes differ (sorted keys instead of first appearance: grouping is the same).

The columns (``.npy``) are cached under ``$APPDISTILL_CACHE/columns/<spec>-<key>`` (default
``~/.cache/appdistill``), the key being the spec's fingerprint and each file's name, size and mtime: a
second run, or every rank of a ``torchrun`` job, opens them instead of encoding again (one process
builds while the others wait on a lock). They are written in a stage and swapped in whole, and their
sizes and sha256 are checked on every open: a damaged file is rebuilt, never read.

Memory: the process holds one chunk at a time while encoding, and while training the split's row
indices (8 bytes per row) and the loader's order; the columns are memory-mapped file pages the kernel
can drop. Side tables (items, users) are read whole, as for a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from appdistill.errors import SpecError
from appdistill.features.processor import FeatureProcessor
from appdistill.features.spec import FeatureSpecSet
from appdistill.features.tables import (check_key_kinds, check_table, join_report, load_tables, one_class_message,
                                        split_rows, table_location)
from appdistill.features.vocab import DenseMoments, DenseTransform, KeyIndex, Vocabulary, normalize_ids
from appdistill.io import (atomic_write_text, digest_problem, file_digests, json_digest, locked, release_mapped,
                           staged_dir)
from appdistill.progress import bar as progress_bar

log = logging.getLogger("appdistill.data")

#: rows per chunk: ~100 MB of pandas frame for a few columns
CHUNK_ROWS = 1 << 21
#: bump when the column layout changes: older caches are then rebuilt, not misread
FORMAT = 1
MANIFEST = "manifest.json"


def stream_files(spec: FeatureSpecSet) -> list[Path] | None:
    """The parquet files of the interactions table when its path is a folder, else ``None``."""
    if spec.tables["interactions"].path is None:
        return None
    folder = Path(table_location(spec, "interactions"))
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".parquet", ".pq"))
    if not files:
        raise SpecError(f"file '{folder}': is a directory without .parquet files; the interactions table is one "
                        ".parquet/.csv/.tsv file or a folder of .parquet files (one table, read in chunks)")
    return files


def columns_root() -> Path:
    return Path(os.environ.get("APPDISTILL_CACHE", Path.home() / ".cache" / "appdistill")) / "columns"


def build_streamed(spec: FeatureSpecSet, files: list[Path]) -> Any:
    """The :class:`~appdistill.features.dataset.Dataset` of a folder of parquet files (module docstring)."""
    import pyarrow.parquet as pq

    stats = []
    for f in files:
        st = f.stat()
        stats.append([f.name, st.st_size, st.st_mtime_ns])
    key = json_digest({"format": FORMAT, "spec": spec.fingerprint(), "files": stats}, 16)
    root = columns_root() / f"{''.join(c if c.isalnum() or c in '-_' else '_' for c in spec.name)}-{key}"
    side = load_tables(spec, skip=("interactions",))
    with locked(root.parent / f".{root.name}.lock"):
        problem = _problem(root)
        if problem is not None:
            if (root / MANIFEST).is_file():
                log.warning("streamed columns %s: %s; encoding them again", root, problem)
            schemas = [pq.ParquetFile(f).schema_arrow for f in files]
            with staged_dir(root) as stage:
                _encode(spec, files, schemas, side, stage)
        return _open(spec, side, root)


# ------------------------------------------------------------------------------------------------ open
def _problem(root: Path) -> str | None:
    if not (root / MANIFEST).is_file():
        return "not built"
    try:
        man = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"manifest unreadable ({e})"
    if not isinstance(man, dict):
        return "manifest is not a JSON object"
    missing = [k for k in ("processor", "fingerprint", "nan_imputed", "join_coverage", "sizes", "sha256")
               if not isinstance(man.get(k), (str, dict))]
    if missing or man.get("format") != FORMAT or "labels.npy" not in man["sha256"]:
        return f"manifest incomplete or of another format (missing {missing})"
    return digest_problem(root, man["sha256"], man["sizes"])


def _open(spec: FeatureSpecSet, side: dict[str, pd.DataFrame], root: Path) -> Any:
    from appdistill.features.dataset import Dataset, encode_dense_table, encode_list_table

    man = json.loads((root / MANIFEST).read_text())
    col = lambda name: np.load(root / f"{name}.npy", mmap_mode="r", allow_pickle=False)  # noqa: E731
    proc = FeatureProcessor.from_json(man["processor"])
    proc.oov_missing = {f.name for f in spec.features if f.kind == "sparse_id" and f.missing == "oov"}
    splits = {k: col(f"split.{k}") for k in ("train", "valid", "test")}
    table_rows = {t: col(f"rows.{t}") for t in spec.tables}
    ds = Dataset(spec, dict(side), col("labels"), splits, proc, table_rows, col("user_ids"), col("item_ids"),
                 col("cold"), streamed=str(root))
    for f in spec.features:
        if f.kind == "sparse_id":
            ds.sparse[f.name] = col(f"sparse.{f.name}")
        elif f.kind == "id_list":
            ds.lists[f.name] = encode_list_table(proc, f, side[f.table])
        elif f.kind == "dense":
            ds.dense[f.name] = col(f"dense.{f.name}") if f.table == "interactions" else \
                encode_dense_table(proc, f, side[f.table], missing_row=True)
    proc.nan_imputed = dict(man["nan_imputed"])  # as counted while encoding (side tables: once)
    ds.fingerprint, ds.join_coverage = man["fingerprint"], man["join_coverage"]
    return ds


# ------------------------------------------------------------------------------------------------ encode
class _Columns:
    """``.npy`` files of ``n`` rows written a slice at a time (``open_memmap``)."""

    def __init__(self, d: Path, n: int) -> None:
        self.d, self.n, self.maps = d, n, {}

    def new(self, name: str, dtype: Any) -> np.ndarray:
        m = np.lib.format.open_memmap(self.d / f"{name}.npy", mode="w+", dtype=dtype, shape=(self.n,))
        self.maps[name] = m
        return m

    def save(self, name: str, arr: np.ndarray) -> None:
        np.save(self.d / f"{name}.npy", arr, allow_pickle=False)

    def release(self) -> None:
        """Unmap the pages written so far: written pages of a file mapping count in the resident set
        until unmapped, so without this encoding would hold every column whole (they stay in the page
        cache and reach the file)."""
        release_mapped(list(self.maps.values()))

    def flush(self) -> None:
        for m in self.maps.values():
            m.flush()
        self.release()
        self.maps.clear()


class _Counts:
    """Distinct values and how often each occurs, summed over chunks.

    Chunks' ``(values, counts)`` wait until they hold as many values as the merged part, then are
    merged in one sort: each value is re-sorted a logarithmic number of times, not once per chunk
    (merging every chunk into millions of ids made the pass quadratic in the chunks).
    """

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray]] = []
        self.waiting = 0
        self.merged: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, values: np.ndarray) -> None:
        u, c = np.unique(values, return_counts=True)
        self.parts.append((u, c))
        self.waiting += len(u)
        if self.merged is None or self.waiting >= len(self.merged[0]):
            self._merge()

    def _merge(self) -> None:
        parts = self.parts + ([self.merged] if self.merged is not None else [])
        if len(parts) == 1:
            self.merged = parts[0]
        else:
            u, inv = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
            c = np.bincount(inv, weights=np.concatenate([p[1] for p in parts]), minlength=len(u))
            self.merged = (u, c.astype(np.int64))
        self.parts, self.waiting = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sorted distinct values, their counts)``."""
        if self.parts or self.merged is None:
            self._merge()
        assert self.merged is not None
        return self.merged


def _chunks(files: list[Path], columns: list[str] | None, desc: str, n: int):
    """``(file, first row in the file, first global row, frame)`` of every chunk, in order."""
    import pyarrow.parquet as pq

    g, bar = 0, progress_bar(total=n, desc=desc, unit="rows", leave=False)
    try:
        for f in files:
            try:
                pf = pq.ParquetFile(f)
                r = 0
                for b in pf.iter_batches(batch_size=CHUNK_ROWS, columns=columns):
                    df = b.to_pandas()
                    yield f, r, g, df
                    r, g = r + len(df), g + len(df)
                    bar.update(len(df))
            except SpecError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged or unreadable part file, named
                raise SpecError(f"file '{f}': cannot be read as a parquet table: {e}") from e
    finally:
        bar.close()


def _encode(spec: FeatureSpecSet, files: list[Path], schemas: list[Any], side: dict[str, pd.DataFrame],
            out: Path) -> None:
    """Write every column of the streamed data set into ``out`` (a stage) and its manifest."""
    from appdistill.features.dataset import _hash_table, encode_dense_table, encode_list_table

    import pyarrow.parquet as pq

    iloc = table_location(spec, "interactions")
    names0 = schemas[0].names
    for f, sch in zip(files, schemas):
        if sch.names != names0:
            raise SpecError(f"file '{f}': columns {sch.names} differ from those of '{files[0]}' ({names0}); the parquet "
                            "files of a folder are one table")
    inter_feats = [f for f in spec.features if f.table == "interactions" and f.kind in ("sparse_id", "id_list", "dense")]
    for f in inter_feats:
        if f.kind == "id_list":
            raise SpecError(f"file '{iloc}', feature '{f.name}': an id_list feature on a streamed interactions table "
                            "is not supported; put it on a side table (items, users)")
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if n == 0:
        raise SpecError(f"file '{iloc}': table 'interactions' is empty")
    cols = _Columns(out, n)

    # 1. the split, from the one column it needs, by the in-memory split's own code
    s = spec.split
    need = [s.column] if s.by == "time" else [spec.item_key] if s.by == "cold_item" else []
    for c in need:
        if c not in names0:
            raise SpecError(f"file '{files[0]}': {'split' if s.by == 'time' else 'key'} column '{c}' is missing "
                            f"(columns: {names0})")
    frame = pd.concat([d for *_, d in _chunks(files, need, "split", n)], ignore_index=True) if need \
        else pd.DataFrame(index=pd.RangeIndex(n))
    splits = split_rows(spec, frame)
    del frame
    is_train = np.zeros(n, bool)
    is_train[splits["train"]] = True
    for k, v in splits.items():
        cols.save(f"split.{k}", v)

    # 2. pass 1: checks, labels, side rows, fingerprint, training counts and moments
    sides = [t for t in spec.tables if t != "interactions"]
    key_index = {t: KeyIndex(side[t][spec.tables[t].keys[0]]) for t in sides}
    labels = cols.new("labels", np.float32)
    rows = {t: cols.new(f"rows.{t}", np.int64) for t in sides}
    ident = cols.new("rows.interactions", np.int64)
    referenced = {t: np.zeros(len(side[t]), bool) for t in sides}
    matched = dict.fromkeys(sides, 0)
    counts: dict[str, _Counts] = {}
    is_int: dict[str, tuple[bool, Path]] = {}
    moments = {f.name: DenseMoments() for f in inter_feats if f.kind == "dense"}
    pre = {f.name: DenseTransform(f.name, f.transform) for f in inter_feats if f.kind == "dense"}
    keys_seen: dict[str, _Counts] = {}  # all keys (codes) and the training rows' items (cold)
    positives = 0
    h = hashlib.sha256(spec.fingerprint().encode())
    pending = sorted([*sides, "interactions"])
    while pending[0] != "interactions":  # the in-memory fingerprint hashes the tables in name order
        name = pending.pop(0)
        h.update(name.encode())
        h.update(_hash_table(side[name]).tobytes())
    h.update(pending.pop(0).encode())
    for f, r0, g0, df in _chunks(files, None, "encode 1/2", n):
        g1, loc = g0 + len(df), str(f)
        y = check_table(spec, "interactions", df, loc, first_row=r0, whole=False)
        assert y is not None
        tr = is_train[g0:g1]
        labels[g0:g1] = y
        positives += int(y.sum())
        ident[g0:g1] = np.arange(g0, g1, dtype=np.int64)
        for t in sides:
            k = spec.tables[t].keys[0]
            check_key_kinds(spec, t, df[k], side[t][k], loc)
            idx = key_index[t].get_indexer(df[k])
            ok = idx >= 0
            matched[t] += int(ok.sum())
            referenced[t][idx[ok & tr]] = True
            rows[t][g0:g1] = np.where(ok, idx, len(side[t]))
        h.update(_hash_table(df).tobytes())
        cols.release()
        for key, which in ((spec.user_key, None), (spec.item_key, None), (spec.item_key, tr)):
            name = key if which is None else "train:" + key
            v = df[key].to_numpy() if which is None else df[key].to_numpy()[which]
            keys_seen.setdefault(name, _Counts()).add(pd.unique(v))
        for feat in inter_feats:
            c = df[feat.col][tr]
            if feat.kind == "dense":
                moments[feat.name].add(pre[feat.name]._pre(c.to_numpy(np.float64, na_value=np.nan)))
                continue
            if feat.missing == "oov":
                c = c.dropna()
            ids = normalize_ids(c.reset_index(drop=True), what=f"file '{loc}', feature '{feat.name}', column '{feat.col}'")
            kind = ids.dtype != object
            if is_int.setdefault(feat.name, (kind, f))[0] != kind and len(ids):
                raise SpecError(f"file '{loc}', feature '{feat.name}', column '{feat.col}': ids are "
                                f"{'integers' if kind else 'strings'} here but {'strings' if kind else 'integers'} in "
                                f"file '{is_int[feat.name][1]}'; one feature's ids are one kind")
            counts.setdefault(feat.name, _Counts()).add(ids)
    if positives in (0, len(labels)) or not is_train.any():
        raise SpecError(one_class_message(f"file '{iloc}', column '{spec.tables['interactions'].label.column}'",
                                          float(labels[0])))
    for name in pending:
        h.update(name.encode())
        h.update(_hash_table(side[name]).tobytes())
    for k in ("train", "valid", "test"):
        h.update(splits[k].tobytes())
    coverage = {t: join_report(spec, t, matched[t], n, iloc, [], side[t][spec.tables[t].keys[0]].head(3).tolist())
                for t in sides}

    # the processor: side tables' features as for a file, the interactions' from counts and moments
    side_feats = [f for f in spec.features if f.table != "interactions" and f.kind in ("sparse_id", "id_list", "dense")]
    train_side = {t: side[t].iloc[np.flatnonzero(referenced[t])] for t in sides}
    proc = FeatureProcessor.fit(side_feats, train_side, {t: table_location(spec, t) for t in sides})
    for feat in inter_feats:
        if feat.kind == "dense":
            proc.dense[feat.name] = pre[feat.name].with_moments(moments[feat.name])
        else:
            if feat.missing == "oov":
                proc.oov_missing.add(feat.name)
            u, c_ = counts[feat.name].result() if feat.name in counts else (np.zeros(0, np.int64),) * 2
            proc.vocabs[feat.name] = Vocabulary.from_counts(feat, u, c_, is_int.get(feat.name, (True,))[0], iloc)
    order = [f.name for f in spec.features]
    proc.vocabs = {k: proc.vocabs[k] for k in order if k in proc.vocabs}
    proc.dense = {k: proc.dense[k] for k in order if k in proc.dense}
    for feat in side_feats:  # counted once per table (as for a file), not once per chunk
        if feat.kind == "dense":
            encode_dense_table(proc, feat, side[feat.table], missing_row=True)
        elif feat.kind == "id_list":
            encode_list_table(proc, feat, side[feat.table])

    # 3. pass 2: encoded features and key codes
    codes = {k: KeyIndex(keys_seen[k].result()[0]) for k in {spec.user_key, spec.item_key}}
    seen = np.zeros(len(codes[spec.item_key]), bool)
    seen[codes[spec.item_key].get_indexer(keys_seen["train:" + spec.item_key].result()[0])] = True
    user_ids, item_ids, cold = cols.new("user_ids", np.int64), cols.new("item_ids", np.int64), cols.new("cold", bool)
    sparse = {f.name: cols.new(f"sparse.{f.name}", np.int64) for f in spec.features if f.kind == "sparse_id"}
    dense = {f.name: cols.new(f"dense.{f.name}", np.float32) for f in inter_feats if f.kind == "dense"}
    side_ids = {f.name: np.append(proc.encode_sparse(f.name, side[f.table][f.col]), 0)
                for f in side_feats if f.kind == "sparse_id"}
    read = sorted({spec.user_key, spec.item_key, *(f.col for f in inter_feats)})
    for f, _, g0, df in _chunks(files, read, "encode 2/2", n):
        g1 = g0 + len(df)
        user_ids[g0:g1] = codes[spec.user_key].get_indexer(df[spec.user_key])
        it = codes[spec.item_key].get_indexer(df[spec.item_key])
        item_ids[g0:g1], cold[g0:g1] = it, ~seen[it]
        for feat in inter_feats:
            if feat.kind == "sparse_id":
                sparse[feat.name][g0:g1] = proc.encode_sparse(feat.name, df[feat.col].reset_index(drop=True))
            else:
                dense[feat.name][g0:g1] = proc.encode_dense(feat.name, df[feat.col].to_numpy())
        for feat in side_feats:
            if feat.kind == "sparse_id":
                sparse[feat.name][g0:g1] = side_ids[feat.name][rows[feat.table][g0:g1]]
        cols.release()
    cols.flush()
    names = sorted(p.name for p in out.glob("*.npy"))
    digests = file_digests(out, names)
    atomic_write_text(out / MANIFEST, json.dumps({
        "format": FORMAT, "rows": n, "files": [str(f) for f in files], "fingerprint": h.hexdigest()[:16],
        "processor": proc.to_json(), "nan_imputed": proc.nan_imputed, "join_coverage": coverage,
        "sizes": {k: (out / k).stat().st_size for k in names}, "sha256": digests}, indent=1))
    log.info("streamed %d interactions from %d files into %s", n, len(files), out)
