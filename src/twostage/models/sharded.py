"""ID tables sharded by TorchRec across the ranks of a run, trained with fbgemm's
kernel and its row-wise Adagrad fused into the backward pass.

``retrieval.embedding_backend=torchrec`` swaps every ``index`` field's
``nn.Embedding`` of both towers for a :class:`ShardedEmbedding` for the length of
training (:func:`sharded_tables`). Each is a TorchRec ``EmbeddingCollection`` of one
table that ``DistributedModelParallel`` shards by rows over the process group: under
``torchrun`` each rank holds ``1/W`` of every table's rows and its row-wise Adagrad
state, and a lookup sends each ID to the rank that owns its row (an all-to-all) and
the gradient back. Without ``torchrun`` the group is one gloo rank made for the length
of training.

TorchRec averages the gradients that reach a row over the ranks, as
DistributedDataParallel averages the dense ones, so under the loss scaling of
:mod:`twostage.distributed` 2 ranks train the tables of 1 (a test compares them).

Lookups are collectives: every rank must look up every table the same number of times,
which training and the per-epoch validation do (each rank validates on all of the
carve-out). The state dict holds each table whole (``weight``, ``accumulator``), so
checkpoints, the best epoch's copy and ``--resume`` work as with plain tables; its
gather is a collective too. On the way out each table becomes a plain ``nn.Embedding``
again on every rank, so evaluation, saved runs and serving never need TorchRec.

TorchRec is an optional install: ``torchrec==1.8.0`` with ``--no-deps`` (its declared
requirements pull the CUDA build of fbgemm) beside ``fbgemm-gpu-cpu==1.8.0``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from twostage.errors import ConfigError
from twostage.models.fused import SelfUpdatingTable, swapped_tables

if TYPE_CHECKING:
    from twostage.models.retrieval import RetrievalModel

__all__ = ["ShardedEmbedding", "require_torchrec", "sharded_tables"]

logger = logging.getLogger(__name__)

#: TorchRec and what its import needs, at the versions that match torch==2.13.0.
INSTALL_COMMAND = (
    'pip install "fbgemm-gpu-cpu==1.8.0" && pip install --no-deps torchrec==1.8.0 '
    "tensordict==0.15.3 pyvers==0.2.3 cloudpickle==3.1.3 pyre-extensions==0.0.32 "
    "typing-inspect==0.9.0"
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
            f"build; Linux x86_64 only). Received: {e}."
        ) from e


class ShardedEmbedding(SelfUpdatingTable):
    """One ``[N, D]`` table sharded by rows over ``group``: ``[...]`` indices ->
    ``[..., D]`` rows.

    Each backward pass updates the looked-up rows on the ranks that own them with
    exact row-wise Adagrad, as :class:`twostage.models.fused.FusedEmbedding` does in
    one process.

    Args:
        weight: the whole initial table, the same on every rank; each rank copies in
            its rows.
        name: the table's name (the field's).
        learning_rate: the initial learning rate.
        eps: Adagrad's epsilon.
        group: the ranks to shard over.
    """

    def __init__(
        self,
        weight: Tensor,
        *,
        name: str,
        learning_rate: float,
        eps: float,
        group: dist.ProcessGroup,
    ) -> None:
        super().__init__()
        require_torchrec()
        self.name, self.group = name, group
        self.collective = dist.get_world_size(group) > 1
        self.num_embeddings, self.embedding_dim = weight.shape
        # A list, not a submodule: model.parameters(), .to() and state_dict() must not
        # reach the sharded module (its parameters are ShardedTensors that update
        # themselves); this module's own state dict holds the table whole.
        self._dmp = [_shard(name, weight.shape, learning_rate, eps, group)]
        with torch.no_grad():
            self._load(weight, torch.zeros(self.num_embeddings))

    def forward(self, ids: Tensor) -> Tensor:
        from torchrec import KeyedJaggedTensor

        flat = ids.reshape(-1).long()
        # One ID per bag: lengths of ones.
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[self.name], values=flat, lengths=torch.ones_like(flat)
        )
        out: Any = self._dmp[0](features)
        if hasattr(out, "wait"):
            out = out.wait()
        return out[self.name].values().view(*ids.shape, self.embedding_dim)

    def set_learning_rate(self, value: float) -> None:
        optimizer = self._dmp[0].fused_optimizer
        for group in optimizer.param_groups:
            group["lr"] = value
        optimizer.step()  # a fused optimiser's step only hands the kernel its rate

    def full_weight(self) -> Tensor:
        """``[N, D]``: the whole table, gathered from every rank (a collective)."""
        return _gather(self._weight_shards(), self.num_embeddings, self.group)

    def full_accumulator(self) -> Tensor:
        """``[N]``: the whole table's row-wise Adagrad state (a collective)."""
        return _gather(self._accumulator_shards(), self.num_embeddings, self.group)

    def _weight_shards(self) -> Any:
        return self._dmp[0].state_dict()[f"embeddings.{self.name}.weight"]

    def _accumulator_shards(self) -> Any:
        state = self._dmp[0].fused_optimizer.state_dict()["state"]
        return state[f"embeddings.{self.name}.weight"][f"{self.name}.momentum1"]

    def _load(self, weight: Tensor, accumulator: Tensor) -> None:
        """Copy this rank's rows of whole tables into the shards (views of the
        kernel's storage)."""
        for shards, whole in (
            (self._weight_shards(), weight),
            (self._accumulator_shards(), accumulator),
        ):
            for shard in shards.local_shards():
                start, size = shard.metadata.shard_offsets[0], len(shard.tensor)
                shard.tensor.copy_(whole[start : start + size])

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        destination[prefix + "weight"] = self.full_weight()
        destination[prefix + "accumulator"] = self.full_accumulator()

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
            self._load(weight, accumulator)


def _shard(
    name: str,
    shape: torch.Size,
    learning_rate: float,
    eps: float,
    group: dist.ProcessGroup,
) -> Any:
    """One table as a TorchRec EmbeddingCollection, sharded by rows over ``group``
    with row-wise Adagrad applied in backward."""
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

    rows, dim = shape
    collection = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[name]
            )
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
    """The whole tensor of a row-sharded ShardedTensor, on every rank of ``group``."""
    spans = {rank: (0, 0) for rank in range(dist.get_world_size(group))}
    metadata = shards.metadata()
    for meta in metadata.shards_metadata:
        spans[meta.placement.rank()] = (meta.shard_offsets[0], meta.shard_sizes[0])
    local = [shard.tensor for shard in shards.local_shards()]
    tail = tuple(metadata.size[1:])
    mine = local[0] if local else torch.zeros((0, *tail))
    width = max(size for _, size in spans.values())
    padded = mine.new_zeros((width, *tail))
    padded[: len(mine)] = mine
    parts = [torch.empty_like(padded) for _ in spans]
    dist.all_gather(parts, padded, group=group)
    whole = mine.new_empty((rows, *tail))
    for rank, (start, size) in spans.items():
        whole[start : start + size] = parts[rank][:size]
    return whole


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

        def shard(name: str, weight: Tensor) -> ShardedEmbedding:
            return ShardedEmbedding(
                weight, name=name, learning_rate=learning_rate, eps=eps, group=group
            )

        with swapped_tables(model, shard, backend="torchrec") as tables:
            yield tables  # type: ignore[misc]
