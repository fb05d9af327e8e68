"""Embedding store vs direct ``SentenceTransformer.encode`` on the ML-100K item texts.

Both paths use the same loaded all-MiniLM-L6-v2 model, the same texts (``feature_specs/ml100k.yaml``
feature ``title``: "<title>. <genres>") and the same batch size, in the same process; runs
alternate (direct, store, direct, store, ...) after a warm-up so neither side gets a cold or warm
advantage. The store path includes everything a user pays: input hashing, the weight-file hash,
encoding, the float16 memmap write, checksums and the atomic commit. Then a second build with
nothing changed (must encode 0 items) and an incremental build with 10 edited texts.

Usage:
    python benchmarks/bench_store.py --out runs/bench_store [--repeats 3] [--batch-size 64]

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_RATIO = 0.95


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="encode only the first N items (0 = all)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import numpy as np
    import torch

    from appdistill.features import FeatureSpecSet
    from appdistill.features.tables import load_tables
    from appdistill.foundation import ENCODERS, EmbeddingStore, feature_inputs

    spec = FeatureSpecSet.from_yaml(REPO / "feature_specs" / "ml100k.yaml")
    tables = load_tables(spec)
    ids, texts = feature_inputs(spec, tables, spec.feature("title"))
    if args.limit:
        ids, texts = ids[: args.limit], texts[: args.limit]
    n = len(texts)
    enc = ENCODERS.build("minilm", {"batch_size": args.batch_size})
    st = enc.model  # load once; both paths share it
    st.encode(texts[:128], batch_size=args.batch_size)  # warm-up (allocator, kernels)

    direct_s, store_s, roots = [], [], []
    ref = None
    for r in range(args.repeats):
        t = time.perf_counter()
        ref = st.encode(texts, batch_size=args.batch_size, show_progress_bar=False)
        direct_s.append(time.perf_counter() - t)
        root = out / f"store_run{r}"
        shutil.rmtree(root, ignore_errors=True)
        roots.append(root)
        store = EmbeddingStore(root, progress=False)
        t = time.perf_counter()
        entry = store.get_or_build(enc, "title", ids, texts)
        store_s.append(time.perf_counter() - t)
        assert entry.n_encoded == len(set(texts)), entry.n_encoded
        print(f"run {r}: direct {direct_s[-1]:.2f}s  store {store_s[-1]:.2f}s", flush=True)

    max_diff = float(np.abs(np.asarray(entry.matrix, np.float32) - ref).max())  # float16 storage

    # second build, nothing changed: a fresh encoder (as in a new process) must encode nothing
    fresh = ENCODERS.build("minilm", {"batch_size": args.batch_size})
    t = time.perf_counter()
    again = EmbeddingStore(roots[-1], progress=False).get_or_build(fresh, "title", ids, texts)
    second_s = time.perf_counter() - t

    # incremental: 10 edited item texts -> 10 encoded, the rest copied
    edited = list(texts)
    for i in range(0, 10 * (n // 10), n // 10):
        edited[i] = edited[i] + " (director's cut)"
    t = time.perf_counter()
    inc = EmbeddingStore(roots[-1], progress=False).get_or_build(enc, "title", ids, edited)
    inc_s = time.perf_counter() - t
    for root in roots[:-1]:
        shutil.rmtree(root, ignore_errors=True)

    d_med, s_med = statistics.median(direct_s), statistics.median(store_s)
    res = {
        "dataset": "ml100k", "field": "title", "model": "all-MiniLM-L6-v2", "items": n,
        "unique_texts": len(set(texts)), "batch_size": args.batch_size, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "direct_encode": {"seconds": direct_s, "items_per_s": n / d_med},
        "store_build": {"seconds": store_s, "items_per_s": n / s_med, "dtype": "float16"},
        "ratio_store_over_direct": round(d_med / s_med, 4),
        "target_ratio": TARGET_RATIO,
        "meets_target": d_med / s_med >= TARGET_RATIO,
        "max_abs_diff_vs_direct": max_diff,
        "second_build": {"encoded": again.n_encoded, "seconds": second_s, "model_loaded": fresh._model is not None},
        "incremental_10_edits": {"encoded": inc.n_encoded, "reused": inc.n_reused, "seconds": inc_s},
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    md = [
        "# Embedding store vs direct encode (ML-100K item texts, all-MiniLM-L6-v2)",
        "",
        f"{n} items, batch {args.batch_size}, {torch.get_num_threads()} torch threads, median of {args.repeats} "
        "alternating runs in one process.",
        "",
        "| path | median s | items/s |",
        "|---|---:|---:|",
        f"| `SentenceTransformer.encode` | {d_med:.2f} | {n / d_med:.1f} |",
        f"| `EmbeddingStore.get_or_build` (float16 memmap) | {s_med:.2f} | {n / s_med:.1f} |",
        "",
        f"- ratio store/direct (items/s): **{d_med / s_med:.3f}** (target >= {TARGET_RATIO})",
        f"- max |store - direct| (float16 storage): {max_diff:.2e}",
        f"- second build, nothing changed: encoded **{again.n_encoded}** items in {second_s:.2f}s "
        f"(model loaded: {fresh._model is not None})",
        f"- 10 edited texts: encoded {inc.n_encoded}, reused {inc.n_reused} rows in {inc_s:.2f}s",
        "",
    ]
    (out / "results.md").write_text("\n".join(md))
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
