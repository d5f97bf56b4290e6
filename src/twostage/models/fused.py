"""ID tables trained with fbgemm's table-batched embedding kernel (TBE): the kernel
TorchRec's sharded embedding tables run on, with the optimiser fused into the backward
pass (exact row-wise Adagrad: one accumulator per row).

``retrieval.embedding_backend=fbgemm`` swaps every ``index`` field's ``nn.Embedding``
of both towers for a :class:`FusedEmbedding` for the length of training
(:func:`fused_tables`) and swaps plain tables back afterwards, so checkpoints hold the
kernel's state while saved runs, bundles and serving never need fbgemm. The kernel is
the optional ``fbgemm-gpu-cpu`` package (``pip install "twostage[fbgemm]"``); it is
the CPU build, so training stays on the CPU and in one process (its updates happen
inside backward, where DDP cannot average them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from twostage.errors import ConfigError, clause

if TYPE_CHECKING:
    from twostage.models.retrieval import RetrievalModel

__all__ = [
    "FusedEmbedding",
    "SelfUpdatingTable",
    "fused_modules",
    "fused_tables",
    "require_fbgemm",
    "swapped_tables",
]

logger = logging.getLogger(__name__)

_INSTALL = (
    "`retrieval.embedding_backend=fbgemm` needs the optional fbgemm kernel: "
    'pip install "twostage[fbgemm]" (fbgemm-gpu-cpu==1.8.0, which matches '
    "torch==2.13.0; Linux x86_64 only)."
)


def require_fbgemm() -> None:
    """Raise a ConfigError that says how to install fbgemm when it is missing."""
    try:
        import fbgemm_gpu  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"{_INSTALL} Received: {clause(e)}.") from e


class SelfUpdatingTable(nn.Module):
    """A table that updates its rows inside backward (no optimiser may touch it):
    it takes the schedule's learning rate and gives back its whole table."""

    #: Whether :meth:`full_weight` is a collective every rank must call.
    collective: bool = False

    def set_learning_rate(self, value: float) -> None:
        raise NotImplementedError

    def full_weight(self) -> Tensor:
        """``[N, D]``: the whole table."""
        raise NotImplementedError


class FusedEmbedding(SelfUpdatingTable):
    """One ``[N, D]`` table in fbgemm's kernel: ``[B]`` indices -> ``[B, D]`` rows.

    Each backward pass updates the looked-up rows in place with exact row-wise Adagrad
    (the accumulator of row ``r`` adds the mean of its squared gradient; the row moves
    by ``lr * g / (sqrt(acc) + eps)``). The learning rate follows the training
    schedule through :meth:`set_learning_rate`.

    Args:
        weight: the initial table, copied in.
        learning_rate: the initial learning rate.
        eps: Adagrad's epsilon.
    """

    def __init__(self, weight: Tensor, *, learning_rate: float, eps: float) -> None:
        super().__init__()
        require_fbgemm()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
            EmbeddingLocation,
            PoolingMode,
        )
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        rows, dim = weight.shape
        self.kernel = SplitTableBatchedEmbeddingBagsCodegen(
            [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
            optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            learning_rate=learning_rate,
            eps=eps,
            pooling_mode=PoolingMode.SUM,
        )
        with torch.no_grad():
            self.weight.copy_(weight)
            self.kernel.split_optimizer_states()[0][0].zero_()

    @property
    def weight(self) -> Tensor:
        """``[N, D]`` view of the kernel's table."""
        return self.kernel.split_embedding_weights()[0]

    @property
    def accumulator(self) -> Tensor:
        """``[N]`` row-wise Adagrad accumulators."""
        return self.kernel.split_optimizer_states()[0][0]

    def set_learning_rate(self, value: float) -> None:
        self.kernel.set_learning_rate(value)

    def full_weight(self) -> Tensor:
        return self.weight

    def forward(self, ids: Tensor) -> Tensor:
        # One index per bag: bag b is ids[b:b + 1], and a sum over one row is the row.
        offsets = torch.arange(len(ids) + 1, dtype=torch.int64, device=ids.device)
        return self.kernel(ids.long(), offsets)


def fused_modules(model: nn.Module) -> list[SelfUpdatingTable]:
    """The tables of ``model`` that update themselves inside backward."""
    return [m for m in model.modules() if isinstance(m, SelfUpdatingTable)]


def _index_tables(model: RetrievalModel) -> Iterator[tuple[nn.ModuleDict, list[str]]]:
    """Each tower's ``(dict, names)``: its tables and its ``index`` fields' names."""
    for tower in (model.query_tower, model.candidate_tower):
        names = [info.name for info in tower.fields if info.kind == "index"]
        if names:
            yield tower.embeddings, names


@contextmanager
def swapped_tables(
    model: RetrievalModel,
    make: Callable[[list[tuple[str, Tensor]]], list[SelfUpdatingTable]],
    *,
    backend: str,
) -> Iterator[list[SelfUpdatingTable]]:
    """Swap each tower's ``index`` fields' ``nn.Embedding`` tables for
    ``make([(name, weight), ...])`` (one call per tower, the tables in field order)
    while inside; on the way out each becomes an ``nn.Embedding`` again, with the
    trained weights and the sparsity it had. After an error too, except for tables
    whose whole weight is a collective (sharded over several ranks): another rank
    may never reach it, so those stay as they are and the error goes on."""
    swapped: list[tuple[nn.ModuleDict, str, bool]] = []
    failed = False
    try:
        for tables, names in _index_tables(model):
            plain: list[nn.Embedding] = []
            for name in names:
                table = tables[name]
                assert isinstance(table, nn.Embedding)
                plain.append(table)
            made = make(
                [(n, t.weight.detach()) for n, t in zip(names, plain, strict=True)]
            )
            for name, old, new in zip(names, plain, made, strict=True):
                tables[name] = new
                swapped.append((tables, name, old.sparse))
        logger.info(
            "%s: %d table(s) train with row-wise Adagrad inside backward (%s); "
            "train.optimizer applies to the other parameters",
            backend,
            len(swapped),
            ", ".join(name for _, name, _ in swapped),
        )
        yield [tables[name] for tables, name, _ in swapped]  # type: ignore[misc]
    except BaseException:
        failed = True
        raise
    finally:
        for tables, name, sparse in swapped:
            table = tables[name]
            assert isinstance(table, SelfUpdatingTable)
            if failed and table.collective:
                continue
            weight = table.full_weight().detach().clone()
            rows, dim = weight.shape
            plain_table = nn.Embedding(rows, dim, sparse=sparse)
            with torch.no_grad():
                plain_table.weight.copy_(weight)
            tables[name] = plain_table


@contextmanager
def fused_tables(
    model: RetrievalModel, *, learning_rate: float, eps: float = 1e-10
) -> Iterator[list[SelfUpdatingTable]]:
    """Train ``model``'s ID and categorical tables in fbgemm's kernel while inside
    (:func:`swapped_tables` with :class:`FusedEmbedding`)."""

    def fuse(tables: list[tuple[str, Tensor]]) -> list[SelfUpdatingTable]:
        return [
            FusedEmbedding(weight, learning_rate=learning_rate, eps=eps)
            for _, weight in tables
        ]

    with swapped_tables(model, fuse, backend="fbgemm") as tables:
        yield tables
