"""The student: a TorchRec ranking model built from the feature spec.

``EmbeddingBagCollection`` (one table per sparse feature) -> dense arch (MLP over dense features)
-> interaction (``dot`` or ``dcn``) -> ``h`` -> over-arch (MLP -> 1 logit). A dense-only model (no
sparse feature) has no EBC (``ebc is None``) and an empty ``[B, 0]`` embedding block. ``h`` is exposed for
the distillation methods, and the over-arch is a module of its own so a method can reuse it
(DiverseDistill's committee path). The DLRM teacher is the same class with a bigger config.

Example:
    >>> model = RankingModel.from_spec(spec, proc, StudentConfig(over_arch=[64, 32]))
    >>> out = model(batch.sparse, batch.dense)
    >>> out.logits.shape, out.h.shape          # [B], [B, d_h]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from appdistill.features.processor import FeatureProcessor
from appdistill.features.spec import SPARSE_KINDS, FeatureSpec, FeatureSpecSet
from appdistill.student.interaction import INTERACTIONS


@dataclass
class StudentConfig:
    """Architecture of a :class:`RankingModel`.

    Args:
        embedding_dim: overrides every feature's ``dim`` when set (``dot`` needs equal dims).
        dense_arch: hidden sizes of the dense MLP (its last size is the dense vector's size).
        interaction: ``{key, kwargs}`` of :data:`INTERACTIONS`.
        over_arch: hidden sizes of the over-arch MLP (a final ``Linear(·, 1)`` is added).
        dropout: dropout in the over-arch.
        content_dim: columns of the content table (:mod:`appdistill.features.content`) appended to the
            dense input; they are projected into one more embedding slot of the interaction.
    """

    embedding_dim: int | None = None
    dense_arch: list[int] = field(default_factory=lambda: [16])
    interaction: dict[str, Any] = field(default_factory=lambda: {"key": "dcn", "kwargs": {}})
    over_arch: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    content_dim: int = 0

    @classmethod
    def from_section(cls, section: Any, spec: FeatureSpecSet) -> StudentConfig:
        """From a config's ``student:`` section (``appdistill.config.StudentSection``); ``spec`` sizes
        the content input (``student.content``: ``dim`` columns per content feature)."""
        from appdistill.features.content import content_features

        c = section.content
        width = c.dim * len(content_features(list(c.features), spec)) if c.enabled else 0
        return cls(section.embedding_dim, list(section.dense_arch), section.interaction.model_dump(),
                   list(section.over_arch), section.dropout, width)


class StudentOutput(NamedTuple):
    """``logits`` ``[B]`` and ``h`` ``[B, d_h]`` (the over-arch input). A tuple so DDP can walk it."""

    logits: torch.Tensor
    h: torch.Tensor


def mlp(sizes: list[int], in_dim: int, dropout: float = 0.0, last_act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = in_dim
    for i, s in enumerate(sizes):
        layers.append(nn.Linear(d, s))
        if i < len(sizes) - 1 or last_act:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
        d = s
    return nn.Sequential(*layers)


class OverArch(nn.Module):
    """``h`` ``[B, d_h]`` -> logit ``[B]``."""

    def __init__(self, in_dim: int, sizes: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        self.body = mlp(sizes, in_dim, dropout)
        self.out = nn.Linear(sizes[-1] if sizes else in_dim, 1)
        self.in_dim = in_dim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(h)).squeeze(-1)


class RankingModel(nn.Module):
    """TorchRec EBC + dense arch + interaction + over-arch.

    Args:
        tables: one ``EmbeddingBagConfig`` per sparse feature (same order as the KJT keys); empty
            for a dense-only student (then ``ebc`` is ``None``).
        dense_in: number of dense input features ``D`` (the input is ``[B, D + config.content_dim]``).
        config: architecture.
        device: ``meta`` to defer allocation to ``DistributedModelParallel``.
    """

    def __init__(self, tables: list[EmbeddingBagConfig], dense_in: int, config: StudentConfig,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.keys = [t.feature_names[0] for t in tables]
        # a dense-only student (numeric columns only) has no tables, and so no EBC at all: TorchRec's EBC
        # cannot run with zero tables (its forward concatenates an empty list), and DMP would have nothing
        # to shard; ``embed`` then returns an empty ``[B, 0]`` block
        self.ebc: EmbeddingBagCollection | None = \
            EmbeddingBagCollection(tables=tables, device=device or torch.device("cpu")) if tables else None
        self.dense_in = dense_in
        self.dense_arch = mlp(config.dense_arch, dense_in) if dense_in else None
        dense_out = config.dense_arch[-1] if dense_in and config.dense_arch else dense_in
        emb_dims = [t.embedding_dim for t in tables]
        # the content vector becomes one more embedding slot (``dot`` needs equal sizes)
        self.content_proj = nn.Linear(config.content_dim, config.embedding_dim or (emb_dims or [16])[0]) \
            if config.content_dim else None
        if self.content_proj is not None:
            emb_dims.append(self.content_proj.out_features)
        inter = config.interaction
        self.interaction = INTERACTIONS.build(
            inter["key"], inter.get("kwargs"), "student.interaction",
            num_sparse=len(emb_dims), emb_dims=emb_dims, dense_dim=dense_out)
        self.over_arch = OverArch(self.interaction.out_dim, config.over_arch, config.dropout)

    @classmethod
    def from_spec(cls, features: list[FeatureSpec], processor: FeatureProcessor, config: StudentConfig,
                  device: torch.device | None = None) -> RankingModel:
        """Build from the features a model may see (``spec.visible(name)``) and the fitted vocabularies."""
        tables = [
            EmbeddingBagConfig(
                name=f"t_{f.name}", embedding_dim=config.embedding_dim or f.dim,
                num_embeddings=processor.vocabs[f.name].num_embeddings, feature_names=[f.name],
                pooling=PoolingType.MEAN if (f.kind == "id_list" and f.pooling == "mean") else PoolingType.SUM)
            for f in features if f.kind in SPARSE_KINDS
        ]
        dense_in = sum(1 for f in features if f.kind == "dense")
        return cls(tables, dense_in, config, device)

    def embed(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled embeddings ``[B, sum(dims)]`` in ``self.keys`` order.

        A sharded EBC returns its keys grouped by shard (table-wise on 2 ranks: rank 0's tables first),
        so the order is fixed here; otherwise a model trained under ``torchrun`` would learn a
        permuted layout that no unsharded copy (resume on 1 rank, export) reproduces.
        """
        if self.ebc is None:  # dense-only: no tables; the KJT has no keys but carries the batch size
            return torch.zeros(sparse.stride(), 0, device=self.over_arch.out.weight.device)
        kt = self.ebc(sparse)
        if kt.keys() == self.keys:
            return kt.values()
        d = kt.to_dict()
        return torch.cat([d[k] for k in self.keys], dim=1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor) -> StudentOutput:
        return student_head(self, self.embed(sparse), dense)  # emb [B, sum(dims)] in table order

    def size(self) -> dict[str, int]:
        """Parameter count and bytes (embedding tables included)."""
        params = sum(p.numel() for p in self.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in self.parameters())
        emb = sum(p.numel() for p in self.ebc.parameters()) if self.ebc is not None else 0
        return {"params": int(params), "bytes": int(nbytes), "embedding_params": int(emb)}


def student_head(m: nn.Module, emb: torch.Tensor, dense: torch.Tensor) -> StudentOutput:
    """Pooled embeddings ``[B, sum(dims)]`` + dense input ``[B, D + C]`` -> :class:`StudentOutput`.

    Shared by :class:`RankingModel` and the serving model (``appdistill.export.serving``), so the two
    cannot compute the head differently. ``m`` holds ``dense_in``, ``content_proj``, ``dense_arch``,
    ``interaction`` and ``over_arch``.
    """
    if m.content_proj is not None:
        emb = torch.cat([emb, m.content_proj(dense[:, m.dense_in:])], 1)
        dense = dense[:, :m.dense_in]
    d = m.dense_arch(dense) if m.dense_arch is not None else dense
    h = m.interaction(d, emb)
    return StudentOutput(m.over_arch(h), h)


def check_interaction(section: Any, spec: FeatureSpecSet) -> None:
    """Refuse ``student.interaction: dot`` for a student with no embedding slot at all (dense features
    only, no content table), before data is read or a run directory exists; ``dot`` takes products of
    embedding pairs, and the model would otherwise fail only when it is built.

    Args:
        section: the config's ``student:`` section (``appdistill.config.StudentSection``).
        spec: the feature spec (its ``student`` visibility).

    Raises:
        ConfigError: ``dot`` with neither a sparse feature nor ``student.content``.
    """
    from appdistill.errors import ConfigError

    sparse = any(f.kind in SPARSE_KINDS for f in spec.visible("student"))
    if section.interaction.key == "dot" and not sparse and not section.content.enabled:
        raise ConfigError(
            "student.interaction: 'dot' needs sparse features (sparse_id/id_list), but the student of spec "
            f"'{spec.name}' sees only dense features; use interaction 'dcn' (the default), which crosses the "
            "dense vector alone")


def build_student(spec: FeatureSpecSet, processor: FeatureProcessor, config: StudentConfig,
                  model: str = "student", device: torch.device | None = None) -> RankingModel:
    return RankingModel.from_spec(spec.visible(model), processor, config, device)
