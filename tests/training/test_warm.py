"""Warm start (``train.warm_start``): a model retrained on a newer log starts from
a saved model's weights, copied by ID where the vocabularies differ."""

import json
import re
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from twostage import TwoStageModel
from twostage.bundles import load_recommender
from twostage.cli import app
from twostage.config import ExperimentConfig, apply_overrides
from twostage.data.dataset import Dataset
from twostage.data.registry import load_dataset_for
from twostage.errors import ConfigError
from twostage.ranking.run import build_ranking_model
from twostage.retrieval.run import RetrievalRun, build_member, spec_for
from twostage.retrieval.tensors import build_tensors
from twostage.training.warm import WarmStart, copy_weights
from twostage.two_stage import fit_two_stage

SYNTHETIC = "synthetic:num_users=300,num_items=100,num_interactions=8000"
SMALL = [
    f"data.dataset={SYNTHETIC}",
    "train.epochs=3",
    "train.num_threads=1",
    "ranking.epochs=1",
    "retrieval.embedding_dim=16",
    "retrieval.output_dim=16",
]


def small(*more: str) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), [*SMALL, *more])


def logs() -> tuple[Dataset, Dataset]:
    """Yesterday's log (users 0 to 199, items but the last ten) and today's
    (users 100 to 299, every item): shared IDs, new ones and gone ones."""
    dataset = load_dataset_for(small())
    rows = dataset.interactions
    old = rows.filter((pl.col("user_id") < 200) & (pl.col("item_id") < 90))
    new = rows.filter(pl.col("user_id") >= 100)
    return dataset.with_interactions(old), dataset.with_interactions(new)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    old, _ = logs()
    out = tmp_path_factory.mktemp("warm") / "models" / "1"
    return fit_two_stage(small(), dataset=old).recommender().save(out)


def _rows(table: torch.Tensor, vocabulary, ids: list[int], offset: int = 0):
    return table[torch.from_numpy(vocabulary.transform(ids) + offset)]


def test_each_id_both_logs_hold_keeps_its_saved_rows(saved: Path) -> None:
    source = load_recommender(saved)
    old, new = logs()
    config = small(f"train.warm_start={saved}")
    spec = spec_for(new, config).fit(new)
    torch.manual_seed(0)
    model = build_member(spec, config.retrieval)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = WarmStart(source=str(saved))
    copy_weights(model, spec, source.run.model, source.run.spec, report=report)

    old_spec, old_state = source.run.spec, source.run.model.state_dict()
    state = model.state_dict()
    name = "query_tower.embeddings.user_id.weight"
    before, now = old.interactions, new.interactions
    shared = sorted(set(before["user_id"]) & set(now["user_id"]))
    added = sorted(set(now["user_id"]) - set(before["user_id"]))
    users, old_users = spec.vocabulary("user_id"), old_spec.vocabulary("user_id")
    # The same user sits at another row: copied by ID, not by row number.
    assert not (users.transform(shared) == old_users.transform(shared)).all()
    assert torch.equal(
        _rows(state[name], users, shared), _rows(old_state[name], old_users, shared)
    )
    assert torch.equal(
        _rows(state[name], users, added), _rows(fresh[name], users, added)
    )
    assert torch.equal(state[name][0], old_state[name][0])  # the unknown user's row
    items, old_items = spec.vocabulary("item_id"), old_spec.vocabulary("item_id")
    kept = sorted(set(before["item_id"]))
    new_items = sorted(set(now["item_id"]) - set(kept))
    assert len(shared) == 100 and added and len(kept) > 80 and new_items
    for table in (
        "candidate_tower.embeddings.item_id.weight",
        "query_tower.history.embedding.weight",
    ):
        assert torch.equal(
            _rows(state[table], items, kept), _rows(old_state[table], old_items, kept)
        )
        assert torch.equal(
            _rows(state[table], items, new_items), _rows(fresh[table], items, new_items)
        )
    assert report.rows[name] == (len(shared), len(shared) + len(added))
    assert report.rows["candidate_tower.embeddings.item_id.weight"] == (
        len(kept),
        len(kept) + len(new_items),
    )
    # A text field's table keeps its padding row before the vocabulary.
    title = "candidate_tower.embeddings.title.weight"
    words, old_words = spec.vocabulary("title"), old_spec.vocabulary("title")
    common = [w for w in old_words.values.to_list() if words.contains(w)]
    assert common
    assert torch.equal(
        _rows(state[title], words, common, 1),
        _rows(old_state[title], old_words, common, 1),
    )
    # Buffers come from the new config, not the saved model.
    assert "log_temperature" not in dict(model.named_parameters())

    # The ranker: its tables and its bias rows by ID, its layers whole.
    run = RetrievalRun(
        config=config,
        spec=spec,
        model=model,
        tensors=build_tensors(spec, new, config.retrieval),
    )
    ranker = build_ranking_model(run, config.ranking, rating_mean=3.0)
    copy_weights(
        ranker,
        spec,
        source.ranker.model,
        old_spec,
        report=WarmStart(source=str(saved)),
    )
    old_ranker = source.ranker.model.state_dict()
    assert torch.equal(
        ranker.state_dict()["deep.0.weight"], old_ranker["deep.0.weight"]
    )
    assert torch.equal(
        _rows(ranker.state_dict()["user_bias.weight"], users, shared),
        _rows(old_ranker["user_bias.weight"], old_users, shared),
    )
    assert float(ranker.rating_mean) == 3.0


def test_a_warm_start_trains_further_than_a_cold_one(saved: Path) -> None:
    """One epoch on today's log from yesterday's weights beats one from random
    weights (the estimator, with the setting)."""
    _, new = logs()
    figures = {}
    for name, settings in {
        "cold": {},
        "warm": {"train.warm_start": str(saved)},
    }.items():
        model = TwoStageModel(
            settings={
                **{o.split("=")[0]: o.split("=")[1] for o in SMALL[1:]},
                "train.epochs": 1,
                **settings,
            }
        )
        train, test = _split(new)
        model.fit(train)
        figures[name] = model.evaluate(test).ndcg[10]
    assert figures["warm"] > figures["cold"] * 1.05


def _split(dataset: Dataset) -> tuple[Dataset, Dataset]:
    from twostage.data.split import random_split

    return random_split(dataset, test_fraction=0.2, seed=42)


def test_another_architecture_is_refused(saved: Path) -> None:
    _, new = logs()
    wider = small(f"train.warm_start={saved}", "retrieval.embedding_dim=32")
    with pytest.raises(
        ConfigError, match=r"query_tower.embeddings.user_id.weight.*another width"
    ):
        fit_two_stage(wider, dataset=new)
    deeper = small(
        f"train.warm_start={saved}",
        "retrieval.query_encoder=transformer",
        "retrieval.examples=sequences",
    )
    with pytest.raises(ConfigError, match=r"holds the members \['pooling'\]"):
        fit_two_stage(deeper, dataset=new)
    with pytest.raises(ConfigError, match="does not exist"):
        fit_two_stage(small(f"train.warm_start={saved}-missing"), dataset=new)


def test_the_cli_warm_starts_in_memory_and_from_a_stream(
    saved: Path, tmp_path: Path
) -> None:
    _, new = logs()
    log = tmp_path / "today"
    log.mkdir()
    new.interactions.write_parquet(log / "part-0.parquet")
    assert new.users is not None and new.items is not None
    new.users.write_parquet(tmp_path / "users.parquet")
    new.items.write_parquet(tmp_path / "items.parquet")
    settings = [part for o in SMALL[1:] for part in ("--set", o)]
    tables = ["--user-table", str(tmp_path / "users.parquet")]
    tables += ["--item-table", str(tmp_path / "items.parquet")]
    out = tmp_path / "models" / "2"
    said = CliRunner().invoke(
        app,
        [
            "train",
            "--dataset",
            str(log / "part-0.parquet"),
            *settings,
            *tables,
            "--warm-start",
            str(saved.parent),  # the newest version: recorded as such
            "--out",
            str(out),
        ],
        env={"COLUMNS": "300"},
    )
    assert said.exit_code == 0, said.output
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["warm_start"] == str(saved.resolve())
    shown = CliRunner().invoke(app, ["info", str(out)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    # The table may wrap a long path: read it without borders and spaces.
    joined = re.sub(r"[│╭╮╰╯─┌┬┐└┴┘├┼┤\s]", "", shown.output)
    assert f"warmstartfrom{saved.resolve()}" in joined
    described = CliRunner().invoke(app, ["info", str(out), "--json"])
    assert json.loads(described.stdout)["warm_start"] == str(saved.resolve())
    # The model's directory as --out: saved as its next version (a daily retrain
    # need not number it), and a directory that holds no versions is refused.
    daily = [
        *("train", "--dataset", str(log / "part-0.parquet"), *settings, *tables),
        *("--warm-start", str(out.parent), "--json", "--out"),
    ]
    nxt = CliRunner().invoke(app, [*daily, str(out.parent)], env={"COLUMNS": "300"})
    assert nxt.exit_code == 0, nxt.output
    assert json.loads(nxt.stdout)["bundle"] == str(out.parent / "3")
    config = json.loads((out.parent / "3" / "config.json").read_text())
    assert config["train"]["warm_start"] == str(out.resolve())  # the newest, 2
    other = tmp_path / "other"
    other.mkdir()
    refused = CliRunner().invoke(app, [*daily, str(other)], env={"COLUMNS": "300"})
    assert refused.exit_code == 2 and "already exists" in refused.output
    run = tmp_path / "run"
    streamed = CliRunner().invoke(
        app,
        [
            "-v",
            "train",
            "retrieval",
            "--stream",
            "--dataset",
            str(log),
            *settings,
            "--warm-start",
            str(saved),
            "--out",
            str(run),
        ],
        env={"COLUMNS": "300"},
    )
    assert streamed.exit_code == 0, streamed.output
    said_text = re.sub(r"[│╭╮╰╯─\s]", "", streamed.output)
    assert f"retrievalwarmstartfrom{saved.resolve()}" in said_text


def test_a_field_encoded_otherwise_starts_afresh(saved: Path) -> None:
    source = load_recommender(saved)
    _, new = logs()
    config = small('retrieval.field_kinds=["age=categorical"]')
    spec = spec_for(new, config).fit(new)
    model = build_member(spec, config.retrieval)
    fresh = model.state_dict()["query_tower.embeddings.age.weight"].clone()
    report = WarmStart(source=str(saved))
    copy_weights(model, spec, source.run.model, source.run.spec, report=report)
    name = "query_tower.embeddings.age.weight"
    assert report.fresh[name] == "BucketEncoder saved, CategoricalEncoder now"
    assert torch.equal(model.state_dict()[name], fresh)
    assert "afresh: query_tower.embeddings.age.weight" in report.summary()


def test_unset_it_is_none_so_older_checkpoints_resume() -> None:
    """A checkpoint written before the setting existed lacks it: resume treats a
    key absent there as the same run only while it is unset (None)."""
    from twostage.config import to_dict
    from twostage.training.loop import resume_fingerprint

    assert resume_fingerprint(to_dict(ExperimentConfig()))["train.warm_start"] is None


def test_the_estimator_warm_starts_from_its_own_fit(tmp_path: Path) -> None:
    """fit(warm_start=True) starts from the model's own weights: the same
    weights as a warm start from the same model saved and named by the setting."""
    old, new = logs()
    settings: dict[str, object] = {o.split("=")[0]: o.split("=")[1] for o in SMALL[1:]}
    settings["train.epochs"] = 1
    model = TwoStageModel(settings=settings)
    with pytest.raises(ConfigError, match="not fitted yet"):
        model.fit(new, warm_start=True)
    model.fit(old)
    path = model.save(tmp_path / "m" / "1")
    model.fit(new, warm_start=True)
    named = TwoStageModel(settings={**settings, "train.warm_start": str(path)})
    named.fit(new)
    cold = TwoStageModel(settings=settings).fit(new)
    for fitted in (named, cold):
        assert fitted.recommender_ is not None and model.recommender_ is not None
    ours, theirs = model.recommender_, named.recommender_
    for a, b in (
        (ours.run.model, theirs.run.model),
        (ours.ranker.model, theirs.ranker.model),  # type: ignore[union-attr]
    ):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    user = "query_tower.embeddings.user_id.weight"
    assert not torch.equal(
        ours.run.model.state_dict()[user],
        cold.recommender_.run.model.state_dict()[user],
    )
    with pytest.raises(ConfigError, match="`warm_start` should be True or False"):
        model.fit(new, warm_start="yes")  # type: ignore[arg-type]


def test_both_stages_start_from_one_load(saved: Path, monkeypatch) -> None:
    """The saved model is read once for both stages (it was read once each)."""
    from twostage.training import warm

    loads: list[str] = []
    real = warm.load_warm_start

    def counted(path: str):
        loads.append(path)
        return real(path)

    monkeypatch.setattr(warm, "load_warm_start", counted)
    _, new = logs()
    stages = fit_two_stage(
        small(f"train.warm_start={saved}", "train.epochs=1"), dataset=new
    )
    assert stages.ranker is not None and loads == [str(saved)]


def test_each_ensemble_member_starts_from_the_saved_member_of_its_place(
    tmp_path: Path,
) -> None:
    """A trained member copies from the saved member of its place (the members
    are trained apart, each from its own seed); a closed-form one is refitted."""
    from twostage.retrieval.fit import fit_retrieval

    old, new = logs()
    ensemble = ['retrieval.ensemble=["pooling","ease"]', "train.epochs=1"]
    config = small(*ensemble)
    saved, _ = fit_retrieval(config, dataset=old, out_dir=tmp_path / "run")
    warm, _ = fit_retrieval(
        small(*ensemble, f"train.warm_start={tmp_path / 'run'}", "train.max_steps=1"),
        dataset=new,
    )
    cold, _ = fit_retrieval(small(*ensemble, "train.max_steps=1"), dataset=new)
    table = "candidate_tower.embeddings.item_id.weight"
    items = warm.spec.vocabulary("item_id")
    kept = sorted(set(old.interactions["item_id"]))
    rows = torch.from_numpy(items.transform(kept))
    old_rows = torch.from_numpy(saved.spec.vocabulary("item_id").transform(kept))
    first = warm.model.members[0].state_dict()[table][rows]  # type: ignore[union-attr,index]
    before = saved.model.members[0].state_dict()[table][old_rows]  # type: ignore[union-attr,index]
    fresh = cold.model.members[0].state_dict()[table][rows]  # type: ignore[union-attr,index]
    # One step from the saved rows: nearer them than a cold step is.
    assert (first - before).norm() < (fresh - before).norm() / 2
    with pytest.raises(ConfigError, match="holds the members"):
        fit_retrieval(
            small(
                'retrieval.ensemble=["pooling"]', f"train.warm_start={tmp_path / 'run'}"
            ),
            dataset=new,
        )
