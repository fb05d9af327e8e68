"""Checkpoints and resume: SIGKILL at a random step then ``--resume`` gives identical metrics; torchrun
survives a killed rank with ``--max-restarts 1``; a 2-rank run resumes on 1 rank and back; a changed
spec or teacher set is refused."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from appdistill.cli import main
from appdistill.train.checkpoint import RESUME_FILE
from appdistill.io import load_checkpoint
from tests.test_train import tiny_config

STEPS_PER_EPOCH = 31  # 16008 training rows, global batch 512, drop_last


def _cli(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appdistill", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)


def _torchrun(args: list[str], port: int, nproc: int = 2, restarts: int = 0,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--max-restarts",
           str(restarts), "--master_port", str(port), "-m", "appdistill", *args]
    run = lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=600,  # noqa: E731
                                 env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    r = run()
    # Once in a few clean-clone CI runs a rank aborted within seconds of its start, before any step
    # (SIGABRT, "terminate called without an active exception" from torch's C++ threads), in plain
    # and distilled runs alike; the same command then passes. One retry on exactly that signature
    # (a re-run resumes or restarts the run directory as a user's would); any other failure fails.
    if r.returncode != 0 and "terminate called without an active exception" in r.stderr and \
            "exitcode  : -6" in r.stderr:
        r = run()
    return r


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _same(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe equality


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 20010 interactions: 2001 valid and test rows; with eval batches of 1000 per rank the last global
    # evaluation batch has 1 row, so under torchrun rank 1 gets an empty batch (uneven data)
    p = tiny_config(tmp_path_factory.mktemp("resume"),
                    train={"epochs": 2, "batch_size": 512, "prefetch": 2, "checkpoint_every": 5,
                           "eval_batch_size": 1000})
    spec = yaml.safe_load((p.parent / "spec.yaml").read_text())
    spec["source"]["kwargs"]["n_interactions"] = 20010
    (p.parent / "spec.yaml").write_text(yaml.safe_dump(spec))
    return p


@pytest.fixture(scope="module")
def reference(cfg_path: Path) -> dict:
    # through the CLI with the same thread count as the resumed runs: identical float reduction order
    r = _cli(["train", str(cfg_path), "--run-dir", str(cfg_path.parent / "ref"), "--no-progress"])
    assert r.returncode == 0, r.stderr[-2000:]
    return _metrics(cfg_path.parent / "ref")


def test_sigkill_at_random_step_then_resume_is_identical(cfg_path: Path, reference: dict) -> None:
    step = random.Random(os.environ.get("PYTEST_SEED", "7")).randint(2, 2 * STEPS_PER_EPOCH - 1)
    run = cfg_path.parent / "killed"
    r = _cli(["train", str(cfg_path), "--run-dir", str(run), "--no-progress"], {"APPDISTILL_FAULT": f"0:{step}"})
    assert r.returncode == -9, r.stderr[-2000:]  # really SIGKILLed, no clean-up ran
    assert not (run / "metrics.json").exists()
    ck = load_checkpoint(run / RESUME_FILE)
    assert ck["position"]["global_step"] == step // 5 * 5 or ck["position"]["global_step"] == STEPS_PER_EPOCH
    assert set(ck) >= {"model", "optim", "method", "position", "rng", "identity", "config"}
    r = _cli(["train", str(cfg_path), "--run-dir", str(run), "--no-progress", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stdout
    m = _metrics(run)
    assert _same(m["test"], reference["test"]) and _same(m["valid"], reference["valid"])
    assert m["train"]["steps"] == reference["train"]["steps"]
    h_ref = json.loads((cfg_path.parent / "ref" / "history.json").read_text())
    assert json.loads((run / "history.json").read_text()) == h_ref


def test_resume_of_a_finished_run_reevaluates_without_training(cfg_path: Path, reference: dict) -> None:
    r = _cli(["train", str(cfg_path), "--run-dir", str(cfg_path.parent / "ref"), "--no-progress", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"step {2 * STEPS_PER_EPOCH}" in r.stdout
    assert _same(_metrics(cfg_path.parent / "ref")["test"], reference["test"])


def test_resume_refuses_another_spec_or_method(cfg_path: Path, reference: dict,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = str(cfg_path.parent / "ref")
    # another feature spec: the synthetic source with a different seed changes spec and data
    spec = yaml.safe_load((cfg_path.parent / "spec.yaml").read_text())
    spec["source"]["kwargs"]["seed"] = 2
    other = cfg_path.parent / "other_spec.yaml"
    other.write_text(yaml.safe_dump(spec))
    before = (cfg_path.parent / "ref" / RESUME_FILE).read_bytes()
    assert main(["train", str(cfg_path), "--run-dir", run, "--resume", "--no-progress",
                 "--set", f"spec={other}"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "feature spec" in err and RESUME_FILE in err
    assert main(["train", str(cfg_path), "--run-dir", run, "--resume", "--no-progress",
                 "--set", "student.over_arch=[8]"]) == 2
    assert "student architecture" in capsys.readouterr().err
    assert (cfg_path.parent / "ref" / RESUME_FILE).read_bytes() == before  # nothing overwritten


def test_truncated_checkpoint_is_a_clear_error(cfg_path: Path, reference: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "trunc"
    (run / "checkpoints").mkdir(parents=True)
    data = (cfg_path.parent / "ref" / RESUME_FILE).read_bytes()
    (run / RESUME_FILE).write_bytes(data[: len(data) // 2])
    assert main(["train", str(cfg_path), "--run-dir", str(run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "last.pt" in err
    assert (run / RESUME_FILE).stat().st_size == len(data) // 2  # left as found


@pytest.mark.parametrize("blocked", [RESUME_FILE, "checkpoint.pt", "metrics.json"])
def test_a_directory_where_the_run_writes_a_file_is_refused_first(cfg_path: Path, tmp_path: Path, blocked: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 naming it before any data is built, not an IsADirectoryError after the first epoch."""
    run = tmp_path / "blocked"
    (run / blocked / "keep").mkdir(parents=True)
    for resume in ([], ["--resume"]):
        assert main(["train", str(cfg_path), "--run-dir", str(run), "--no-progress", *resume]) == 2
        err = capsys.readouterr().err
        assert f"{run / blocked}'" in err and "directory" in err and "Traceback" not in err, err
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == sorted(
        [*(p.as_posix() for p in Path(blocked).parents if p != Path(".")), blocked, f"{blocked}/keep"])


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_survives_a_killed_rank_and_resizes(cfg_path: Path, reference: dict) -> None:
    """torchrun --max-restarts 1: rank 1 is SIGKILLed mid-run, the group restarts from the last
    checkpoint and completes (within float tolerance of an uninterrupted 2-rank run). Then a 2-rank run
    killed for good resumes on 1 rank, and a 1-rank run resumes on 2 ranks."""
    base = cfg_path.parent
    args = ["train", str(cfg_path), "--no-progress"]
    r = _torchrun([*args, "--run-dir", str(base / "d_ref")], 29541)
    assert r.returncode == 0, r.stderr[-3000:]
    # restarts=2: the injected kill takes one; a restarted group's rank once aborted at its start
    # (see _torchrun), which a user's torchrun retries the same way
    r = _torchrun([*args, "--run-dir", str(base / "d_restart")], 29542, restarts=2,
                  env={"APPDISTILL_FAULT": "1:40"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout + r.stderr
    ref2, m = _metrics(base / "d_ref"), _metrics(base / "d_restart")
    assert m["train"]["world_size"] == 2 and m["train"]["steps"] == ref2["train"]["steps"]
    for k in ("auc", "logloss", "gauc"):
        assert m["test"][k] == pytest.approx(ref2["test"][k], abs=1e-5), k

    # 2 ranks -> 1 rank
    r = _torchrun([*args, "--run-dir", str(base / "d21")], 29543, env={"APPDISTILL_FAULT": "0:12"})
    assert r.returncode != 0
    r = _cli([*args, "--run-dir", str(base / "d21"), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and _metrics(base / "d21")["train"]["world_size"] == 1
    # sharded and single-process steps agree to float precision, so a resized run lands on the same model
    assert _metrics(base / "d21")["test"]["auc"] == pytest.approx(reference["test"]["auc"], abs=1e-4)
    # 1 rank -> 2 ranks
    r = _cli([*args, "--run-dir", str(base / "d12")], {"APPDISTILL_FAULT": "0:40"})
    assert r.returncode == -9
    r = _torchrun([*args, "--run-dir", str(base / "d12"), "--resume"], 29544)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _metrics(base / "d12")
    assert m["train"]["world_size"] == 2
    assert m["test"]["auc"] == pytest.approx(reference["test"]["auc"], abs=1e-4)


def test_resume_refuses_another_teacher_set(cfg_path: Path, reference: dict) -> None:
    from appdistill.errors import AppDistillError
    from appdistill.train.checkpoint import load_resume

    path = cfg_path.parent / "ref" / RESUME_FILE
    ident = dict(load_checkpoint(path)["identity"])
    assert load_resume(path, ident)["position"].global_step == 2 * STEPS_PER_EPOCH
    with pytest.raises(AppDistillError, match=r"teacher set differs.*checkpoint: \[\], now: \['lightgbm'\]"):
        load_resume(path, {**ident, "teachers": {"lightgbm": {"key": "lightgbm", "fit": "abc"}}})
    with pytest.raises(AppDistillError, match="method or its kwargs"):
        load_resume(path, {**ident, "method": {"key": "kd", "kwargs": {}}})
