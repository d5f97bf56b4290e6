"""The index contract, run against every backend; the exact index is the oracle."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from twostage.config import IndexConfig
from twostage.errors import ArtifactError, ConfigError, DataError, NotFittedError
from twostage.index import (
    KINDS,
    ExactIndex,
    HNSWIndex,
    Index,
    IVFIndex,
    IVFSQIndex,
    ScannIndex,
    load_index,
    make_index,
)

NUM_ITEMS, DIM, NUM_QUERIES, K = 3000, 32, 40, 10
HAS_SCANN = importlib.util.find_spec("scann") is not None


def _clustered(
    num: int, centres: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    pick = torch.randint(len(centres), (num,), generator=generator)
    noise = 0.25 * torch.randn(num, centres.shape[1], generator=generator)
    return torch.nn.functional.normalize(centres[pick] + noise, dim=1)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    """3,000 clustered items under shuffled, non-contiguous ids, and 40 queries."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(
        torch.randn(30, DIM, generator=generator), dim=1
    )
    items = _clustered(NUM_ITEMS, centres, generator)
    queries = _clustered(NUM_QUERIES, centres, generator)
    ids = torch.randperm(10 * NUM_ITEMS, generator=generator)[:NUM_ITEMS] + 1
    return {"items": items, "ids": ids, "queries": queries}


def _backend(kind: str) -> Index:
    if kind == "scann":
        pytest.importorskip("scann")
        return ScannIndex()
    if kind == "exact":  # several chunks, so running top-k lists get merged
        return ExactIndex(chunk_size=1000)
    return make_index(IndexConfig(kind=kind))  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=KINDS)
def index(request: pytest.FixtureRequest, data: dict[str, torch.Tensor]) -> Index:
    return _backend(request.param).build(data["items"], data["ids"])


def _reference(
    data: dict[str, torch.Tensor], k: int, exclude: list[torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: every score, excluded items set to -inf, torch.topk."""
    scores = data["queries"] @ data["items"].T
    for row, excluded in enumerate(exclude or []):
        scores[row, torch.isin(data["ids"], excluded)] = -torch.inf
    top, positions = scores.topk(k, dim=1)
    return top, data["ids"][positions]


def _recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = [
        len(np.intersect1d(a[a >= 0], b[b >= 0]))
        for a, b in zip(found, truth, strict=True)
    ]
    return sum(hits) / int((truth >= 0).sum())


def test_matches_the_exact_oracle(index: Index, data: dict[str, torch.Tensor]) -> None:
    scores, ids = index.search(data["queries"], K)
    ref_scores, ref_ids = _reference(data, K)
    assert scores.shape == ids.shape == (NUM_QUERIES, K)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best first
    if index.is_exact:
        assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)
    else:
        assert _recall(ids, ref_ids) >= 0.9
    assert index.size == NUM_ITEMS and index.dim == DIM
    # No query: no rows, of the same types (the exact index ended in torch.cat's
    # "non-empty list" error).
    none_scores, none_ids = index.search(data["queries"][:0], K, exclude=[])
    assert none_scores.shape == none_ids.shape == (0, K)
    assert none_scores.dtype == torch.float32 and none_ids.dtype == torch.int64


def test_exclusion_never_loses_results(
    index: Index, data: dict[str, torch.Tensor]
) -> None:
    _, top = _reference(data, 60)
    exclude: list[torch.Tensor | None] = [
        top[row, : 5 + row] for row in range(NUM_QUERIES)
    ]
    best = int(top[0, 0])
    exclude[0] = torch.tensor([-5, 10**9, best, best])  # unknown ids and a repeat
    exclude[1] = None
    exclude[2] = top[2].numpy()  # 60 excluded, more than k
    scores, ids = index.search(data["queries"], K, exclude=exclude)
    assert bool((ids >= 0).all()) and bool(torch.isfinite(scores).all())
    for row, excluded in enumerate(exclude):
        if excluded is not None:
            assert not set(ids[row].tolist()) & set(torch.as_tensor(excluded).tolist())
    as_tensors = [torch.as_tensor(e if e is not None else []).long() for e in exclude]
    ref_scores, ref_ids = _reference(data, K, as_tensors)
    if index.is_exact:
        assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)
    else:
        assert _recall(ids, ref_ids) >= 0.9


def test_pads_when_almost_everything_is_excluded(
    index: Index, data: dict[str, torch.Tensor]
) -> None:
    queries = data["queries"][:3]
    remaining = data["ids"][[7, 1500, 2999, 42]]
    allowed = data["ids"][~torch.isin(data["ids"], remaining)]
    scores, ids = index.search(queries, K, exclude=[allowed, allowed[:-2], None])
    assert sorted(ids[0, :4].tolist()) == sorted(remaining.tolist())
    assert ids[0, 4:].eq(-1).all() and scores[0, 4:].eq(-torch.inf).all()
    assert set(ids[1, :6].tolist()) == {*remaining.tolist(), *allowed[-2:].tolist()}
    assert ids[1, 6:].eq(-1).all() and (ids[2] >= 0).all()
    # k beyond the catalogue: every item once, then padding.
    scores, ids = index.search(queries[:1], NUM_ITEMS + 5)
    assert sorted(ids[0, :NUM_ITEMS].tolist()) == sorted(data["ids"].tolist())
    assert ids[0, NUM_ITEMS:].eq(-1).all()
    assert scores[0, NUM_ITEMS:].eq(-torch.inf).all()


def test_save_load_gives_identical_results(
    index: Index, data: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    # Saved in one directory, then moved, as a bundle is renamed into place.
    index.save(tmp_path / "written")
    (tmp_path / "written").rename(tmp_path / "moved")
    tmp_path = tmp_path / "moved"
    meta = json.loads((tmp_path / "index.json").read_text())
    assert meta["kind"] == index.kind
    assert (meta["size"], meta["dim"]) == (NUM_ITEMS, DIM)
    for saved in tmp_path.rglob("*"):  # no file may name where it was written
        if saved.is_file() and saved.suffix in (".json", ".pbtxt", ".txt"):
            assert "written" not in saved.read_text(errors="replace"), saved
    loaded = load_index(tmp_path)
    assert type(loaded) is type(index) and loaded.params() == index.params()
    exclude = [data["ids"][row : row + 20] for row in range(NUM_QUERIES)]
    for before, after in zip(
        index.search(data["queries"], K, exclude=exclude),
        loaded.search(data["queries"], K, exclude=exclude),
        strict=True,
    ):
        assert torch.equal(before, after)
    data_file = next(p for p in sorted(tmp_path.iterdir()) if p.suffix != ".json")
    data_file.write_bytes(b"not an index")
    with pytest.raises(ArtifactError, match=data_file.name):
        load_index(tmp_path)
    (tmp_path / "index.json").unlink()
    with pytest.raises(ArtifactError, match=r"index\.json"):
        load_index(tmp_path)


def test_clear_errors(index: Index, data: dict[str, torch.Tensor]) -> None:
    with pytest.raises(
        ConfigError, match=r"`k` should be a positive integer\. Received: `k` = 0\."
    ):
        index.search(data["queries"], 0)
    with pytest.raises(ConfigError, match="`k`"):
        index.search(data["queries"], 2.5)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=f"should have {DIM} columns"):
        index.search(torch.randn(2, DIM + 1), K)
    with pytest.raises(DataError, match="2-D"):
        index.search(data["queries"][0], K)
    with pytest.raises(DataError, match="one entry per query"):
        index.search(data["queries"], K, exclude=[None])
    with pytest.raises(DataError, match="integer ids"):
        index.search(data["queries"][:1], K, exclude=[torch.tensor([1.5])])
    empty = type(index)()
    with pytest.raises(NotFittedError, match="build"):
        empty.search(data["queries"], K)
    with pytest.raises(DataError, match="distinct"):
        empty.build(data["items"][:2], torch.tensor([3, 3]))


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "scann" or HAS_SCANN])
def test_make_index_builds_the_configured_class(kind: str) -> None:
    expected = {
        "exact": ExactIndex,
        "hnsw": HNSWIndex,
        "ivf": IVFIndex,
        "ivf_sq": IVFSQIndex,
        "scann": ScannIndex,
    }
    config = IndexConfig(kind=kind, hnsw_m=16, ef_search=0, nprobe=4, chunk_size=512)  # type: ignore[arg-type]
    index = make_index(config)
    assert type(index) is expected[kind] and index.kind == kind
    params = {"exact": {"chunk_size": 512}, "hnsw": {"m": 16, "ef_search": 128}}
    params |= {"ivf": {"nprobe": 4}, "ivf_sq": {"nprobe": 4}}
    params |= {"scann": {"leaves_to_search": 4}}
    assert params[kind].items() <= index.params().items()
    with pytest.raises(ConfigError, match="`nprobe`"):
        IVFIndex(nprobe=-1)


def test_settings_a_kind_does_not_read_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: `train --set index.kind=ivf --set index.ef_search=64` took the
    HNSW setting without a word (only `index build` named it)."""
    with caplog.at_level("WARNING", logger="twostage.index"):
        make_index(IndexConfig(kind="hnsw", ef_search=64, hnsw_m=16))
        assert not caplog.records
        make_index(IndexConfig(kind="ivf", ef_search=64, nprobe=4, chunk_size=99))
    (record,) = caplog.records
    assert record.getMessage() == (
        "index.ef_search=64, index.chunk_size=99: not read by the ivf index "
        "(it reads ivf_nlist, nprobe)"
    )


@pytest.mark.skipif(HAS_SCANN, reason="scann is installed")
def test_scann_absent_is_a_config_error_with_the_install_hint() -> None:
    with pytest.raises(ConfigError, match=r"pip install 'twostage\[scann\]'"):
        make_index(IndexConfig(kind="scann"))


@pytest.mark.parametrize(
    "narrow", [lambda: IVFIndex(nprobe=1), lambda: HNSWIndex(m=4, ef_search=1)]
)
def test_a_narrow_search_widens_until_rows_are_full(
    narrow: Callable[[], Index],
    data: dict[str, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = narrow().build(data["items"], data["ids"])
    calls: list[tuple[int, int]] = []
    raw_search = index._raw_search

    def counted(queries: np.ndarray, fetch: int, attempt: int):  # type: ignore[no-untyped-def]
        calls.append((fetch, attempt))
        return raw_search(queries, fetch, attempt)

    monkeypatch.setattr(index, "_raw_search", counted)
    k = 400  # more than one IVF list holds (about 40 items each)
    _, ids = index.search(data["queries"], k)
    assert bool((ids >= 0).all())
    assert all(len(set(row.tolist())) == k for row in ids)
    assert _recall(ids, _reference(data, k)[1]) >= 0.9
    if isinstance(index, IVFIndex):
        assert len(calls) > 1  # the first, one-list search was short


def test_scann_asset_paths_are_kept_relative_and_resolved_on_load(
    tmp_path: Path,
) -> None:
    """Regression: ScaNN recorded absolute temporary paths in scann_assets.pbtxt, so
    a bundle renamed into place could not be opened."""
    from twostage.index.scann import absolute_asset_paths, relative_asset_paths

    written = (
        'assets {\n  asset_type: AH_CENTERS\n  asset_path: "/tmp/x/.tmp-1/index/scann'
        '/ah_codebook.pb"\n}\nassets {\n  asset_type: DATASET_NPY\n'
        '  asset_path: "/tmp/x/.tmp-1/index/scann/dataset.npy"\n}\n'
    )
    relative = relative_asset_paths(written)
    assert "/tmp/x" not in relative
    assert 'asset_path: "ah_codebook.pb"' in relative
    assert 'asset_path: "dataset.npy"' in relative
    here = absolute_asset_paths(relative, tmp_path / "scann")
    assert f'asset_path: "{(tmp_path / "scann").resolve()}/dataset.npy"' in here
    assert "AH_CENTERS" in here and here.count("asset_path: ") == 2


def test_tensors_read_back_aligned_and_equal(tmp_path: Path) -> None:
    # safetensors' own loader returns views at the file's offsets; find a header
    # that puts them off the 64-byte alignment, as a saved index's can be.
    from safetensors.torch import load_file, save_file

    from twostage.artifacts import read_safetensors

    vectors = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "vectors.safetensors"
    for pad in range(64):
        save_file({"v" * (pad + 1): vectors}, path)
        if next(iter(load_file(path).values())).data_ptr() % 64:
            break
    else:
        pytest.skip("every header left safetensors' views aligned")
    (read,) = read_safetensors(path).values()
    assert read.data_ptr() % 64 == 0 and torch.equal(read, vectors)
    # An exact index built from what was read scores as the one built in memory,
    # to the last bit (one query: the product whose kernel alignment decides).
    query = vectors[3:4] + 0.1
    built = ExactIndex().build(vectors, torch.arange(1, 501))
    again = ExactIndex().build(read, torch.arange(1, 501))
    pairs = zip(built.search(query, 20), again.search(query, 20), strict=True)
    assert all(torch.equal(before, after) for before, after in pairs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_gpu_index_is_refused_without_a_gpu_and_loads_onto_the_cpu(
    data: dict[str, torch.Tensor],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # `index build --set device=cuda` ended in torch's "not compiled with CUDA"
    # traceback; a bundle whose index was saved on a GPU machine failed to load.
    with pytest.raises(ConfigError, match="torch sees no GPU here"):
        ExactIndex(device="cuda")
    built = ExactIndex().build(data["items"], data["ids"])
    built.save(tmp_path)
    meta = json.loads((tmp_path / "index.json").read_text())
    meta["params"]["device"] = "cuda:0"  # as a GPU machine saves it
    (tmp_path / "index.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="twostage.index.exact"):
        loaded = load_index(tmp_path)
    assert "saved for device 'cuda:0'" in caplog.text
    assert isinstance(loaded, ExactIndex) and loaded.device == torch.device("cpu")
    want = built.search(data["queries"], K)
    got = loaded.search(data["queries"], K)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_more_ivf_lists_than_the_items_fill_are_reported(
    data: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    items, ids = data["items"][:200], data["ids"][:200]
    with caplog.at_level("WARNING", logger="twostage.index.faiss"):
        index = IVFIndex(nlist=5000).build(items, ids)
    assert index.params()["nlist"] == 200  # one list per item at most
    assert "nlist = 5000 asks for more lists than 200 items fill" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="twostage.index.faiss"):
        IVFIndex(nlist=4).build(items, ids)
    assert "asks for more lists" not in caplog.text


@pytest.mark.parametrize("kind", KINDS)
def test_an_index_grows_into_a_copy_that_matches_one_built_anew(
    kind: str, data: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """``extended``: the first 2,700 items built, the last 300 added to a copy. The
    copy finds what an index of all 3,000 finds (the same lists for the exact
    index, the oracle's recall for the others), saves and loads; the index it grew
    from is unchanged."""
    first, rest = slice(0, 2700), slice(2700, None)
    base = _backend(kind).build(data["items"][first], data["ids"][first])
    before = base.search(data["queries"], K)
    grown = base.extended(data["items"][rest], data["ids"][rest])
    if kind == "scann":  # ScaNN cannot grow a copy: the caller builds one
        assert grown is None
        return
    assert grown is not None and grown is not base
    assert grown.size == NUM_ITEMS and grown.kind == kind
    assert grown.params() == base.params()
    assert grown.ids.tolist() == data["ids"].tolist()
    scores, ids = grown.search(data["queries"], K)
    ref_scores, ref_ids = _reference(data, K)
    if grown.is_exact:
        assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)
    else:
        assert _recall(ids, ref_ids) >= 0.9
    # an added item comes back, and can be excluded
    added = int(data["ids"][2800])
    found = grown.search(data["items"][2800:2801], 1)[1]
    assert found.tolist() == [[added]]
    assert added not in grown.search(data["items"][2800:2801], 5, exclude=[[added]])[1]
    again = load_index(grown.save(tmp_path / "grown"))
    assert torch.equal(again.search(data["queries"], K)[1], ids)
    after = base.search(data["queries"], K)
    assert base.size == 2700
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    with pytest.raises(DataError, match="holds ids the index holds already"):
        base.extended(data["items"][:2], data["ids"][:2])
    with pytest.raises(DataError, match="columns"):
        base.extended(torch.zeros(1, DIM + 1), torch.tensor([10**6]))
    with pytest.raises(NotFittedError):
        _backend(kind).extended(data["items"][:1], data["ids"][:1])


def test_an_ivf_index_grown_by_a_large_share_says_its_centroids_are_stale(
    data: dict[str, torch.Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    """IVF lists keep the centroids of the vectors they were built on: growing by
    more than a fifth is reported with the command that trains them anew."""
    base = IVFIndex().build(data["items"][:2000], data["ids"][:2000])
    with caplog.at_level("WARNING", logger="twostage.index"):
        base.extended(data["items"][2000:2300], data["ids"][2000:2300])
    assert not caplog.records  # 15%
    with caplog.at_level("WARNING", logger="twostage.index"):
        base.extended(data["items"][2000:], data["ids"][2000:])
    assert "adding 1000 vectors to an IVF index of 2000" in caplog.text
    assert "twostage index build" in caplog.text


def test_an_ivf_index_grown_by_small_steps_counts_from_its_build(
    data: dict[str, torch.Tensor],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    """Steps of 10% never passed the fifth on their own: the share is counted
    from the vectors the centroids were built on, through a save and a load."""
    step = IVFIndex().build(data["items"][:2000], data["ids"][:2000])
    with caplog.at_level("WARNING", logger="twostage.index"):
        step = step.extended(data["items"][2000:2200], data["ids"][2000:2200])
        step.save(tmp_path / "grown")
        loaded = load_index(tmp_path / "grown")
        assert isinstance(loaded, IVFIndex)
        step = loaded
        assert not caplog.records  # 2,200 of 2,000: 10% above the build
        step = step.extended(data["items"][2200:2420], data["ids"][2200:2420])
    assert "among the 2000 it was built on" in caplog.text
    assert "(now 2420)" in caplog.text
    meta = tmp_path / "grown" / "index.json"
    written = json.loads(meta.read_text())
    assert written["built_on"] == 2000
    for bad in (0, 2201, "2000", None):
        meta.write_text(json.dumps(written | {"built_on": bad}))
        with pytest.raises(ArtifactError, match="built_on"):
            load_index(tmp_path / "grown")
