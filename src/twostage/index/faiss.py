"""Approximate indexes on faiss: HNSW graphs and IVF inverted lists (inner product).

Faiss stores the vectors under their build positions ``0..N-1``; ``ids.safetensors``
maps positions to the caller's int64 ids. Keeping faiss in position space lets the
shared over-fetch loop (see :class:`~twostage.index.base.ApproximateIndex`) exclude and
widen without a round trip through an id map. Indexes are written with
``faiss.write_index`` (faiss's own binary format, no pickle).

Defaults were measured with ``benchmarks/index_bench.py`` (1M L2-normalised 64-d
vectors around 1,000 Gaussian centres, 1,000 queries, k=100, one search thread, on a
shared 2-core VM):

* HNSW ``m=32, ef_construction=80, ef_search=128``: recall@100 0.994 at 0.57 ms p50.
  faiss searches with ``max(ef_search, k)``, so 64 is really 100 for k=100 (0.990);
  256 and 512 add 0.002-0.003 recall for +0.1-0.4 ms. 128 keeps a margin for smaller
  ``k`` (where 64 would really be 64) at no measurable cost. On the harder 20k set
  below, 128 gave 0.946 and 256 gave 0.990.
* IVF ``nlist = 4 sqrt(N)`` (4,000 lists for 1M) and ``nprobe=32``: recall@100 0.999
  at 0.56 ms p50. ``nprobe=16`` already gave 0.998 at 0.45 ms on this data (1,000
  vectors per centre), but on 20k vectors from the same generator (20 per centre) 32
  of 512 lists gave only 0.66: recall depends on the corpus, so the default keeps a 2x
  margin. Measure your own corpus before lowering it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from twostage.errors import ArtifactError
from twostage.index.base import ApproximateIndex, check_int

__all__ = [
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_NPROBE",
    "HNSWIndex",
    "IVFIndex",
]

logger = logging.getLogger(__name__)

DEFAULT_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 128
DEFAULT_NPROBE = 32
INDEX_FILE = "index.faiss"
_TRAIN_POINTS_PER_LIST = 64  # k-means sample per centroid (faiss needs >= 39)
_MIN_POINTS_PER_LIST = 39  # below this faiss's k-means warns and degrades
#: Growing an IVF index past this share above the vectors it was built on is
#: reported: its centroids stay those of the build.
_STALE_SHARE = 0.2


class _FaissIndex(ApproximateIndex):
    """Shared save/load of a faiss index plus ``ids.safetensors``."""

    def __init__(self) -> None:
        super().__init__()
        self._index: Any = None

    def _save_data(self, directory: Path) -> None:
        faiss.write_index(self._index, str(directory / INDEX_FILE))
        self._save_ids(directory)

    def _load_data(self, directory: Path, meta: dict[str, Any]) -> None:
        path = directory / INDEX_FILE
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:  # faiss raises RuntimeError for missing/corrupt files
            raise ArtifactError(f"cannot read index file {str(path)!r}: {e}") from e
        ids = self._load_ids(directory)
        if index.ntotal != len(ids):
            raise ArtifactError(
                f"{str(path)!r} holds {index.ntotal} vectors but ids.safetensors "
                f"holds {len(ids)} ids."
            )
        self._index = index
        self._set_ids(ids, index.d)

    def _exhaustive_search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._raw_search(queries, self.size, attempt=64)

    def _extended(self, embeddings: torch.Tensor, ids: torch.Tensor) -> Any:
        """A copy (``faiss.clone_index``) with the vectors added at the next
        positions: linked into the HNSW graph, or assigned to the IVF lists'
        trained centroids (which are not trained again: a catalogue that changes
        much should be indexed anew, ``twostage index build``)."""
        grown = type(self)(**self.params())
        grown._index = faiss.clone_index(self._index)
        grown._index.add(np.ascontiguousarray(embeddings.numpy()))
        return grown


class HNSWIndex(_FaissIndex):
    """``faiss.IndexHNSWFlat`` with inner product.

    Args:
        m: graph neighbours per node (memory grows by ``2 m`` ints per vector).
        ef_construction: candidate list size while building; 0 picks 80.
        ef_search: candidate list size while searching (at least ``k`` is used);
            0 picks 128 (recall@100 0.994 at 0.57 ms p50 on 1M x 64, one thread).
    """

    kind = "hnsw"

    def __init__(
        self, m: int = 32, ef_construction: int = 0, ef_search: int = 0
    ) -> None:
        super().__init__()
        self.m = check_int("m", m)
        ef_construction = check_int("ef_construction", ef_construction, minimum=0)
        ef_search = check_int("ef_search", ef_search, minimum=0)
        self.ef_construction = ef_construction or DEFAULT_EF_CONSTRUCTION
        self.ef_search = ef_search or DEFAULT_EF_SEARCH

    def params(self) -> dict[str, Any]:
        return {
            "m": self.m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
        }

    def _build(self, embeddings: torch.Tensor, ids: torch.Tensor) -> None:
        index = faiss.IndexHNSWFlat(
            embeddings.shape[1], self.m, faiss.METRIC_INNER_PRODUCT
        )
        index.hnsw.efConstruction = self.ef_construction
        index.add(embeddings.numpy())
        self._index = index

    def _raw_search(
        self, queries: np.ndarray, fetch: int, attempt: int
    ) -> tuple[np.ndarray, np.ndarray]:
        if attempt >= 64:  # exhaustive: brute force over the graph's flat storage
            storage = faiss.downcast_index(self._index.storage)
            return storage.search(queries, fetch)
        ef = max(self.ef_search << attempt, fetch)
        params = faiss.SearchParametersHNSW(efSearch=ef)  # type: ignore[attr-defined]
        return self._index.search(queries, fetch, params=params)


class IVFIndex(_FaissIndex):
    """``faiss.IndexIVFFlat`` with an inner-product coarse quantizer.

    Args:
        nlist: number of inverted lists; 0 picks ``4 sqrt(N)``, at most ``N / 39``
            (faiss's k-means wants 39 training points per centroid), at least 1.
        nprobe: lists scanned per query; 0 picks 32 (recall@100 0.999 at 0.56 ms p50
            on 1M x 64 with 4,000 lists, one thread).
        seed: seed of the k-means training sample.
    """

    kind = "ivf"

    def __init__(self, nlist: int = 0, nprobe: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.nlist = check_int("nlist", nlist, minimum=0)
        self._nlist = self.nlist  # resolved at build
        self.nprobe = check_int("nprobe", nprobe, minimum=0) or DEFAULT_NPROBE
        self.seed = check_int("seed", seed, minimum=0)
        self._built_on = 0  # the vectors its centroids were trained among

    def params(self) -> dict[str, Any]:
        return {"nlist": self._nlist, "nprobe": self.nprobe, "seed": self.seed}

    def _extra_meta(self) -> dict[str, Any]:
        return {"built_on": self._built_on}

    def _load_data(self, directory: Path, meta: dict[str, Any]) -> None:
        super()._load_data(directory, meta)
        built_on = meta.get("built_on", self.size)  # not recorded before growth was
        if type(built_on) is not int or not 1 <= built_on <= self.size:
            raise ArtifactError(
                f"{str(directory / 'index.json')!r}: `built_on` should be the "
                f"number of vectors the index was built on, 1 to its {self.size}. "
                f"Received {built_on!r}."
            )
        self._built_on = built_on

    def _build(self, embeddings: torch.Tensor, ids: torch.Tensor) -> None:
        num_items, dim = embeddings.shape
        nlist = min(self.nlist, num_items)
        if self.nlist > num_items // _MIN_POINTS_PER_LIST:
            # faiss trains on what there is, with a warning of its own on stderr.
            logger.warning(
                "nlist = %d asks for more lists than %d items fill (%d points a list "
                "is faiss's minimum%s); the index has %d lists, and recall may "
                "suffer: fewer lists (or 0, picked from the catalogue) fit better.",
                self.nlist,
                num_items,
                _MIN_POINTS_PER_LIST,
                "; one list per item at most" if self.nlist > num_items else "",
                nlist,
            )
        if nlist == 0:
            wanted = round(4 * math.sqrt(num_items))
            nlist = max(1, min(wanted, num_items // _MIN_POINTS_PER_LIST))
        vectors = embeddings.numpy()
        num_train = min(num_items, _TRAIN_POINTS_PER_LIST * nlist)
        rng = np.random.default_rng(self.seed)
        sample = vectors[np.sort(rng.choice(num_items, num_train, replace=False))]
        quantizer = faiss.IndexFlatIP(dim)
        index = self._ivf(quantizer, dim, nlist)
        index.cp.seed = self.seed
        index.train(sample)
        index.add(vectors)
        self._index, self._nlist, self._built_on = index, nlist, num_items

    def _extended(self, embeddings: torch.Tensor, ids: torch.Tensor) -> Any:
        held, total = self.size, self.size + len(embeddings)
        # Counted from the build, so that growth by small steps is reported too.
        if total > (1 + _STALE_SHARE) * self._built_on:
            logger.warning(
                "adding %d vectors to an IVF index of %d: its %d lists' centroids "
                "were trained among the %d it was built on and are not trained "
                "again, so recall may fall as the catalogue (now %d) drifts from "
                "them; `twostage index build` trains them anew.",
                len(embeddings),
                held,
                self._nlist,
                self._built_on,
                total,
            )
        grown = super()._extended(embeddings, ids)
        grown._built_on = self._built_on
        return grown

    def _ivf(self, quantizer: Any, dim: int, nlist: int) -> Any:
        """The inverted-file index over ``quantizer``: float vectors in the lists."""
        return faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)

    def _raw_search(
        self, queries: np.ndarray, fetch: int, attempt: int
    ) -> tuple[np.ndarray, np.ndarray]:
        nprobe = min(self._nlist, self.nprobe << min(attempt, 32))
        params = faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]
        return self._index.search(queries, fetch, params=params)


class IVFSQIndex(IVFIndex):
    """``faiss.IndexIVFScalarQuantizer`` with 8-bit codes: :class:`IVFIndex` with one
    byte per dimension in the lists instead of four, for catalogues whose float
    vectors do not fit comfortably (10M x 64 floats: 2.4 GiB; as codes: 0.6 GiB).
    Scores are computed on the decoded codes, so they differ slightly from the exact
    ones; ``benchmarks/index_bench.py`` measures recall against exact.
    """

    kind = "ivf_sq"

    def _ivf(self, quantizer: Any, dim: int, nlist: int) -> Any:
        return faiss.IndexIVFScalarQuantizer(
            quantizer,
            dim,
            nlist,
            faiss.ScalarQuantizer.QT_8bit,
            faiss.METRIC_INNER_PRODUCT,
        )
