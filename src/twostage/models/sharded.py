"""ID tables sharded by TorchRec across the ranks of a run, trained with fbgemm's
kernel and its row-wise Adagrad fused into the backward pass.

``retrieval.embedding_backend=torchrec`` swaps every ``index`` field's
``nn.Embedding`` of both towers for a :class:`ShardedEmbedding` for the length of
training (:func:`sharded_tables`). Each tower's tables form one
:class:`ShardedCollection`: a TorchRec ``EmbeddingCollection`` that
``DistributedModelParallel`` shards by rows over the process group. Under
``torchrun`` each rank holds ``1/W`` of every table's rows and their row-wise Adagrad
state, and a lookup sends each ID to the rank that owns its row (an all-to-all) and
the gradient back; a tower looks up all its fields at once
(:func:`lookup_together`), one all-to-all each way instead of one per table. Without
``torchrun`` the group is one gloo rank made for the length of training.

TorchRec averages the gradients that reach a row over the ranks, as
DistributedDataParallel averages the dense ones, so under the loss scaling of
:mod:`twostage.distributed` 2 ranks train the tables of 1 (a test compares them).

Lookups are collectives: every rank must look up every table the same number of times,
which training and the per-epoch validation do (each rank validates on all of the
carve-out). The state dict holds each table whole (``weight``, ``accumulator``), so
checkpoints, the best epoch's copy and ``--resume`` work as with plain tables; its
gather is a collective too. On the way out each table becomes a plain ``nn.Embedding``
again on every rank, so evaluation, saved runs and serving never need TorchRec.

TorchRec is an optional install: the ``torchrec`` extra (fbgemm's CPU kernel and what
``import torchrec`` needs), then ``torchrec==1.8.0`` with ``--no-deps`` (its declared
requirements pull the CUDA build of fbgemm).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from twostage.errors import ConfigError, clause
from twostage.models.fused import SelfUpdatingTable, swapped_tables
from twostage.models.names import module_key

if TYPE_CHECKING:
    from twostage.models.retrieval import RetrievalModel

__all__ = [
    "ShardedCollection",
    "ShardedEmbedding",
    "lookup_together",
    "require_torchrec",
    "sharded_tables",
]

logger = logging.getLogger(__name__)

#: TorchRec and what its import needs, at the versions that match torch==2.13.0.
INSTALL_COMMAND = (
    'pip install "twostage[torchrec]" && pip install --no-deps torchrec==1.8.0'
)


def require_torchrec() -> None:
    """Raise a ConfigError that says how to install TorchRec when it is missing."""
    try:
        import fbgemm_gpu  # noqa: F401
        import torchrec  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "`retrieval.embedding_backend=torchrec` needs TorchRec and fbgemm's kernel: "
            f"{INSTALL_COMMAND} (--no-deps keeps torchrec from pulling fbgemm's CUDA "
            f"build; Linux x86_64 only). Received: {clause(e)}."
        ) from e


class ShardedCollection:
    """A side's ``[N_t, D]`` tables in one TorchRec ``EmbeddingCollection``, each
    sharded by rows over ``group``, updated in backward with exact row-wise Adagrad
    on the ranks that own the rows (as :class:`twostage.models.fused.FusedEmbedding`
    does in one process).

    Args:
        tables: ``(name, whole initial table)`` pairs, the same on every rank; each
            rank copies in its rows.
        learning_rate: the initial learning rate.
        eps: Adagrad's epsilon.
        group: the ranks to shard over.
    """

    def __init__(
        self,
        tables: list[tuple[str, Tensor]],
        *,
        learning_rate: float,
        eps: float,
        group: dist.ProcessGroup,
    ) -> None:
        require_torchrec()
        # TorchRec's lookups call torch.fx's is_fx_tracing, which logs a deprecation
        # notice to torch.fx's logger on every rank; nothing a user can act on.
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        self.group = group
        self.shapes = {name: tuple(weight.shape) for name, weight in tables}
        self.module = _shard(self.shapes, learning_rate, eps, group)
        with torch.no_grad():
            for name, weight in tables:
                self.load(name, weight, torch.zeros(len(weight)))

    def lookup(self, ids: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{name: [...] indices}`` -> ``{name: [..., D] rows}`` in one lookup (a
        collective: every rank calls it with the same names). The indices all have
        one shape; tables not named take no IDs."""
        from torchrec import KeyedJaggedTensor

        shapes = {tuple(value.shape) for value in ids.values()}
        if len(shapes) != 1:
            raise ValueError(
                f"`ids` should all have one shape. Received: {sorted(shapes)}."
            )
        shape = shapes.pop()
        count = math.prod(shape)
        # Every table is a key of one batch of `count` bags: one ID per bag for the
        # tables asked for, empty bags for the others.
        # The values go in the collection's key order.
        names = list(self.shapes)
        values = torch.cat([ids[n].reshape(-1).long() for n in names if n in ids])
        lengths = torch.cat(
            [torch.full((count,), int(n in ids), dtype=torch.int64) for n in names]
        )
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[module_key(n) for n in names], values=values, lengths=lengths
        )
        out: Any = self.module(features)
        if hasattr(out, "wait"):
            out = out.wait()
        return {
            name: out[module_key(name)].values().view(*shape, self.shapes[name][1])
            for name in ids
        }

    def set_learning_rate(self, value: float) -> None:
        optimizer = self.module.fused_optimizer
        for group in optimizer.param_groups:
            group["lr"] = value
        optimizer.step()  # a fused optimiser's step only hands the kernel its rate

    def full_weight(self, name: str) -> Tensor:
        """``[N, D]``: table ``name`` whole, gathered from every rank (a collective)."""
        return _gather(self._weights(name), self.shapes[name][0], self.group)

    def full_accumulator(self, name: str) -> Tensor:
        """``[N]``: its row-wise Adagrad state, whole (a collective)."""
        return _gather(self._accumulators(name), self.shapes[name][0], self.group)

    def load(self, name: str, weight: Tensor, accumulator: Tensor) -> None:
        """Copy this rank's rows of a whole table and its state into the shards
        (views of the kernel's storage)."""
        for shards, whole in (
            (self._weights(name), weight),
            (self._accumulators(name), accumulator),
        ):
            for shard in shards.local_shards():
                start, size = shard.metadata.shard_offsets[0], len(shard.tensor)
                shard.tensor.copy_(whole[start : start + size])

    def _weights(self, name: str) -> Any:
        return self.module.state_dict()[f"embeddings.{module_key(name)}.weight"]

    def _accumulators(self, name: str) -> Any:
        state = self.module.fused_optimizer.state_dict()["state"]
        key = module_key(name)
        return state[f"embeddings.{key}.weight"][f"{key}.momentum1"]


class ShardedEmbedding(SelfUpdatingTable):
    """One table of a :class:`ShardedCollection`: ``[...]`` indices -> ``[..., D]``
    rows. Its state dict holds the table whole (``weight``, ``accumulator``).

    Args:
        collection: the side's collection.
        name: the table's name in it (the field's).
    """

    def __init__(self, collection: ShardedCollection, name: str) -> None:
        super().__init__()
        # A list, not a submodule: model.parameters(), .to() and state_dict() must not
        # reach the sharded module (its parameters are ShardedTensors that update
        # themselves); this module's own state dict holds the table whole.
        self._collection = [collection]
        self.name = name
        self.num_embeddings, self.embedding_dim = collection.shapes[name]
        self.collective = dist.get_world_size(collection.group) > 1

    @property
    def collection(self) -> ShardedCollection:
        return self._collection[0]

    def forward(self, ids: Tensor) -> Tensor:
        return self.collection.lookup({self.name: ids})[self.name]

    def set_learning_rate(self, value: float) -> None:
        self.collection.set_learning_rate(value)

    def full_weight(self) -> Tensor:
        return self.collection.full_weight(self.name)

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        destination[prefix + "weight"] = self.full_weight()
        destination[prefix + "accumulator"] = self.collection.full_accumulator(
            self.name
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        keys = [prefix + "weight", prefix + "accumulator"]
        missing = [key for key in keys if key not in state_dict]
        missing_keys.extend(missing)
        if missing:
            return
        weight, accumulator = (state_dict[key] for key in keys)
        if weight.shape != (self.num_embeddings, self.embedding_dim):
            error_msgs.append(
                f"{prefix}weight should have shape "
                f"{(self.num_embeddings, self.embedding_dim)}. Received: "
                f"{tuple(weight.shape)}."
            )
            return
        with torch.no_grad():
            self.collection.load(self.name, weight, accumulator)


def lookup_together(
    tables: nn.ModuleDict, names: list[str], features: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The rows of every field in ``names`` whose table is a :class:`ShardedEmbedding`,
    one lookup per collection (one all-to-all each way instead of one per table);
    ``{}`` when none is."""
    groups: dict[int, tuple[ShardedCollection, dict[str, Tensor]]] = {}
    for name in names:
        table = tables[name]
        if isinstance(table, ShardedEmbedding):
            collection = table.collection
            groups.setdefault(id(collection), (collection, {}))[1][name] = features[
                name
            ]
    rows: dict[str, Tensor] = {}
    for collection, ids in groups.values():
        rows |= collection.lookup(ids)
    return rows


def _shard(
    shapes: dict[str, tuple[int, ...]],
    learning_rate: float,
    eps: float,
    group: dist.ProcessGroup,
) -> Any:
    """Tables ``{name: (rows, dim)}`` as one TorchRec EmbeddingCollection, each
    sharded by rows over ``group``, with row-wise Adagrad applied in backward."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec import EmbeddingCollection, EmbeddingConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.planner import (
        EmbeddingShardingPlanner,
        ParameterConstraints,
        Topology,
    )
    from torchrec.distributed.types import ShardingEnv, ShardingType

    collection = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=module_key(name),  # TorchRec keeps a module per table
                embedding_dim=dim,
                num_embeddings=rows,
                feature_names=[module_key(name)],
            )
            for name, (rows, dim) in shapes.items()
        ],
        device=torch.device("meta"),  # the rows are copied in after sharding
    )
    sharder = EmbeddingCollectionSharder(
        fused_params={
            "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
            "learning_rate": learning_rate,
            "eps": eps,
        }
    )
    # The planner warns about how its topology and storage estimate were made; on
    # CPU hosts neither matters.
    quiet = logging.getLogger("torchrec.distributed.planner")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            planner = EmbeddingShardingPlanner(
                topology=Topology(
                    world_size=dist.get_world_size(group), compute_device="cpu"
                ),
                constraints={
                    name: ParameterConstraints(
                        sharding_types=[ShardingType.ROW_WISE.value]
                    )
                    for name in shapes
                },
            )
            plan = planner.collective_plan(collection, [sharder], group)
            return DistributedModelParallel(
                collection,
                env=ShardingEnv.from_process_group(group),
                device=torch.device("cpu"),
                plan=plan,
                sharders=[sharder],
                init_data_parallel=False,  # the dense part is ours (DDP) or local
            )
    finally:
        quiet.setLevel(level)


def _gather(shards: Any, rows: int, group: dist.ProcessGroup) -> Tensor:
    """The whole tensor of a row-sharded ShardedTensor, on every rank of ``group``
    (a fresh copy: training goes on changing the shards).

    Row-wise shards are blocks of ``ceil(rows / W)`` rows, rank ``r``'s at ``r``
    blocks (the last one shorter or empty): each rank pads its block to that size
    and one all-gather fills a ``[W * block, ...]`` buffer whose first ``rows`` rows
    are the table, so a gather holds the table once, not once per rank plus a copy.
    """
    world = dist.get_world_size(group)
    metadata = shards.metadata()
    tail = tuple(metadata.size[1:])
    local = [shard.tensor for shard in shards.local_shards()]
    mine = local[0] if local else torch.zeros((0, *tail))
    if world == 1:
        return mine.clone()
    block = -(-rows // world)
    for meta in metadata.shards_metadata:
        if meta.shard_offsets[0] != meta.placement.rank() * block:
            raise RuntimeError(
                "TorchRec's row-wise shards should be blocks of "
                f"{block} rows at rank x {block}. Received: a shard at row "
                f"{meta.shard_offsets[0]} on rank {meta.placement.rank()}."
            )
    padded = mine.new_zeros((block, *tail))
    padded[: len(mine)] = mine
    whole = mine.new_empty((world * block, *tail))
    dist.all_gather_single(whole, padded, group=group)
    return whole[:rows]


@contextmanager
def _process_group() -> Iterator[dist.ProcessGroup]:
    """The run's process group, or a 1-rank gloo group for the length of training
    when there is none (no torchrun)."""
    if dist.is_initialized():
        yield dist.group.WORLD  # type: ignore[misc]
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD  # type: ignore[misc]
    finally:
        dist.destroy_process_group()


@contextmanager
def sharded_tables(
    model: RetrievalModel, *, learning_rate: float, eps: float = 1e-10
) -> Iterator[list[ShardedEmbedding]]:
    """Train ``model``'s ID and categorical tables sharded by TorchRec while inside.

    On the way in each such ``nn.Embedding`` becomes a :class:`ShardedEmbedding`
    with its weights; on the way out each becomes an ``nn.Embedding`` again on every
    rank, with the whole trained table.
    """
    with _process_group() as group:

        def shard(tables: list[tuple[str, Tensor]]) -> list[SelfUpdatingTable]:
            collection = ShardedCollection(
                tables, learning_rate=learning_rate, eps=eps, group=group
            )
            return [ShardedEmbedding(collection, name) for name, _ in tables]

        with swapped_tables(model, shard, backend="torchrec") as tables:
            yield tables  # type: ignore[misc]
