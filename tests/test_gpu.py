"""The GPU path (``-m gpu``; skipped without CUDA): the student and DiverseDistill train on a CUDA
device with the same code as on CPU, and agree with the CPU run. ``scripts/gpu_check.sh`` runs these
and the GPU benchmarks on a machine with an NVIDIA GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from appdistill.config import load_config
from appdistill.pipeline import distill, train
from tests.test_teachers import SMALL_DLRM, SMALL_LGB
from tests.test_train import tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_plain_student_trains_on_cuda_and_agrees_with_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(tiny_config(tmp_path))
    monkeypatch.setenv("APPDISTILL_DEVICE", "cpu")
    on_cpu = train(cfg, tmp_path / "cpu", progress=False)
    monkeypatch.setenv("APPDISTILL_DEVICE", "cuda")
    on_gpu = train(cfg, tmp_path / "gpu", progress=False)
    # same data, seed and schedule: kernels differ, the model must not
    assert abs(on_gpu["test"]["auc"] - on_cpu["test"]["auc"]) < 0.01
    assert on_gpu["train"]["samples_per_s"] > 0


def test_diverse_distill_trains_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPDISTILL_DEVICE", "cuda")
    cfg = load_config(tiny_config(tmp_path, method={"key": "diverse_distill",
                                                           "kwargs": {"committee_path": {"top_k": 2, "d_e": 8}}},
                                  teachers={"lightgbm": {"key": "lightgbm", "kwargs": SMALL_LGB},
                                            "dlrm": {"key": "dlrm", "kwargs": SMALL_DLRM}}))
    m = distill(cfg, tmp_path / "run", progress=False)
    assert 0.5 < m["test"]["auc"] < 1 and (tmp_path / "run" / "export" / "manifest.json").is_file()
