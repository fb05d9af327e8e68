"""Optional experiment tracking with MLflow (config section ``tracking:``, off by default).

``train()`` logs through a :class:`Tracker`: the resolved config as params, per-step loss terms,
per-epoch validation metrics, the final ``metrics.json`` values and the run directory's files as
artefacts. With tracking off (or on ranks other than 0) it gets a :class:`NullTracker` that does
nothing, so the loop never asks whether tracking is on.

The default store is a local MLflow *file store*, ``./mlruns`` relative to the current working
directory (``tracking.uri`` picks another path or any MLflow URI, e.g. ``sqlite:///mlflow.db`` or
``http://host:5000``). MLflow 3 keeps the file store in maintenance mode and refuses to open it unless
``MLFLOW_ALLOW_FILE_STORE=true``; :func:`make_tracker` sets that variable (when unset) for file-store
URIs only. Browse the runs with the full ``mlflow`` package::

    MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri ./mlruns

The run's id is written to ``RUN_DIR/tracking.json`` so that later steps (the pipeline's export, a
resumed training) log into the same MLflow run (:func:`reopen_tracker`).

Tracking is best effort: once the run exists, a failing log call warns and training goes on.

Example:
    >>> from appdistill.config import load_config
    >>> cfg = load_config("configs/ml100k_plain.yaml", ["tracking.enabled=true"])
    >>> tracker = make_tracker(cfg, "runs/plain", is_main=True)
    >>> tracker.log_step(1, {"loss": 0.69, "loss_bce": 0.69})
    >>> tracker.log_metrics({"test": {"auc": 0.78, "ndcg@10": 0.41}})  # -> test.auc, test.ndcg_at_10
    >>> tracker.close("FINISHED")
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from appdistill.errors import ConfigError

TRACKING_FILE = "tracking.json"
#: what the ConfigError tells a user without mlflow to install (keep in step with pyproject.toml)
MLFLOW_REQUIREMENT = "mlflow-skinny>=3.1,<4"
DEFAULT_STORE = "mlruns"
# MLflow's limits (mlflow.utils.validation), repeated so that flattening needs no mlflow import
MAX_KEY_LENGTH = 250
MAX_PARAM_VAL_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
STATUSES = ("FINISHED", "FAILED", "KILLED")


class Tracker:
    """Where ``train()`` sends what it logs. This base class logs nothing (see :class:`NullTracker`).

    Example:
        >>> t = NullTracker()
        >>> t.log_params({"train.lr": "0.001"})
        >>> t.log_step(10, {"loss": 0.52})
        >>> t.close("FINISHED")
    """

    #: the MLflow run id, ``None`` when nothing is tracked
    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log run parameters.

        Args:
            params: flat ``{name: value}``; values are stringified and cut to MLflow's limit.
        """

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        """Log scalar values at one training step (or epoch: any monotone ``step``).

        Args:
            step: the x-axis value (the global step, or the epoch number for per-epoch values).
            values: ``{name: number}``; NaN, infinities and non-numbers are skipped.
        """

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Log final metrics, flattening nested dicts to dotted keys (``{"test": {"auc": x}}`` -> ``test.auc``).

        Args:
            metrics: possibly nested dict (e.g. ``metrics.json``); non-numbers and NaN are skipped.
        """

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy one local file into the run's artefacts.

        Args:
            path: the file; a missing file is skipped with a warning.
            artifact_path: folder inside the run's artefacts (default: their root).
        """

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Copy a local directory's contents into the run's artefacts.

        Args:
            directory: the folder; a missing folder is skipped with a warning.
            artifact_path: folder inside the run's artefacts (default: their root).
        """

    def close(self, status: str = "FINISHED") -> None:
        """End the run (idempotent).

        Args:
            status: ``"FINISHED"``, ``"FAILED"`` or ``"KILLED"``.
        """

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


class NullTracker(Tracker):
    """Tracking off (or not rank 0): every call is a no-op."""


class MLflowTracker(Tracker):
    """Logs into one MLflow run through ``mlflow.MlflowClient`` (no global ``mlflow.active_run``).

    Args:
        tracking_uri: an MLflow tracking URI (see :func:`resolve_tracking_uri`).
        experiment: experiment name, created when missing.
        run_name: the new run's name (``train()`` uses the run directory's name).
        run_id: attach to this existing run instead of creating one.
        tags: tags of a new run.
        owns_run: whether :meth:`close` ends the run (``False`` to add to a finished run).

    Example:
        >>> t = MLflowTracker("file:///tmp/mlruns", "demo", run_name="plain")
        >>> t.log_params({"train.lr": 0.001})
        >>> t.log_step(1, {"loss": 0.69})
        >>> t.close()
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str | None = None, *,
                 run_id: str | None = None, tags: Mapping[str, str] | None = None, owns_run: bool = True) -> None:
        mlflow = import_mlflow()
        from mlflow.exceptions import MlflowException

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.owns_run = owns_run
        self._closed = False
        self._warned: set[str] = set()
        try:
            self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
            if run_id is not None:
                run = self.client.get_run(run_id)
                self.run_id = run.info.run_id
                self.experiment_id = run.info.experiment_id
                if owns_run and run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
            else:
                self.experiment_id = self._experiment_id(experiment)
                run = self.client.create_run(self.experiment_id, run_name=run_name, tags=dict(tags or {}))
                self.run_id = run.info.run_id
        except MlflowException as e:
            raise ConfigError(f"tracking: MLflow at '{tracking_uri}' cannot open "
                              f"{'run ' + run_id if run_id else 'experiment ' + repr(experiment)}: {e}") from e

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another process created it in between
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run one logging call; a failure warns (once per kind of call) instead of stopping training."""
        if self._closed and self.owns_run:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must not end a training run
            if what not in self._warned:
                self._warned.add(what)
                warnings.warn(f"MLflow {what} failed (run {self.run_id}), going on without it: {e}",
                              RuntimeWarning, stacklevel=3)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = {sanitize_key(k): truncate(str(v), MAX_PARAM_VAL_LENGTH) for k, v in params.items()}
        # MLflow refuses to change a logged param; on a reattached run keep the first value
        known = self._existing_params()
        changed = sorted(k for k, v in items.items() if k in known and known[k] != v)
        if changed:
            warnings.warn(f"MLflow run {self.run_id}: params {changed} differ from the logged ones; "
                          "keeping the first values", RuntimeWarning, stacklevel=2)
        todo = [Param(k, v) for k, v in items.items() if k not in known]
        for i in range(0, len(todo), MAX_PARAMS_PER_BATCH):
            self._safe("log_params", self.client.log_batch, self.run_id, params=todo[i:i + MAX_PARAMS_PER_BATCH])

    def _existing_params(self) -> dict[str, str]:
        try:
            return dict(self.client.get_run(self.run_id).data.params)
        except Exception:  # noqa: BLE001
            return {}

    def log_step(self, step: int, values: Mapping[str, float]) -> None:
        self._log_numbers(dict(values), int(step), "log_step")

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        self._log_numbers(flatten(metrics), 0, "log_metrics")

    def _log_numbers(self, values: Mapping[str, Any], step: int, what: str) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(sanitize_key(k), x, ts, step) for k, v in values.items() if (x := as_number(v)) is not None]
        for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
            self._safe(what, self.client.log_batch, self.run_id, metrics=ms[i:i + MAX_METRICS_PER_BATCH])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(path).is_file():
            warnings.warn(f"MLflow: no file '{path}' to log as an artefact", RuntimeWarning, stacklevel=2)
            return
        self._safe("log_artifact", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        if not Path(directory).is_dir():
            warnings.warn(f"MLflow: no folder '{directory}' to log as artefacts", RuntimeWarning, stacklevel=2)
            return
        self._safe("log_artifacts", self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        if status not in STATUSES:
            raise ValueError(f"status {status!r}: expected one of {STATUSES}")
        if self.owns_run:
            self._safe("close", self.client.set_terminated, self.run_id, status)
        self._closed = True


def import_mlflow() -> Any:
    """``import mlflow``, or a :class:`ConfigError` that says how to install it."""
    try:
        import mlflow
    except ImportError as e:
        raise ConfigError(
            "tracking.enabled is true but the 'mlflow' package is not installed: install it with "
            f"`pip install '{MLFLOW_REQUIREMENT}'` (or `pip install -e '.[tracking]'`), "
            f"or set tracking.enabled=false ({e})") from e
    return mlflow


def resolve_tracking_uri(uri: str | None) -> str:
    """The MLflow tracking URI for ``tracking.uri``.

    Args:
        uri: ``None`` (``./mlruns``), a local path or ``file:`` URI (resolved against the current
            working directory), or any other MLflow URI (``sqlite:///x.db``, ``http://host:5000``),
            returned unchanged.

    Example:
        >>> resolve_tracking_uri(None)          # in /srv/app
        'file:///srv/app/mlruns'
    """
    if uri is None or not uri.strip():
        return (Path.cwd() / DEFAULT_STORE).resolve().as_uri()
    uri = uri.strip()
    if uri.startswith("file:") and not uri.startswith("file://"):
        uri = uri[len("file:"):]  # file:./mlruns
    elif uri.startswith("file://"):
        return uri
    if len(urlparse(uri).scheme) > 1:  # sqlite:, http:, databricks: (one letter would be a drive)
        return uri
    return Path(uri).expanduser().resolve().as_uri()


def is_file_store(uri: str) -> bool:
    return uri.startswith("file:")


def make_tracker(cfg: Any, run_dir: str | Path, is_main: bool, *, resume: bool = False) -> Tracker:
    """The tracker ``train()`` logs to: an :class:`MLflowTracker` on rank 0 when ``cfg.tracking.enabled``.

    Creates (or, when ``resume`` and ``RUN_DIR/tracking.json`` names a run in the same store,
    reopens) the MLflow run and writes ``RUN_DIR/tracking.json``. The run is named after the run
    directory, in experiment ``cfg.tracking.experiment`` (default ``cfg.name``).

    Args:
        cfg: the ``ExperimentConfig``.
        run_dir: the run directory (must exist on rank 0).
        is_main: whether this process is rank 0; other ranks get a :class:`NullTracker`.
        resume: training resumes from a checkpoint: continue the recorded MLflow run.

    Raises:
        ConfigError: tracking is on but ``mlflow`` is not installed, or the store cannot be opened.

    Example:
        >>> tracker = make_tracker(cfg, run_dir, ctx.is_main)
        >>> try:
        ...     ...  # train, tracker.log_step(step, {...})
        ... finally:
        ...     tracker.close("FINISHED")
    """
    t = cfg.tracking
    if not t.enabled:
        return NullTracker()
    import_mlflow()  # on every rank: under torchrun all of them stop with the error, none waits for rank 0
    if not is_main:
        return NullTracker()
    run_dir = Path(run_dir).resolve()
    uri = resolve_tracking_uri(t.uri)
    if is_file_store(uri):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses the file store otherwise
    experiment = t.experiment or cfg.name
    previous = read_tracking_file(run_dir) if resume else None
    tracker: MLflowTracker | None = None
    if previous and previous.get("tracking_uri") == uri and previous.get("run_id"):
        try:
            tracker = MLflowTracker(uri, experiment, run_id=previous["run_id"])
        except ConfigError as e:  # the run was deleted meanwhile: start a new one
            warnings.warn(f"MLflow run {previous['run_id']} cannot be reopened, starting a new one: {e}",
                          RuntimeWarning, stacklevel=2)
    if tracker is None:
        tracker = MLflowTracker(uri, experiment, run_name=run_dir.name,
                                tags={"appdistill.run_dir": str(run_dir), "appdistill.method": cfg.method.key})
    from appdistill.io import atomic_write_text

    atomic_write_text(run_dir / TRACKING_FILE, json.dumps(
        {"run_id": tracker.run_id, "experiment_id": tracker.experiment_id, "experiment": experiment,
         "tracking_uri": uri, "run_name": run_dir.name}, indent=1))
    return tracker


def read_tracking_file(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN_DIR/tracking.json`` (MLflow run id and URI), or ``None`` when absent or unreadable."""
    p = Path(run_dir) / TRACKING_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def reopen_tracker(run_dir: str | Path) -> Tracker:
    """A tracker that adds to the MLflow run recorded in ``RUN_DIR/tracking.json`` without ending it.

    Used after training (e.g. to log the exported artefact); a :class:`NullTracker` with a warning
    when the run directory has no ``tracking.json`` or its run cannot be opened.

    Raises:
        ConfigError: ``mlflow`` is not installed.

    Args:
        run_dir: a run directory written by ``train()`` with tracking on.

    Example:
        >>> with reopen_tracker("runs/plain") as t:
        ...     t.log_artifacts("runs/plain/export", "export")
    """
    rec = read_tracking_file(run_dir)
    if not rec or not rec.get("run_id") or not rec.get("tracking_uri"):
        warnings.warn(f"no MLflow run recorded in '{Path(run_dir) / TRACKING_FILE}': nothing logged",
                      RuntimeWarning, stacklevel=2)
        return NullTracker()
    import_mlflow()
    if is_file_store(rec["tracking_uri"]):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        return MLflowTracker(rec["tracking_uri"], rec.get("experiment", ""), run_id=rec["run_id"], owns_run=False)
    except ConfigError as e:  # best effort after training: the run was deleted, the store moved
        warnings.warn(f"{e}: nothing logged", RuntimeWarning, stacklevel=2)
        return NullTracker()


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}``; an empty dict stays a leaf (``{}``).

    Args:
        d: nested mapping; lists and other values are leaves.
        prefix: prepended to every key (``prefix.key``).
        sep: the separator between levels.
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def config_params(cfg: Any) -> dict[str, str]:
    """The resolved config as flat MLflow params: ``{"train.lr": "0.001", "student.dense_arch": "[16]"}``."""
    return {k: truncate(str(v), MAX_PARAM_VAL_LENGTH) for k, v in flatten(cfg.model_dump(exclude={"base_dir"})).items()}


def as_number(v: Any) -> float | None:
    """``v`` as a finite float, or ``None`` for NaN, infinities, bools and non-numbers."""
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    if isinstance(v, str) or not math.isfinite(x):
        return None
    return x


_BAD = re.compile(r"[^\w./\- ]")


def sanitize_key(key: str) -> str:
    """An MLflow-valid param/metric name: ``ndcg@10`` -> ``ndcg_at_10``, other odd characters -> ``_``."""
    k = _BAD.sub("_", str(key).replace("@", "_at_"))
    k = re.sub(r"/+", "/", k).strip("/") or "_"
    k = "/".join(p if p not in (".", "..") else "_" for p in k.split("/"))
    return truncate(k, MAX_KEY_LENGTH, marker="")


def truncate(s: str, n: int, marker: str = "...") -> str:
    return s if len(s) <= n else s[:n - len(marker)] + marker


def step_values(rec: Mapping[str, float], terms: Mapping[str, Any]) -> dict[str, float]:
    """What ``train()`` logs at a step: its ``step_log`` record (``loss``, the method's logs) without
    ``step``, plus each loss term as ``loss_<term>`` (tensors or numbers)."""
    out: dict[str, float] = {k: v for k, v in rec.items() if k != "step"}
    for k, v in terms.items():
        out[f"loss_{k}"] = float(v.detach()) if hasattr(v, "detach") else float(v)
    return out
