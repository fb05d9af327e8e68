"""Pure-Python inspection of ``model.pt2`` and ``weights.pt`` before anything is deserialised:
an archive that would run code when loaded is refused (:class:`UnsafeArchiveError`).
"""

from __future__ import annotations

import io
import json
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any


from appdistill.errors import AppDistillError

# ---------------------------------------------------------------------------------------- archive check
_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_PT2_MEMBERS = re.compile(r"(models/\w+\.json|data/weights/\w+_weights_config\.json|"
                          r"data/constants/\w+_constants_config\.json|data/weights/weight_\d+|"
                          r"data/constants/tensor_\d+|data/sample_inputs/\w+\.pt)")
#: what the (weights-only) pickle of the sample inputs may name: tensors, their storages, dicts
_SAFE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                 ("collections", "OrderedDict"), ("torch", "device")}
_UNSAFE_OPS = {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "STACK_GLOBAL"}
#: guards and symbolic expressions are Python/sympy expressions that torch evaluates on load
_SAFE_EXPR = re.compile(r"[A-Za-z0-9_\[\]'\"().,:=<>!+\-*/%& |]*")


class UnsafeArchiveError(AppDistillError):
    """A ``model.pt2`` holds a pickled payload or something else that loading it would execute."""


def check_pt2_archive(path: str | Path) -> None:
    """Refuse a ``torch.export`` archive that would run code when loaded, without deserialising it.

    Only the members ``torch.export.save`` writes for a plain module are allowed; every weight and
    constant must be stored raw (``use_pickle: false``) as a tensor; the sample-input pickle may name
    only tensor-rebuilding globals (no ``INST``/``OBJ``/``STACK_GLOBAL``/extension opcodes); guard and
    expression strings may not use dunders or characters beyond arithmetic and indexing. A
    :class:`Ranker` never loads the archive anyway; this keeps a tampered one from being served or
    passed on.

    Raises:
        UnsafeArchiveError: naming the file and the member.
    """
    path = Path(path)

    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"file '{path}': refused: {why}; the export was tampered with or is not from "
                                  "`appdistill export` (re-export the run)")

    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise refuse(f"not a torch.export archive ({e})") from None
    with z:
        names = z.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise refuse(f"unexpected archive layout {sorted(roots)[:5]}")
        root = roots.pop() + "/"
        rel = {n[len(root):]: n for n in names}
        odd = sorted(r for r in rel if r not in _PT2_FIXED and not _PT2_MEMBERS.fullmatch(r))
        if odd:
            raise refuse(f"unexpected member(s) {odd[:5]} (custom objects, pickled weights or code)")
        for r, n in rel.items():
            if r.endswith("_config.json"):
                _check_payload_config(z, n, r, refuse)
            elif r.startswith("models/"):
                _check_program_json(z, n, refuse)
            elif r.startswith("data/sample_inputs/"):
                _check_weights_pickle(z.read(n), n, refuse)


def check_weights_file(path: str | Path) -> None:
    """Refuse a ``torch.save`` file (``weights.pt``) whose pickle names anything but tensors, storages and
    dicts -- checked without unpickling, before ``torch.load(weights_only=True)`` reads it."""
    path = Path(path)

    def refuse(why: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(f"file '{path}': refused: {why}; the export was tampered with (re-export the run)")

    _check_weights_pickle(path.read_bytes(), path.name, refuse)


def _json_member(z: zipfile.ZipFile, name: str, refuse: Any) -> Any:
    try:
        return json.loads(z.read(name))
    except (ValueError, UnicodeDecodeError) as e:
        raise refuse(f"member '{name}' is not valid JSON ({e})") from None


def _check_payload_config(z: zipfile.ZipFile, name: str, rel: str, refuse: Any) -> None:
    cfg = _json_member(z, name, refuse)
    entries = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(entries, dict):
        raise refuse(f"member '{name}' is not a payload config")
    prefix = "weight_" if rel.startswith("data/weights/") else "tensor_"
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise refuse(f"member '{name}' marks '{fqn}' as a pickled payload (use_pickle)")
        if not str(meta.get("path_name", "")).startswith(prefix) or not isinstance(meta.get("tensor_meta"), dict):
            raise refuse(f"member '{name}': '{fqn}' is not a raw tensor ({meta.get('path_name')!r})")


def _check_program_json(z: zipfile.ZipFile, name: str, refuse: Any) -> None:
    prog = _json_member(z, name, refuse)
    exprs: list[str] = list(prog.get("guards_code") or []) if isinstance(prog, dict) else []
    stack = [prog]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            if isinstance(o.get("expr_str"), str):
                exprs.append(o["expr_str"])
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    for e in exprs:
        if not isinstance(e, str) or "__" in e or not _SAFE_EXPR.fullmatch(e):
            raise refuse(f"member '{name}' holds an expression torch would evaluate that is not plain arithmetic: "
                         f"{str(e)[:80]!r}")


def _check_weights_pickle(data: bytes, name: str, refuse: Any) -> None:
    """A ``torch.save`` zip whose pickles name only tensor-rebuilding globals (what ``weights_only`` loads)."""
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise refuse(f"member '{name}' is not a torch.save archive (a bare pickle?)") from None
    with inner:
        for n in inner.namelist():
            if not n.endswith(".pkl"):
                continue
            try:
                for op, arg, _ in pickletools.genops(inner.read(n)):
                    if op.name in _UNSAFE_OPS:
                        raise refuse(f"member '{name}/{n}' uses the pickle opcode {op.name}")
                    if op.name == "GLOBAL":
                        mod, _, attr = str(arg).partition(" ")
                        if (mod, attr) not in _SAFE_GLOBALS and not (mod == "torch" and attr.endswith("Storage")):
                            raise refuse(f"member '{name}/{n}' pickles a reference to {mod}.{attr}")
            except UnsafeArchiveError:
                raise
            except Exception as e:  # noqa: BLE001 - a malformed pickle is refused, never loaded
                raise refuse(f"member '{name}/{n}' is not a readable pickle ({type(e).__name__}: {e})") from None


