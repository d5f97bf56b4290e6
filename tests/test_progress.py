"""Training progress bars: one per stage, one per model of an ensemble."""

from __future__ import annotations

import io

from rich.console import Console

from twostage.progress import training_bars


def _step(epoch: int, step: int, **extra: int) -> dict:
    return {
        "epoch": epoch,
        "step": step,
        "loss": 1.0,
        "examples": 10 * (step + 1),
        "num_epochs": 2,
        "total_steps": 4,
        **extra,
    }


def test_each_ensemble_member_gets_its_own_bar() -> None:
    out = io.StringIO()
    seen: list[dict] = []
    console = Console(file=out, width=120, force_terminal=False)
    with training_bars(
        "retrieval", "ranking", console=console, also=seen.append
    ) as bars:
        for step in range(4):  # two members' records, interleaved
            bars["retrieval"](_step(step // 2, step, member=0))
            if step < 2:
                bars["retrieval"](_step(0, step, member=1))
        bars["ranking"](_step(0, 0))
    text = out.getvalue()
    assert "retrieval 1" in text and "retrieval 2" in text
    assert "ranking" in text
    # the first member finished its 4 steps; the second stopped at 2 of 4
    lines = {line.split()[1]: line for line in text.splitlines() if "retrieval" in line}
    assert "100%" in lines["1"] and "epoch 2/2" in lines["1"]
    assert "50%" in lines["2"] and "epoch 1/2" in lines["2"]
    assert [r["stage"] for r in seen].count("retrieval") == 6


def test_the_rate_counts_only_the_steps_after_the_first(monkeypatch) -> None:
    # The first step of an epoch has no time behind it: it once showed its
    # examples over a floor of 1e-9 s (10,000,000,000 ex/s here).
    import twostage.progress as progress

    now = {"t": 100.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now["t"])

    def shown(*steps: tuple[float, int]) -> str:
        out = io.StringIO()
        console = Console(file=out, width=120, force_terminal=False)
        with training_bars("retrieval", console=console) as bars:
            for t, step in steps:
                now["t"] = t
                bars["retrieval"](_step(0, step))
        return out.getvalue()

    assert "      0 ex/s" in shown((100.0, 0))  # one step: no rate yet
    assert "     10 ex/s" in shown((100.0, 0), (102.0, 2))  # 20 examples in 2 s
