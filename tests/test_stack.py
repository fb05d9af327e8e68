"""The committee's held-out stack: per-segment teacher weights, shrinkage, the target DiverseDistill reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appdistill.errors import ConfigError
from appdistill.methods import METHODS
from appdistill.methods.stack import HeldOut, SegmentStack


def _held(n: int = 20_000, seed: int = 0) -> tuple[HeldOut, np.ndarray]:
    """Items 0-9 frequent (head), 10-399 rare (tail); teacher ``a`` knows head items, ``b`` tail ones."""
    rng = np.random.default_rng(seed)
    freq = np.r_[np.full(10, 5_000), np.full(390, 10), np.zeros(100, np.int64)]  # codes 400-499: cold
    items = np.where(rng.random(n) < 0.5, rng.integers(0, 10, n), rng.integers(10, 500, n))
    truth = rng.normal(size=n) * 2
    y = (rng.random(n) < 1 / (1 + np.exp(-truth))).astype(np.float32)
    head = items < 10
    za = np.where(head, truth, rng.normal(size=n) * 1.5) + rng.normal(size=n) * 0.3  # noise off its segment
    zb = np.where(~head, truth, rng.normal(size=n) * 1.5) + rng.normal(size=n) * 0.3
    return HeldOut({"a": za, "b": zb}, y, items), freq


def test_segments_get_the_teacher_that_knows_them() -> None:
    held, freq = _held()
    stack = SegmentStack.fit(held, ["a", "b"], freq)
    w = stack.describe()
    assert stack.segments == ["cold", "tail", "torso", "head"]
    assert w["head"]["a"] > 0.7 and abs(w["head"]["b"]) < 0.1
    # (a weak, low-variance column is shrunk towards the whole-split weights, not set to 0)
    assert w["tail"]["b"] > 0.7 and w["tail"]["b"] > 3 * abs(w["tail"]["a"]) and w["cold"]["b"] > w["cold"]["a"]
    # the stacked target beats each teacher and their average on the held-out rows
    from appdistill.eval.metrics import auc

    z = torch.tensor(np.stack([held.logits["a"], held.logits["b"]], 1), dtype=torch.float32)
    zs = stack(z, torch.as_tensor(held.item_codes)).numpy()
    y = held.labels
    assert auc(zs, y) > max(auc(held.logits["a"], y), auc(held.logits["b"], y), auc(z.mean(1).numpy(), y)) + 0.05
    # codes never seen in training (or beyond the vocabulary) take the cold segment
    assert stack.segment_of(torch.tensor([0, 15, 450, 10_000, -1])).tolist() == [3, 1, 0, 0, 0]
    # the formula: b_s + sum_i a_si z_i
    ws = stack.weights.numpy()
    np.testing.assert_allclose(zs[:5], (ws[stack.segment_of(torch.as_tensor(held.item_codes[:5])).numpy()]
                                        * np.c_[z[:5].numpy(), np.ones(5)]).sum(1), rtol=1e-5, atol=1e-5)


def test_small_or_one_class_segments_shrink_to_the_whole_fit() -> None:
    held, freq = _held()
    keep = (held.item_codes < 10) | (np.arange(len(held.labels)) % 200 == 0)  # a handful of tail rows
    few = HeldOut({k: v[keep] for k, v in held.logits.items()}, held.labels[keep], held.item_codes[keep])
    stack = SegmentStack.fit(few, ["a", "b"], freq)
    ws = stack.weights.numpy()
    whole = SegmentStack.fit(HeldOut(few.logits, few.labels, np.zeros_like(few.item_codes)), ["a", "b"],
                             np.zeros(1, np.int64)).weights.numpy()[0]
    rich = SegmentStack.fit(held, ["a", "b"], freq).weights.numpy()  # the tail with all its rows
    assert np.abs(ws[1] - whole).max() < 0.5 * np.abs(rich[1] - whole).max()  # few rows: stays near the whole
    one_class = HeldOut(few.logits, np.zeros_like(few.labels), few.item_codes)
    assert np.isfinite(SegmentStack.fit(one_class, ["a", "b"], freq).weights.numpy()).all()


def test_one_row_per_entity_means_one_stack() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    y = (rng.random(n) < 0.4).astype(np.float32)
    good, bad = (y - 0.4) * 4 + rng.normal(size=n), rng.normal(size=n)
    stack = SegmentStack.fit(HeldOut({"gbdt": good, "dlrm": bad}, y, np.arange(n)), ["gbdt", "dlrm"], np.ones(n))
    assert stack.segments == ["all"] and stack.weights.shape == (1, 3)
    w = stack.describe()["all"]
    assert w["gbdt"] > 0.5 and abs(w["dlrm"]) < 0.1 * w["gbdt"]  # the weak teacher gets (almost) no say
    with pytest.raises(ValueError, match="lack teachers"):
        SegmentStack.fit(HeldOut({"gbdt": good}, y, np.arange(n)), ["gbdt", "dlrm"], np.ones(n))


def test_diverse_distill_stacked_target() -> None:
    from tests.test_methods import COMMITTEE, Y, Z_A, Z_B, Z_S, make_batch, np_bce, sig
    from appdistill.student.model import StudentOutput

    rng = np.random.default_rng(0)
    held = HeldOut({"dlrm": rng.normal(size=500), "foundation": rng.normal(size=500)},
                   (rng.random(500) < 0.5).astype(np.float32), rng.integers(0, 4, 500))
    kw = {"teachers": ["dlrm", "foundation"], "kd_weights": "stacked", "lambda_t": 1.0, "temperature": 1.0}
    m = METHODS.build("diverse_distill", kw, committee=COMMITTEE,
                      student_dim=5, item_frequency=np.array([10, 10, 10, 10]), held_out=held)
    terms = m(StudentOutput(Z_S, torch.zeros(4, 5)), make_batch(), None)
    z_c = m.stack(torch.stack([Z_A, Z_B], 1), torch.arange(4)).numpy()  # batch item ids 0..3
    assert float(terms["kd_teachers"]) == pytest.approx(np_bce(Z_S.numpy(), sig(z_c)), abs=1e-6)
    assert float(terms["bce"]) == pytest.approx(np_bce(Z_S.numpy(), Y.numpy()), abs=1e-6)
    # gated: the gate's importance modulates the stack per sample; still one finite target
    g = METHODS.build("diverse_distill", {**kw, "committee_path": {"d_e": 8}}, committee=COMMITTEE, student_dim=5,
                      item_frequency=np.array([10, 10, 10, 10]), held_out=held)
    from torch import nn

    from appdistill.student.model import OverArch

    model = nn.Module()
    model.over_arch = OverArch(5, [4])
    assert torch.isfinite(g(StudentOutput(Z_S, torch.randn(4, 5)), make_batch(), model)["kd_teachers"])
    with pytest.raises(ConfigError, match="stacked.*validation"):
        METHODS.build("diverse_distill", kw, committee=COMMITTEE, student_dim=5)


def test_a_segment_without_held_out_rows_gets_the_committee_average() -> None:
    """A cold-start split: every validation item is cold, the training rows are warm."""
    held, freq = _held()
    cold = held.item_codes >= 400
    only_cold = HeldOut({k: v[cold] for k, v in held.logits.items()}, held.labels[cold], held.item_codes[cold])
    stack = SegmentStack.fit(only_cold, ["a", "b"], freq)
    w = stack.describe()
    assert w["cold"]["b"] > 0.7 > w["cold"]["a"]  # fitted where it has rows
    assert w["head"] == w["tail"] == {"a": 0.5, "b": 0.5, "bias": 0.0}  # not the cold fit carried over
    # whom to trust, though, is the held-out fit's answer everywhere: shares of warm rows (codes 0,
    # 10) are the whole fit's, of a cold row (450) its segment's; each row's shares sum to n = 2
    sh = stack.shares(torch.tensor([0, 10, 450]))
    torch.testing.assert_close(sh.sum(1), torch.full((3,), 2.0))
    assert (sh[:, 1] > 1.4).all() and torch.allclose(sh[0], sh[1])
    fitted_everywhere = SegmentStack.fit(held, ["a", "b"], freq).shares(torch.tensor([0, 10]))
    assert fitted_everywhere[0, 0] > 1.4 > 0.6 > fitted_everywhere[1, 0]  # head: a, tail: b


def test_auto_kd_weights_stack_when_the_held_out_outputs_are_there() -> None:
    from tests.test_methods import COMMITTEE

    rng = np.random.default_rng(0)
    held = HeldOut({"dlrm": rng.normal(size=200), "foundation": rng.normal(size=200)},
                   (rng.random(200) < 0.5).astype(np.float32), rng.integers(0, 4, 200))
    kw = {"teachers": ["dlrm", "foundation"]}  # kd_weights: auto, the default
    with_held = METHODS.build("diverse_distill", kw, committee=COMMITTEE, student_dim=5,
                              item_frequency=np.array([10, 10, 10, 10]), held_out=held)
    without = METHODS.build("diverse_distill", kw, committee=COMMITTEE, student_dim=5)
    assert with_held.kd_weights == "stacked" and with_held.stack is not None
    assert without.kd_weights == "uniform" and without.stack is None  # no stack, no gate: the mean KD
    path = METHODS.build("diverse_distill", {**kw, "committee_path": {"d_e": 8}}, committee=COMMITTEE, student_dim=5)
    assert path.kd_weights == "soft"  # the committee path's gate weighs the teachers
    with pytest.raises(ConfigError, match="committee path's gate"):
        METHODS.build("diverse_distill", {**kw, "kd_weights": "soft"}, committee=COMMITTEE, student_dim=5)


def test_the_tree_term_weighs_each_row_by_the_gbdt_share_of_its_stack() -> None:
    """Where the stack trusts the GBDT the tree term is taught, where it trusts another teacher not."""
    from tests.test_methods import COMMITTEE, FakeTeacher, make_batch
    from appdistill.student.model import StudentOutput
    from appdistill.teachers.base import Tap

    class Trees(FakeTeacher):
        def taps(self) -> dict[str, Tap]:
            return {**super().taps(), "parts": Tap("parts", 2, "parts")}

    rng = np.random.default_rng(0)
    n = 4000
    y = (rng.random(n) < 0.5).astype(np.float32)
    items = rng.integers(0, 4, n)
    good = (y - 0.5) * 4 + rng.normal(size=n)
    # the GBDT knows items 0-1 (head: frequent), the DLRM items 2-3 (tail)
    gbdt = np.where(items < 2, good, rng.normal(size=n))
    dlrm = np.where(items < 2, rng.normal(size=n), good)
    held = HeldOut({"lightgbm": gbdt, "dlrm": dlrm}, y, items)
    committee = {**COMMITTEE, "lightgbm": Trees("lightgbm", leaves=True)}
    m = METHODS.build("diverse_distill", {"teachers": ["lightgbm", "dlrm"], "lambda_trees": 1.0}, committee=committee,
                      student_dim=5, item_frequency=np.array([5000, 5000, 10, 10]), held_out=held)
    batch = make_batch(4)  # item ids 0..3
    batch.teacher["lightgbm"].hidden["parts"] = torch.ones(4, 2)
    h = torch.zeros(4, 5)
    per_row = [torch.zeros(4, 2) for _ in range(4)]
    for r in range(4):
        per_row[r][r] = 1.0  # row r alone differs from what the zeroed head predicts
    head = m.trees["lightgbm"].head
    torch.nn.init.zeros_(head[2].weight)
    torch.nn.init.zeros_(head[2].bias)
    m.eval()  # the running variance stays as set
    m.trees["lightgbm"].var.fill_(1.0)
    losses = []
    for r in range(4):
        batch.teacher["lightgbm"].hidden["parts"] = per_row[r]
        with torch.no_grad():
            losses.append(float(m.tree_term(h, batch)))
    # rows 0-1 (the GBDT's segment) weigh what its share exceeds an equal one by (at most n - 1 = 1;
    # a row's loss here: its weight / 4 rows); rows 2-3, where the stack trusts the DLRM more, nothing
    assert min(losses[:2]) > 0.1 and max(losses) <= 1 / 4 + 1e-6 and losses[2] == losses[3] == 0
    # a sole GBDT is the whole stack: every row weighs 1
    sole = METHODS.build("diverse_distill", {"teachers": ["lightgbm"], "lambda_trees": 1.0}, committee=committee,
                         student_dim=5, item_frequency=np.array([5000, 5000, 10, 10]), held_out=held)
    sole.trees["lightgbm"].head.load_state_dict(head.state_dict())
    sole.eval()
    sole.trees["lightgbm"].var.fill_(1.0)
    with torch.no_grad():
        assert float(sole.tree_term(h, batch)) == pytest.approx(1 / 4)
    with torch.no_grad():
        assert float(m(StudentOutput(torch.zeros(4), h), batch, None)["trees"]) == pytest.approx(losses[3])
