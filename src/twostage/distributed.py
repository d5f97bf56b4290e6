"""Data-parallel training with ``torch.distributed``: one process per core, GPU or
machine, started by ``torchrun`` (or ``twostage train --nproc N``).

Every rank draws the same global batch (same seed, same permutation) and trains on its
contiguous share of it; :class:`torch.nn.parallel.DistributedDataParallel` averages the
gradients. In-batch negatives come from the whole global batch: each rank gathers the
candidate embeddings, item IDs and sampling probabilities of all ranks
(:func:`gather_rows`, autograd-aware, so the gradient of every candidate reaches the
rank that computed it), and each rank's loss is scaled so that the averaged gradient
equals the single-process gradient of the global batch. A 2-rank run therefore gives the
weights of a 1-rank run with the same batch size (within float tolerance).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "World",
    "current",
    "gather_frames",
    "gather_rows",
    "gather_rows_to",
    "gather_sizes",
    "init_from_env",
    "is_main",
    "run_local_group",
    "shutdown",
]

_WORLD: World | None = None


@dataclass(frozen=True)
class World:
    """This process's place among the ranks."""

    rank: int
    size: int
    backend: str

    def shard(self, batch: Tensor) -> Tensor:
        """This rank's contiguous share of a global batch (shares differ by at most
        one row when the batch does not divide evenly)."""
        return batch.tensor_split(self.size)[self.rank]

    def sizes(self, total: int) -> list[int]:
        """Every rank's share of a global batch of ``total`` rows."""
        base, extra = divmod(total, self.size)
        return [base + (1 if r < extra else 0) for r in range(self.size)]

    def offset(self, total: int) -> int:
        """Where this rank's share (:meth:`shard`) of a global batch of ``total``
        rows begins in it."""
        return sum(self.sizes(total)[: self.rank])


#: The environment variable of a local group's rendezvous file
#: (:func:`run_local_group`), in place of torchrun's ``MASTER_ADDR`` and
#: ``MASTER_PORT``.
INIT_FILE = "TWOSTAGE_INIT_FILE"


def init_from_env(device: str = "cpu") -> World | None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the
    environment), or :func:`run_local_group` (its rendezvous file): ``nccl`` for
    CUDA devices, ``gloo`` otherwise. None when this is a single process.
    Idempotent."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        # torch.distributed.nn's functions take ``group=group.WORLD`` as a default,
        # read when the module is first imported; DDP imports it. Imported after
        # the group exists, the defaults hold the group, so destroying it left its
        # gloo threads running into the interpreter's exit, where a rank aborted
        # now and then ("terminate called without an active exception").
        import torch.distributed.nn

        if INIT_FILE in os.environ:
            dist.init_process_group(
                backend=backend,
                init_method=f"file://{os.environ[INIT_FILE]}",
                rank=int(os.environ["RANK"]),
                world_size=size,
            )
        else:
            dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), backend=backend)
    return _WORLD


def run_local_group(target: Callable[..., Any], size: int, *args: Any) -> None:
    """Run ``target(rank, *args)`` in ``size`` new processes on this host, each
    told its place in one process group as ``torchrun`` tells it (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``), so :func:`init_from_env` joins them; for
    tests and benchmarks that start ranks without torchrun. ``target`` must be
    importable (a module-level function); an error in a rank is raised here.

    The ranks meet through a file of their own (:data:`INIT_FILE`), not a port:
    a free port found by binding and closing a socket could be taken by another
    group starting at the same time (two test workers), before the ranks bind it.
    """
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    meeting = tempfile.mkdtemp(prefix="twostage-group-")
    try:
        mp.start_processes(
            _local_rank,
            args=(size, f"{meeting}/store", target, args),
            nprocs=size,
            join=True,
            start_method="spawn",
        )
    finally:
        shutil.rmtree(meeting, ignore_errors=True)


def _local_rank(
    rank: int, size: int, store: str, target: Callable[..., Any], args: tuple[Any, ...]
) -> None:
    os.environ.update(
        {
            INIT_FILE: store,
            "WORLD_SIZE": str(size),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
        }
    )
    target(rank, *args)


def current() -> World | None:
    """The process group joined by :func:`init_from_env`, or None."""
    return _WORLD


def is_main() -> bool:
    """Rank 0, or a single process: the one that logs, saves and evaluates."""
    return _WORLD is None or _WORLD.rank == 0


def shutdown() -> None:
    """Leave the process group (at the end of a run)."""
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


def gather_rows(local: Tensor, sizes: list[int]) -> Tensor:
    """Every rank's ``local`` rows, concatenated in rank order: ``[sum(sizes), ...]``.

    Ranks may hold different numbers of rows (``sizes``, known to all): each pads to
    the largest and the padding is dropped after gathering. Gradients flow back to the
    rank that owns each row (an all-gather whose backward all-reduces).
    """
    world = _WORLD
    if world is None:
        return local
    width = max(sizes)
    if width == 0:
        return local
    pad = width - local.shape[0]
    if pad:
        filler = local.new_zeros((pad, *local.shape[1:]))
        local = torch.cat([local, filler])
    gather = _AllGather.apply if local.requires_grad else _all_gather
    parts = gather(local).split(width)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def gather_rows_to(local: Tensor, dst: int) -> Tensor | None:
    """Every rank's ``local`` rows, concatenated in rank order, on rank ``dst``
    only (None on the others; ``local`` itself in a single process): what one
    rank must hold of a table the ranks read in shares, without a copy on every
    rank."""
    if _WORLD is None:
        return local
    sizes = gather_sizes(local.shape[0])
    width = max(sizes)
    if width == 0:
        return local[:0] if _WORLD.rank == dst else None
    pad = width - local.shape[0]
    if pad:
        local = torch.cat([local, local.new_zeros((pad, *local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in sizes] if _WORLD.rank == dst else None
    dist.gather(local.contiguous(), parts, dst=dst)
    if parts is None:
        return None
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


def gather_sizes(size: int) -> list[int]:
    """Every rank's ``size``, in rank order (``[size]`` in a single process)."""
    if _WORLD is None:
        return [size]
    return [int(n) for n in _all_gather(torch.tensor([size], dtype=torch.int64))]


def gather_frames(frame: pl.DataFrame) -> list[pl.DataFrame]:
    """Every rank's ``frame``, in rank order, sent as Arrow IPC bytes (never pickled);
    ``[frame]`` in a single process."""
    if _WORLD is None:
        return [frame]
    local, sizes = _ipc(frame)
    return _frames(gather_rows(local, sizes), sizes)


def gather_frames_to(frame: pl.DataFrame, dst: int) -> list[pl.DataFrame] | None:
    """Every rank's ``frame``, in rank order, on rank ``dst`` only (None on the
    others; ``[frame]`` in a single process): :func:`gather_frames` where one
    rank needs them, sent as Arrow IPC bytes (never pickled)."""
    if _WORLD is None:
        return [frame]
    local, sizes = _ipc(frame)
    got = gather_rows_to(local, dst)
    return None if got is None else _frames(got, sizes)


def _ipc(frame: pl.DataFrame) -> tuple[Tensor, list[int]]:
    """``frame`` as Arrow IPC bytes, and every rank's number of them."""
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    local = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    return local, gather_sizes(len(local))


def _frames(gathered: Tensor, sizes: list[int]) -> list[pl.DataFrame]:
    """The frames of :func:`_ipc`'s bytes, gathered in rank order."""
    return [
        pl.read_ipc(io.BytesIO(part.numpy().tobytes()))
        for part in gathered.split(sizes)
    ]


def _all_gather(local: Tensor) -> Tensor:
    """Every rank's equally long ``local``, concatenated in rank order."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sends each rank the summed gradient of its own rows:
    every rank's loss used them. (torch.distributed.nn.functional.all_gather does
    the same but is deprecated; this needs only all_gather and all_reduce, which
    every backend has, gloo included.)"""

    @staticmethod
    def forward(ctx: Any, local: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        return _all_gather(local)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]
