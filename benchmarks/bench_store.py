"""Embedding store vs direct ``SentenceTransformer.encode`` on the ML-100K item texts.

Both paths use the same loaded all-MiniLM-L6-v2 model, the same texts (``feature_specs/ml100k.yaml``
feature ``title``: "<title>. <genres>") and the same batch size, in the same process. The store path
includes everything a user pays: input hashing, the weight-file hash, encoding, the float16 memmap
write, checksums, fsync and the atomic commit.

Two measurements, because the machine is shared (other processes come and go):

- *paired* (the headline): the catalogue split into chunks; each chunk is encoded by both paths
  back to back (order alternating), so a burst of outside load hits both sides alike. Each chunk
  is its own fresh store, so the store pays its fixed per-build cost once per chunk (conservative
  for the store). ``ratio_store_over_direct`` = median over chunk pairs of direct s / store s.
- *whole*: the full catalogue, runs in ABBA order (direct, store, store, direct, ...), best of N;
  on a quiet machine this is the cleanest number, on a busy one it is whichever run was lucky.

Then a second build with nothing changed (must encode 0 items, and never load the model) and an
incremental build with 10 edited texts.

Usage:
    python benchmarks/bench_store.py --out runs/bench_store [--repeats 4] [--chunks 8] [--batch-size 64]

Writes ``OUT/results.json`` and ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
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
    ap.add_argument("--repeats", type=int, default=4, help="whole-catalogue runs of each path (ABBA order)")
    ap.add_argument("--chunks", type=int, default=8, help="chunks of the paired measurement (0 = skip)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the paired measurement")
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
    ids, texts = feature_inputs(spec, load_tables(spec), spec.feature("title"))
    if args.limit:
        ids, texts = ids[: args.limit], texts[: args.limit]
    n, bs = len(texts), args.batch_size
    enc = ENCODERS.build("minilm", {"batch_size": bs})
    st = enc.model  # load once; both paths share it
    st.encode(texts[:128], batch_size=bs)  # warm-up (allocator, kernels)
    scratch = out / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    builds = iter(range(10**6))

    def direct(i: int, j: int) -> tuple[float, np.ndarray]:
        t = time.perf_counter()
        emb = st.encode(texts[i:j], batch_size=bs, show_progress_bar=False)
        return time.perf_counter() - t, emb

    def stored(i: int, j: int) -> tuple[float, object]:
        store = EmbeddingStore(scratch / f"build{next(builds)}", progress=False)
        t = time.perf_counter()
        entry = store.get_or_build(enc, "title", ids[i:j], texts[i:j])
        secs = time.perf_counter() - t
        assert entry.n_encoded == len(set(texts[i:j])), entry.n_encoded
        return secs, entry

    # noise-free view of the work: tokens each path feeds the model (batches padded to their longest)
    token_ids = st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"]
    tok_len = np.array([len(x) for x in token_ids])

    def padded(order: np.ndarray) -> int:
        return int(sum(tok_len[order[s:s + bs]].max() * len(order[s:s + bs]) for s in range(0, n, bs)))

    padded_tokens = {"real": int(tok_len.sum()),
                     "direct_char_sorted": padded(np.argsort([-len(x) for x in texts], kind="stable")),
                     "store_token_sorted": padded(np.argsort(-tok_len, kind="stable"))}

    load_before = os.getloadavg()[0]
    whole_d, whole_s = [], []
    for r in range(args.repeats):  # ABBA: direct first on even runs, store first on odd runs
        first_direct = r % 2 == 0
        for side in ("d", "s") if first_direct else ("s", "d"):
            if side == "d":
                secs, ref = direct(0, n)
                whole_d.append(secs)
            else:
                secs, entry = stored(0, n)
                whole_s.append(secs)
        print(f"whole run {r}: direct {whole_d[-1]:.2f}s  store {whole_s[-1]:.2f}s", flush=True)
    max_diff = float(np.abs(np.asarray(entry.matrix, np.float32) - ref).max())  # float16 storage

    paired_d, paired_s, pair_ratios = [], [], []
    if args.chunks:
        edges = np.linspace(0, n, args.chunks + 1).astype(int)
        for r in range(args.rounds):
            td = ts = 0.0
            for c in range(args.chunks):
                i, j = int(edges[c]), int(edges[c + 1])
                if (c + r) % 2 == 0:
                    d_c, s_c = direct(i, j)[0], stored(i, j)[0]
                else:
                    s_c, d_c = stored(i, j)[0], direct(i, j)[0]
                td, ts = td + d_c, ts + s_c
                pair_ratios.append(d_c / s_c)
            paired_d.append(td)
            paired_s.append(ts)
            print(f"paired round {r}: direct {td:.2f}s  store {ts:.2f}s", flush=True)

    # second build, nothing changed: a fresh encoder (as in a new process) must encode nothing
    last = entry.path.parents[3]  # <root>/<field>/<encoder>/<output>/matrix.npy
    fresh = ENCODERS.build("minilm", {"batch_size": bs})
    t = time.perf_counter()
    again = EmbeddingStore(last, progress=False).get_or_build(fresh, "title", ids, texts)
    second_s = time.perf_counter() - t

    # incremental: 10 edited item texts -> 10 encoded, the rest copied
    edited = list(texts)
    for i in range(0, 10 * (n // 10), n // 10):
        edited[i] = edited[i] + " (director's cut)"
    t = time.perf_counter()
    inc = EmbeddingStore(last, progress=False).get_or_build(enc, "title", ids, edited)
    inc_s = time.perf_counter() - t
    shutil.rmtree(scratch, ignore_errors=True)

    # best-of-N is the least disturbed by other processes; the paired total cancels bursts
    d_best, s_best = min(whole_d), min(whole_s)
    ratio_whole = d_best / s_best
    # median over chunk pairs: a burst of outside load spoils one pair, not the estimate
    ratio_paired = statistics.median(pair_ratios) if pair_ratios else None
    ratio = ratio_paired if ratio_paired is not None else ratio_whole
    res = {
        "dataset": "ml100k", "field": "title", "model": "all-MiniLM-L6-v2", "items": n,
        "unique_texts": len(set(texts)), "batch_size": bs, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "direct_encode": {"items_per_s": n * len(paired_d) / sum(paired_d) if paired_d else n / d_best},
        "store_build": {"items_per_s": n * len(paired_s) / sum(paired_s) if paired_s else n / s_best,
                        "dtype": "float16"},
        "ratio_store_over_direct": round(ratio, 4),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "paired": {"chunks": args.chunks, "rounds": args.rounds, "direct_seconds": paired_d,
                   "store_seconds": paired_s, "pair_ratios": [round(x, 4) for x in pair_ratios],
                   "ratio_of_totals": round(sum(paired_d) / sum(paired_s), 4) if paired_d else None},
        "whole": {"direct_seconds": whole_d, "store_seconds": whole_s, "direct_items_per_s_best": n / d_best,
                  "store_items_per_s_best": n / s_best, "ratio_best": round(ratio_whole, 4)},
        "padded_tokens": padded_tokens,
        "max_abs_diff_vs_direct": max_diff,
        "second_build": {"encoded": again.n_encoded, "seconds": second_s, "model_loaded": fresh._model is not None},
        "incremental_10_edits": {"encoded": inc.n_encoded, "reused": inc.n_reused, "seconds": inc_s},
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    paired_line = "" if ratio_paired is None else (
        f"- paired ({args.chunks} chunks x {args.rounds} rounds, each chunk a fresh store): direct "
        f"{sum(paired_d):.2f}s vs store {sum(paired_s):.2f}s in total; median over the "
        f"{len(pair_ratios)} chunk pairs of store/direct items/s: **{ratio_paired:.3f}** (target >= {TARGET_RATIO})")
    md = [
        "# Embedding store vs direct encode (ML-100K item texts, all-MiniLM-L6-v2)",
        "",
        f"{n} items ({len(set(texts))} unique texts), batch {bs}, {torch.get_num_threads()} torch threads on "
        f"{os.cpu_count()} cores; 1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
        "(shared machine).",
        "",
        "| path | best s (whole catalogue) | items/s | all runs (s) |",
        "|---|---:|---:|---|",
        f"| `SentenceTransformer.encode` | {d_best:.2f} | {n / d_best:.1f} | "
        f"{', '.join(f'{x:.2f}' for x in whole_d)} |",
        f"| `EmbeddingStore.get_or_build` (float16 memmap) | {s_best:.2f} | {n / s_best:.1f} | "
        f"{', '.join(f'{x:.2f}' for x in whole_s)} |",
        "",
        paired_line,
        f"- whole catalogue, best of {args.repeats} each: ratio {ratio_whole:.3f}",
        f"- tokens fed to the model (padded): direct {padded_tokens['direct_char_sorted']}, store "
        f"{padded_tokens['store_token_sorted']} (real tokens {padded_tokens['real']})",
        f"- max |store - direct| (float16 storage): {max_diff:.2e}",
        f"- second build, nothing changed: encoded **{again.n_encoded}** items in {second_s:.2f}s "
        f"(model loaded: {fresh._model is not None})",
        f"- 10 edited texts: encoded {inc.n_encoded}, reused {inc.n_reused} rows in {inc_s:.2f}s",
        "",
        "The store sorts texts by token count (sentence-transformers sorts by characters), which packs "
        "batches with less padding; everything else (hashing, float16 write, sha256, fsync) is small.",
        "",
    ]
    (out / "results.md").write_text("\n".join(x for x in md if x is not None))
    print("\n".join(md))
    return res


if __name__ == "__main__":
    main()
