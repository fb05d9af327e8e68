"""DiverseDistill's routing: the gate may read teachers' confidences, disagreement and item
frequency, and every run reports how it routes per item segment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from appdistill.config import load_config
from tests.test_bench import CONFIG, SPEC


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    from appdistill.pipeline import fit_committee
    from appdistill.pipeline import train

    tmp = tmp_path_factory.mktemp("routing")
    (tmp / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    (tmp / "c.yaml").write_text(yaml.safe_dump({**CONFIG, "train": {**CONFIG["train"], "epochs": 1}}))
    ov = [f"teachers_dir={tmp / 't'}", "method.kwargs.committee_path.every=1"]
    fit_committee(load_config(tmp / "c.yaml", ov), tmp / "t", progress=False)
    routed = train(load_config(tmp / "c.yaml", [*ov, "method.kwargs.committee_path.routing=true"]), tmp / "r",
                   progress=False)
    plain = train(load_config(tmp / "c.yaml", ov), tmp / "p", progress=False)
    stack = train(load_config(tmp / "c.yaml", [f"teachers_dir={tmp / 't'}"]), tmp / "s", progress=False)
    return routed, plain, stack


def test_runs_report_gate_importance_per_item_segment(runs) -> None:
    for m in runs:  # the committee path with and without routing, and the default (the stack alone)
        r = m["routing"]
        assert sorted(r["teachers"]) == ["dlrm", "lightgbm"]
        assert sum(r["overall"].values()) == pytest.approx(1.0, abs=1e-3)
        assert set(r["segments"]) <= {"cold", "tail", "torso", "head"} and r["segments"]
        for seg in r["segments"].values():
            assert sum(seg.values()) == pytest.approx(1.0, abs=1e-3)


def test_the_routed_gate_reads_teacher_logits_and_item_frequency() -> None:
    from appdistill.methods.diverse_distill import DiverseDistill

    from appdistill.teachers.base import Tap

    class T:  # the smallest committee member: cached logits, a hidden tap with a head (its declared contract)
        key, kind = "dlrm", "complementary"

        def taps(self):
            return {"h": Tap("h", 4, has_head=True)}

        def head(self, tap):
            return torch.nn.Linear(4, 1)

    dd = DiverseDistill({"a": T(), "b": T()}, student_dim=8, committee_path={"routing": True},
                        item_frequency=np.array([0, 5, 50]))
    torch.nn.init.normal_(dd.V.weight)

    class B:
        pass

    b = B()
    b.item_ids = torch.tensor([0, 1, 2, 7])
    h = torch.zeros(4, 8)
    z = torch.tensor([[3.0, -3.0], [3.0, -3.0], [3.0, -3.0], [3.0, -3.0]])
    p1 = dd.gate_probs(h, dd.route_features(b, z))
    p2 = dd.gate_probs(h, dd.route_features(b, -z))
    assert not torch.allclose(p1, p2)          # teachers' logits move the gate
    assert not torch.allclose(p1[0], p1[2])    # so does the item's frequency (same logits, same h)
    r = dd.route_features(b, z)
    assert r.shape == (4, 6) and r[0, -1] == 1 and r[3, -1] == 1 and r[2, -1] == 0  # code 7: unseen = cold


def test_routing_reports_each_teachers_share_of_the_distilled_target() -> None:
    """With the held-out stack the report shows the stack's weights (not an untrained gate), and
    without gating and stack the uniform weights the teacher term really uses."""
    from types import SimpleNamespace

    from appdistill.methods.diverse_distill import DiverseDistill
    from appdistill.methods.stack import HeldOut
    from appdistill.teachers.base import Tap

    class T:
        key, kind = "dlrm", "complementary"

        def taps(self):
            return {"h": Tap("h", 4, has_head=True)}

        def head(self, tap):
            return torch.nn.Linear(4, 1)

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000).astype(np.float64)
    held = HeldOut({"a": (2 * y - 1) * 2 + rng.normal(size=2000), "b": rng.normal(size=2000)}, y,
                   np.zeros(2000, np.int64))
    b = SimpleNamespace(item_ids=torch.zeros(5, dtype=torch.long),
                        teacher={"a": SimpleNamespace(logits=torch.randn(5)),
                                 "b": SimpleNamespace(logits=torch.randn(5))})
    h = torch.randn(5, 8)
    stacked = DiverseDistill({"a": T(), "b": T()}, student_dim=8, kd_weights="stacked", held_out=held)
    w = stacked.route_weights(h, b)
    assert torch.allclose(w.sum(1), torch.ones(5))
    assert (w[:, 0] > 0.9).all()  # the stack trusts the informative teacher, whatever the gate says
    plain = DiverseDistill({"a": T(), "b": T()}, student_dim=8, kd_weights="uniform")
    assert torch.allclose(plain.route_weights(h, b), torch.full((5, 2), 0.5))
    ungated = DiverseDistill({"a": T(), "b": T()}, student_dim=8, kd_weights="soft", committee_path={"gating": False})
    assert torch.allclose(ungated.route_weights(h, b), torch.full((5, 2), 0.5))
