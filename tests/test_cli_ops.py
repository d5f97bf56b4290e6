"""`twostage index build|bench` and `twostage serve` from the command line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from twostage.cli import app
from twostage.index import KINDS
from twostage.recommender import Recommender, load
from twostage.serving.app import SETTINGS_ENV, ServeSettings, settings_to_env
from twostage.serving.workers import reuse_port_supported, run_workers

runner = CliRunner()


def test_commands_that_save_a_next_version_need_one_to_follow(
    small_recommender: Recommender, tmp_path: Path
) -> None:
    """A bundle saved without a version number (`train --out models/shop`) has
    no "next version beside it": add-items, remove-items and index build wrote
    models/1 (a version of a model named "models") and lost the name; now they
    ask for --out before any work, and --out works."""
    models = tmp_path / "models"
    small_recommender.save(models / "shop")
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("item_id\n9001\n")
    for command in (
        ["add-items", str(models / "shop"), "--items", str(fresh)],
        ["remove-items", str(models / "shop"), "--ids", "3"],
        ["index", "build", str(models / "shop"), "--kind", "exact"],
    ):
        refused = runner.invoke(app, command)
        said = " ".join(refused.output.replace("│", " ").split())
        assert refused.exit_code == 2, refused.output
        assert "without a version number" in said and "pass --out" in said
        assert sorted(p.name for p in models.iterdir()) == ["shop"]
    moved = runner.invoke(
        app,
        [
            "remove-items",
            str(models / "shop"),
            "--ids",
            "3",
            "--out",
            str(models / "less"),
        ],
    )
    assert moved.exit_code == 0, moved.output
    smaller = load(models / "less")
    assert smaller.item_vocab.lookup(3) not in smaller.index.ids.tolist()
    assert small_recommender.item_vocab.lookup(3) in small_recommender.index.ids


def test_index_build_saves_a_new_version_that_serves(models_dir: Path) -> None:
    model = models_dir / "synthetic"
    result = runner.invoke(
        app, ["index", "build", str(model), "--kind", "hnsw", "--set", "ef_search=32"]
    )
    assert result.exit_code == 0, result.output
    assert "saved" in result.output
    rebuilt = load(model / "2")
    assert rebuilt.index_kind == "hnsw"
    assert rebuilt.run.config.index.ef_search == 32
    original = load(model / "1")
    assert [i["item_id"] for i in rebuilt.recommend(3, 10).items] == [
        i["item_id"] for i in original.recommend(3, 10).items
    ]
    shown = runner.invoke(app, ["index", "build", "--help"], env={"COLUMNS": "200"})
    assert all(kind in shown.output for kind in KINDS), shown.output  # ivf_sq was not
    bad = runner.invoke(app, ["index", "build", str(model), "--kind", "annoy"])
    assert bad.exit_code != 0 and "annoy" in str(bad.exception or bad.output)
    # `--set kind=ivf` built an ivf index and said "built a hnsw index"; a device
    # for a faiss index, or one that holds no data, was taken without a word.
    ivf = runner.invoke(
        app,
        ["index", "build", str(model), "--set", "kind=ivf", "--set", "ef_search=64"],
    )
    assert ivf.exit_code == 0, ivf.output
    said = " ".join(ivf.output.split())
    assert "index.ef_search=64: not read by the ivf index" in said
    # it says how much of exact search the new index finds on the model's users
    rebuilt = load(model / "3")
    assert "against exact search, 1,000 known users' queries at most: " in said
    assert f"{rebuilt.index_recall(100, 1000):.4f}." in said
    assert "built the ivf index" in ivf.output and load(model / "3").index_kind == "ivf"
    for options, message in [
        (
            ["--kind", "hnsw", "--set", "device=cuda"],
            "the hnsw index searches on the CPU",
        ),
        (
            ["--kind", "exact", "--set", "device=meta"],
            "a device that holds the vectors",
        ),
    ]:
        refused = runner.invoke(app, ["index", "build", str(model), *options])
        assert message in str(refused.exception), refused.output
    assert not (model / "4").exists()


def test_index_bench_prints_recall_against_exact(models_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "index",
            "bench",
            str(models_dir / "synthetic"),
            "--kinds",
            "exact,ivf",
            "-k",
            "10",
            "--num-queries",
            "50",
        ],
    )
    assert result.exit_code == 0, result.output
    exact_row = next(line for line in result.output.splitlines() if "exact" in line)
    assert "1.0000" in exact_row  # the oracle agrees with itself
    # --set measures a backend as a bundle would be built with it (there was
    # no way to: only each backend's defaults)
    recall = {}
    for nprobe in (1, 8):
        options = ["--set", "index.ivf_nlist=8", "--set", f"nprobe={nprobe}"]
        bundle = str(models_dir / "synthetic")
        found = runner.invoke(
            app,
            ["index", "bench", bundle, "--kind", "ivf", "-k", "10", "--json", *options],
        )
        assert found.exit_code == 0, found.output
        said = json.loads(found.stdout)
        assert said["settings"] == ["ivf_nlist=8", f"nprobe={nprobe}"]
        recall[nprobe] = said["backends"]["ivf"]["recall_at_k"]
    assert recall[1] < recall[8] == 1.0  # every list probed: exact
    # index build measures what index bench measures, on the same users
    from twostage.config import IndexConfig

    rec = load(models_dir / "synthetic" / "1")
    one = rec.with_index(IndexConfig(kind="ivf", ivf_nlist=8, nprobe=1))
    assert one.index_recall(10, 1000) == pytest.approx(recall[1])
    assert rec.index_recall(10) == 1.0  # the exact index
    users = rec._spread_users(1000)
    assert users[0] == 1 and users[-1] == rec.user_vocab.size - 1
    torch.testing.assert_close(  # a few users' queries, as all users' are
        rec._queries_of(users[:5]), rec._known_queries()[users[:5]], atol=1e-6, rtol=0
    )
    for options, message in [
        (["--set", "kind=hnsw"], "named by --kind"),
        (["--set", "nprobes=3"], "nprobes"),
        (["--kind", "annoy"], "annoy"),
    ]:
        refused = runner.invoke(
            app, ["index", "bench", str(models_dir / "synthetic"), *options]
        )
        assert refused.exit_code != 0
        assert message in str(refused.exception or "") + refused.output, options


def _serve(models_dir: Path, *options: str) -> tuple[subprocess.Popen, int]:
    """`twostage serve` in a subprocess on a free loopback port, once it is healthy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "TWOSTAGE_API_KEY": ""}
    command = [sys.executable, "-m", "twostage", "serve", str(models_dir)]
    command += ["--port", str(port), "--poll-seconds", "0", "--log-level", "warning"]
    server = subprocess.Popen([*command, *options], env=env)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
                    assert json.loads(r.read())["status"] == "ok"
                    return server, port
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
    except BaseException:
        server.kill()
        server.wait()
        raise


@pytest.mark.slow
def test_serve_answers_over_real_http(models_dir: Path) -> None:
    server, port = _serve(models_dir)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models/synthetic:predict",
            data=json.dumps({"instances": ["3"]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions[0]["output_2"]) == 10
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_refuses_a_missing_directory(tmp_path: Path) -> None:
    result = runner.invoke(app, ["serve", str(tmp_path / "nowhere")])
    assert result.exit_code != 0
    assert "not a directory" in str(result.exception)


def test_serve_refuses_a_default_pool_past_its_limit(
    models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from twostage.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "serve",
                str(models_dir),
                "--num-candidates",
                "50",
                "--max-num-candidates",
                "40",
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert (
        "`--num-candidates` (50) should be at most `--max-num-candidates` (40)" in err
    )
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(models_dir), "--widening", "0"])
    assert exit_.value.code == 2
    assert "--widening" in capsys.readouterr().err


@contextmanager
def _two_workers(models_dir: Path) -> Iterator[tuple[subprocess.Popen, int, set[int]]]:
    """`twostage serve --workers 2`, with the pids of both workers once they answer."""
    server, port = _serve(models_dir, "--workers", "2")
    try:
        pids = _worker_pids(port, 2)
        assert len(pids) == 2
        yield server, port, pids
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _worker_pids(
    port: int,
    wanted: int,
    timeout_s: float = 60,
    exclude: frozenset[int] | set[int] = frozenset(),
) -> set[int]:
    """The pids that answer /healthz, one new connection per request (the kernel
    spreads new connections over the workers' sockets), but those in ``exclude``."""
    pids: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(pids) < wanted and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as r:
                pid = json.loads(r.read())["pid"]
                if pid not in exclude:
                    pids.add(pid)
        except OSError:
            time.sleep(0.2)  # a worker may still be loading its models
    return pids


def _assert_gone(pids: set[int], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.2)
    assert not alive, f"workers {sorted(alive)} outlived their supervisor"


linux_only = pytest.mark.skipif(
    not reuse_port_supported(), reason="SO_REUSEPORT balancing is Linux's"
)


@linux_only
@pytest.mark.slow
def test_serve_workers_share_the_port_and_both_answer(models_dir: Path) -> None:
    """Regression: with one shared socket, a worker took every connection."""
    with _two_workers(models_dir) as (server, _, pids):
        assert server.pid not in pids  # the parent only supervises
        server.terminate()
        assert server.wait(timeout=60) == 0
        _assert_gone(pids)


@linux_only
@pytest.mark.slow
def test_serve_workers_stop_when_the_supervisor_is_killed(models_dir: Path) -> None:
    """SIGKILL leaves the supervisor no chance to stop them: they notice and leave."""
    with _two_workers(models_dir) as (server, _, pids):
        server.kill()
        server.wait()
        _assert_gone(pids)


@linux_only
@pytest.mark.slow
def test_serve_replaces_a_worker_that_dies(models_dir: Path) -> None:
    with _two_workers(models_dir) as (server, port, pids):
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        _assert_gone({victim})
        # The survivor and the replacement answer; the supervisor keeps running.
        replaced = _worker_pids(port, 2, exclude={victim})
        assert len(replaced) == 2 and victim not in replaced
        assert server.poll() is None
        server.terminate()
        assert server.wait(timeout=60) == 0
        _assert_gone(replaced)


@linux_only
@pytest.mark.slow
def test_run_workers_gives_up_when_workers_keep_dying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers that cannot load their models are not replaced forever."""
    settings = ServeSettings(models=str(tmp_path / "gone"))
    monkeypatch.setenv(SETTINGS_ENV, settings_to_env(settings))
    code = run_workers(
        "127.0.0.1", 0, 2, log_level="critical", max_restarts=1, restart_window_s=600
    )
    assert code == 1


def test_run_workers_reports_a_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            run_workers("127.0.0.1", port, 2, log_level="warning")


def test_index_build_scann_writes_a_version_recommend_opens(models_dir: Path) -> None:
    """Regression (tutorial 004): `index build --kind scann` wrote a newest version
    whose searcher pointed into the bundle's temporary directory."""
    pytest.importorskip("scann")
    model = models_dir / "synthetic"
    result = runner.invoke(app, ["index", "build", str(model), "--kind", "scann"])
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["recommend", str(model), "--user", "3"])
    assert shown.exit_code == 0, shown.output
    rebuilt = load(model)  # the newest version: the ScaNN one
    assert rebuilt.index_kind == "scann" and len(rebuilt.recommend(3, 10).items) == 10
