"""`StableEmbedding`: the embedding layer of Dettmers et al. (2022) for 8-bit optimizers."""

from __future__ import annotations

import torch
from torch import nn

from .optimizer import override_32bit


class StableEmbedding(nn.Embedding):
    """An `nn.Embedding` that trains stably with 8-bit optimizers: Xavier-uniform
    initialisation, a LayerNorm right after the lookup, and 32-bit optimizer state for its
    weight in every q8 optimizer (rare tokens make its gradients too sparse and spiky for
    8-bit state). Takes nn.Embedding's arguments; the output has the weight's dtype.

    Example:
        >>> emb = q8.optim.StableEmbedding(50_000, 768)
        >>> h = emb(torch.tensor([[1, 2, 3]]))  # (1, 3, 768), layer-normalised
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs):
        device, dtype = kwargs.get("device"), kwargs.get("dtype")
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim, device=device, dtype=dtype)
        override_32bit(self.weight)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(input))
