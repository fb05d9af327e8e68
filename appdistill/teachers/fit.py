"""Save, reuse and load fitted teachers (the loop over a config's committee is ``appdistill.pipeline.fit_teachers``).

Layout of a run directory::

    <run_dir>/teachers/<name>/teacher.json   key, name, kwargs, identity (+ the teacher's own metadata)
                             /fit.json       fit fingerprint (config + spec + data), fit seconds
                             /metrics.json   {"test": {auc, logloss, cold: {auc, n}, ...}, "valid": {...},
                                              "fit_seconds": s}
                             /...            the teacher's artefacts (model.txt, model.pt, ...)

A teacher directory is reused instead of refitted when its ``fit.json`` fingerprint equals the one
of the current config entry, spec and data set, and the loaded teacher's identity equals the saved
one (so a truncated or edited artefact is refitted, never silently used).

Example:
    >>> t = load_teacher("runs/t", "dlrm", spec, ds)      # after `appdistill teachers fit`
    >>> t.predict(batch).logits.shape                      # [B]
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from appdistill.errors import AppDistillError, ConfigError
from appdistill.eval.metrics import evaluate_rows
from appdistill.features.dataset import Dataset
from appdistill.features.spec import FeatureSpec, FeatureSpecSet
from appdistill.io import atomic_write_text
from appdistill.teachers.base import TEACHERS, Teacher

log = logging.getLogger("appdistill.teachers")

FORMAT_VERSION = 1
TEACHER_JSON = "teacher.json"
FIT_JSON = "fit.json"
METRICS_JSON = "metrics.json"


class TeacherError(AppDistillError):
    """A saved teacher is missing, corrupt, or was fitted on differently encoded data."""


# ---------------------------------------------------------------------------------------- helpers
def jsonable(obj: Any) -> Any:
    """``obj`` after a JSON round trip (tuples -> lists), so identities compare equal after loading."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encoding_fingerprint(ds: Dataset, features: list[FeatureSpec]) -> str:
    """Hash of the fitted vocabularies / dense transforms of ``features``.

    A teacher maps *encoded* ids (embedding rows, categorical codes) to outputs, so it may only be
    applied to a data set whose processor encodes its features the same way.
    """
    proc = ds.processor
    payload = {f.name: (proc.vocabs[f.name].to_dict() if f.name in proc.vocabs
                        else proc.dense[f.name].to_dict() if f.name in proc.dense else f.kind)
               for f in features}
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())[:16]


def write_teacher_json(teacher: Teacher, path: Path, **extra: Any) -> None:
    """Write ``path/teacher.json``: what :func:`load_teacher` needs to find and check the teacher."""
    meta = {"format": FORMAT_VERSION, "key": teacher.key, "name": teacher.name, "kwargs": teacher.kwargs,
            "identity": teacher.identity(), "identity_hash": teacher.identity_hash(), **extra}
    atomic_write_text(path / TEACHER_JSON, json.dumps(jsonable(meta), indent=1, sort_keys=True))


def read_teacher_json(path: str | Path) -> dict[str, Any]:
    p = Path(path) / TEACHER_JSON
    if not p.is_file():
        raise TeacherError(f"directory '{path}': no {TEACHER_JSON} (not a saved teacher)")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise TeacherError(f"file '{p}': not valid JSON ({e})") from e
    if meta.get("format") != FORMAT_VERSION:
        raise TeacherError(f"file '{p}': format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    return meta


def restore(cls: type[Teacher], path: str | Path, spec: FeatureSpecSet, ds: Dataset) -> tuple[Any, dict[str, Any]]:
    """``(teacher, teacher.json)``: a ``cls`` rebuilt from the saved name and kwargs, its feature encoding
    checked against ``ds`` (the first step of every built-in teacher's ``load``)."""
    path = Path(path)
    meta = read_teacher_json(path)
    t = cls(spec, meta["name"], **meta["kwargs"])
    check_encoding(meta, ds, t.features, t.name)
    return t, meta


def check_encoding(meta: dict[str, Any], ds: Dataset, features: list[FeatureSpec], where: str) -> None:
    """Refuse to apply a teacher to a data set whose features are encoded differently."""
    want, got = meta.get("encoding"), encoding_fingerprint(ds, features)
    if want is not None and want != got:
        raise TeacherError(f"teacher '{where}': fitted on data encoded differently (vocabularies/transforms "
                           f"{want} vs {got}); refit it on this data set")


def fit_fingerprint(teacher: Teacher, ds: Dataset) -> str:
    """What a fit depends on: key, name, resolved config, spec, data (and extra inputs such as text)."""
    payload = {"key": teacher.key, "name": teacher.name, "kwargs": teacher.kwargs,
               "config": getattr(teacher, "config", None), "spec": teacher.spec.fingerprint(),
               "data": ds.fingerprint, "format": FORMAT_VERSION}
    extra = getattr(teacher, "input_fingerprint", None)
    if callable(extra):
        payload["inputs"] = extra(ds)
    return sha256_bytes(json.dumps(jsonable(payload), sort_keys=True).encode())[:16]


# ---------------------------------------------------------------------------------------- public API
def teacher_class(key: str, context: str = "") -> type[Teacher]:
    """The class registered as ``key``; a built-in module ``appdistill.teachers.<key>`` is imported on
    first use, so a teacher with heavy dependencies (foundation encoders) loads only when named."""
    if key not in TEACHERS and key.isidentifier():
        module = f"appdistill.teachers.{key}"
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    return TEACHERS.get(key, context=context)


def build_teacher(key: str, kwargs: dict[str, Any] | None, spec: FeatureSpecSet, name: str) -> Teacher:
    """``TEACHERS[key](spec, name=name, **kwargs)``; bad kwargs are a :class:`ConfigError`.

    (Not ``TEACHERS.build(..., name=name)``: ``Registry.build``'s own first parameter is ``name``.)
    """
    cls = teacher_class(key, context=f"teachers.{name}")
    try:
        return cls(spec, name=name, **(kwargs or {}))
    except TypeError as e:
        raise ConfigError(f"bad kwargs for teacher '{key}' in teachers.{name}: {e}") from e


def load_teacher(run_dir: str | Path, name: str, spec: FeatureSpecSet, ds: Dataset) -> Teacher:
    """Load teacher ``name`` from ``run_dir/teachers/<name>/`` (or from that directory itself).

    Raises:
        TeacherError: missing/corrupt files, unknown key, or a loaded identity that differs from the
            saved one (an edited or truncated artefact).
    """
    run_dir = Path(run_dir)
    path = run_dir / "teachers" / name
    if not (path / TEACHER_JSON).is_file() and (run_dir / TEACHER_JSON).is_file():
        path = run_dir
    meta = read_teacher_json(path)
    cls = teacher_class(meta["key"], context=f"{path / TEACHER_JSON}")
    try:
        teacher: Teacher = cls.load(path, spec, ds)
    except TeacherError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable artefact is reported with its directory
        raise TeacherError(f"teacher '{name}' in '{path}' cannot be loaded ({type(e).__name__}: {e})") from e
    if meta.get("identity_hash") and teacher.identity_hash() != meta["identity_hash"]:
        added = sorted(set(teacher.kwargs) - set(meta.get("kwargs") or {}))
        why = (f"saved by an older appdistill: its teacher '{meta['key']}' has gained the settings {added} since; "
               f"refit it with 'appdistill teachers fit'") if added else "artefact edited or corrupt"
        raise TeacherError(f"teacher '{name}' in '{path}': loaded identity {teacher.identity_hash()} differs "
                           f"from the saved {meta['identity_hash']} ({why})")
    return teacher


def evaluate_teacher(teacher: Teacher, ds: Dataset, k: int = 10) -> dict[str, Any]:
    """``{"test": {...}, "valid": {...}}`` via :func:`appdistill.eval.metrics.evaluate`."""
    out: dict[str, Any] = {}
    for split, full in (("test", True), ("valid", False)):
        rows = ds.splits[split]
        z = teacher.predict_all(ds, rows).logits.double().numpy()
        out[split] = evaluate_rows(z, ds, rows, k, full)
    return out


def saved_identity(path: Path) -> str | None:
    """``identity_hash`` recorded in a JSON file (``None`` when missing or unreadable)."""
    try:
        return json.loads(path.read_text()).get("identity_hash")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def reuse_fitted(run_dir: Path, name: str, spec: FeatureSpecSet, ds: Dataset,
               fp: str) -> tuple[Teacher, float] | None:
    """The saved teacher and its fit seconds when its fingerprint matches and it loads cleanly."""
    path = run_dir / "teachers" / name
    try:
        fit = json.loads((path / FIT_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if fit.get("fit_fingerprint") != fp:
        log.info("teacher %s: config, spec or data changed since %s was fitted; refitting", name, path)
        return None
    try:
        teacher = load_teacher(run_dir, name, spec, ds)
    except AppDistillError as e:
        log.warning("teacher %s: saved teacher unusable (%s); refitting", name, e)
        return None
    if teacher.identity_hash() != fit.get("identity_hash"):
        log.warning("teacher %s: identity differs from fit.json; refitting", name)
        return None
    return teacher, float(fit.get("fit_seconds", 0.0))
