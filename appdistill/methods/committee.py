"""Shared pieces for methods that talk to teachers through their hidden states.

:class:`TeacherPort` wraps one frozen teacher for a method: it turns the teacher's cached hidden
tap into a float state ``H_i`` ``[B, d_i]`` (LightGBM leaf indices become learned leaf embeddings),
and runs the teacher's frozen head on a (perturbed) state when the teacher has one. Teacher weights
never change; gradients flow *through* frozen heads into the method's own modules.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from appdistill.errors import ConfigError
from appdistill.features.batch import Batch
from appdistill.teachers.base import Head


class CommitteePath(BaseModel):
    """DiverseDistill's committee path (``method.kwargs.committee_path``: ``false``, ``true`` or a map of
    these fields): teacher-conditioned questions from the student state, answers through each
    teacher's frozen head, and the per-sample importance gate they train, which then modulates the
    teacher KD. Off by default (README, "Methods": on no regime measured did it beat the held-out stack
    alone); these fields are its internals, with the measured defaults.

    Args:
        every: run the path on every k-th training step (its cost is per-op overhead that fewer rows
            do not shrink; the gate's softmax still weights the KD in between).
        rows: rows of a batch that take the path, drawn at random per step (``None`` = all).
        grad: scale of the gradient the path sends into the student (``0``: a teaching assistant that
            trains only the method's modules; ``1``: the path also trains the student).
        lambda_kd: weight of distilling the path's own logit ``z_qa`` into the student.
        gating: per-sample importance with top-k skipping (``false``: every teacher answers, uniform).
        top_k / threshold: keep the ``top_k`` most important teachers per sample (default ``n - 1``),
            or those with importance ``>= threshold`` (the most important always kept).
        questions: ``false``: answers ``head_i(H_i)`` without a question (ablation).
        routing: the gate also reads each teacher's cached logit, its distance from the committee
            mean and the row's item training frequency (log-scaled, plus a cold flag).
        d_e: teacher-embedding / question width.  tau: gate temperature.
        lambda_lb: weight of the load-balancing term.
        leaf_dim / leaf_trees: GBDT leaf-embedding width and trees in the leaf state (:class:`TeacherPort`).
        taps: ``{teacher: tap}`` overrides of the hidden tap each teacher answers from.
    """

    model_config = ConfigDict(extra="forbid")

    every: int = Field(8, ge=1)
    rows: int | None = Field(None, ge=1)
    grad: float = Field(0.0, ge=0, le=1)
    lambda_kd: float = Field(0.0, ge=0)
    gating: bool = True
    top_k: int | None = Field(None, ge=1)
    threshold: float | None = Field(None, ge=0, le=1)
    questions: bool = True
    routing: bool = False
    d_e: int = Field(32, ge=1, le=4096)
    tau: float = Field(1.0, gt=0, le=100)
    lambda_lb: float = Field(0.01, ge=0)
    leaf_dim: int = Field(32, ge=1, le=4096)
    leaf_trees: int | None = Field(32, ge=1)
    taps: dict[str, str] | None = None


class TeacherPort(nn.Module):
    """One teacher as seen by a method.

    Args:
        name: committee name (key of ``batch.teacher``).
        teacher: the fitted teacher; its declared ``taps()`` and ``head(tap)`` are all that is read.
        tap: which hidden tap to use (default: the first one with a head, else the first).
        leaf_dim: embedding width for integer (leaf-index) taps.
        leaf_trees: trees whose leaves make the leaf state (``None`` = all), evenly spaced over
            the ensemble (boosting order: early trees carry the main effects, later ones refine
            them, so an even spread sees both). A sample's state is the mean of its leaves'
            embeddings in those trees. Why not every tree: a GBDT has hundreds, and the table of one
            embedding per (tree, leaf) is then ~30k rows whose dense gradient and Adam update cost
            more than the whole student step; sparse gradients are no cure on CPU (SparseAdam was
            2x slower than the dense update here) and NCCL has no sparse all-reduce. A per-step
            random draw of trees kept the full table and its cost, so the subset is fixed.
    Attributes:
        dim: width ``d_i`` of ``H_i``.
        has_head: whether :meth:`answer` runs the teacher's frozen upper layers.
        answer_dim: width of :meth:`answer`'s output.
    """

    def __init__(self, name: str, teacher: Any, tap: str | None = None, leaf_dim: int = 32,
                 leaf_trees: int | None = None) -> None:
        super().__init__()
        taps = teacher.taps()  # the declared contract: width, kind, cardinality, head
        if not taps:
            raise ConfigError(f"teacher '{name}' exposes no hidden taps")
        if tap is None:
            tap = next((t for t, spec in taps.items() if spec.has_head), next(iter(taps)))
        if tap not in taps:
            raise ConfigError(f"teacher '{name}': unknown tap '{tap}' (taps: {sorted(taps)})")
        self.name, self.tap = name, tap
        head = teacher.head(tap) if taps[tap].has_head else None
        # the contract is a frozen Head; a plain module (a plugin's) is taken as its whole head
        self.head = head if head is None or isinstance(head, Head) else Head(head)
        self.is_leaves = taps[tap].kind == "leaves"
        if self.is_leaves:
            n_trees = taps[tap].width
            n_leaves = taps[tap].cardinality
            k = n_trees if leaf_trees is None else max(1, min(int(leaf_trees), n_trees))
            trees = torch.linspace(0, n_trees - 1, k).round().long().unique()
            # None when every tree is used: the state then reads the tap without a column gather
            self.register_buffer("trees", trees if len(trees) < n_trees else None, persistent=False)
            # one row per (used tree, leaf); a sample's state is the mean of its trees' leaf embeddings
            self.leaf_emb = nn.Embedding(len(trees) * n_leaves, leaf_dim)
            self.register_buffer("tree_offset", torch.arange(len(trees)) * n_leaves, persistent=False)
            self.dim = leaf_dim
        else:
            self.dim = taps[tap].width
        self.has_head = self.head is not None
        self.answer_dim = self.head.answer_dim(self.dim) if self.head is not None else self.dim + 1

    def state(self, batch: Batch, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``H_i`` ``[B', d_i]`` for batch rows ``idx`` (all rows when None)."""
        h = batch.teacher[self.name].hidden[self.tap]
        if not self.is_leaves:
            return (h if idx is None else h.index_select(0, idx)).float()
        # gather the smaller side first: the kept rows when they are few, else the used trees'
        # columns (all 466 leaf indices of most rows, then 32 of them, cost 2x)
        if idx is not None and (self.trees is None or 2 * idx.numel() < h.shape[0]):
            h, idx = h.index_select(0, idx), None
        if self.trees is not None:
            h = h.index_select(1, self.trees)
        if idx is not None:
            h = h.index_select(0, idx)
        rows = (h.long() + self.tree_offset).reshape(-1)
        # index_select + mean rather than an EmbeddingBag: its backward is one index_add, where
        # EmbeddingBag's sorts every index first (2x slower on CPU at B x 32 lookups)
        return self.leaf_emb.weight.index_select(0, rows).view(h.shape[0], -1, self.dim).mean(1)

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen head on state ``x`` ``[B', d_i]``: ``[last hidden activation ; logit]``.

        Teachers without a head return ``[x ; 0]`` and rely on the method's learned answer net.
        """
        if self.head is None:
            return torch.cat([x, x.new_zeros(x.shape[0], 1)], 1)
        return self.head.answer(x)

    def logit(self, batch: Batch) -> torch.Tensor:
        return batch.teacher[self.name].logits.float()


def build_ports(committee: dict[str, Any], names: list[str], taps: dict[str, str] | None = None,
                leaf_dim: int = 32, leaf_trees: int | None = None) -> nn.ModuleDict:
    return nn.ModuleDict({n: TeacherPort(n, committee[n], (taps or {}).get(n), leaf_dim, leaf_trees)
                          for n in names})
