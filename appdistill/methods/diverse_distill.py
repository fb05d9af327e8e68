"""``diverse_distill``: the teaching committee with questions, answers and per-sample importance.

Our concrete reading of DiverseDistill (arXiv 2402.14035). For student state ``h``
``[B, d_s]`` (the over-arch input) and teachers ``i = 1..n``:

1. teacher embeddings ``E`` ``[n, d_e]``;
2. question ``q_i = P_i(Q(h) ⊙ e_i)`` ``[B, d_i]`` — one shared question augmenter ``Q: d_s -> d_e``,
   conditioned on the teacher by ``e_i`` and projected to teacher ``i``'s hidden width by ``P_i``
   (the product is taken in the shared ``d_e`` space so one ``Q`` serves teachers of any width);
3. answer ``a_i = head_i(H_i + q_i)`` from the cached hidden tap ``H_i`` through the teacher's own
   frozen upper layers (DLRM over-arch, foundation adapting layers), or a learned answer MLP over
   ``[H_i ; q_i]`` when it has none (LightGBM: ``H_i`` = learned leaf embeddings);
4. answer augmenter ``ã_i = LN(A_i(a_i))`` ``[B, d_s]``;
5. importance ``w = softmax(⟨W h, E⟩ / τ)`` ``[B, n]``; only the top-k (or ``w_i >= θ``) teachers
   of each sample are kept, **before** answers are computed, so skipped answers cost nothing;
   a load-balancing term ``n·Σ_i f_i·P_i`` keeps the gate from collapsing;
6. committee path ``z_qa = over_arch(h + Σ_i w_i ã_i)`` through the student's own over-arch;
7. loss ``BCE(z_s, y) + BCE(z_qa, y) + λ_kd·T²·BCE(z_s/T, σ(sg(z_qa)/T)) + λ_t·Σ_i w_i·KD(z_s, z_i)``
   (or TAID towards the gated committee logit with ``output_loss: taid``).

Steps 2-4 and 6 (the committee path) cost several student steps; ``committee_every`` runs them on
every k-th training step only and ``committee_rows`` on a random subset of each batch's rows.

Everything here is training-only: export keeps the plain student.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from appdistill.errors import ConfigError
from appdistill.features.batch import Batch
from appdistill.methods.base import METHODS, Method, label_bce
from appdistill.methods.committee import build_ports
from appdistill.methods.stack import HeldOut, SegmentStack
from appdistill.methods.taid import TAIDSchedule, global_mean, taid_loss
from appdistill.student.model import RankingModel, StudentOutput



@METHODS.register("diverse_distill")
class DiverseDistill(Method):
    """The defaults are the setting the shipped regime configs use (committee path as a teaching
    assistant, soft importance weights on the teacher KD, the committee path every 8th step); the
    bench tunes ``lambda_t`` and ``temperature`` around it (:attr:`grid`).

    Args:
        committee: ``{name: Teacher}``.
        student_dim: ``d_s`` (width of ``h``), supplied by the training loop.
        teachers: committee members to use (default: all).
        complementary: keep LightGBM/DLRM teachers (``False`` = foundation-only ablation).
        gating: per-sample importance with skipping (``False`` = every teacher answers, w uniform).
        top_k / threshold: keep the ``top_k`` most important teachers per sample, or those with
            ``w_i >= threshold`` (the most important is always kept).
        questions: ``False`` = plain answers ``head_i(H_i)`` (no question) ablation.
        committee_path: ``False`` = drop ``z_qa`` and its terms (ablation).
        committee_grad: scale of the gradient the committee terms send into the student (``h`` and
            the over-arch); the forward is unchanged. ``0`` makes the committee path a teaching
            assistant: it trains only the method's modules, and the student learns from it through
            ``kd_committee`` alone, so the student's state is not bent towards what helps *with* the
            teachers' answers (which the served model never has). (It replaces an earlier
            ``committee_trains_over_arch`` switch, whose only effect is the ``0`` end of this scale.)
        d_e: teacher-embedding / question width.
        tau: gate temperature.
        lambda_kd, lambda_t, lambda_lb: weights of the committee-KD, teacher-KD and balance terms.
        temperature: KD temperature ``T``.
        output_loss: ``kd`` or ``taid`` for the teacher term.
        kd_weights: how the teacher term weighs the teachers' cached logits: ``gated`` (the top-k
            weights ``w``), ``soft`` (the ungated importance ``softmax``: cached logits cost nothing
            to read, so only *answers* need skipping, and every teacher keeps teaching each sample),
            ``uniform`` (``1/n``: the gate and committee path then shape the student's state, not
            whom it imitates) or ``stacked``: one target, the committee's held-out stack
            ``z* = b_s + Σ_i a_{s,i} · n·p_i(x) · z_i`` (:mod:`appdistill.methods.stack`: per item
            segment ``s``, ``a, b`` fitted on the validation split, which no teacher trained on),
            the gate's ungated importance ``p`` modulating it per sample (with ``gating: false`` it
            is the stack itself). ``auto`` (the default): ``stacked`` when the committee's
            validation outputs are supplied (training through the pipeline), else ``soft``.
        committee_rows: rows of each batch that take the committee path (questions, answers,
            ``z_qa``), drawn at random per step; ``None`` = all. The gate's importance and the
            teacher KD still cover every row. Answers run teachers' frozen heads and the answer
            nets forward and backward, several times the student's own step at full batch; with
            ``committee_grad: 0`` the path only trains the method's modules (the gate first), and a
            random quarter of each batch trains them about as well (README, "Step cost").
        committee_every: run the committee path on every k-th training step only (the gate, the
            teacher KD and the balance term still run every step): its cost is mostly per-op
            overhead that fewer rows do not shrink, so this is the lever that amortises it.
        taps: ``{teacher: tap}`` overrides of the hidden tap each teacher answers from.
        leaf_dim / leaf_trees: GBDT leaf-embedding width and trees (evenly spaced) in the leaf state
            (:class:`~appdistill.methods.committee.TeacherPort`; ``None`` = every tree).
        routing: the gate also reads what routing needs, not only ``h``: each teacher's cached
            logit (its confidence), its distance from the committee mean (disagreement), and the
            row's item training frequency (log-scaled, plus a cold flag). ``w = softmax(⟨W h + V r,
            E⟩ / τ)`` with ``r`` ``[B, 2n + 2]``, no gradient into ``r``.
        item_frequency: ``[n_item_codes]`` training rows per item code (supplied by the loop).
        held_out: the committee's cached validation logits and labels
            (:class:`~appdistill.methods.stack.HeldOut`, supplied by the loop; ``stacked`` needs it).
    """

    # lambda_t 1 / 4: the same teacher-KD-to-label ratios as kd's alpha 0.5 / 0.8
    grid = {"lambda_t": [1.0, 4.0], "temperature": [1.0, 2.0]}

    kwarg_ranges = {"top_k": {"ge": 1}, "threshold": {"ge": 0, "le": 1}, "committee_grad": {"ge": 0, "le": 1},
                    "d_e": {"ge": 1, "le": 4096}, "tau": {"gt": 0, "le": 100}, "lambda_kd": {"ge": 0},
                    "lambda_t": {"ge": 0}, "lambda_lb": {"ge": 0}, "temperature": {"gt": 0, "le": 100},
                    "leaf_dim": {"ge": 1, "le": 4096}, "leaf_trees": {"ge": 1}, "committee_rows": {"ge": 1},
                    "committee_every": {"ge": 1}}

    def __init__(self, committee: dict[str, Any] | None = None, student_dim: int = 0,
                 teachers: list[str] | None = None, complementary: bool = True, gating: bool = True,
                 top_k: int | None = None, threshold: float | None = None, questions: bool = True,
                 committee_path: bool = True,
                 committee_grad: float = 0.0, d_e: int = 32,
                 tau: float = 1.0, lambda_kd: float = 0.0,
                 lambda_t: float = 1.5, lambda_lb: float = 0.01, temperature: float = 1.0,
                 output_loss: str = "kd", taps: dict[str, str] | None = None, leaf_dim: int = 32,
                 leaf_trees: int | None = 32, taid: dict[str, float] | None = None,
                 kd_weights: str = "auto", committee_rows: int | None = None,
                 committee_every: int = 8, routing: bool = False,
                 item_frequency: Any = None, held_out: HeldOut | None = None) -> None:
        super().__init__(committee)
        committee = committee or {}
        names = self.pick(teachers)
        if not complementary:
            names = [n for n in names if committee[n].kind != "complementary"]
            if not names:
                raise ConfigError("diverse_distill: complementary=false leaves no (foundation) teacher")
        if output_loss not in ("kd", "taid"):
            raise ConfigError(f"diverse_distill: output_loss must be 'kd' or 'taid', got '{output_loss}'")
        if student_dim <= 0:
            raise ConfigError("diverse_distill: student_dim must be supplied (the width of h)")
        self.names, self.requires = names, tuple(names)
        n = len(names)
        self.gating, self.questions, self.committee_path = gating, questions, committee_path
        if not 0.0 <= committee_grad <= 1.0:
            raise ConfigError(f"diverse_distill: committee_grad must be in [0, 1], got {committee_grad}")
        self.committee_grad = committee_grad
        self.top_k = top_k if top_k is not None else (max(1, n - 1) if threshold is None else None)
        self.threshold = threshold
        self.tau, self.T = tau, temperature
        self.lambda_kd, self.lambda_t, self.lambda_lb = lambda_kd, lambda_t, lambda_lb
        self.output_loss = output_loss
        if kd_weights not in ("auto", "gated", "soft", "uniform", "stacked"):
            raise ConfigError(f"diverse_distill: kd_weights must be 'auto', 'gated', 'soft', 'uniform' or 'stacked', "
                              f"got '{kd_weights}'")
        if kd_weights == "auto":  # the stack where the loop supplies the held-out outputs, else soft
            kd_weights = "stacked" if held_out is not None else "soft"
        self.kd_weights = kd_weights
        self.stack: SegmentStack | None = None
        if kd_weights == "stacked":
            if held_out is None:
                raise ConfigError("diverse_distill: kd_weights 'stacked' fits the committee on its cached "
                                  "validation outputs; train through appdistill.pipeline (`appdistill train`), "
                                  "which supplies them")
            self.stack = SegmentStack.fit(held_out, names, item_frequency)
        if committee_rows is not None and committee_rows < 1:
            raise ConfigError(f"diverse_distill: committee_rows must be >= 1 or null, got {committee_rows}")
        self.committee_rows = committee_rows
        if committee_every < 1:
            raise ConfigError(f"diverse_distill: committee_every must be >= 1, got {committee_every}")
        self.committee_every = committee_every
        self._calls = 0  # training forwards so far (committee_every counts them; checkpointed)
        self.schedule = TAIDSchedule(**(taid or {})) if output_loss == "taid" else None

        self.ports = build_ports(committee, names, taps, leaf_dim, leaf_trees)
        self.E = nn.Parameter(torch.randn(n, d_e) * 0.1)              # teacher embeddings
        self.W = nn.Linear(student_dim, d_e, bias=False)                # gate query
        # ReLU, not GELU: erf-GELU was ~10% of the method's CPU step at these widths
        self.Q = nn.Sequential(nn.Linear(student_dim, d_e), nn.ReLU(), nn.Linear(d_e, d_e))  # shared question
        self.P = nn.ModuleDict({k: nn.Linear(d_e, p.dim) for k, p in self.ports.items()})
        # learned answer nets for teachers without a frozen head: MLP over [H_i ; q_i]
        self.answer_net = nn.ModuleDict({
            k: nn.Sequential(nn.Linear(2 * p.dim, 64), nn.ReLU(), nn.Linear(64, 64))
            for k, p in self.ports.items() if not p.has_head})
        self.A = nn.ModuleDict({
            k: nn.Sequential(nn.Linear(64 if k in self.answer_net else p.answer_dim, student_dim),
                             nn.LayerNorm(student_dim))
            for k, p in self.ports.items()})
        self.routing = routing
        if routing:
            freq = torch.as_tensor(item_frequency if item_frequency is not None else [], dtype=torch.float32)
            self.register_buffer("item_freq", torch.log1p(freq) / max(float(torch.log1p(freq).max()), 1.0)
                                 if freq.numel() else freq, persistent=False)
            self.V = nn.Linear(2 * n + 2, d_e, bias=False)               # routing features -> gate query
            nn.init.zeros_(self.V.weight)  # starts as the plain gate; learns to route from there
        self.answer_calls = {k: 0 for k in names}  # rows answered per teacher (tests count these)
        self._kept = self._total = 0

    # ------------------------------------------------------------------ gate
    def importance(self, h: torch.Tensor, r: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w, keep, probs)``: gated weights ``[B, n]`` (0 where skipped, rows sum to 1), the keep
        mask ``[B, n]`` bool and the ungated softmax ``[B, n]``; ``r``: routing features or None."""
        probs = self.gate_probs(h, r)
        if not self.gating:
            keep = torch.ones_like(probs, dtype=torch.bool)
            return torch.full_like(probs, 1.0 / probs.shape[1]), keep, probs
        if self.threshold is not None:
            keep = probs >= self.threshold
            keep |= F.one_hot(probs.argmax(1), probs.shape[1]).bool()
        else:
            k = min(self.top_k or probs.shape[1], probs.shape[1])
            keep = torch.zeros_like(probs, dtype=torch.bool).scatter(1, probs.topk(k, dim=1).indices, True)
        w = probs * keep
        return w / w.sum(1, keepdim=True).clamp_min(1e-12), keep, probs

    def gate_probs(self, h: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        """The ungated importance ``softmax(⟨W h (+ V r), E⟩ / τ)`` ``[B, n]``."""
        # ⟨W h, e_i⟩ = h·(Wᵀ e_i): one [n, d_s] matrix instead of projecting every sample to d_e;
        # F.linear with it, not h @ its transpose: MKL's skinny [B, d_s] x [d_s, n] was 2.5x slower
        logits = F.linear(h, self.E @ self.W.weight)
        if r is not None:
            logits = logits + F.linear(r, self.E @ self.V.weight)
        return torch.softmax(logits / self.tau, dim=1)

    def route_features(self, batch: Batch, z_t: torch.Tensor) -> torch.Tensor | None:
        """``r`` ``[B, 2n + 2]`` (see ``routing``), or None without routing."""
        if not self.routing:
            return None
        z = z_t.detach()
        feats = [torch.tanh(z / 4), torch.tanh((z - z.mean(1, keepdim=True)).abs() / 4)]
        if self.item_freq.numel():
            codes = batch.item_ids.clamp(0, self.item_freq.numel() - 1)
            f = torch.where(batch.item_ids < self.item_freq.numel(), self.item_freq[codes], 0.0)
        else:
            f = torch.zeros_like(z[:, 0])
        return torch.cat([*feats, f.unsqueeze(1), (f == 0).float().unsqueeze(1)], 1)

    @torch.no_grad()
    def route_weights(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Each teacher's share ``[B, n]`` (rows sum to 1) of what the student distils on ``batch``
        (routing reports): the KD weights the teacher term uses (gated, soft or uniform), or with
        the held-out stack ``|a_{s,i} · n·p_i| / Σ_j |a_{s,j} · n·p_j|``, its segment's weights
        modulated by the gate. Not the raw gate: without gating (or with ``uniform``) the gate's
        softmax weights nothing, and reporting it would show a routing that does not happen."""
        z_t = torch.stack([self.ports[n].logit(batch) for n in self.names], 1)
        n = len(self.names)
        if self.kd_weights == "uniform" or not self.gating:
            wd = torch.full_like(z_t, 1.0 / n)
        else:
            w, _, probs = self.importance(h, self.route_features(batch, z_t))
            wd = w if self.kd_weights == "gated" else probs
        if self.stack is None:
            return wd
        a = self.stack.weights.index_select(0, self.stack.segment_of(batch.item_ids))[:, :-1]
        share = (a * wd * n).abs()
        return share / share.sum(1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------------ answers
    def committee_message(self, h: torch.Tensor, batch: Batch, w: torch.Tensor, keep: torch.Tensor,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i w_i ã_i`` ``[B', d_s]``, computing answers only for kept (sample, teacher) pairs.

        ``h``, ``w``, ``keep`` hold the committee rows; ``rows`` are their batch indices (None = all).
        """
        msg = torch.zeros_like(h)
        qh = self.Q(h) if self.questions else None
        for j, name in enumerate(self.names):
            idx = keep[:, j].nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            port = self.ports[name]
            H = port.state(batch, idx if rows is None else rows.index_select(0, idx))
            q = self.P[name](qh[idx] * self.E[j]) if qh is not None else torch.zeros_like(H)
            if name in self.answer_net:
                a = self.answer_net[name](torch.cat([H, q], 1))
            else:
                a = port.answer(H + q)
            self.answer_calls[name] += int(idx.numel())
            msg = msg.index_add(0, idx, w[idx, j:j + 1] * self.A[name](a))
        return msg

    def committee_subset(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Sorted batch rows that take the committee path this step (None = all ``n``)."""
        if self.committee_rows is None or self.committee_rows >= n or not self.training:
            return None
        # torch's global RNG: seeded by train() and restored on resume
        return torch.randperm(n, device=device)[: self.committee_rows].sort().values

    # ------------------------------------------------------------------ loss
    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        h, z_s, y = out.h, out.logits, batch.labels
        g = self.committee_grad if self.committee_path else 1.0
        h_c = scale_grad(h, g)  # what the method's modules read of the student
        run_committee = self.committee_path and (not self.training or self._calls % self.committee_every == 0)
        self._calls += int(self.training)
        # between committee steps nothing trains the gate (its weights on the teacher KD are
        # detached), so it runs without a graph and the balance term waits for the next one
        train_gate = run_committee or not self.committee_path
        z_t = torch.stack([self.ports[n].logit(batch) for n in self.names], 1)  # [B, n]
        r = self.route_features(batch, z_t)
        if train_gate or (self.gating and self.kd_weights == "gated"):
            with torch.set_grad_enabled(train_gate and torch.is_grad_enabled()):
                w, keep, probs = self.importance(h_c, r)
        else:  # the teacher KD reads only the ungated importance (or none): skip the top-k
            with torch.no_grad():
                probs = self.gate_probs(h_c, r)
        terms = {"bce": label_bce(z_s, y)}
        if run_committee:
            rows = self.committee_subset(h.shape[0], h.device)
            sub = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
            kept = sub(keep)
            self._kept += int(kept.sum())
            self._total += kept.numel()
            x = sub(h_c) + self.committee_message(sub(h_c), batch, sub(w), kept, rows)
            if g == 1.0:
                z_qa = model.over_arch(x)
            else:
                weights = {k: scale_grad(v, g) for k, v in model.over_arch.named_parameters()}
                z_qa = torch.func.functional_call(model.over_arch, weights, (x,))
            terms["bce_committee"] = label_bce(z_qa, sub(y))
            terms["kd_committee"] = self.lambda_kd * self.T ** 2 * F.binary_cross_entropy_with_logits(
                sub(z_s) / self.T, torch.sigmoid(z_qa.detach() / self.T))
        elif not self.committee_path:
            self._kept += int(keep.sum())
            self._total += keep.numel()
        if self.kd_weights == "uniform" or not self.gating:
            wd = torch.full_like(probs, 1.0 / probs.shape[1])
        else:
            wd = (w if self.kd_weights == "gated" else probs).detach()
        if self.stack is not None:  # one target: the held-out stack, modulated per sample by the gate
            z_c = self.stack(z_t * (wd * wd.shape[1]), batch.item_ids)
            if self.output_loss == "kd":
                terms["kd_teachers"] = self.lambda_t * self.T ** 2 * F.binary_cross_entropy_with_logits(
                    z_s / self.T, torch.sigmoid(z_c / self.T))
            else:
                assert self.schedule is not None
                terms["taid_teachers"] = self.lambda_t * taid_loss(z_s, z_c, self.schedule.t)
        elif self.output_loss == "kd":
            per = F.binary_cross_entropy_with_logits(
                (z_s / self.T).unsqueeze(1).expand_as(z_t), torch.sigmoid(z_t / self.T), reduction="none")
            terms["kd_teachers"] = self.lambda_t * self.T ** 2 * (wd * per).sum(1).mean()
        else:
            assert self.schedule is not None
            z_c = (wd * z_t).sum(1)
            t = self.schedule.t
            terms["taid_teachers"] = self.lambda_t * taid_loss(z_s, z_c, t)
        if train_gate and self.gating and self.lambda_lb and len(self.names) > 1:
            f = keep.float().mean(0)
            f = f / f.sum()
            terms["balance"] = self.lambda_lb * len(self.names) * (f.detach() * probs.mean(0)).sum()
        return terms

    def on_step_end(self, loss: torch.Tensor, step: int, total_steps: int) -> None:
        if self.schedule is not None:
            self.schedule.update(global_mean(loss), step, total_steps)

    def skipped_fraction(self) -> float:
        return 1.0 - self._kept / self._total if self._total else 0.0

    def logs(self) -> dict[str, float]:
        out = {"skipped": self.skipped_fraction()}
        if self.schedule is not None:
            out["taid_t"] = self.schedule.t
        return out

    def state(self) -> dict[str, Any]:
        s: dict[str, Any] = {"kept": self._kept, "total": self._total, "answer_calls": dict(self.answer_calls),
                             "calls": self._calls}
        if self.schedule is not None:
            s["taid"] = self.schedule.state()
        return s

    def load_state(self, state: dict[str, Any]) -> None:
        self._kept, self._total = int(state["kept"]), int(state["total"])
        self._calls = int(state.get("calls", 0))
        self.answer_calls.update(state.get("answer_calls", {}))
        if self.schedule is not None and "taid" in state:
            self.schedule.load_state(state["taid"])


def scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward; its gradient times ``g`` in the backward (``g = 0``: ``x.detach()``)."""
    if g == 1.0:
        return x
    if g == 0.0:
        return x.detach()
    return x.detach() + g * (x - x.detach())
