"""Optional MLflow tracking: params, per-step loss terms, final metrics and artefacts of a tiny run
(through ``distill``, so the exported artefact is logged into the same run), resume reattaching to
the run, FAILED status on an error, nothing at all when tracking is off, and config errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appdistill.config import config_from_dict, load_config
from appdistill.errors import ConfigError
from appdistill.pipeline import train
from appdistill.train.tracking import (NullTracker, as_number, config_params, flatten, make_tracker,
                                       resolve_tracking_uri, sanitize_key)
from tests.test_train import tiny_config

mlflow = pytest.importorskip("mlflow")

ALLOW = "MLFLOW_ALLOW_FILE_STORE"


def _unset_allow(mp: pytest.MonkeyPatch) -> None:
    """Unset ``MLFLOW_ALLOW_FILE_STORE`` for the test (make_tracker must set it) and restore it after."""
    mp.setenv(ALLOW, "x")  # records the original value (or its absence) for the undo
    mp.delenv(ALLOW)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One tracked tiny run: ``distill`` (train + a stand-in export), then a ``--resume`` of the finished run."""
    from appdistill.pipeline import distill

    tmp = tmp_path_factory.mktemp("tracked")
    store = tmp / "store"
    cfg = load_config(tiny_config(tmp, train={"epochs": 1, "log_every": 5},
                                  tracking={"enabled": True, "uri": str(store), "experiment": "tiny-exp"}))

    def fake_export(run_dir: Path, out: Path, *args: Any, **kwargs: Any) -> Path:  # real one: ~10 s, test_export.py
        out.mkdir(parents=True)
        (out / "manifest.json").write_text(json.dumps({"from": str(run_dir)}))
        (out / "model.pt2").write_bytes(b"pt2")
        return out

    with pytest.MonkeyPatch.context() as mp:
        _unset_allow(mp)
        mp.setattr("appdistill.export.artifact.export_run", fake_export)
        run = tmp / "run"
        metrics = distill(cfg, run, progress=False)
        assert os.environ.get(ALLOW) == "true", "make_tracker opens the file store itself"
        rec = json.loads((run / "tracking.json").read_text())
        client = mlflow.MlflowClient(tracking_uri=store.as_uri())
        before = client.get_run(rec["run_id"]).info.status
        train(cfg, run, progress=False, resume=True)  # finished already: only re-evaluates and logs
        yield {"cfg": cfg, "run": run, "store": store, "metrics": metrics, "rec": rec, "client": client,
               "status_before_resume": before}


def _the_run(t: dict[str, Any]) -> Any:
    client = t["client"]
    exp = client.get_experiment_by_name("tiny-exp")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "distill and the resume log into one MLflow run"
    return runs[0]


def test_run_is_recorded_in_the_configured_store(tracked: dict[str, Any]) -> None:
    run = _the_run(tracked)
    rec = tracked["rec"]
    assert run.info.run_id == rec["run_id"]
    assert rec["tracking_uri"] == tracked["store"].as_uri()
    assert run.info.run_name == "run"  # the run directory's name
    assert run.info.status == "FINISHED" and tracked["status_before_resume"] == "FINISHED"
    assert (tracked["store"] / run.info.experiment_id / run.info.run_id).is_dir()


def test_params_are_the_flattened_config(tracked: dict[str, Any]) -> None:
    params = _the_run(tracked).data.params
    assert params["name"] == "tiny"
    assert params["train.epochs"] == "1"
    assert params["train.batch_size"] == "512"
    assert params["method.key"] == "none"
    assert params["student.dense_arch"] == "[8]"
    assert params["tracking.enabled"] == "True"
    assert "base_dir" not in params
    assert params == config_params(tracked["cfg"])


def test_step_metrics_follow_history(tracked: dict[str, Any]) -> None:
    client, run_id = tracked["client"], tracked["rec"]["run_id"]
    history = json.loads((tracked["run"] / "history.json").read_text())
    loss = client.get_metric_history(run_id, "loss")
    assert len(loss) >= 5
    assert [m.step for m in loss] == [s["step"] for s in history["steps"]]
    assert [m.value for m in loss] == pytest.approx([s["loss"] for s in history["steps"]])
    bce = client.get_metric_history(run_id, "loss_bce")  # the per-term loss values of those steps
    assert [m.step for m in bce] == [m.step for m in loss]
    assert [m.value for m in bce] == pytest.approx([m.value for m in loss])  # method none: loss == bce
    auc = client.get_metric_history(run_id, "valid_auc")  # per epoch, step = epoch
    assert [(m.step, m.value) for m in auc] == [(1, pytest.approx(history["epochs"][0]["valid_auc"]))]
    assert [m.step for m in client.get_metric_history(run_id, "train_bce")] == [1]
    assert [m.step for m in client.get_metric_history(run_id, "valid_logloss")] == [1]


def test_final_metrics_match_metrics_json(tracked: dict[str, Any]) -> None:
    logged = _the_run(tracked).data.metrics
    disk = json.loads((tracked["run"] / "metrics.json").read_text())
    assert logged["test.auc"] == pytest.approx(disk["test"]["auc"])
    assert logged["test.auc"] == pytest.approx(tracked["metrics"]["test"]["auc"])
    assert logged["test.ndcg_at_10"] == pytest.approx(disk["test"]["ndcg@10"])
    assert logged["valid.logloss"] == pytest.approx(disk["valid"]["logloss"])
    assert logged["train.steps"] == disk["train"]["steps"]
    assert not any(k.startswith("data.fingerprint") or k == "dataset" for k in logged)  # strings skipped


def test_artefacts_and_export_are_logged(tracked: dict[str, Any]) -> None:
    client, run_id = tracked["client"], tracked["rec"]["run_id"]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "history.json", "curve.png", "config.yaml", "export"} <= top
    exported = {a.path for a in client.list_artifacts(run_id, "export")}
    assert "export/model.pt2" in exported and "export/manifest.json" in exported
    local = Path(client.download_artifacts(run_id, "metrics.json", str(tracked["run"].parent / "dl")))
    assert json.loads(local.read_text()) == json.loads((tracked["run"] / "metrics.json").read_text())
    png = Path(client.download_artifacts(run_id, "curve.png", str(tracked["run"].parent / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_training_marks_the_run_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    cfg = load_config(tiny_config(tmp_path, tracking={"enabled": True, "uri": str(store)}),
                      ["student.interaction.key=dot", "train.epochs=1"])  # unequal dims: an error
    _unset_allow(monkeypatch)
    with pytest.raises(ConfigError, match="Set student.embedding_dim"):
        train(cfg, tmp_path / "bad", progress=False)
    rec = json.loads((tmp_path / "bad" / "tracking.json").read_text())
    run = mlflow.MlflowClient(tracking_uri=store.as_uri()).get_run(rec["run_id"])
    assert run.info.status == "FAILED"
    assert run.data.params["student.interaction.key"] == "dot"


def test_tracking_off_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_config(tiny_config(tmp_path), ["train.epochs=1"])
    assert cfg.tracking.enabled is False
    train(cfg, tmp_path / "run", progress=False)
    assert not (cwd / "mlruns").exists()
    assert not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "run" / "tracking.json").exists()


def test_default_store_is_mlruns_in_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _unset_allow(monkeypatch)
    cfg = config_from_dict({"name": "dflt", "spec": "unused.yaml", "tracking": {"enabled": True}})
    (tmp_path / "r1").mkdir()
    assert isinstance(make_tracker(cfg, tmp_path / "r1", is_main=False), NullTracker)  # only rank 0 logs
    assert not (tmp_path / "mlruns").exists()
    with make_tracker(cfg, tmp_path / "r1", is_main=True) as t:
        t.log_step(3, {"loss": 0.5, "nan": float("nan"), "label": "x"})  # type: ignore[dict-item]
    assert (tmp_path / "mlruns").is_dir()
    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("dflt")  # experiment defaults to the config's name
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.metrics == {"loss": 0.5}


def test_unknown_tracking_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tracking.enable: unknown key"):
        load_config(tiny_config(tmp_path), ["tracking.enable=true"])
    with pytest.raises(ConfigError, match="tracking.enabled"):
        load_config(tiny_config(tmp_path), ["tracking.enabled=[1]"])


def test_missing_mlflow_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    cfg = config_from_dict({"spec": "unused.yaml", "tracking": {"enabled": True, "uri": str(tmp_path / "s")}})
    with pytest.raises(ConfigError, match="pip install 'mlflow-skinny"):
        make_tracker(cfg, tmp_path, is_main=True)
    with pytest.raises(ConfigError, match="not installed"):  # every rank stops, none waits for rank 0
        make_tracker(cfg, tmp_path, is_main=False)
    off = config_from_dict({"spec": "unused.yaml"})
    assert isinstance(make_tracker(off, tmp_path, is_main=True), NullTracker)  # off: mlflow not needed


def test_helpers() -> None:
    assert flatten({"test": {"auc": 0.7, "cold": {"auc": 0.6}}, "n": 3, "empty": {}}) == {
        "test.auc": 0.7, "test.cold.auc": 0.6, "n": 3, "empty": {}}
    assert [as_number(v) for v in (1, 2.5, float("nan"), float("inf"), "3", None, True)] == [
        1.0, 2.5, None, None, None, None, None]
    assert sanitize_key("test.ndcg@10") == "test.ndcg_at_10"
    assert sanitize_key("a b/c:d(e)") == "a b/c_d_e_"
    assert sanitize_key("../x") == "_/x"
    assert resolve_tracking_uri("sqlite:///m.db") == "sqlite:///m.db"
    assert resolve_tracking_uri("file:///tmp/m") == "file:///tmp/m"
    assert resolve_tracking_uri("rel/store") == (Path.cwd() / "rel/store").resolve().as_uri()
    assert resolve_tracking_uri("file:./m") == (Path.cwd() / "m").resolve().as_uri()
    assert resolve_tracking_uri(None) == (Path.cwd() / "mlruns").resolve().as_uri()
    params = config_params(config_from_dict({"spec": "s.yaml", "method": {"key": "kd", "kwargs": {"alpha": 0.5}},
                                             "name": "x" * 7000}))
    assert params["method.kwargs.alpha"] == "0.5" and len(params["name"]) == 6000
