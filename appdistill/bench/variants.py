"""What ``appdistill bench`` can run: every registered method, plus DiverseDistill's ablations.

A variant is a method with some kwargs pinned. Methods are tuned on their own grid (``Method.grid``,
the same number of settings each); an ablation is not tuned: it takes the setting chosen for its
``follows`` method and flips one switch, so the ablation measures the switch and nothing else.

Example:
    >>> VARIANTS["dd_committee"].follows
    'diverse_distill'
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from appdistill.methods import METHODS

BEST = "{best}"  # replaced by the single teacher with the best validation AUC


@dataclass(frozen=True)
class Variant:
    """Args:
        key: method registry key.
        kwargs: pinned method kwargs (``"{best}"`` = the best single teacher on validation).
        follows: for ablations, the variant whose chosen setting this one reuses (not tuned itself).
        teachers: ``"foundation"`` / ``"complementary"``: restrict the committee to that kind.
        config: config overrides (``{"transfer.enabled": True}``).
        doc: one line for the report.
    """

    key: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    follows: str | None = None
    teachers: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


VARIANTS: dict[str, Variant] = {
    "none": Variant("none", doc="plain student (labels only)"),
    "kd": Variant("kd", {"teacher": BEST}, doc="Hinton KD from the best single teacher on validation"),
    "avg_kd": Variant("avg_kd", doc="KD towards the mean committee probability"),
    "taid": Variant("taid", {"teacher": BEST}, doc="TAID from the best single teacher on validation"),
    "talking": Variant("talking", doc="Talking Models (message passing through teachers' heads)"),
    "diverse_distill": Variant("diverse_distill", doc="the teaching committee, distilled through its held-out stack"),
    "dd_committee": Variant("diverse_distill", {"committee_path": True}, "diverse_distill",
                            doc="DiverseDistill with the committee path: questions, answers, a per-sample gate "
                                "modulating the stack (the default until this release)"),
    "dd_no_stack": Variant("diverse_distill", {"kd_weights": "uniform"}, "diverse_distill",
                           doc="DiverseDistill without the held-out stack: the mean of per-teacher KD"),
    "dd_soft": Variant("diverse_distill", {"committee_path": True, "kd_weights": "soft"}, "diverse_distill",
                       doc="the committee path's gate weighting per-teacher KD, no stack (two releases ago)"),
    "dd_no_questions": Variant("diverse_distill", {"committee_path": {"questions": False}}, "diverse_distill",
                               doc="dd_committee, answers without questions"),
    "dd_routing": Variant("diverse_distill", {"committee_path": {"routing": True}}, "diverse_distill",
                          doc="dd_committee whose gate also reads teachers' confidences, disagreement, item frequency"),
    "dd_taid": Variant("diverse_distill", {"output_loss": "taid"}, "diverse_distill",
                       doc="DiverseDistill with TAID towards the stack as the teacher term"),
    "dd_no_trees": Variant("diverse_distill", {"lambda_trees": 0.0}, "diverse_distill",
                           doc="DiverseDistill without the tree term (the student does not regress the GBDT "
                               "teachers' parts)"),
    "dd_foundation_only": Variant("diverse_distill", {}, "diverse_distill", teachers="foundation",
                                  doc="DiverseDistill with the foundation teachers only"),
    "dd_complementary_only": Variant("diverse_distill", {}, "diverse_distill", teachers="complementary",
                                     doc="DiverseDistill with the complementary teachers only"),
}
# the transfer-set ablation of each distillation method: its chosen setting plus a transfer set
for _m in ("kd", "avg_kd", "taid", "diverse_distill", "dd_committee", "dd_no_trees"):
    VARIANTS[f"{_m}+transfer"] = Variant(VARIANTS[_m].key, VARIANTS[_m].kwargs, _m,
                                         config={"transfer.enabled": True},
                                         doc=f"{_m} with a transfer set (config `transfer:`; ratio as configured)")

# the content-table ablation: the method's chosen setting, the student carrying per-item content vectors
for _m in ("none", "kd", "avg_kd", "taid", "diverse_distill", "dd_committee", "dd_no_trees"):
    VARIANTS[f"{_m}+content"] = Variant(VARIANTS[_m].key, VARIANTS[_m].kwargs, _m,
                                        config={"student.content.enabled": True},
                                        doc=f"{_m}, the student with a content table (config `student.content`)")
# the sub-committees with a content table: DiverseDistill's chosen setting (the setting the plain
# sub-committees take too), so that both share one tuning run
for _m in ("dd_foundation_only", "dd_complementary_only"):
    VARIANTS[f"{_m}+content"] = Variant("diverse_distill", {}, "diverse_distill", teachers=VARIANTS[_m].teachers,
                                        config={"student.content.enabled": True},
                                        doc=f"{_m}, the student with a content table (config `student.content`)")
# both: the student's content table and a transfer set. Transfer rows draw half their items uniformly
# over the catalogue, so items no training row shows get teacher labels, and with a content table
# the student has a feature (the item's vectors) through which those labels can reach such items
for _m in ("none", "kd", "avg_kd", "taid", "diverse_distill", "dd_committee", "dd_no_trees", "dd_foundation_only",
           "dd_complementary_only"):
    _c = VARIANTS[f"{_m}+content"]
    VARIANTS[f"{_m}+content+transfer"] = Variant(_c.key, _c.kwargs, _c.follows or _m, teachers=_c.teachers,
                                                 config={**_c.config, "transfer.enabled": True},
                                                 doc=f"{_m}, content table and transfer set")
#: the additions a variant's name switches on (``+transfer``, ``+content``); every other variant runs
#: with them off whatever the config says, so ``none`` is the student trained alone and ``kd`` is KD
#: alone even where the config (as the shipped regime configs do) trains with both
ADDITIONS = {"transfer.enabled": False, "student.content.enabled": False}

#: what ``--methods`` runs by default: every method, no ablation
DEFAULT = ["none", "kd", "avg_kd", "taid", "talking", "diverse_distill"]
#: named groups ``--methods`` accepts besides single names. ``additions``: the distillation methods
#: with a transfer set, and with a content table plus a transfer set (the recommended setting where
#: items have text or images; on data without them the ``+content`` variants are reported as not run)
GROUPS = {
    "all": list(VARIANTS),
    "default": DEFAULT,
    "additions": ["none", "none+content", "kd", "avg_kd", "taid", "diverse_distill",
                  *(f"{m}+transfer" for m in ("kd", "avg_kd", "taid", "diverse_distill")),
                  *(f"{m}+content+transfer" for m in ("kd", "avg_kd", "taid", "diverse_distill"))],
}


def expand(names: list[str] | None) -> list[str]:
    """``--methods`` as given, group names (:data:`GROUPS`) replaced by their members, each name once."""
    out: list[str] = []
    for n in names or DEFAULT:
        out += [m for m in GROUPS.get(n, [n]) if m not in out]
    return out


def grid_points(key: str, budget: int | None = None) -> list[dict[str, Any]]:
    """The crossed grid of method ``key`` (``Method.grid``), the first ``budget`` settings of it."""
    grid = getattr(METHODS.get(key, context="bench"), "grid", {}) or {}
    names = list(grid)
    points = [dict(zip(names, vals)) for vals in itertools.product(*(grid[n] for n in names))] or [{}]
    return points[:budget] if budget else points


def ordered(names: list[str]) -> list[str]:
    """``names`` with every ablation after the variant it follows (added if missing, and so on up the
    chain: ``dd_committee+content`` follows ``dd_committee``, which follows ``diverse_distill``)."""
    out: list[str] = []

    def add(n: str) -> None:
        f = VARIANTS[n].follows
        if f:
            add(f)
        if n not in out:
            out.append(n)

    for n in names:
        add(n)
    return out
