"""DCN-v2 cross layers (Wang et al., WWW 2021), full-rank or low-rank."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CrossLayer", "CrossNetwork"]


class CrossLayer(nn.Module):
    """One DCN-v2 cross layer: ``x_{l+1} = x0 * (W x_l + b) + x_l``.

    Args:
        width: size of ``x0`` and ``x_l``.
        rank: 0 for a full-rank ``W`` (``[width, width]``); otherwise ``W = U V`` with
            ``V`` ``[rank, width]`` and ``U`` ``[width, rank]``, the DCN-v2 paper's
            low-rank cross layer, which costs ``2 * rank / width`` of the full one.
    """

    def __init__(self, width: int, rank: int = 0) -> None:
        super().__init__()
        self.rank = rank
        if rank:
            self.down = nn.Linear(width, rank, bias=False)
            self.up = nn.Linear(rank, width)
        else:
            self.linear = nn.Linear(width, width)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        """``x0``, ``x``: ``[B, width]`` -> ``[B, width]``."""
        inner = self.up(self.down(x)) if self.rank else self.linear(x)
        return torch.addcmul(x, x0, inner)

    def matrix(self) -> tuple[Tensor, Tensor]:
        """``W`` (``[width, width]``, the product ``U V`` when low-rank) and ``b``."""
        if self.rank:
            return self.up.weight @ self.down.weight, self.up.bias
        return self.linear.weight, self.linear.bias


class CrossNetwork(nn.Module):
    """``num_layers`` cross layers applied to the same ``x0``; 0 layers is identity."""

    def __init__(self, width: int, num_layers: int, rank: int = 0) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(width, rank) for _ in range(num_layers))

    def forward(self, x0: Tensor) -> Tensor:
        """``x0``: ``[B, width]`` -> ``[B, width]``."""
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x
