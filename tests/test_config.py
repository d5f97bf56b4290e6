"""Config: strict keys and types, range checks in every section, the ranking section."""

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from twostage.cli import app
from twostage.config import (
    ExperimentConfig,
    RankingConfig,
    apply_overrides,
    apply_settings,
    load_config,
    save_config,
)
from twostage.errors import ConfigError


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("retrieval.temperature=0", "positive"),
        ("retrieval.temperature=-0.5", "positive"),
        ("train.epochs=-1", "a positive integer"),
        ("train.epochs=0", "a positive integer"),
        ("train.batch_size=0", "a positive integer"),
        ("train.learning_rate=0", "positive"),
        ("train.grad_clip=-1", "0 (no clipping) or positive"),
        ("train.seed=-3", "a non-negative integer"),
        ("data.test_fraction=1", "in (0, 1)"),
        ("data.test_fraction=0", "in (0, 1)"),
        ("data.validation_fraction=-0.1", "in [0, 1)"),
        ("retrieval.history_dropout=1", "in [0, 1)"),
        ("retrieval.embedding_dim=0", "a positive integer"),
        ("retrieval.hidden_dims=64,0", "positive widths"),
        ("retrieval.max_positives_per_user=-1", "0 (no cap) or positive"),
        ("index.chunk_size=0", "a positive integer"),
        ("ranking.epochs=0", "a positive integer"),
        ("ranking.num_candidates=10", ">= 100"),
        ("ranking.dropout=1.5", "in [0, 1)"),
        # NaN and the infinities pass a range check such as `> 0`: refused first.
        ("retrieval.session_knn_weight=inf", "a finite number"),
        ("retrieval.session_knn_weight=nan", "a finite number"),
        ("retrieval.ensemble_weights=0.5,inf", "a finite number"),
        ("train.learning_rate=-inf", "a finite number"),
        ("data.unrated_values=nan", "a finite number"),
        ("ranking.blend_weight=inf", "a finite number"),
    ],
)
def test_out_of_range_values_name_key_range_and_value(
    override: str, allowed: str
) -> None:
    key, value = override.split("=")
    with pytest.raises(ConfigError) as error:
        apply_overrides(ExperimentConfig(), [override])
    message = str(error.value)
    assert f"`{key}` should be {allowed}" in message
    assert f"Received: `{key}` = " in message
    assert value.split(",")[-1] in message.rsplit("=", 1)[1]


def test_a_non_finite_number_is_refused_however_the_config_is_built(
    tmp_path: Path,
) -> None:
    from twostage.config import RetrievalConfig

    with pytest.raises(
        ConfigError, match=r"`retrieval\.temperature` should be a finite"
    ):
        RetrievalConfig(temperature=float("inf"))
    path = tmp_path / "config.json"
    path.write_text('{"train": {"learning_rate": NaN}}')  # Python's json reads NaN
    with pytest.raises(ConfigError, match=r"`train\.learning_rate` should be a finite"):
        load_config(path)


@pytest.mark.parametrize(
    "reader",
    [
        "retrieval.query_encoder=transformer",
        "retrieval.query_encoder=gru",
        "retrieval.ensemble=gru",
        "retrieval.examples=sequences",
    ],
)
def test_an_ordered_model_needs_a_history(reader: str) -> None:
    # Each trained without one, and its queries read nothing but the user ID.
    with pytest.raises(ConfigError, match="at least 1 with a transformer or GRU"):
        apply_overrides(ExperimentConfig(), [reader, "retrieval.history_length=0"])
    kept = apply_overrides(ExperimentConfig(), [reader, "retrieval.history_length=1"])
    assert kept.retrieval.history_length == 1
    bag = apply_overrides(ExperimentConfig(), ["retrieval.history_length=0"])
    assert bag.retrieval.history_length == 0  # a bag model may read no history


def test_a_list_with_an_empty_item_is_refused_not_shortened() -> None:
    # "a,,b" became ("a", "b") and "0,1," (0, 1): a slip passed unseen.
    for override in ("data.user_features=age,,gender", "data.unrated_values=0,1,"):
        with pytest.raises(ConfigError, match="without empty items"):
            apply_overrides(ExperimentConfig(), [override])
    config = apply_overrides(
        ExperimentConfig(), ["retrieval.hidden_dims=", "data.user_features=age, gender"]
    )
    assert config.retrieval.hidden_dims == ()  # "" is the empty list
    assert config.data.user_features == ("age", "gender")
    result = CliRunner().invoke(
        app, ["data", "describe", "synthetic", "--user-features", "age,,gender"]
    )
    assert result.exit_code == 2
    assert "without empty" in result.output and "'age,,gender'" in result.output


def test_an_override_key_with_an_empty_part_is_named() -> None:
    # "train..epochs=3" answered "unknown config section '' ... Known sections: []".
    for override in ("train..epochs=3", "=3", "train.=3"):
        with pytest.raises(ConfigError, match="without empty parts"):
            apply_overrides(ExperimentConfig(), [override])


def test_config_files_are_one_json_object_read_strictly(tmp_path: Path) -> None:
    """A BOM (Notepad's UTF-8) was refused; a repeated key silently kept the last;
    a list said "unknown config key(s) [1, 2]"; bytes that are no UTF-8 ended in a
    UnicodeDecodeError traceback."""
    path = tmp_path / "config.json"
    path.write_bytes(b'\xef\xbb\xbf{"train": {"epochs": 3}}')
    assert load_config(path).train.epochs == 3
    for content, message in [
        (b'{"train": {"epochs": 1, "epochs": 2}}', "'epochs' is given twice"),
        (b"[1, 2]", "should hold one JSON object of sections"),
        (b'{"train": {"epochs": \xff}}', r"as JSON \(UTF-8\)"),
        (b"train:\n  epochs: 1\n", r"as JSON \(UTF-8\)"),
    ]:
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=message):
            load_config(path)


def test_python_settings_keep_their_types() -> None:
    """`TwoStageModel(settings=...)` went through override text: None became the
    column name "None", and True passed as "True"."""
    config = apply_settings(
        apply_overrides(ExperimentConfig(), ["data.time_col=ts"]),
        {
            "data.time_col": None,
            "train.epochs": np.int64(3),
            "data.user_features": ["age", "gender"],
            "ranking.hidden_dims": np.array([64, 32]),
            "retrieval.ensemble": ["gru"],
            "retrieval.ensemble_weights": [np.float32(0.5), np.float64(0.5)],
            "train.learning_rate": 0.01,
        },
    )
    assert config.data.time_col is None
    assert config.train.epochs == 3 and type(config.train.epochs) is int
    assert config.data.user_features == ("age", "gender")
    assert config.ranking.hidden_dims == (64, 32)
    assert config.retrieval.ensemble_weights == (0.5, 0.5)
    assert config.ranking.hidden_dims == (64, 32)
    assert config.retrieval.ensemble_weights == (0.5, 0.5)
    assert config.train.learning_rate == 0.01
    for settings, message in [
        ({"train.epochs": True}, "should be of type int. Received: True"),
        ({"train.epochs": None}, "should be of type int. Received: None"),
        ({"train.epoch": 3}, "Did you mean 'train.epochs'"),
        ({"train..epochs": 3}, "without empty parts"),
        ({("train", "epochs"): 3}, "`section.key` text"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_settings(ExperimentConfig(), settings)


def test_ranking_is_a_section_that_overrides_and_files_reach(tmp_path: Path) -> None:
    config = apply_overrides(ExperimentConfig(), ["ranking.epochs=2"])
    assert config.ranking == RankingConfig(epochs=2)
    save_config(config, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["ranking"]["epochs"] == 2
    # Keys the ranker shares with other sections live there only.
    assert (
        "seed" not in saved["ranking"] and "validation_fraction" not in saved["ranking"]
    )
    assert load_config(tmp_path / "config.json") == config
    # A preset may set the ranking section alone; the rest keeps its defaults.
    (tmp_path / "preset.json").write_text(json.dumps({"ranking": {"blend_weight": 1}}))
    assert load_config(tmp_path / "preset.json").ranking.blend_weight == 1.0
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(ExperimentConfig(), ["ranking.epoch=2"])
    with pytest.raises(ConfigError, match="rating_weight"):
        apply_overrides(
            ExperimentConfig(), ["ranking.rating_weight=0", "ranking.click_weight=0"]
        )


def test_cli_reports_a_range_error_without_a_traceback() -> None:
    result = CliRunner().invoke(
        app, ["train", "--out", "unused", "--set", "retrieval.temperature=0"]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)
    assert "`retrieval.temperature` should be positive" in str(result.exception)


def test_name_value_keys_take_an_object_in_files_and_settings(tmp_path: Path) -> None:
    """`data.weight_values` and `retrieval.field_kinds` are name=value entries; a
    JSON config or Python settings hold them most naturally as an object."""
    path = tmp_path / "config.json"
    path.write_text(
        '{"data": {"weight_col": "event", "weight_values": {"view": 1, "buy": 5}},'
        ' "retrieval": {"field_kinds": {"category_id": "categorical"}}}'
    )
    config = load_config(path)
    assert config.data.weight_values == ("view=1", "buy=5")
    assert config.data.weights_of_values == {"view": 1.0, "buy": 5.0}
    assert config.retrieval.field_kinds == ("category_id=categorical",)
    from_settings = apply_settings(ExperimentConfig(), {"data.weight_values": {"a": 2}})
    assert from_settings.data.weight_values == ("a=2",)
    with pytest.raises(ConfigError, match="each weight a finite number"):
        apply_settings(ExperimentConfig(), {"data.weight_values": {"view": True}})
    with pytest.raises(ConfigError, match="should be a list"):  # other lists stay lists
        apply_settings(ExperimentConfig(), {"retrieval.query_fields": {"age": 1}})


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (["retrieval.sequence_layers=3"], ["retrieval.sequence_layers"]),
        (  # a GRU has layers but no heads
            [
                "retrieval.query_encoder=gru",
                "retrieval.sequence_layers=3",
                "retrieval.sequence_heads=4",
            ],
            ["retrieval.sequence_heads"],
        ),
        (  # a transformer member reads them
            [
                "retrieval.ensemble=transformer",
                "retrieval.sequence_heads=4",
                "retrieval.ensemble_weights=1,1",
            ],
            [],
        ),
        (
            ["retrieval.session_knn_sample=100", "retrieval.session_knn_length=50"],
            ["retrieval.session_knn_length", "retrieval.session_knn_sample"],
        ),
        (["retrieval.session_knn_weight=-1", "retrieval.session_knn_sample=100"], []),
        (["retrieval.ease_rank=64"], ["retrieval.ease_rank"]),
        (
            [
                "retrieval.ensemble=transition",
                "retrieval.ensemble_weights=1,0.1",
                "retrieval.ease_rank=64",
                "retrieval.ease_recency=0.5",
            ],
            ["retrieval.ease_recency"],
        ),
        (["ranking.ease_rank=32"], ["ranking.ease_rank"]),
        (["ranking.ease_rank=32", "ranking.ease_weight=0.5"], []),
        (
            ["ranking.architecture=mlp", "ranking.structure=stacked"],
            ["ranking.structure"],
        ),
        (["data.label_threshold=3"], ["data.label_threshold"]),
        (
            ["retrieval.logq_correction=false", "retrieval.logq_weight=0.5"],
            ["retrieval.logq_weight"],
        ),
        (["retrieval.logq_weight=0.5"], []),
        (["data.label_threshold=3", "data.label_col=clicked"], []),
        (["retrieval.history_pooling=attention"], []),
        (
            ["retrieval.history_pooling=attention", "retrieval.history_length=0"],
            ["retrieval.history_pooling"],
        ),
        (
            ["retrieval.query_encoder=gru", "retrieval.history_pooling=attention"],
            ["retrieval.history_pooling"],
        ),
        (  # a pooling member reads it
            [
                "retrieval.query_encoder=gru",
                "retrieval.ensemble=pooling",
                "retrieval.ensemble_weights=1,1",
                "retrieval.history_pooling=attention",
            ],
            [],
        ),
        (["retrieval.history_dropout=0.2"], []),
        (["retrieval.history_dropout=0.2", "retrieval.examples=users"], []),
        (
            ["retrieval.history_dropout=0.2", "retrieval.history_length=0"],
            ["retrieval.history_dropout"],
        ),
        (
            ["retrieval.history_dropout=0.2", "retrieval.examples=sequences"],
            ["retrieval.history_dropout"],
        ),
    ],
)
def test_settings_nothing_reads_are_named(
    settings: list[str], named: list[str]
) -> None:
    """A setting changed for a part the model does not have (the transformer's
    heads on a GRU, the session-kNN term's sample without the term) trained as
    if unset, silently."""
    from twostage.config.unread import unread_settings

    found = unread_settings(apply_overrides(ExperimentConfig(), settings))
    assert sorted(s.split("`")[1] for s in found) == named


def test_no_preset_sets_what_its_model_does_not_read() -> None:
    from twostage.config.unread import unread_settings

    presets = sorted(Path(__file__).parents[1].glob("presets/*.json"))
    assert presets and not unread_settings(ExperimentConfig())
    for path in presets:
        assert unread_settings(load_config(path)) == [], path.name


def test_training_says_which_settings_it_does_not_read(caplog) -> None:
    from twostage.retrieval.fit import fit_retrieval

    config = apply_overrides(
        ExperimentConfig(),
        [
            "data.dataset=synthetic:num_users=30,num_items=20,num_interactions=400",
            "train.epochs=1",
            "retrieval.embedding_dim=8",
            "retrieval.output_dim=8",
            "retrieval.session_knn_sample=10",
        ],
    )
    with caplog.at_level("WARNING", logger="twostage.retrieval.fit"):
        fit_retrieval(config, evaluate_test=False)
    said = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(said) == 1 and "`retrieval.session_knn_sample` = 10" in said[0]
