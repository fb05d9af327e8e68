"""A serving form of the student with no TorchRec dependency: plain ``nn.EmbeddingBag`` tables.

The trained TorchRec ``EmbeddingBagCollection`` is copied table by table into ``nn.EmbeddingBag``
modules (same weights, same pooling), so the model takes plain tensors — per sparse feature a
``values`` ``[nnz]`` and ``offsets`` ``[B]`` pair, plus ``dense`` ``[B, D]`` — and can be compiled
with ``torch.export`` (see README: why ``torch.export`` and not TorchScript).
"""

from __future__ import annotations

import torch
from torch import nn

from appdistill.student.model import RankingModel, student_head


class ServingModel(nn.Module):
    """``(values_0, offsets_0, ..., values_{F-1}, offsets_{F-1}, dense) -> logits [B]``.

    ``dense`` is ``[B, D + C]``: the dense features, then the content table's columns (if any).

    Args:
        model: a trained :class:`RankingModel` (its training-only parts never exist here: methods
            keep theirs outside the student).
    """

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.keys = list(model.keys)
        self.tables = nn.ModuleList()
        configs = model.ebc.embedding_bag_configs() if model.ebc is not None else []  # None: dense-only
        for cfg in configs:
            mode = "mean" if cfg.pooling.name == "MEAN" else "sum"
            bag = nn.EmbeddingBag(cfg.num_embeddings, cfg.embedding_dim, mode=mode)
            self.tables.append(bag)
        weights = [model.ebc.embedding_bags[c.name].weight for c in configs]  # type: ignore[union-attr]
        with torch.no_grad():
            for bag, w in zip(self.tables, weights):
                bag.weight.copy_(w)
        self.dense_in = model.dense_in
        self.content_proj = model.content_proj
        self.dense_arch = model.dense_arch
        self.interaction = model.interaction
        self.over_arch = model.over_arch

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        dense = inputs[-1]
        embs = [bag(inputs[2 * i], inputs[2 * i + 1]) for i, bag in enumerate(self.tables)]
        # a dense-only student: no tables, an empty [B, 0] block (as RankingModel.embed)
        emb = torch.cat(embs, 1) if embs else dense.new_zeros((dense.shape[0], 0))
        return student_head(self, emb, dense).logits
