"""Feature interactions of the student (and the DLRM teacher): ``dot`` (DLRM) and ``dcn`` (DCN-v2).

Each takes the dense-arch output ``[B, d]`` and the pooled embeddings (a TorchRec ``KeyedTensor``)
and returns the over-arch input ``h`` ``[B, out_dim]``.
"""

from __future__ import annotations

import torch
from torch import nn

from appdistill.errors import ConfigError
from appdistill.registry import Registry

INTERACTIONS: Registry = Registry("interaction")


@INTERACTIONS.register("dot")
class DotInteraction(nn.Module):
    """DLRM pairwise dot products of the F embeddings and the dense vector, plus the dense vector.

    All embedding dims must equal the dense-arch output dim ``d``.
    ``out_dim = d + (F+1)·F/2`` (F sparse features; without dense features: ``F·(F-1)/2 + ...``).

    Args:
        num_sparse: F.
        dim: d.
        has_dense: whether a dense vector takes part.
    """

    def __init__(self, num_sparse: int, emb_dims: list[int], dense_dim: int) -> None:
        super().__init__()
        if not emb_dims:  # a dense-only model: one vector, no pairs to take dot products of
            raise ConfigError(
                "student.interaction: 'dot' needs sparse features (sparse_id/id_list), but the model sees only "
                "dense features; use interaction 'dcn' (the default), which crosses the dense vector alone")
        if len(set(emb_dims)) != 1 or (dense_dim and dense_dim != emb_dims[0]):
            raise ConfigError(
                f"interaction 'dot' needs equal embedding dims and dense-arch output = embedding dim; got "
                f"embedding dims {emb_dims} and dense output {dense_dim}. Set student.embedding_dim, "
                "or use interaction 'dcn'")
        self.dim, self.has_dense = emb_dims[0], dense_dim > 0
        n = num_sparse + int(self.has_dense)
        self.register_buffer("tri", torch.triu_indices(n, n, offset=1), persistent=False)
        self.out_dim = (self.dim if self.has_dense else 0) + n * (n - 1) // 2

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        b = sparse.shape[0]
        x = sparse.view(b, -1, self.dim)
        if self.has_dense:
            x = torch.cat([dense.unsqueeze(1), x], 1)
        inter = torch.bmm(x, x.transpose(1, 2))[:, self.tri[0], self.tri[1]]
        return torch.cat([dense, inter], 1) if self.has_dense else inter


@INTERACTIONS.register("dcn")
class DCNv2Interaction(nn.Module):
    """DCN-v2 low-rank cross network over ``x0 = [dense ; embeddings]``.

    ``x_{l+1} = x0 ⊙ (U_l (V_l x_l) + b_l) + x_l``; ``out_dim = len(x0)``. With no sparse features
    (a dense-only model) ``x0`` is the dense vector alone.

    Args:
        num_layers: cross layers.
        low_rank: rank of ``U_l V_l`` (``0`` = full rank).
    """

    def __init__(self, num_sparse: int, emb_dims: list[int], dense_dim: int, num_layers: int = 2,
                 low_rank: int = 32) -> None:
        super().__init__()
        d = sum(emb_dims) + dense_dim
        self.out_dim = d
        if low_rank and low_rank < d:
            self.V = nn.ModuleList([nn.Linear(d, low_rank, bias=False) for _ in range(num_layers)])
            self.U = nn.ModuleList([nn.Linear(low_rank, d) for _ in range(num_layers)])
        else:
            self.V = nn.ModuleList([nn.Identity() for _ in range(num_layers)])
            self.U = nn.ModuleList([nn.Linear(d, d) for _ in range(num_layers)])

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([dense, sparse], 1)
        x = x0
        for v, u in zip(self.V, self.U):
            x = x0 * u(v(x)) + x
        return x
