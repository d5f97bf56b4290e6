"""Memory kept between the blocks of one computation.

Evaluation and the session-kNN scoring work through large catalogues and user
tables a block at a time, and each block needs the same few ``[rows, columns]``
tensors again: 128 MiB each for 10^6 stored users. A fresh tensor that size is
memory the system maps anew and faults in page by page on first touch (glibc
hands every allocation above 32 MiB to ``mmap``), which cost a third of the CPU
time of an evaluation on a 200,000-item catalogue. A :class:`Scratch` hands each
block the memory of the block before instead.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Scratch"]


class Scratch:
    """Named tensors reused from block to block, grown when a block needs more.

    Not shared between threads: make one per call (serving answers requests on
    several threads at once).
    """

    def __init__(self) -> None:
        self._kept: dict[str, torch.Tensor] = {}

    def block(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """A ``shape`` tensor in ``name``'s memory: its values are whatever the
        last block left, so the caller writes all of it before reading."""
        size = math.prod(shape)
        place = torch.device("cpu") if device is None else torch.device(device)
        kept = self._kept.get(name)
        if (
            kept is None
            or kept.numel() < size
            or kept.dtype != dtype
            or kept.device != place
        ):
            kept = self._kept[name] = torch.empty(size, dtype=dtype, device=place)
        return kept[:size].view(shape)
