"""Our sparse ID embeddings against TorchRec's kernel (fbgemm's table-batched embedding
bags with a fused row-wise Adagrad update), on the step the two towers spend their time
in: look up a batch of user and item IDs, score in-batch softmax, backward, update.

Needs the optional ``torchrec==1.8.0`` + ``fbgemm-gpu-cpu==1.8.0`` (installed with
``--no-deps``: see docs/scaling.md); without them only our backend is measured.

    python benchmarks/embedding_backends.py --json benchmarks/results/embedding_backends.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table, write_json


def _loss(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """In-batch softmax of unit vectors, as the retrieval task computes it."""
    users, items = F.normalize(users, dim=1), F.normalize(items, dim=1)
    logits = users @ items.T / 0.05  # (B, D) @ (D, B) -> (B, B)
    return F.cross_entropy(logits, torch.arange(len(users)))


def ours(args: argparse.Namespace) -> dict[str, float]:
    """nn.Embedding with sparse gradients and torch's Adagrad (our sparse setting)."""
    tables = torch.nn.ModuleList(
        torch.nn.Embedding(n, args.dim, sparse=True) for n in (args.users, args.items)
    )
    optimizer = torch.optim.Adagrad(tables.parameters(), lr=0.05)

    def step(users: torch.Tensor, items: torch.Tensor) -> None:
        loss = _loss(tables[0](users), tables[1](items))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _time(step, args)


def fbgemm(args: argparse.Namespace) -> dict[str, float]:
    """TorchRec's CPU kernel: both tables in one table-batched module, the backward
    pass and the row-wise Adagrad update fused."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        EmbeddingLocation,
        PoolingMode,
    )
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    module = SplitTableBatchedEmbeddingBagsCodegen(
        [
            (n, args.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)
            for n in (args.users, args.items)
        ],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.05,
        pooling_mode=PoolingMode.SUM,
    )

    def step(users: torch.Tensor, items: torch.Tensor) -> None:
        batch = len(users)
        indices = torch.cat([users, items])
        offsets = torch.arange(2 * batch + 1, dtype=torch.int64)  # one ID per bag
        out = module(indices, offsets)  # (B, 2 * D): the tables side by side
        loss = _loss(out[:, : args.dim], out[:, args.dim :])
        loss.backward()  # the update happens inside the backward pass

    return _time(step, args)


def _time(step: Any, args: argparse.Namespace) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    times = []
    for number in range(args.steps + 5):
        users = torch.randint(0, args.users, (args.batch_size,), generator=generator)
        items = torch.randint(0, args.items, (args.batch_size,), generator=generator)
        started = time.perf_counter()
        step(users, items)
        if number >= 5:  # warm-up
            times.append(time.perf_counter() - started)
    seconds = median(times)
    return {"step_ms": seconds * 1000, "examples_per_s": args.batch_size / seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"ours (sparse nn.Embedding + Adagrad)": ours(args)}
    try:
        results["torchrec/fbgemm (fused row-wise Adagrad)"] = fbgemm(args)
    except ImportError as e:
        results["torchrec/fbgemm (fused row-wise Adagrad)"] = {"skipped": str(e)}
    print_table(
        f"ID embeddings, {args.users:,} users x {args.items:,} items x {args.dim}, "
        f"batch {args.batch_size}, {args.threads} threads",
        ["backend", "step ms", "examples/s"],
        [
            [name, r.get("step_ms", "-"), r.get("examples_per_s", "-")]
            for name, r in results.items()
        ],
    )
    payload = {**results, "config": vars(args) | {"json": None}, "machine": machine()}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
