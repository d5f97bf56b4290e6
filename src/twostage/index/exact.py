"""The exact index: chunked matrix product and a running top-k. The oracle.

Scores for ``chunk_size`` items at a time are computed for a block of queries, excluded
items are masked to ``-inf`` inside the chunk (so exclusion never needs over-fetching),
and each chunk's top-k is merged into a running top-k. Memory stays at
``query_block x chunk_size`` scores whatever the catalogue size. Works on any torch
device; results always come back on the CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from safetensors.torch import save_file

from twostage.errors import ArtifactError, ConfigError
from twostage.index.base import Index, check_int, load_tensors

__all__ = ["ExactIndex"]

logger = logging.getLogger(__name__)

DATA_FILE = "embeddings.safetensors"
_SCORES_PER_BLOCK = 1 << 24  # query_block x chunk_size scores (64 MiB of float32)


class ExactIndex(Index):
    """Brute-force maximum inner product search.

    Args:
        chunk_size: items scored per matrix product.
        device: torch device that holds the embeddings and computes the scores.
    """

    kind = "exact"
    is_exact = True

    def __init__(self, chunk_size: int = 65536, device: str = "cpu") -> None:
        super().__init__()
        self.chunk_size = check_int("chunk_size", chunk_size)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(
                f"`device` should be a torch device such as 'cpu' or 'cuda'. "
                f"Received: `device` = {device!r}."
            ) from e
        if self.device.type not in ("cpu", "cuda", "mps"):  # meta holds no data
            raise ConfigError(
                f"`device` should be 'cpu', 'cuda' (or 'cuda:N') or 'mps': a device "
                f"that holds the vectors. Received: `device` = {device!r}."
            )
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"`device` = {device!r} asks for CUDA but torch sees no GPU here; "
                "use 'cpu'."
            )
        self._embeddings = torch.empty(0, 0)
        self._device_ids = torch.empty(0, dtype=torch.int64)

    def params(self) -> dict[str, Any]:
        return {"chunk_size": self.chunk_size, "device": str(self.device)}

    def _build(self, embeddings: torch.Tensor, ids: torch.Tensor) -> None:
        self._embeddings = embeddings.to(self.device)
        self._device_ids = ids.to(self.device)

    def _extended(self, embeddings: torch.Tensor, ids: torch.Tensor) -> Self:
        grown = type(self)(**self.params())
        grown._build(
            torch.cat([self._embeddings.cpu(), embeddings]),
            torch.cat([self._device_ids.cpu(), ids]),
        )
        return grown

    def _search(
        self, queries: torch.Tensor, k: int, excluded: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        block = max(1, _SCORES_PER_BLOCK // min(self.chunk_size, self.size))
        results = [
            self._search_block(queries[start : start + block], k, excluded[start:])
            for start in range(0, len(queries), block)
        ]
        scores = torch.cat([r[0] for r in results]).cpu()
        ids = torch.cat([r[1] for r in results]).cpu()
        return scores, ids

    @torch.no_grad()
    def _search_block(
        self, queries: torch.Tensor, k: int, excluded: list[np.ndarray]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = queries.to(self.device)
        batch = len(queries)
        # (row, build position) of every excluded item of this block of queries.
        counts = torch.tensor([len(e) for e in excluded[:batch]], dtype=torch.int64)
        rows = torch.repeat_interleave(torch.arange(batch), counts).to(self.device)
        cols = torch.from_numpy(
            np.concatenate([*excluded[:batch], np.empty(0, np.int64)])
        )
        cols = cols.to(self.device)
        best = torch.full((batch, k), -torch.inf, device=self.device)
        best_ids = torch.full((batch, k), -1, dtype=torch.int64, device=self.device)
        for start in range(0, self.size, self.chunk_size):
            chunk = self._embeddings[start : start + self.chunk_size]
            scores = queries @ chunk.T  # (B, D) @ (D, C) -> (B, C)
            if len(cols):
                inside = (cols >= start) & (cols < start + len(chunk))
                scores[rows[inside], cols[inside] - start] = -torch.inf
            top, local = scores.topk(min(k, len(chunk)), dim=1)
            ids = self._device_ids[start + local]
            merged, pick = torch.cat([best, top], dim=1).topk(k, dim=1)
            best_ids = torch.cat([best_ids, ids], dim=1).gather(1, pick)
            best = merged
        # Masked (excluded) items and the padding of short rows both score -inf.
        best_ids[best == -torch.inf] = -1
        return best, best_ids

    @classmethod
    def _load(cls, directory: Path, meta: dict[str, Any]) -> Self:
        """As :meth:`Index._load`; an index saved on a GPU machine loads onto the
        CPU where there is none (the scores are the same up to float rounding),
        with a warning."""
        device = meta["params"].get("device")
        if (
            isinstance(device, str)
            and device.startswith("cuda")
            and not torch.cuda.is_available()
        ):
            logger.warning(
                "%s was saved for device %r, but torch sees no GPU here: it is "
                "searched on the CPU.",
                directory,
                device,
            )
            meta = {**meta, "params": {**meta["params"], "device": "cpu"}}
        return super()._load(directory, meta)

    def _save_data(self, directory: Path) -> None:
        tensors = {
            "embeddings": self._embeddings.cpu().contiguous(),
            "ids": self._device_ids.cpu().contiguous(),
        }
        save_file(tensors, directory / DATA_FILE)

    def _load_data(self, directory: Path, meta: dict[str, Any]) -> None:
        path = directory / DATA_FILE
        tensors = load_tensors(path, {"embeddings", "ids"})
        embeddings, ids = tensors["embeddings"], tensors["ids"]
        if embeddings.ndim != 2 or ids.shape != (len(embeddings),):
            raise ArtifactError(
                f"index file {str(path)!r} holds embeddings of shape "
                f"{tuple(embeddings.shape)} and ids of shape {tuple(ids.shape)}."
            )
        self._build(embeddings.to(torch.float32), ids.to(torch.int64))
        self._set_ids(ids.numpy(), embeddings.shape[1])
