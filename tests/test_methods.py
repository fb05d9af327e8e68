"""Golden values for every loss on fixed tiny tensors, TAID's t, and DiverseDistill's gating."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from appdistill.errors import ConfigError
from appdistill.features.batch import Batch, TeacherOutput
from appdistill.methods import METHODS
from appdistill.methods.taid import TAIDSchedule
from appdistill.student.model import OverArch, StudentOutput
from appdistill.teachers.base import Head, Tap

Z_S = torch.tensor([0.5, -1.0, 2.0, 0.0])
Y = torch.tensor([1.0, 0.0, 1.0, 0.0])
Z_A = torch.tensor([1.0, -2.0, 0.5, 0.3])
Z_B = torch.tensor([-0.5, 0.0, 3.0, -1.0])


def np_bce(z: np.ndarray, p: np.ndarray) -> float:
    s = 1 / (1 + np.exp(-z))
    return float(np.mean(-(p * np.log(s) + (1 - p) * np.log(1 - s))))


def sig(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


class FakeTeacher:
    """A teacher with a float tap + frozen over-arch head, or integer leaves without a head."""

    def __init__(self, key: str, dim: int = 8, leaves: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.key, self.leaves = key, leaves
        self.dim = dim
        self.num_leaves = 4
        over = OverArch(dim, [6])
        self._head = None if leaves else Head(over.out, body=over.body)

    @property
    def kind(self) -> str:
        return "foundation" if self.key == "foundation" else "complementary"

    def taps(self) -> dict[str, Tap]:
        return {"leaves": Tap("leaves", self.dim, "leaves", self.num_leaves)} if self.leaves \
            else {"h": Tap("h", self.dim, has_head=True)}

    def head(self, tap: str) -> Head | None:
        return self._head



def make_batch(b: int = 4) -> Batch:
    kjt = KeyedJaggedTensor(keys=["u"], values=torch.zeros(b, dtype=torch.long), lengths=torch.ones(b, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    teacher = {
        "dlrm": TeacherOutput(Z_A[:b].clone(), {"h": torch.randn(b, 8, generator=g)}),
        "foundation": TeacherOutput(Z_B[:b].clone(), {"h": torch.randn(b, 8, generator=g)}),
        "lightgbm": TeacherOutput(torch.zeros(b), {"leaves": torch.randint(0, 4, (b, 8), generator=g)}),
    }
    return Batch(kjt, torch.zeros(b, 0), Y[:b].clone(), torch.arange(b), torch.arange(b), torch.arange(b), teacher)


COMMITTEE = {"dlrm": FakeTeacher("dlrm"), "foundation": FakeTeacher("foundation", seed=1),
             "lightgbm": FakeTeacher("lightgbm", leaves=True)}


def test_none_is_bce() -> None:
    m = METHODS.build("none", {})
    out = m(StudentOutput(Z_S, torch.zeros(4, 3)), make_batch(), None)
    assert float(out["bce"]) == pytest.approx(np_bce(Z_S.numpy(), Y.numpy()), abs=1e-6)


def test_kd_golden() -> None:
    m = METHODS.build("kd", {"teacher": "dlrm", "alpha": 0.3, "temperature": 2.0}, committee=COMMITTEE)
    out = m(StudentOutput(Z_S, torch.zeros(4, 3)), make_batch(), None)
    zs, za = Z_S.numpy(), Z_A.numpy()
    assert float(out["bce"]) == pytest.approx(0.7 * np_bce(zs, Y.numpy()), abs=1e-6)
    assert float(out["kd"]) == pytest.approx(0.3 * 4 * np_bce(zs / 2, sig(za / 2)), abs=1e-6)


def test_avg_kd_golden() -> None:
    m = METHODS.build("avg_kd", {"teachers": ["dlrm", "foundation"], "weights": [3, 1], "alpha": 1.0},
                      committee=COMMITTEE)
    out = m(StudentOutput(Z_S, torch.zeros(4, 3)), make_batch(), None)
    p = 0.75 * sig(Z_A.numpy()) + 0.25 * sig(Z_B.numpy())
    assert float(out["kd"]) == pytest.approx(np_bce(Z_S.numpy(), p), abs=1e-6)
    assert float(out["bce"]) == 0.0


def test_unknown_teacher_is_config_error() -> None:
    with pytest.raises(ConfigError, match="not in the committee"):
        METHODS.build("kd", {"teacher": "gpt"}, committee=COMMITTEE)


def test_taid_loss_golden_and_t_sequence() -> None:
    m = METHODS.build("taid", {"teacher": "dlrm", "t_start": 0.4, "label_weight": 0.0}, committee=COMMITTEE)
    out = m(StudentOutput(Z_S, torch.zeros(4, 3)), make_batch(), None)
    t = 0.4
    target = sig((1 - t) * Z_S.numpy() + t * Z_A.numpy())
    assert float(out["taid"]) == pytest.approx(np_bce(Z_S.numpy(), target), abs=1e-6)
    # t sequence against a hand computation of the TAID schedule
    losses, total = [1.0, 0.8, 0.9, 0.5, 0.5, 0.2], 1000
    s = TAIDSchedule(0.4, 1.0, 5e-4, 0.99)
    got = [s.update(j, k, total) for k, j in enumerate(losses)]
    t, mom, prev, want = 0.4, 0.0, None, []
    for k, j in enumerate(losses):
        t_lin = 0.4 + 0.6 * (k + 1) / total
        if prev is None:
            t = max(t_lin, t)
        else:
            mom = 0.99 * mom + 0.01 * (prev - j) / (prev + 1e-15)
            t = min(1.0, max(t_lin, t + 5e-4 * (1 / (1 + math.exp(-mom))) * (1 - t)))
        prev = j
        want.append(t)
    assert got == pytest.approx(want, abs=1e-12)
    assert all(b >= a for a, b in zip(got, got[1:]))  # t never decreases
    s2 = TAIDSchedule(0.4, 1.0)
    assert s2.update(1.0, total - 1, total) == 1.0  # the linear floor reaches t_end


def _dd(committee_path: dict | bool = True, **kw):
    """DiverseDistill on the fake committee; ``committee_path``: its fields (``d_e`` 8), ``True`` or ``False``."""
    cp = {"d_e": 8, **(committee_path if isinstance(committee_path, dict) else {})} if committee_path else False
    return METHODS.build("diverse_distill", {"committee_path": cp, **kw}, committee=COMMITTEE, student_dim=5)


def test_diverse_distill_gating_skips_answers() -> None:
    torch.manual_seed(0)
    m = _dd({"top_k": 2, "lambda_kd": 0.5})
    model = nn.Module()
    model.over_arch = OverArch(5, [4])
    h = torch.randn(4, 5, requires_grad=True)
    terms = m(StudentOutput(Z_S.clone().requires_grad_(), h), make_batch(), model)
    assert set(terms) == {"bce", "bce_committee", "kd_committee", "kd_teachers", "balance"}
    # each sample keeps 2 of 3 teachers: exactly one third of the answers are never computed
    assert sum(m.answer_calls.values()) == 4 * 2
    assert m.skipped_fraction() == pytest.approx(1 / 3)
    sum(terms.values()).backward()
    assert m.E.grad is not None and m.Q[0].weight.grad is not None
    head = COMMITTEE["dlrm"].head("h")
    assert all(p.grad is None and not p.requires_grad for p in head.parameters())  # teachers stay frozen


def test_diverse_distill_ablations() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.over_arch = OverArch(5, [4])
    h = torch.randn(4, 5)
    m = _dd({"gating": False})
    m(StudentOutput(Z_S, h), make_batch(), model)
    assert m.skipped_fraction() == 0.0 and sum(m.answer_calls.values()) == 12
    m = _dd(False)  # the default: no committee path, no method parameters, no hidden taps read
    assert set(m(StudentOutput(Z_S, h), make_batch(), model)) == {"bce", "kd_teachers"}
    assert sum(m.answer_calls.values()) == 0 and not list(m.parameters())
    assert _dd(teachers=["foundation"]).names == ["foundation"]
    m = _dd({"questions": False}, output_loss="taid")
    terms = m(StudentOutput(Z_S, h), make_batch(), model)
    assert "taid_teachers" in terms
    m.on_step_end(torch.tensor(0.7), 0, 10)
    assert m.logs()["taid_t"] >= 0.4


def test_committee_rows_and_every_bound_where_answers_are_computed() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.over_arch = OverArch(5, [4])
    h = torch.randn(4, 5)
    # committee_rows: 2 of the 4 rows take the committee path, each asking top_k = 2 teachers
    m = _dd({"top_k": 2, "rows": 2}, lambda_t=1.5, temperature=1.0)
    torch.manual_seed(3)
    terms = m(StudentOutput(Z_S, h), make_batch(), model)
    assert sum(m.answer_calls.values()) == 2 * 2 and m.skipped_fraction() == pytest.approx(1 / 3)
    torch.manual_seed(3)
    rows = torch.randperm(4)[:2].sort().values                               # the same draw
    x = h[rows] + m.committee_message(h[rows], make_batch(), *m.importance(h[rows])[:2], rows)
    want = F.binary_cross_entropy_with_logits(model.over_arch(x), Y[rows])
    assert float(terms["bce_committee"].detach()) == pytest.approx(float(want.detach()), abs=1e-6)
    # the teacher KD still covers every row: per-teacher KD weighted by the gate's softmax on all 4
    probs = m.gate_probs(h).detach()
    z_t = torch.stack([Z_A, Z_B, torch.zeros(4)], 1)
    per = F.binary_cross_entropy_with_logits(Z_S.unsqueeze(1).expand_as(z_t), torch.sigmoid(z_t), reduction="none")
    assert float(terms["kd_teachers"]) == pytest.approx(1.5 * float((probs * per).sum(1).mean()), abs=1e-5)
    # committee_every: the committee path (and the gate's training) runs on steps 0, 3, 6, ...
    m = _dd({"top_k": 2, "every": 3})
    seen = [set(m(StudentOutput(Z_S, h), make_batch(), model)) for _ in range(4)]
    assert [("bce_committee" in t, "balance" in t) for t in seen] == [(True, True), (False, False), (False, False), (True, True)]
    assert all("kd_teachers" in t for t in seen) and sum(m.answer_calls.values()) == 2 * 4 * 2
    resumed = _dd({"top_k": 2, "every": 3})
    resumed.load_state(m.state())                                             # the step count survives a resume
    assert [("bce_committee" in resumed(StudentOutput(Z_S, h), make_batch(), model)) for _ in range(3)] == [False, False, True]
    with pytest.raises(ConfigError, match="committee_path.every"):
        _dd({"every": 0})
    with pytest.raises(ConfigError, match="committee_path.rows"):
        _dd({"rows": 0})


def test_diverse_distill_kd_term_golden() -> None:
    """With gating off (w uniform) the teacher term is the mean of per-teacher KD."""
    m = _dd(False, lambda_t=1.0, temperature=1.0, teachers=["dlrm", "foundation"])
    terms = m(StudentOutput(Z_S, torch.zeros(4, 5)), make_batch(), None)
    zs = Z_S.numpy()
    want = 0.5 * np_bce(zs, sig(Z_A.numpy())) + 0.5 * np_bce(zs, sig(Z_B.numpy()))
    assert float(terms["kd_teachers"]) == pytest.approx(want, abs=1e-6)


def test_talking_terms_and_frozen_teachers() -> None:
    torch.manual_seed(0)
    m = METHODS.build("talking", {"d_m": 6}, committee=COMMITTEE, student_dim=5)
    assert "lightgbm" not in m.dec  # GBDT teachers only send
    model = nn.Module()
    model.over_arch = OverArch(5, [4])
    h = torch.randn(4, 5, requires_grad=True)
    terms = m(StudentOutput(Z_S.clone().requires_grad_(), h), make_batch(), model)
    assert set(terms) == {"bce", "bce_interaction", "message", "reconstruction", "kd_interaction"}
    assert float(terms["bce"].detach()) == pytest.approx(np_bce(Z_S.numpy(), Y.numpy()), abs=1e-6)
    sum(terms.values()).backward()
    assert m.enc_s[0].weight.grad is not None and m.dec["dlrm"][0].weight.grad is not None
    assert all(p.grad is None for p in COMMITTEE["dlrm"].head("h").parameters())


def test_leaf_state_is_the_mean_leaf_embedding_over_evenly_spaced_trees() -> None:
    from appdistill.methods.committee import TeacherPort

    torch.manual_seed(0)
    batch = make_batch()
    leaves = batch.teacher["lightgbm"].hidden["leaves"]                      # [4, 8 trees], 4 leaves each
    port = TeacherPort("lightgbm", FakeTeacher("lightgbm", leaves=True), leaf_dim=3, leaf_trees=3)
    assert port.trees.tolist() == [0, 4, 7]                                   # first, middle, last
    assert port.leaf_emb.weight.shape == (3 * 4, 3)                           # rows for the used trees only
    table = port.leaf_emb.weight.detach()
    want = table[leaves[:, [0, 4, 7]].long() + torch.arange(3) * 4].mean(1)   # [4, 3]
    assert torch.allclose(port.state(batch), want, atol=1e-6)
    port.eval()
    assert torch.allclose(port.state(batch), want, atol=1e-6)                 # the same trees at evaluation
    for idx in (torch.tensor([3, 1]), torch.tensor([2])):  # most rows (trees first) or few (rows first)
        assert torch.allclose(port.state(batch, idx), want[idx], atol=1e-6)
    # the gradient reaches exactly the used (tree, leaf) rows
    port.state(batch).sum().backward()
    used = (leaves[:, [0, 4, 7]].long() + torch.arange(3) * 4).unique()
    assert set(port.leaf_emb.weight.grad.abs().sum(1).nonzero().flatten().tolist()) == set(used.tolist())
    every = TeacherPort("lightgbm", FakeTeacher("l", leaves=True), leaf_dim=3, leaf_trees=100)  # >= trees: all
    assert every.trees is None and every.leaf_emb.weight.shape == (8 * 4, 3)
    table = every.leaf_emb.weight.detach()
    assert torch.allclose(every.state(batch), table[leaves.long() + torch.arange(8) * 4].mean(1), atol=1e-6)


def test_methods_declare_the_cache_taps_they_read() -> None:
    assert _dd().cache_taps() == {"dlrm": ["h"], "foundation": ["h"], "lightgbm": ["leaves"]}
    assert _dd(False).cache_taps() == {"dlrm": [], "foundation": [], "lightgbm": []}  # the stack: logits only
    assert METHODS.build("kd", {"teacher": "dlrm"}, committee=COMMITTEE).cache_taps() == {"dlrm": []}
    talking = METHODS.build("talking", {}, committee=COMMITTEE, student_dim=5)
    assert talking.cache_taps()["lightgbm"] == ["leaves"]


def test_tree_term_reads_the_gbdt_parts_only() -> None:
    class Trees(FakeTeacher):
        def taps(self) -> dict[str, Tap]:
            return {**super().taps(), "parts": Tap("parts", 3, "parts")}

    committee = {**COMMITTEE, "lightgbm": Trees("lightgbm", leaves=True)}
    m = METHODS.build("diverse_distill", {"lambda_trees": 0.5}, committee=committee, student_dim=6)
    assert list(m.trees) == ["lightgbm"] and m.trees["lightgbm"].k == 3
    assert m.cache_taps() == {"dlrm": [], "foundation": [], "lightgbm": ["parts"]}
    dd = METHODS.get("diverse_distill")
    assert dd.reads_hidden({"lambda_trees": 0.5}) == ("parts",) and not dd.reads_hidden({"lambda_trees": 0})
    assert dd.reads_hidden({"lambda_trees": 0.5, "committee_path": True}) is True
    batch = make_batch(4)
    batch.teacher["lightgbm"].hidden["parts"] = torch.randn(4, 3)
    out = StudentOutput(torch.zeros(4, requires_grad=True), torch.randn(4, 6, requires_grad=True))
    terms = m(out, batch, None)
    assert set(terms) == {"bce", "kd_teachers", "trees"} and terms["trees"] > 0
    sum(terms.values()).backward()
    assert out.h.grad is not None and out.h.grad.abs().sum() > 0  # the parts shape the student's state
    # a committee without trees: no term, no taps, nothing to configure away
    plain = METHODS.build("diverse_distill", {"lambda_trees": 0.5}, committee=COMMITTEE, student_dim=6)
    assert not len(plain.trees) and "trees" not in plain(out, make_batch(4), None)


def test_committee_grad_scales_what_the_committee_path_sends_into_the_student() -> None:
    def grads(g: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]:
        torch.manual_seed(0)
        model = nn.Module()
        model.over_arch = OverArch(5, [4])
        h = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(2)
        m = _dd({"grad": g})
        terms = m(StudentOutput(Z_S.clone(), h), make_batch(), model)
        (terms["bce_committee"] + terms.get("balance", 0.0)).backward()
        return terms["bce_committee"].detach(), h.grad, model.over_arch.out.weight.grad, float(m.Q[0].weight.grad.abs().sum())

    full, half, none = grads(1.0), grads(0.5), grads(0.0)
    assert torch.allclose(full[0], none[0]) and torch.allclose(full[0], half[0])  # the forward is unchanged
    assert torch.allclose(half[1], 0.5 * full[1], atol=1e-6)                       # h: scaled gradient
    assert torch.allclose(half[2], 0.5 * full[2], atol=1e-6)                       # over-arch: scaled
    assert none[1] is None and none[2] is None                                     # a teaching assistant
    assert none[3] > 0 and abs(none[3] - full[3]) < 1e-5 * max(1.0, full[3])       # the method learns alike
    with pytest.raises(ConfigError, match="committee_path.grad"):
        _dd({"grad": 1.5})


def test_uniform_kd_weights_imitate_every_teacher_alike() -> None:
    model = nn.Module()
    model.over_arch = OverArch(5, [4])
    torch.manual_seed(0)
    m = _dd(kd_weights="uniform", lambda_t=1.5, temperature=2.0)
    terms = m(StudentOutput(Z_S.clone(), torch.randn(4, 5)), make_batch(), model)
    z_t = np.stack([Z_A.numpy(), Z_B.numpy(), np.zeros(4, np.float32)], 1)
    sig = 1 / (1 + np.exp(-z_t / 2.0))
    per = np.stack([np_bce(Z_S.numpy() / 2.0, sig[:, j]) for j in range(3)])
    assert float(terms["kd_teachers"]) == pytest.approx(1.5 * 4.0 * per.mean(), abs=1e-5)
    with pytest.raises(ConfigError, match="kd_weights"):
        _dd(kd_weights="loud")
