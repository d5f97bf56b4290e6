"""Data-parallel training: 2 gloo ranks give the weights of 1 process with the same
global batch (in-batch negatives gathered across ranks, gradients averaged by DDP)."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from twostage import distributed
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.user_items import UserItems
from twostage.evaluate import evaluate_embeddings
from twostage.two_stage import TwoStage, fit_two_stage

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not built in"
)


NEEDS_TORCHREC = pytest.mark.skipif(
    importlib.util.find_spec("torchrec") is None,
    reason="torchrec is not installed (make install-dev installs it)",
)


def _config(extra: list[str]) -> ExperimentConfig:
    return apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=150,num_items=90,num_interactions=3000",
            "data.validation_fraction=0",
            "train.epochs=2",
            "train.batch_size=256",  # 2,400 rows: the last batch is uneven (96)
            "train.num_threads=1",
            "ranking.epochs=2",
            # Dropout masks follow each rank's share (the only per-rank draw left).
            "ranking.dropout=0",
            # Hard negatives are retrieval's top 500 per user: retrieval weights equal
            # to 1e-7 can still swap one at the boundary, and the runs then part.
            "ranking.num_hard_negatives=0",
            "retrieval.embedding_dim=16",
            "retrieval.output_dim=16",
            "retrieval.history_length=8",
            *extra,
        ],
    )


def _rank(rank: int, extra: list[str], out: str) -> None:
    try:
        stages = fit_two_stage(_config(extra))  # test users sharded over the ranks
        if rank == 0:
            save_file(_weights(stages), out)
            Path(out + ".json").write_text(json.dumps(stages.retrieval.metrics))
    finally:
        distributed.shutdown()


def _stop_rank(rank: int, run: str, phase: str) -> None:
    """Retrieval on this rank: ``full`` uninterrupted, ``stop`` asked to stop (on
    rank 0 only) within epoch 2, ``resume`` from that; rank 0 saves the weights."""
    from twostage.retrieval.fit import fit_retrieval
    from twostage.training.loop import TrainingInterrupted, request_stop

    config = _config(["train.epochs=3", "train.batch_size=128"])
    out = Path(run) / ("full" if phase == "full" else "run")
    try:
        if phase == "stop":

            def stop(info: dict) -> None:  # called on rank 0 only
                if info["epoch"] == 1 and info["step"] == 19 + 4:  # 19 steps an epoch
                    request_stop()

            with pytest.raises(TrainingInterrupted, match="after step 5 of 19"):
                fit_retrieval(config, out_dir=out, on_step=stop, evaluate_test=False)
            return
        trained, _ = fit_retrieval(
            config, out_dir=out, resume=phase == "resume", evaluate_test=False
        )
        if rank == 0:
            state = trained.model.state_dict()
            save_file(
                {k: v.contiguous() for k, v in state.items()}, f"{out}.safetensors"
            )
    finally:
        distributed.shutdown()


def _gloo_threads() -> list[str]:
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return sorted(name for name in names if "gloo" in name)


def _leave_rank(rank: int, out: str) -> None:
    """Join, train a DDP step, leave: which gloo threads are left."""
    distributed.init_from_env()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    model(torch.ones(4, 3)).sum().backward()
    joined = _gloo_threads()
    del model
    distributed.shutdown()
    left = {"joined": joined, "left": _gloo_threads()}
    Path(out, f"{rank}.json").write_text(json.dumps(left))


def _kept_queries(shard: bool) -> tuple[np.ndarray, np.ndarray]:
    """Each query's figures of one evaluation of 50 seeded queries, 7 a block."""
    rng = np.random.default_rng(3)
    query_emb = torch.from_numpy(rng.normal(size=(50, 8)))
    item_emb = torch.from_numpy(rng.normal(size=(40, 8)))
    pairs = rng.integers(0, 40, size=(2, 160))
    relevant = UserItems.from_pairs(pairs[0] % 50, pairs[1], num_rows=50)
    result = evaluate_embeddings(
        query_emb,
        item_emb,
        relevant=relevant,
        ks=(1, 5, 10),
        exclude_seen=False,
        batch_size=7,
        shard=shard,
        keep_queries=True,
    )
    kept = result.queries["include_seen"]
    return kept.rows, kept.values


def _queries_rank(rank: int, out: str) -> None:
    distributed.init_from_env()
    try:
        rows, values = _kept_queries(shard=True)
        np.savez(Path(out, f"{rank}.npz"), rows=rows, values=values)
    finally:
        distributed.shutdown()


def test_two_ranks_keep_the_per_query_figures_of_one(tmp_path: Path) -> None:
    """Sharded evaluation gathers each rank's per-query figures, with the rows
    of the whole evaluation: both ranks hold those of one process."""
    rows, values = _kept_queries(shard=False)
    distributed.run_local_group(_queries_rank, 2, str(tmp_path))
    for rank in (0, 1):
        with np.load(tmp_path / f"{rank}.npz") as found:
            np.testing.assert_array_equal(found["rows"], rows)
            np.testing.assert_allclose(found["values"], values, rtol=1e-6)
    assert 30 < len(rows) <= 50


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_leaving_the_group_stops_its_threads_after_ddp(tmp_path: Path) -> None:
    """DDP imports torch.distributed.nn, whose functions' defaults keep the group
    they find: imported after the group exists, they kept it (and its gloo threads)
    alive after it was destroyed, and a rank aborted now and then at exit."""
    distributed.run_local_group(_leave_rank, 2, str(tmp_path))
    for rank in (0, 1):
        threads = json.loads((tmp_path / f"{rank}.json").read_text())
        assert threads["joined"], "gloo names its threads: the check sees them"
        assert threads["left"] == [], threads


@pytest.mark.slow
def test_a_stop_asked_of_one_rank_stops_every_rank_after_the_same_step(
    tmp_path: Path,
) -> None:
    """SIGTERM or Ctrl-C may reach one rank first: the ranks agree after each step,
    so all stop after the same one (a rank left alone would wait in the next
    all-reduce for ever), checkpoint it once with every rank's random states, and
    --resume on as many ranks gives the weights of the run never stopped."""
    for phase in ("full", "stop", "resume"):
        distributed.run_local_group(_stop_rank, 2, str(tmp_path), phase)
    full = load_file(tmp_path / "full.safetensors")
    resumed = load_file(tmp_path / "run.safetensors")
    assert set(full) == set(resumed)
    for name, weights in full.items():
        torch.testing.assert_close(resumed[name], weights, rtol=0, atol=0, msg=name)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert (state["next_epoch"], state["next_step"]) == (3, 0)


def _weights(stages: TwoStage) -> dict[str, torch.Tensor]:
    """Both stages' weights, by stage."""
    assert stages.ranker is not None
    out = {f"retrieval.{k}": v for k, v in stages.retrieval.model.state_dict().items()}
    out |= {f"ranking.{k}": v for k, v in stages.ranker.model.state_dict().items()}
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        # Side features, history, logQ correction, ID dropout: the defaults.
        [],
        # Adagrad, ratings as weights, extra uniform negatives. (Sparse embeddings
        # train under DDP too, but a loaded CI run once differed beyond tolerance
        # there: gloo's sparse all-reduce is not asserted bit-close.)
        [
            "train.optimizer=adagrad",
            "retrieval.num_extra_negatives=32",
            "retrieval.rating_weights=true",
        ],
        # The ID tables sharded by rows over the ranks (TorchRec), one rank's
        # share each: the gradients TorchRec averages are the global batch's.
        pytest.param(["retrieval.embedding_backend=torchrec"], marks=NEEDS_TORCHREC),
        # IDs only: every retrieval table sharded, no dense parameter for DDP (it
        # refused to wrap such a model).
        pytest.param(
            [
                "retrieval.embedding_backend=torchrec",
                "retrieval.use_side_features=false",
                "retrieval.history_length=0",
            ],
            marks=NEEDS_TORCHREC,
        ),
        # Each row's context, read by both stages: the ranker's share of the
        # batch carries its rows' context.
        ["retrieval.query_fields=user_id,hour_of_day"],
        # Sequence towers, next-item prediction at every position: each rank
        # trains on its share of the windows over the whole catalogue (dropout
        # off: its masks are drawn per rank)...
        [
            "retrieval.query_encoder=transformer",
            "retrieval.examples=sequences",
            "retrieval.negatives=full",
            "retrieval.sequence_dropout=0",
        ],
        # ...or against the distinct targets of every rank's share plus uniform
        # draws, logQ corrected.
        [
            "retrieval.query_encoder=gru",
            "retrieval.examples=sequences",
            "retrieval.num_extra_negatives=16",
            "retrieval.sequence_dropout=0",
        ],
        # One example per user (`presets/two-stage-ease.json`'s mode): each rank
        # takes its share of the users, the positives drawn for the whole batch...
        [
            "retrieval.examples=users",
            "retrieval.negatives=full",
            "retrieval.history_dropout=0.5",
            "retrieval.max_positives_per_user=5",
        ],
        # ...and the distinct items of the whole batch as candidates, the pairs
        # weighted by their ratings.
        ["retrieval.examples=users", "retrieval.rating_weights=true"],
    ],
    ids=[
        "defaults",
        "adagrad-weights-extra-negatives",
        "torchrec",
        "torchrec-ids-only",
        "per-row-context",
        "transformer-sequences",
        "gru-sequences-sampled",
        "users-full-softmax",
        "users-sampled-weights",
    ],
)
def test_two_ranks_train_the_weights_of_one(extra: list[str], tmp_path: Path) -> None:
    """Both stages: retrieval (gathered negatives) and the ranker (its share of the
    global batch, negatives drawn for the whole batch)."""
    alone = fit_two_stage(_config(extra))
    assert alone.ranker is not None
    assert alone.ranker.reads_context == any("query_fields" in e for e in extra)
    single = _weights(alone)
    out = tmp_path / "rank0.safetensors"
    distributed.run_local_group(_rank, 2, extra, str(out))
    two = load_file(out)
    one = single
    assert set(two) == set(one)
    changed = 0
    for name, weights in one.items():
        gap = float((two[name] - weights).abs().max())
        torch.testing.assert_close(
            two[name], weights, rtol=1e-4, atol=1e-5, msg=f"{name}: max gap {gap:.3g}"
        )
        changed += 1
    assert changed > 4
    assert any(k.startswith("ranking.") for k in one)
    # Evaluation sharded by user: each rank scored half the test users, and the
    # merged figures are the single process's.
    sharded = json.loads(Path(str(out) + ".json").read_text())
    whole = alone.retrieval.metrics
    assert sharded["counts"] == whole["counts"]
    for part in ("metrics", "standard_errors"):  # spreads merge as means do
        for mode, metrics in whole[part].items():
            for name, per_k in metrics.items():
                for k, value in per_k.items():
                    got = sharded[part][mode][name][k]
                    assert got == pytest.approx(value, abs=1e-6), (part, mode, name, k)


@pytest.mark.slow
def test_cli_nproc_trains_one_run_through_torchrun(tmp_path: Path) -> None:
    """`twostage train retrieval --nproc 2`: torchrun starts 2 gloo ranks; rank 0
    writes the run and prints the JSON, the other stays quiet."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "twostage", "train", "retrieval", "--nproc", "2"),
            *(
                "--dataset",
                "synthetic:num_users=150,num_items=90,num_interactions=3000",
            ),
            *("--out", str(out), "--set", "train.epochs=1"),
            *("--set", "train.num_threads=1", "--json"),
        ],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    # The ranks' own errors come before torchrun's summary: keep both.
    assert done.returncode == 0, done.stderr[-12_000:]
    answer = json.loads(done.stdout)  # one JSON document: rank 0's
    assert answer["run"] == str(out) and answer["retrieval"]["metrics"]
    assert (out / "model.safetensors").exists() and (out / "checkpoint").exists()
