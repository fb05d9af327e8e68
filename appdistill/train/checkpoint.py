"""Resumable training checkpoints.

``RUN_DIR/checkpoints/last.pt`` holds everything a run needs to continue as if it had never stopped:

- ``model``: the *unsharded* student state (gathered from the DMP shards), so a 2-rank run resumes on
  1 rank and back;
- ``optim``: the optimizer state in the same world-size-free form: Adagrad accumulators per
  embedding table (gathered from TorchRec's fused, sharded optimizer) and Adam moments per dense
  parameter name;
- ``method``: the training-only parameters, their optimizer and the method's own state (TAID's ``t``,
  gate counters);
- ``position``: epoch and batch within it (the loader's order is a pure function of seed and epoch),
  running loss sums, history, best-epoch state, seconds and samples so far;
- ``rng``: python, numpy and torch generator states of every rank (restored only when the world
  size is unchanged; otherwise each rank is re-seeded from ``seed``, rank and step);
- ``identity``: spec and data fingerprints, teacher identities, student and method config. Resuming
  with a different identity is refused: the checkpoint would silently train another experiment.

Writes are atomic and carry a content checksum (``appdistill.io``); loading uses
``torch.load(weights_only=True)`` and refuses a checkpoint that fails its checksum. A ``--resume``
whose identity changed is refused before the run directory is written (:func:`precheck_resume`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from appdistill.distributed import DistContext, full_state_dict
from appdistill.errors import AppDistillError
from appdistill.io import load_checkpoint, save_checkpoint

RESUME_FILE = "checkpoints/last.pt"


@dataclass
class Position:
    """Where training stands. ``step_in_epoch == steps_per_epoch`` means the epoch's batches are done
    but its evaluation is not."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # steps that logged each term (some skip steps)
    history: list[dict[str, Any]] = field(default_factory=list)
    step_log: list[dict[str, float]] = field(default_factory=list)
    best_auc: float = float("-inf")
    best_epoch: int = -1
    train_seconds: float = 0.0
    samples: int = 0


def _name(k: str) -> str:
    """Parameter / optimizer key without wrapper prefixes (DMP, DDP, CombinedOptimizer)."""
    for p in ("embedding.", "dense."):
        if k.startswith(p):
            k = k[len(p):]
            break
    return k.replace("_dmp_wrapped_module.", "").replace("module.", "")


def _gather_sharded(local: dict[str, Any], ctx: DistContext) -> dict[str, torch.Tensor] | None:
    """``{name: ShardedTensor}`` on each rank (each rank may own different tables) -> full tensors on
    rank 0. Shards travel with their offsets, so any sharding layout (table/row/column-wise) works."""
    mine: dict[str, Any] = {}
    for name, st in local.items():
        shards = [(list(s.metadata.shard_offsets), s.tensor.detach().cpu()) for s in st.local_shards()]
        mine[name] = (list(st.size()), st.dtype, shards)
    allp: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(allp, mine)  # between our own ranks only
    if not ctx.is_main:
        return None
    out: dict[str, torch.Tensor] = {}
    for part in allp:
        for name, (size, dtype, shards) in part.items():
            full = out.setdefault(name, torch.zeros(size, dtype=dtype))
            for off, t in shards:
                full[tuple(slice(o, o + s) for o, s in zip(off, t.shape))] = t
    return out


def optimizer_state(opt: Any, ctx: DistContext) -> dict[str, Any] | None:
    """World-size-free optimizer state (rank 0; ``None`` elsewhere). Collective under torchrun.

    Returns ``{"embedding": {table weight name: Adagrad sum [rows, dim]}, "dense": {param name:
    {"step", "exp_avg", "exp_avg_sq"}}}``.
    """
    sd = opt.state_dict()["state"]
    emb: dict[str, torch.Tensor] = {}
    sharded: dict[str, Any] = {}
    dense: dict[str, dict[str, torch.Tensor]] = {}
    for key, st in sd.items():
        name = _name(key)
        if key.startswith("embedding."):
            for k, v in st.items():
                if hasattr(v, "local_shards"):  # fused TorchRec optimizer: "<table>.momentum1"
                    sharded[name] = v
                elif k == "sum":
                    emb[name] = v.detach().cpu().clone()
        else:
            dense[name] = {k: v.detach().cpu().clone() for k, v in st.items()}
    if ctx.is_dist:
        full = _gather_sharded(sharded, ctx)
        if not ctx.is_main:
            return None
        emb.update(full or {})  # DMP embedding gradients are at single-process scale
    return {"embedding": emb, "dense": dense}



def load_optimizer_state(opt: Any, state: dict[str, Any], ctx: DistContext) -> None:
    """Copy a :func:`optimizer_state` dict into ``opt`` in place (each rank its own shards)."""
    # torch optimizers create their state lazily: a zero-gradient step makes it exist (the caller
    # loads the model weights afterwards), then it is overwritten in place. TorchRec's fused
    # embedding optimizer always has its state.
    for key, sub in opt.optimizers:
        if not (ctx.is_dist and key == "embedding"):
            sub.init_state()
    sd = opt.state_dict()["state"]
    for key, st in sd.items():
        name = _name(key)
        src = state["embedding"].get(name) if key.startswith("embedding.") else state["dense"].get(name)
        if src is None:
            raise AppDistillError(f"checkpoint has no optimizer state for parameter '{name}'")
        for k, v in st.items():
            if hasattr(v, "local_shards"):
                for shard in v.local_shards():
                    sl = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets,
                                                               shard.metadata.shard_sizes))
                    shard.tensor.detach().copy_(src[sl])
            elif key.startswith("embedding."):
                if k == "sum":
                    v.detach().copy_(src)
                elif k == "step":
                    v.detach().fill_(0)  # Adagrad's step only feeds lr_decay, which is 0
            else:
                v.detach().copy_(src[k])


# ------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states as tensors/lists (``weights_only``-loadable)."""
    ver, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [ver, list(internal), gauss], "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_rng_state(s: dict[str, Any]) -> None:
    ver, internal, gauss = s["python"]
    random.setstate((ver, tuple(internal), gauss))
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(s["torch"])


def gather_rng(ctx: DistContext) -> list[dict[str, Any]] | None:
    mine = rng_state()
    if not ctx.is_dist:
        return [mine]
    allp: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(allp, mine)
    return allp if ctx.is_main else None


# ------------------------------------------------------------------ save / load
def identity(cfg: Any, spec_fingerprint: str, data_fingerprint: str, teachers: dict[str, Any],
             streamed: bool = False) -> dict[str, Any]:
    """What must not change between a checkpoint and the run that resumes it. ``streamed``: the data set
    is a folder of parquet files (``train.shuffle: auto`` then means blocks: another epoch order)."""
    ident = {"spec_fingerprint": spec_fingerprint, "data_fingerprint": data_fingerprint,
             "teachers": json.loads(json.dumps(teachers, default=str)),
             "student": cfg.stable_dump()["student"], "method": cfg.method.model_dump(),
             "batch_size": cfg.train.batch_size, "seed": cfg.seed}
    if cfg.train.block_shuffle(streamed):
        ident["shuffle"] = "blocks"  # only then: checkpoints of full-permutation runs keep their identity
    return ident


def save_resume(path: Path, *, model: dict[str, torch.Tensor], optim: dict[str, Any], method: dict[str, Any],
                position: Position, rng: list[dict[str, Any]], ident: dict[str, Any],
                best_state: dict[str, torch.Tensor] | None, config: dict[str, Any]) -> None:
    save_checkpoint(path, {"format": 1, "model": model, "optim": optim, "method": method,
                           "position": asdict(position), "rng": rng, "identity": ident,
                           "best_state": best_state, "config": config})


_WHAT = {"spec_fingerprint": "feature spec", "data_fingerprint": "data (tables or split)",
         "teachers": "teacher set", "student": "student architecture", "method": "method or its kwargs",
         "batch_size": "global batch size", "seed": "seed", "shuffle": "training order (train.shuffle)"}


def _compare(path: Path, old: dict[str, Any], ident: dict[str, Any]) -> None:
    """Raise naming the first identity field of ``ident`` that differs from the checkpoint's ``old``."""
    for key, what in _WHAT.items():
        # "shuffle" is recorded only for block shuffles: compare it either way round
        if (key in ident or key == "shuffle") and old.get(key) != ident.get(key):
            detail = ""
            if key == "teachers":
                a, b = set(old.get(key) or {}), set(ident.get(key) or {})
                detail = (f" (checkpoint: {sorted(a)}, now: {sorted(b)})" if a != b
                          else " (same names, different fitted teachers)")
            raise AppDistillError(
                f"file '{path}': cannot resume: the {what} differs from the checkpoint's{detail}; "
                "start a new run directory or restore the original inputs")


def load_resume(path: Path, ident: dict[str, Any]) -> dict[str, Any]:
    """Read ``path`` and refuse it when its identity differs from ``ident`` (names what changed)."""
    ck = load_checkpoint(path, warn_unverified=True)
    if ck.get("format") != 1 or "identity" not in ck:
        raise AppDistillError(f"file '{path}': not an appdistill resume checkpoint")
    _compare(path, ck["identity"], ident)
    ck["position"] = Position(**ck["position"])
    return ck


def precheck_resume(path: Path, cfg: Any, spec_fingerprint: str, data_fingerprint: str, teachers_dir: Path,
                    streamed: bool = False) -> None:
    """Refuse a resume whose identity changed *before* the run writes anything (``train --resume``).

    :func:`load_resume` checks again once the committee is loaded; this early check needs no teacher
    loaded and no cache built: the teachers' identities come from their ``teacher.json`` (equal to the
    loaded ones, or loading them fails). A teacher without a readable ``teacher.json`` leaves the
    teacher set to the later check.
    """
    ck = load_checkpoint(path)  # (load_resume warns about an unverifiable one)
    if not isinstance(ck, dict) or ck.get("format") != 1 or not isinstance(ck.get("identity"), dict):
        raise AppDistillError(f"file '{path}': not an appdistill resume checkpoint")
    ident = identity(cfg, spec_fingerprint, data_fingerprint, {}, streamed)
    if cfg.method.key == "none" or not cfg.teachers:
        pass  # no committee: the identity's teacher set is empty
    else:
        found = {}
        for name in cfg.teachers:
            try:
                meta = Path(teachers_dir) / "teachers" / name / "teacher.json"
                found[name] = json.loads(meta.read_text())["identity"]
            except (OSError, ValueError, KeyError, TypeError):
                found = None
                break
        if found is None:
            ident.pop("teachers")
        else:
            ident["teachers"] = json.loads(json.dumps(found, default=str))
    _compare(path, ck["identity"], ident)


def save_resume_collective(path: Path, model: torch.nn.Module, opt: Any, method: torch.nn.Module,
                           method_opt: torch.optim.Optimizer | None, position: Position, ident: dict[str, Any],
                           best_state: dict[str, torch.Tensor] | None, config: dict[str, Any],
                           ctx: DistContext) -> None:
    """Gather every rank's part and write ``path`` on rank 0 (collective under torchrun)."""
    full = full_state_dict(model, ctx)
    optim = optimizer_state(opt, ctx)
    rng = gather_rng(ctx)
    if not ctx.is_main:
        return
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    mstate = {"params": {k: v.detach().cpu().clone() for k, v in method.state_dict().items() if k in trainable},
              "optim": method_opt.state_dict() if method_opt is not None else None,
              "state": method.state()}
    assert full is not None and optim is not None and rng is not None
    save_resume(path, model=full, optim=optim, method=mstate, position=position, rng=rng, ident=ident,
                best_state=best_state, config=config)
