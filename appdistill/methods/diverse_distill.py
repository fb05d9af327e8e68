"""``diverse_distill``: the teaching committee distilled through its held-out stack, optionally with
the committee path of questions, answers and per-sample importance.

Our reading of DiverseDistill (arXiv 2402.14035), reduced to the parts the benchmark shows matter.
For student logit ``z_s`` ``[B]``, state ``h`` ``[B, d_s]`` and teachers ``i = 1..n`` with cached
logits ``z_i``:

- **Default**: the student distils one target, the committee's *held-out stack*
  ``z* = b_s + Σ_i a_{s,i} z_i`` (:mod:`appdistill.methods.stack`: per item segment ``s``, fitted
  on the validation split, which no teacher trained on), so each teacher teaches where it is
  really good: ``loss = BCE(z_s, y) + λ_t·T²·BCE(z_s/T, σ(z*/T))``.
- **The committee path** (``committee_path: true`` or a map of
  :class:`~appdistill.methods.committee.CommitteePath` fields; off by default):

  1. teacher embeddings ``E`` ``[n, d_e]``; question ``q_i = P_i(Q(h) ⊙ e_i)`` ``[B, d_i]``;
  2. answer ``a_i = head_i(H_i + q_i)`` from the cached hidden tap ``H_i`` through the teacher's
     frozen upper layers, or a learned answer MLP over ``[H_i ; q_i]`` when it has none (LightGBM:
     learned leaf embeddings); answer augmenter ``ã_i = LN(A_i(a_i))`` ``[B, d_s]``;
  3. importance ``w = softmax(⟨W h, E⟩ / τ)`` ``[B, n]``, top-k applied **before** answers are
     computed (skipped answers cost nothing), a load-balancing term against collapse;
  4. ``z_qa = over_arch(h + Σ_i w_i ã_i)`` through the student's own over-arch, trained with
     ``BCE(z_qa, y)``; the gate's importance modulates the teacher KD (the stack's weights become
     ``a_{s,i} · n·w_i(x)``). It costs several student steps, so it runs on every ``every``-th step.

Everything here is training-only: export keeps the plain student.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from appdistill.errors import ConfigError
from appdistill.features.batch import Batch
from appdistill.methods.base import METHODS, Method, label_bce
from appdistill.methods.committee import CommitteePath, build_ports
from appdistill.methods.stack import HeldOut, SegmentStack
from appdistill.methods.taid import TAIDSchedule, global_mean, taid_loss
from appdistill.methods.trees import TreeParts, parts_tap
from appdistill.student.model import RankingModel, StudentOutput

#: the tree term's default weight (README, "Methods": chosen on validation across regimes)
LAMBDA_TREES = 2.0


@METHODS.register("diverse_distill")
class DiverseDistill(Method):
    """The defaults are the setting the shipped regime configs use (the held-out stack, no committee
    path), chosen on validation across regimes (README, "Methods"); the bench tunes ``lambda_t`` and
    ``temperature`` around it (:attr:`grid`).

    Args:
        committee: ``{name: Teacher}``.
        student_dim: ``d_s`` (width of ``h``), supplied by the training loop.
        teachers: committee members to use (default: all).
        lambda_t: weight of the teacher term.
        temperature: KD temperature ``T``.
        kd_weights: what the teacher term distils: ``stacked`` (one target, the held-out stack
            ``z*``; with the committee path, its weights modulated per sample by the gate,
            ``a_{s,i} · n·p_i(x)``), ``uniform`` (the mean of per-teacher KD), and with the committee
            path ``soft`` (per-teacher KD weighted by the gate's ungated importance) or ``gated``
            (by its top-k weights). ``auto`` (the default): ``stacked`` when the loop supplies the
            committee's validation outputs (training through the pipeline), else ``soft`` with the
            committee path and ``uniform`` without.
        output_loss: ``kd`` or ``taid`` (TAID towards the target, ``taid:`` its schedule).
        committee_path: ``false`` (default), ``true`` or a map of
            :class:`~appdistill.methods.committee.CommitteePath` fields.
        lambda_trees: weight of the tree term: the student's state also regresses each GBDT
            teacher's function in parts (its ``parts`` tap, :mod:`appdistill.methods.trees`: the sums
            of its trees in 8 groups of boosting order), each part's squared error over its variance.
            ``0`` turns it off; committees without a GBDT have no such term.
        item_frequency: ``[n_item_codes]`` training rows per item code (supplied by the loop).
        held_out: the committee's cached validation logits and labels
            (:class:`~appdistill.methods.stack.HeldOut`, supplied by the loop; ``stacked`` needs it).

    Example:
        >>> m = METHODS.build("diverse_distill", {"committee_path": {"every": 4}}, committee=teachers,
        ...                   student_dim=64)  # doctest: +SKIP
    """

    # lambda_t 1 / 4: the same teacher-KD-to-label ratios as kd's alpha 0.5 / 0.8
    grid = {"lambda_t": [1.0, 4.0], "temperature": [1.0, 2.0]}

    kwarg_ranges = {"lambda_t": {"ge": 0}, "temperature": {"gt": 0, "le": 100}, "lambda_trees": {"ge": 0}}
    #: kwargs of earlier releases, and where they went (config errors say so)
    moved_kwargs = {
        **{old: f"moved to committee_path.{new} (the committee path's settings are one map now)"
           for old, new in (("gating", "gating"), ("top_k", "top_k"), ("threshold", "threshold"),
                            ("questions", "questions"), ("committee_grad", "grad"), ("d_e", "d_e"), ("tau", "tau"),
                            ("lambda_kd", "lambda_kd"), ("lambda_lb", "lambda_lb"), ("taps", "taps"),
                            ("leaf_dim", "leaf_dim"), ("leaf_trees", "leaf_trees"), ("committee_rows", "rows"),
                            ("committee_every", "every"), ("routing", "routing"))},
        "complementary": "removed: list the teachers to keep under `teachers:` instead",
    }

    @classmethod
    def reads_hidden(cls, kwargs: dict[str, Any]) -> bool | tuple[str, ...]:
        """The committee path (its answers) reads hidden taps, the tree term the GBDT teachers'
        ``parts`` taps only; the held-out stack reads logits."""
        if kwargs.get("committee_path"):
            return True
        return ("parts",) if kwargs.get("lambda_trees", LAMBDA_TREES) else False

    def cache_taps(self) -> dict[str, list[str]]:
        taps = super().cache_taps()
        for name, parts in self.trees.items():
            taps[name] = sorted({*taps.get(name, []), parts.tap})
        return taps

    @classmethod
    def check_kwargs(cls, kw: dict[str, Any]) -> list[str]:
        """Constraints between kwargs, checked when a config loads (``registry.kwargs_errors``)."""
        if kw.get("kd_weights") in ("soft", "gated") and not kw.get("committee_path"):
            return [f"kd_weights: '{kw['kd_weights']}' weighs the teachers by the committee path's gate; "
                    "set committee_path: true, or use 'stacked' / 'uniform'"]
        return []

    def __init__(self, committee: dict[str, Any] | None = None, student_dim: int = 0,
                 teachers: list[str] | None = None, lambda_t: float = 4.0, temperature: float = 2.0,
                 kd_weights: str = "auto", output_loss: str = "kd", taid: dict[str, float] | None = None,
                 committee_path: bool | CommitteePath = False, lambda_trees: float = LAMBDA_TREES,
                 item_frequency: Any = None, held_out: HeldOut | None = None) -> None:
        super().__init__(committee)
        committee = committee or {}
        names = self.pick(teachers)
        if output_loss not in ("kd", "taid"):
            raise ConfigError(f"diverse_distill: output_loss must be 'kd' or 'taid', got '{output_loss}'")
        self.names, self.requires = names, tuple(names)
        n = len(names)
        if isinstance(committee_path, dict):
            try:
                committee_path = CommitteePath.model_validate(committee_path)
            except ValidationError as e:
                bad = "; ".join(f"committee_path.{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
                raise ConfigError(f"diverse_distill: {bad}") from None
        cp = CommitteePath() if committee_path is True else committee_path or None
        self.path: CommitteePath | None = cp
        self.gating = bool(cp and cp.gating)
        self.T, self.lambda_t, self.output_loss = temperature, lambda_t, output_loss
        if kd_weights not in ("auto", "gated", "soft", "uniform", "stacked"):
            raise ConfigError(f"diverse_distill: kd_weights must be 'auto', 'gated', 'soft', 'uniform' or 'stacked', "
                              f"got '{kd_weights}'")
        problems = self.check_kwargs({"kd_weights": kd_weights, "committee_path": cp})
        if problems:
            raise ConfigError(f"diverse_distill: {problems[0]}")
        if kd_weights == "auto":  # the stack where the loop supplies the held-out outputs
            kd_weights = "stacked" if held_out is not None else ("soft" if cp else "uniform")
        self.kd_weights = kd_weights
        self.stack: SegmentStack | None = None
        if kd_weights == "stacked":
            if held_out is None:
                raise ConfigError("diverse_distill: kd_weights 'stacked' fits the committee on its cached "
                                  "validation outputs; train through appdistill.pipeline (`appdistill train`), "
                                  "which supplies them")
            self.stack = SegmentStack.fit(held_out, names, item_frequency)
        self._calls = 0  # training forwards so far (the path's `every` counts them; checkpointed)
        self.schedule = TAIDSchedule(**(taid or {})) if output_loss == "taid" else None
        self._kept = self._total = 0
        self.answer_calls = {k: 0 for k in names}  # rows answered per teacher (tests count these)
        self.lambda_trees = lambda_trees
        self.trees = nn.ModuleDict()
        tree_taps = {k: t for k in names if (t := parts_tap(committee[k])) is not None} if lambda_trees else {}
        if tree_taps:  # a committee without trees has no tree term (the default setting then costs nothing)
            if student_dim <= 0:
                raise ConfigError("diverse_distill: student_dim must be supplied (the width of h)")
            self.trees = nn.ModuleDict({k: TreeParts(t, student_dim) for k, t in tree_taps.items()})
        if cp is None:
            return  # logits only: no ports, no gate, the cache join reads no hidden tap
        if student_dim <= 0:
            raise ConfigError("diverse_distill: student_dim must be supplied (the width of h)")
        self.top_k = cp.top_k if cp.top_k is not None else (max(1, n - 1) if cp.threshold is None else None)
        self.ports = build_ports(committee, names, cp.taps, cp.leaf_dim, cp.leaf_trees)
        d_e = cp.d_e
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
        if cp.routing:
            freq = torch.as_tensor(item_frequency if item_frequency is not None else [], dtype=torch.float32)
            self.register_buffer("item_freq", torch.log1p(freq) / max(float(torch.log1p(freq).max()), 1.0)
                                 if freq.numel() else freq, persistent=False)
            self.V = nn.Linear(2 * n + 2, d_e, bias=False)               # routing features -> gate query
            nn.init.zeros_(self.V.weight)  # starts as the plain gate; learns to route from there

    def logits(self, batch: Batch) -> torch.Tensor:
        """The teachers' cached logits ``[B, n]``."""
        return torch.stack([batch.teacher[n].logits.float() for n in self.names], 1)

    # ------------------------------------------------------------------ gate
    def importance(self, h: torch.Tensor, r: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w, keep, probs)``: gated weights ``[B, n]`` (0 where skipped, rows sum to 1), the keep
        mask ``[B, n]`` bool and the ungated softmax ``[B, n]``; ``r``: routing features or None."""
        probs = self.gate_probs(h, r)
        if not self.gating:
            keep = torch.ones_like(probs, dtype=torch.bool)
            return torch.full_like(probs, 1.0 / probs.shape[1]), keep, probs
        if self.path.threshold is not None:
            keep = probs >= self.path.threshold
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
        return torch.softmax(logits / self.path.tau, dim=1)

    def route_features(self, batch: Batch, z_t: torch.Tensor) -> torch.Tensor | None:
        """``r`` ``[B, 2n + 2]`` (see ``CommitteePath.routing``), or None without routing."""
        if self.path is None or not self.path.routing:
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
        z_t = self.logits(batch)
        w = probs = None
        if self.gating and self.kd_weights != "uniform":
            w, _, probs = self.importance(h, self.route_features(batch, z_t))
        wd = self.teacher_weights(z_t, w, probs)
        if self.stack is None:
            return wd
        a = self.stack.weights.index_select(0, self.stack.segment_of(batch.item_ids))[:, :-1]
        share = (a * wd * len(self.names)).abs()
        return share / share.sum(1, keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------------ answers
    def committee_message(self, h: torch.Tensor, batch: Batch, w: torch.Tensor, keep: torch.Tensor,
                          rows: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ_i w_i ã_i`` ``[B', d_s]``, computing answers only for kept (sample, teacher) pairs.

        ``h``, ``w``, ``keep`` hold the committee rows; ``rows`` are their batch indices (None = all).
        """
        msg = torch.zeros_like(h)
        qh = self.Q(h) if self.path.questions else None
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
        k = self.path.rows
        if k is None or k >= n or not self.training:
            return None
        # torch's global RNG: seeded by train() and restored on resume
        return torch.randperm(n, device=device)[:k].sort().values

    # ------------------------------------------------------------------ loss
    def forward(self, out: StudentOutput, batch: Batch, model: RankingModel) -> dict[str, torch.Tensor]:
        z_s, y = out.logits, batch.labels
        z_t = self.logits(batch)  # [B, n]
        terms = {"bce": label_bce(z_s, y)}
        if len(self.trees):
            terms["trees"] = self.lambda_trees * self.tree_term(out.h, batch)
        wd = self.teacher_weights(z_t) if self.path is None else self.committee_terms(out, batch, model, z_t, terms)
        if self.stack is not None:  # one target: the held-out stack (modulated per sample by the gate)
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
            terms["taid_teachers"] = self.lambda_t * taid_loss(z_s, (wd * z_t).sum(1), self.schedule.t)
        return terms

    def tree_term(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The GBDT teachers' parts regressed from ``h`` ``[B, d_s]``. With the held-out stack each
        row's term weighs what the teacher's share of its row's stack exceeds an equal share by,
        ``max(n·share − 1, 0)`` (:meth:`SegmentStack.shares`; a sole teacher: 1): a GBDT's structure
        is taught where the stack trusts it more than the others, and not where it trusts it less
        (where the text teacher knows better: cold items, text-led data)."""
        share = None
        if self.stack is not None:
            share = self.stack.shares(batch.item_ids)
            if share.shape[1] > 1:
                share = (share - 1).clamp_min(0)
        return sum(p.loss(h, batch.teacher[k].hidden[p.tap],
                          None if share is None else share[:, self.names.index(k)])
                   for k, p in self.trees.items())

    def committee_terms(self, out: StudentOutput, batch: Batch, model: RankingModel, z_t: torch.Tensor,
                        terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """The committee path's terms (added to ``terms``); returns the teacher-KD weights ``[B, n]``
        (detached)."""
        cp = self.path
        assert cp is not None
        h, z_s, y = out.h, out.logits, batch.labels
        g = cp.grad
        h_c = scale_grad(h, g)  # what the method's modules read of the student
        run = not self.training or self._calls % cp.every == 0
        self._calls += int(self.training)
        # between committee steps nothing trains the gate (its weights on the teacher KD are
        # detached), so it runs without a graph and the balance term waits for the next one
        r = self.route_features(batch, z_t)
        w = None
        if run or (self.gating and self.kd_weights == "gated"):
            with torch.set_grad_enabled(run and torch.is_grad_enabled()):
                w, keep, probs = self.importance(h_c, r)
        else:  # the teacher KD reads only the ungated importance (or none): skip the top-k
            with torch.no_grad():
                probs = self.gate_probs(h_c, r)
        if run:
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
            if cp.lambda_kd:
                terms["kd_committee"] = cp.lambda_kd * self.T ** 2 * F.binary_cross_entropy_with_logits(
                    sub(z_s) / self.T, torch.sigmoid(z_qa.detach() / self.T))
            if self.gating and cp.lambda_lb and len(self.names) > 1:
                f = keep.float().mean(0)
                f = f / f.sum()
                terms["balance"] = cp.lambda_lb * len(self.names) * (f.detach() * probs.mean(0)).sum()
        return self.teacher_weights(z_t, w, probs)

    def teacher_weights(self, z_t: torch.Tensor, w: torch.Tensor | None = None,
                        probs: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher term's weights ``[B, n]`` (detached): uniform without gating (or with
        ``uniform``), else the gate's top-k weights ``w`` (``gated``) or its softmax ``probs``."""
        if self.kd_weights == "uniform" or not self.gating:
            return torch.full_like(z_t, 1.0 / z_t.shape[1])
        return (w if self.kd_weights == "gated" else probs).detach()

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
