"""The committee's held-out stack: per-segment teacher weights fitted on rows no teacher trained on.

A teacher's outputs on its own training rows are the wrong place to learn whom to trust: LightGBM
and the DLRM fitted those rows, so there they look better than they are (and by how much differs per
teacher). The validation split is held out from every teacher's fit, so the committee's cached
outputs there say how good each teacher really is, and where: per item-frequency segment (cold /
tail / torso / head, :mod:`appdistill.eval.segments`), the segment oracle's view, softened into a
logistic stack

    z*(x) = b[s] + Σ_i a[s, i] · z_i(x)        s = segment of x's item         [B]

fitted by Newton's method (a handful of parameters per segment). A segment with few held-out rows
shrinks to the whole-split fit (the penalty pulls its weights towards it). A segment with no
held-out rows, or one class only, gets the plain committee average (``a = 1/n``, ``b = 0``): the
whole-split fit then describes *other* segments (on a cold-start split every validation item is
cold, and its weights favour the text teacher, which is the wrong teacher for warm training rows).

Example:
    >>> held = HeldOut({"lightgbm": zl, "dlrm": zd}, labels, item_codes)      # validation rows
    >>> stack = SegmentStack.fit(held, ["lightgbm", "dlrm"], item_frequency)
    >>> stack(torch.stack([z_lgb, z_dlrm], 1), batch.item_ids)                # [B] target logits

Where items have no frequency segments (one row per entity: a table), one stack serves every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from appdistill.eval.segments import BUCKETS, Segmenter

#: prior strength (in held-out rows) pulling a segment's weights towards the whole-split fit
PRIOR_ROWS = 200.0
LOGIT_CLIP = 30.0


@dataclass
class HeldOut:
    """The committee's cached outputs on held-out rows (the validation split).

    Args:
        logits: ``{teacher: [N]}`` cached teacher logits.
        labels: ``[N]`` 0/1 labels.
        item_codes: ``[N]`` int64 item codes of the rows.
    """

    logits: dict[str, np.ndarray]
    labels: np.ndarray
    item_codes: np.ndarray

    @classmethod
    def of(cls, ds: Any, logits: dict[str, np.ndarray], split: str = "valid") -> HeldOut:
        """The teachers' ``logits`` (``{teacher: [N]}``) on the rows of ``ds.splits[split]``, with those
        rows' labels and item codes (``ds``: a :class:`~appdistill.features.dataset.Dataset`)."""
        rows = ds.splits[split]
        return cls(logits, ds.labels[rows], ds.item_ids[rows])


def _newton(x: np.ndarray, y: np.ndarray, prior: np.ndarray, strength: float, iters: int = 25) -> np.ndarray:
    """argmin_θ  NLL(σ(xθ), y) + strength/2 · ||θ - prior||² (``x`` ``[N, p]``), by Newton steps."""
    theta = prior.copy()
    eye = np.eye(x.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ theta, -LOGIT_CLIP, LOGIT_CLIP)))
        grad = x.T @ (p - y) + strength * (theta - prior)
        hess = (x * (p * (1 - p))[:, None]).T @ x + strength * eye
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-7:
            break
    return theta


class SegmentStack(nn.Module):
    """``z* = b[s] + Σ_i a[s, i] z_i``: the held-out committee stack (see the module docstring).

    Args:
        weights: ``[S, n + 1]`` per segment ``(a_1..a_n, b)``.
        names: the teachers, in the order of the columns of ``z``.
        code_segment: ``[n_codes + 1]`` segment of each item code (the last entry: codes never seen).
        segments: the ``S`` segment names.
        whole: ``[n + 1]`` the whole held-out split's fit (default: the mean of ``weights``).
        fitted: ``[S]`` bool, the segments fitted on their own held-out rows (default: all).
    """

    def __init__(self, weights: np.ndarray, names: list[str], code_segment: np.ndarray,
                 segments: list[str], whole: np.ndarray | None = None, fitted: np.ndarray | None = None) -> None:
        super().__init__()
        self.names, self.segments = list(names), list(segments)
        self.register_buffer("weights", torch.as_tensor(np.asarray(weights, np.float32)))
        self.register_buffer("code_segment", torch.as_tensor(np.asarray(code_segment, np.int64)))
        # rebuilt from the held-out outputs at every start: not checkpointed
        self.register_buffer("whole", torch.as_tensor(np.asarray(
            whole if whole is not None else np.asarray(weights).mean(0), np.float32)), persistent=False)
        self.register_buffer("fitted", torch.as_tensor(np.asarray(
            fitted if fitted is not None else np.ones(len(segments)), bool)), persistent=False)
        # [S, n] :meth:`shares` per segment, derived from the three above: a per-step gather
        self.register_buffer("share_table", self._share_table(), persistent=False)

    @classmethod
    def fit(cls, held: HeldOut, names: list[str], item_frequency: np.ndarray | None) -> SegmentStack:
        """Fit on ``held`` (teachers ``names``; ``item_frequency`` ``[n_codes]`` training rows per item
        code); every segment starts from, and shrinks to, the whole fit."""
        missing = [n for n in names if n not in held.logits]
        if missing:
            raise ValueError(f"held-out logits lack teachers {missing}")
        x = np.column_stack([np.clip(np.asarray(held.logits[n], np.float64), -LOGIT_CLIP, LOGIT_CLIP)
                             for n in names] + [np.ones(len(held.labels))])
        y = np.asarray(held.labels, np.float64)
        counts = np.asarray(item_frequency if item_frequency is not None else [], np.int64)
        segmenter = Segmenter.from_counts(counts)
        if segmenter.reason is None:
            names_s = list(BUCKETS)
            code_segment = np.r_[segmenter.index(np.arange(len(counts))), BUCKETS.index("cold")]
        else:  # no frequency segments (e.g. one row per entity): one stack for every row
            names_s, code_segment = ["all"], np.zeros(len(counts) + 1, np.int64)
        seg = code_segment[np.clip(np.asarray(held.item_codes, np.int64), 0, len(counts))]
        # whole split: start from the plain average of the teachers' logits, a weak ridge towards it
        avg = np.r_[np.full(len(names), 1.0 / len(names)), 0.0]
        whole = _newton(x, y, avg, 1e-3 * max(len(y), 1))
        w = np.tile(avg, (len(names_s), 1))
        fitted = np.zeros(len(names_s), bool)
        for s in range(len(names_s)):
            m = seg == s
            if m.sum() and 0 < y[m].sum() < m.sum():
                w[s] = _newton(x[m], y[m], whole, PRIOR_ROWS * 0.25)  # 0.25: σ' at p = 0.5, per row
                fitted[s] = True
        return cls(w, names, code_segment, names_s, whole, fitted)

    def _share_table(self) -> torch.Tensor:
        a = torch.where(self.fitted.unsqueeze(1), self.weights, self.whole.unsqueeze(0))[:, :-1].abs()
        return a * (a.shape[1] / a.sum(1, keepdim=True).clamp_min(1e-12))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.share_table.copy_(self._share_table())  # loaded weights: their shares

    def segment_of(self, item_codes: torch.Tensor) -> torch.Tensor:
        """``[B]`` segment index of each item code (codes beyond the training vocabulary: cold)."""
        n = self.code_segment.numel() - 1
        return self.code_segment[torch.where((item_codes >= 0) & (item_codes < n), item_codes, n)]

    def shares(self, item_codes: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` each teacher's share of its row's stack, ``n · |a_i| / Σ_j |a_j|`` (1 where the
        teachers share alike), from the segment's own fit, or from the whole held-out fit where the
        segment has no held-out rows (its target is then the plain average, which says nothing about
        whom to trust: a cold-start split's warm training rows, judged on cold items)."""
        return self.share_table.index_select(0, self.segment_of(item_codes))

    def forward(self, z: torch.Tensor, item_codes: torch.Tensor) -> torch.Tensor:
        """``z`` ``[B, n]`` teacher logits, ``item_codes`` ``[B]`` -> ``[B]`` stacked logits."""
        w = self.weights.index_select(0, self.segment_of(item_codes))  # [B, n + 1]
        return (w[:, :-1] * z.clamp(-LOGIT_CLIP, LOGIT_CLIP)).sum(1) + w[:, -1]

    def score(self, logits: dict[str, np.ndarray], item_codes: np.ndarray) -> np.ndarray:
        """:meth:`forward` on numpy: ``{teacher: [N]}`` logits and ``[N]`` item codes -> ``[N]`` float64."""
        z = torch.as_tensor(np.column_stack([logits[n] for n in self.names]), dtype=torch.float32)
        return self(z, torch.as_tensor(np.asarray(item_codes, np.int64))).double().numpy()

    def describe(self) -> dict[str, dict[str, float]]:
        """``{segment: {teacher: a, "bias": b}}``, for logs and reports."""
        w = self.weights.cpu().numpy()
        return {b: {**{n: round(float(w[s, i]), 4) for i, n in enumerate(self.names)},
                    "bias": round(float(w[s, -1]), 4)} for s, b in enumerate(self.segments)}
