"""The served lists under list rules, measured as evaluation measures lists."""

import json
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from twostage.cli import app, main
from twostage.config import ExperimentConfig, apply_overrides
from twostage.errors import ConfigError
from twostage.list_evaluation import evaluate_list_rules, list_figures, served_lists
from twostage.retrieval.evaluation import eval_queries
from twostage.two_stage import fit_two_stage

CONFIG = [
    "data.dataset=synthetic:num_users=150,num_items=60,num_interactions=3000",
    "train.epochs=2",
    "train.num_threads=1",
    "retrieval.embedding_dim=8",
    "retrieval.output_dim=8",
    "retrieval.history_length=10",
    "retrieval.popularity_fallback=0",
    "ranking.epochs=1",
    "ranking.embedding_dim=8",
    "ranking.hidden_dims=8",
]


@pytest.fixture(scope="module")
def stages():  # type: ignore[no-untyped-def]
    return fit_two_stage(apply_overrides(ExperimentConfig(), CONFIG))


def test_the_lists_as_scored_are_the_ranking_report_s_served_lists(stages) -> None:  # type: ignore[no-untyped-def]
    """Written through recommend_table, the lists without rules score what the
    ranking report's two-stage lists score: the same lists, measured alike."""
    rec = stages.recommender()
    found = evaluate_list_rules(
        rec, stages.split.test, diversity=0.5, max_per={"category": 1}
    )
    served = stages.ranking_metrics["two_stage"]
    for metric in ("ndcg", "recall", "hit_rate"):
        assert found["as_scored"][metric] == pytest.approx(
            served[metric]["10"], abs=1e-6
        ), metric
    assert found["users"] > found["scored_users"] > 0
    assert found["as_scored"]["mean_length"] == 10.0
    ruled = found["with_rules"]
    assert ruled["intra_list_diversity"] > found["as_scored"]["intra_list_diversity"]
    assert ruled != found["as_scored"] and 0 < ruled["mean_length"] <= 10
    with pytest.raises(ConfigError, match="unknown `max_per` column"):
        evaluate_list_rules(rec, stages.split.test, max_per={"colour": 1})
    # From fewer candidates a list the limit leaves short is picked again
    # from wider pools (10, 40, 160: the whole catalogue here, as from 100),
    # so each is as long as from 100; the row as scored keeps the ranking
    # stage's number.
    limited = evaluate_list_rules(rec, stages.split.test, max_per={"category": 1})
    narrow = evaluate_list_rules(
        rec, stages.split.test, max_per={"category": 1}, num_candidates=10
    )
    assert narrow["num_candidates"] == 10 and found["num_candidates"] == 100
    assert rec.deepest_width(10) >= rec.item_embeddings.shape[0] - 1
    assert narrow["as_scored"]["ndcg"] == pytest.approx(found["as_scored"]["ndcg"])
    assert narrow["with_rules"]["mean_length"] == limited["with_rules"]["mean_length"]
    # Diverse by the category column: its spread by category is reported, and
    # grows past the lists as scored and the lists diverse by embeddings.
    by = evaluate_list_rules(
        rec, stages.split.test, diversity=0.5, diversity_by="category"
    )
    assert by["diversity_by"] == "category" and "value_diversity" not in ruled
    assert by["with_rules"]["value_diversity"] > by["as_scored"]["value_diversity"]
    embedded = evaluate_list_rules(rec, stages.split.test, diversity=0.5)
    queries = eval_queries(rec.run, stages.split.test)
    embedded_lists = served_lists(rec, queries, 10, diversity=0.5)
    plain = list_figures(rec, queries, embedded_lists, 10, "category")
    assert by["with_rules"]["value_diversity"] > plain["value_diversity"]
    assert embedded["with_rules"]["ndcg"] == pytest.approx(plain["ndcg"])


def test_evaluate_prints_and_returns_the_rules_figures(
    stages, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "models" / "m" / "1"
    stages.recommender().save(bundle)
    result = CliRunner().invoke(
        app,
        [
            *("evaluate", str(bundle), "--max-per", "category=2", "--json"),
            *("--diversity", "0.2", "--diversity-by", "category"),
        ],
    )
    assert result.exit_code == 0, result.output
    rules = json.loads(result.stdout)["list_rules"]
    assert rules["max_per"] == {"category": 2} and rules["diversity"] == 0.2
    assert rules["diversity_by"] == "category"
    assert "value_diversity" in rules["with_rules"]
    assert set(rules["with_rules"]) >= {"ndcg", "intra_list_diversity", "coverage"}
    printed = CliRunner().invoke(
        app, ["evaluate", str(bundle), "--diversity", "0.3"], env={"COLUMNS": "200"}
    )
    assert printed.exit_code == 0, printed.output
    shown = re.sub(r"[│╭╮╰╯─┏┳┓┗┻┛━┃╇╈┡┩└┴┘┌┬┐├┼┤\s]", "", printed.output)
    assert "Servedlistsofthe" in shown, shown  # (a narrow table folds its cells)
    sessions = tmp_path / "visits.csv"
    sessions.write_text("session_id,item_id\n1,3\n1,5\n")
    with pytest.raises(SystemExit) as exited:
        main(
            ["evaluate", str(bundle), "--sessions", str(sessions), "--diversity", "0.3"]
        )
    assert exited.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", str(bundle), "--num-candidates", "50"])
    assert exited.value.code == 2
    assert "--diversityor--max-per" in re.sub(
        r"[│╭╮╰╯─\s]", "", capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exited:
        main(
            ["evaluate", str(bundle), "--sessions", str(sessions), "--diversity", "0.3"]
        )
    assert exited.value.code == 2
    said = re.sub(r"[│╭╮╰╯─\s]", "", capsys.readouterr().err)
    assert "--sessionsmeasuressessionsinstead" in said, said


def test_items_added_after_training_are_judged_by_their_ids(stages) -> None:  # type: ignore[no-untyped-def]
    """`evaluate --max-per` on a bundle with added items crashed ("item indices
    should be < num_items"): the served lists hold items the trained catalogue
    lacks. An added item a test row names is a hit; the others never are."""
    rec = stages.recommender()
    grown = rec.add_items(
        pl.DataFrame(
            {
                "item_id": [901, 902],
                "title": ["a", "b"],
                "category": ["cat18", "cat3"],
                "price": [45.0, 10.0],
            }
        )
    )
    test = stages.split.test
    inter = test.interactions
    users = inter["user_id"].unique().sort()
    extra = pl.DataFrame(
        {
            "user_id": users,
            "item_id": [901] * len(users),
            "timestamp": [1_700_000_000] * len(users),
            "rating": [4.0] * len(users),
        }
    ).cast(inter.schema)  # every test user took 901 too
    test = test.with_interactions(pl.concat([inter, extra]))
    queries = eval_queries(grown.run, test)
    seen = {u: {h["item_id"] for h in grown.history(u)} for u in users.to_list()}
    taken: dict[object, set[object]] = {}
    for user, item in inter.select("user_id", "item_id").iter_rows():
        taken.setdefault(user, set()).add(item)
    for rules in (None, {"category": 1}):
        lists = served_lists(grown, queries, 10, max_per=rules)
        figures = list_figures(grown, queries, lists, 10)
        hits = []
        for user, row in zip(queries.user_ids.to_list(), lists.tolist(), strict=True):
            served = {grown.item_ids[i] for i in row if i >= 0}
            assert 902 not in taken.get(user, set())
            wanted = (taken.get(user, set()) | {901}) - seen[user]
            hits.append(bool(served & wanted))
        assert any(901 in {grown.item_ids[i] for i in row} for row in lists.tolist())
        assert figures["hit_rate"] == pytest.approx(sum(hits) / len(hits))
    found = evaluate_list_rules(grown, test, max_per={"category": 1})
    assert found["with_rules"]["hit_rate"] == pytest.approx(figures["hit_rate"])
