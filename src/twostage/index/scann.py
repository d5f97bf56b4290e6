"""ScaNN (Google's anisotropic-quantisation index), when the optional package is there.

``pip install 'twostage[scann]'`` (wheels exist for Linux x86_64 only). The searcher is
a partitioning tree, asymmetric-hashing scores and an exact re-ordering of the best
candidates; it is saved with ``searcher.serialize`` into ``scann/`` (numpy files and
protos, no pickle) beside ``ids.safetensors``, with the asset paths in
``scann_assets.pbtxt`` made relative so the bundle can be renamed or moved.
"""

from __future__ import annotations

import importlib
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twostage.errors import ArtifactError, ConfigError
from twostage.index.base import ApproximateIndex, check_int

__all__ = ["ScannIndex"]

SEARCHER_DIR = "scann"
_ASSETS = "scann_assets.pbtxt"
#: ScaNN's ``serialize`` records every asset by the absolute path it wrote it to.
_ASSET_PATH = re.compile(r'asset_path:\s*"([^"]*)"')
_MIN_LEAVES_TO_SEARCH = 40  # 3,000 items, 55 leaves: 20 gave recall@10 0.94, 40 0.995


def _import_scann() -> Any:
    try:
        return importlib.import_module("scann")
    except ImportError as e:
        raise ConfigError(
            "the 'scann' index needs the optional ScaNN package, which is not "
            "installed. Install it with `pip install 'twostage[scann]'` (Linux x86_64 "
            "only), or use kind='hnsw' or 'ivf'."
        ) from e


class ScannIndex(ApproximateIndex):
    """A ScaNN searcher with dot-product scoring.

    Args:
        num_leaves: partitions of the tree; 0 picks ``sqrt(N)``.
        leaves_to_search: partitions scanned per query; 0 picks ``num_leaves / 3``,
            at least 40 (or all of them). On 100k x 64 clustered vectors (316 leaves,
            ``benchmarks/index_bench.py --quick``) 40 leaves gave recall@100 0.91,
            100 gave 0.97 at 0.3-0.6 ms p50; re-ordering more than 250 added < 0.01.
        reorder: candidates re-scored exactly; 0 picks 250.
    """

    kind = "scann"

    def __init__(
        self, num_leaves: int = 0, leaves_to_search: int = 0, reorder: int = 0
    ) -> None:
        super().__init__()
        self._scann = _import_scann()
        self.num_leaves = check_int("num_leaves", num_leaves, minimum=0)
        self.leaves_to_search = check_int(
            "leaves_to_search", leaves_to_search, minimum=0
        )
        self.reorder = check_int("reorder", reorder, minimum=0) or 250
        self._searcher: Any = None

    def params(self) -> dict[str, Any]:
        return {
            "num_leaves": self.num_leaves,
            "leaves_to_search": self.leaves_to_search,
            "reorder": self.reorder,
        }

    def _build(self, embeddings: torch.Tensor, ids: torch.Tensor) -> None:
        num_items = len(embeddings)
        self.num_leaves = min(self.num_leaves or round(math.sqrt(num_items)), num_items)
        default_leaves = max(self.num_leaves // 3, _MIN_LEAVES_TO_SEARCH)
        self.leaves_to_search = min(
            self.leaves_to_search or default_leaves, self.num_leaves
        )
        builder = self._scann.scann_ops_pybind.builder(
            embeddings.numpy(), 10, "dot_product"
        )
        self._searcher = (
            builder.tree(
                num_leaves=self.num_leaves,
                num_leaves_to_search=self.leaves_to_search,
                training_sample_size=min(num_items, 250_000),
            )
            .score_ah(2, anisotropic_quantization_threshold=0.2)
            .reorder(self.reorder)
            .build()
        )

    def _raw_search(
        self, queries: np.ndarray, fetch: int, attempt: int
    ) -> tuple[np.ndarray, np.ndarray]:
        leaves = min(self.num_leaves, self.leaves_to_search << min(attempt, 32))
        positions, scores = self._searcher.search_batched(
            queries,
            final_num_neighbors=fetch,
            pre_reorder_num_neighbors=max(self.reorder, fetch),
            leaves_to_search=leaves,
        )
        positions = np.asarray(positions, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float32)  # dot products, best first
        # ScaNN pads a row it cannot fill with position 0 and a NaN score.
        missing = np.isnan(scores)
        positions[missing], scores[missing] = -1, -np.inf
        return scores, positions

    def _exhaustive_search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._raw_search(queries, self.size, attempt=64)

    def _save_data(self, directory: Path) -> None:
        searcher_dir = directory / SEARCHER_DIR
        searcher_dir.mkdir(exist_ok=True)
        self._searcher.serialize(str(searcher_dir))
        # The bundle is written in a temporary directory and renamed into place:
        # keep the asset paths relative, or the saved index points at a dead path.
        assets = searcher_dir / _ASSETS
        if assets.exists():
            assets.write_text(relative_asset_paths(assets.read_text()))
        self._save_ids(directory)

    def _load_data(self, directory: Path, meta: dict[str, Any]) -> None:
        path = directory / SEARCHER_DIR
        try:
            self._searcher = _load_searcher(self._scann, path)
        except (OSError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"cannot read ScaNN searcher {str(path)!r}: {e}") from e
        self._set_ids(self._load_ids(directory), int(meta["dim"]))


def relative_asset_paths(text: str) -> str:
    """``scann_assets.pbtxt`` with each asset path reduced to its file name."""
    return _ASSET_PATH.sub(lambda m: f'asset_path: "{Path(m.group(1)).name}"', text)


def absolute_asset_paths(text: str, directory: Path) -> str:
    """``scann_assets.pbtxt`` with each asset path inside ``directory``."""
    root = directory.resolve()
    return _ASSET_PATH.sub(
        lambda m: f'asset_path: "{root / Path(m.group(1)).name}"', text
    )


def _load_searcher(scann: Any, path: Path) -> Any:
    """``load_searcher`` for a searcher directory wherever it now lies.

    ScaNN reads its assets from the paths in ``scann_assets.pbtxt``; the bundle keeps
    them relative, so the searcher is loaded from a temporary directory holding the
    other files (links) and a copy of that file with the paths made absolute.
    """
    assets = path / _ASSETS
    if not assets.exists():
        return scann.scann_ops_pybind.load_searcher(str(path))
    with tempfile.TemporaryDirectory(prefix="twostage-scann-") as temp:
        for item in path.iterdir():
            if item.name != _ASSETS:
                (Path(temp) / item.name).symlink_to(item.resolve())
        (Path(temp) / _ASSETS).write_text(
            absolute_asset_paths(assets.read_text(), path)
        )
        return scann.scann_ops_pybind.load_searcher(temp)
