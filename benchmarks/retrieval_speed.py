"""Two-tower training throughput on a large synthetic log (10M interactions, 1M items,
1M users by default), ID-only and with side features and history, on the CPU and on a
GPU when one is present. The last row is the floor of the CPU batch size: the in-batch
softmax's three matmuls alone.

    python benchmarks/retrieval_speed.py --json benchmarks/results/retrieval_speed.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, print_table, write_json
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.synthetic import generate
from twostage.retrieval.fit import train_retrieval
from twostage.retrieval.run import build_model, spec_for
from twostage.retrieval.tensors import build_tensors

ID_ONLY = ["retrieval.use_side_features=false", "retrieval.history_length=0"]
FEATURES = ["retrieval.history_length=20"]
SPARSE = ["retrieval.sparse_embeddings=true"]
ADAGRAD = ["train.optimizer=adagrad", "train.learning_rate=0.05"]
#: fbgemm's kernel for the ID and categorical tables (row-wise Adagrad fused into
#: backward); the optional fbgemm-gpu-cpu package, skipped without it.
FBGEMM = ["retrieval.embedding_backend=fbgemm"]
#: The same tables sharded by TorchRec (one rank here: what its sharding layer costs
#: over the bare kernel); the optional torchrec package, skipped without it.
TORCHREC = ["retrieval.embedding_backend=torchrec"]
VARIANTS = {
    "id-only": ID_ONLY,
    "id-only/sparse": ID_ONLY + SPARSE,
    "id-only/sparse-adagrad": ID_ONLY + SPARSE + ADAGRAD,
    "id-only/fbgemm": ID_ONLY + SPARSE + ADAGRAD + FBGEMM,
    "id-only/torchrec": ID_ONLY + SPARSE + ADAGRAD + TORCHREC,
    "features+history": FEATURES,
    "features+history/sparse": FEATURES + SPARSE,
    "features+history/sparse-adagrad": FEATURES + SPARSE + ADAGRAD,
    "features+history/fbgemm": FEATURES + SPARSE + ADAGRAD + FBGEMM,
    "features+history/torchrec": FEATURES + SPARSE + ADAGRAD + TORCHREC,
}


def measure(
    dataset: Any, overrides: list[str], device: str, steps: int, batch: int
) -> dict[str, Any]:
    config = apply_overrides(
        ExperimentConfig(),
        [
            *overrides,
            f"train.device={device}",
            f"train.batch_size={batch}",
            f"train.max_steps={steps}",
            "train.epochs=1",
            "train.early_stopping_patience=0",
            "retrieval.id_dropout=0.1",
        ],
    )
    started = time.perf_counter()
    spec = spec_for(dataset, config).fit(dataset)
    tensors = build_tensors(spec, dataset, config.retrieval)
    prepare_s = time.perf_counter() - started
    model = build_model(spec, config.retrieval)
    stamps: list[float] = []

    def on_step(_: dict[str, Any]) -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    train_retrieval(model, tensors, config.train, on_step=on_step)
    warmup = min(10, len(stamps) // 4)
    per_step = [
        b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)
    ]
    step_s = median(per_step)
    return {
        "examples_per_s": batch / step_s,
        "median_step_ms": step_s * 1000,
        "steps": len(stamps),
        "batch_size": batch,
        "prepare_s": prepare_s,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def matmul_floor(batch: int, dim: int = 64, repeats: int = 50) -> dict[str, Any]:
    """The in-batch softmax's three matmuls alone (logits, and the gradients of the
    queries and the candidates): no step of that batch size can be faster here."""
    queries, candidates = torch.randn(batch, dim), torch.randn(batch, dim)
    grad = torch.randn(batch, batch)
    stamps = []
    for _ in range(repeats + 5):
        started = time.perf_counter()
        _ = queries @ candidates.T
        _ = grad @ candidates
        _ = grad.T @ queries
        stamps.append(time.perf_counter() - started)
    step_s = median(stamps[5:])
    return {"examples_per_s": batch / step_s, "median_step_ms": step_s * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--interactions", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=1024, help="CPU batch size")
    parser.add_argument("--gpu-batch-size", type=int, default=8192)
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, any of " + ", ".join(VARIANTS),
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads (0: torch default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dataset = generate(
        num_users=args.users,
        num_items=args.items,
        num_interactions=args.interactions,
        num_clusters=200,
    )
    generate_s = time.perf_counter() - started
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results: dict[str, Any] = {}
    rows = []
    for device in devices:
        for name in args.variants.split(","):
            overrides = VARIANTS[name]
            key = f"{name}/{device}"
            optional = {"fbgemm": "fbgemm_gpu", "torchrec": "torchrec"}
            backend = name.rsplit("/", 1)[-1]
            if backend in optional and (
                device != "cpu" or not _installed(optional[backend])
            ):
                continue  # the CPU build of the optional kernel
            results[key] = measure(
                dataset, overrides, device, args.steps, args.batch_size
            )
            r = results[key]
            rows.append(
                [
                    key,
                    f"{r['examples_per_s']:,.0f}",
                    f"{r['median_step_ms']:.1f}",
                    r["steps"],
                    f"{r['prepare_s']:.1f}",
                    f"{r['parameters']:,}",
                ]
            )
    floor = results["matmul-floor/cpu"] = matmul_floor(args.batch_size)
    rows.append(
        [
            "matmul-floor/cpu",
            f"{floor['examples_per_s']:,.0f}",
            f"{floor['median_step_ms']:.1f}",
            "",
            "",
            "",
        ]
    )
    print_table(
        f"Training throughput: {args.interactions:,} interactions, {args.items:,} items, {args.users:,} users",
        [
            "variant/device",
            "examples/s",
            "step ms (median)",
            "steps",
            "prepare s",
            "parameters",
        ],
        rows,
    )
    write_json(
        args.json,
        {
            "results": results,
            "generate_s": generate_s,
            "shape": vars(args) | {"json": None},
            "machine": machine(),
        },
    )


if __name__ == "__main__":
    main()
