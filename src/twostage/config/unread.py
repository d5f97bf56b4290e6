"""Settings a config changes that nothing in that config reads.

A config is strict about names, types and ranges, and several settings are refused
where they cannot apply (an ordered history's switches on a pooled one). Others are
read by one part of the model only: the transformer's heads, the session-kNN term's
neighbours, the ranker's cross layers. Set while that part is absent, such a value
used to train as if it were unset, without a word. :func:`unread_settings` names
them, so that training can say so (a warning, not an error: a preset may carry
settings for a part a user switches off).
"""

from __future__ import annotations

from twostage.config.sections import (
    DataConfig,
    ExperimentConfig,
    RankingConfig,
    RetrievalConfig,
)

__all__ = ["unread_settings"]

_ORDERED = ("transformer", "gru")
_TERM = (
    "session_knn_neighbours",
    "session_knn_recency",
    "session_knn_proximity",
    "session_knn_length",
    "session_knn_sample",
)


def _changed(section: object, default: object, names: tuple[str, ...]) -> list[str]:
    """The ``names`` whose value in ``section`` differs from ``default``'s."""
    return [n for n in names if getattr(section, n) != getattr(default, n)]


def unread_settings(config: ExperimentConfig) -> list[str]:
    """One sentence per setting changed from its default that no part of
    ``config``'s model reads, saying what would read it."""
    retrieval, ranking, data = config.retrieval, config.ranking, config.data
    kinds = [retrieval.query_encoder, *retrieval.ensemble]
    defaults = RetrievalConfig()
    found = []
    ordered = retrieval.history_length > 0 and any(k in _ORDERED for k in kinds)
    if not ordered:
        for name in _changed(
            retrieval,
            defaults,
            ("sequence_layers", "sequence_heads", "sequence_dropout"),
        ):
            found.append(
                f"`retrieval.{name}` = {getattr(retrieval, name)!r}: only an ordered "
                "history reads it (`retrieval.query_encoder` or a "
                "`retrieval.ensemble` member 'transformer' or 'gru', with "
                "`retrieval.history_length` > 0), and this model has none."
            )
    elif "transformer" not in kinds and _changed(
        retrieval, defaults, ("sequence_heads",)
    ):
        found.append(
            f"`retrieval.sequence_heads` = {retrieval.sequence_heads!r}: only a "
            "transformer reads it, and this model's ordered history is a GRU."
        )
    if (retrieval.history_length == 0 or "pooling" not in kinds) and _changed(
        retrieval, defaults, ("history_pooling",)
    ):
        found.append(
            f"`retrieval.history_pooling` = {retrieval.history_pooling!r}: only a "
            "pooled history reads it (`retrieval.query_encoder` or a "
            "`retrieval.ensemble` member 'pooling', with `retrieval.history_length` "
            "> 0), and this model has none."
        )
    if (
        retrieval.history_length == 0 or retrieval.examples == "sequences"
    ) and _changed(retrieval, defaults, ("history_dropout",)):
        found.append(
            f"`retrieval.history_dropout` = {retrieval.history_dropout!r}: it hides "
            "history items of `retrieval.examples` = 'interactions' or 'users' "
            "batches, and "
            + (
                "this model reads no history (`retrieval.history_length` = 0)."
                if retrieval.history_length == 0
                else "'sequences' trains each position on the items before it."
            )
        )
    if not retrieval.logq_correction and _changed(
        retrieval, defaults, ("logq_weight",)
    ):
        found.append(
            f"`retrieval.logq_weight` = {retrieval.logq_weight!r}: it scales the "
            "sampling-bias correction, and `retrieval.logq_correction` = false "
            "applies none."
        )
    if retrieval.session_knn_weight == 0:
        for name in _changed(retrieval, defaults, _TERM):
            found.append(
                f"`retrieval.{name}` = {getattr(retrieval, name)!r}: only the "
                "session-kNN term reads it, and `retrieval.session_knn_weight` = 0 "
                "adds none (-1 picks its weight on validation)."
            )
    if not any(k in ("ease", "transition") for k in kinds) and _changed(
        retrieval, defaults, ("ease_rank",)
    ):
        found.append(
            f"`retrieval.ease_rank` = {retrieval.ease_rank!r}: only a "
            "`retrieval.ensemble` member 'ease' or 'transition' reads it, and this "
            "model has none."
        )
    if "ease" not in kinds and _changed(retrieval, defaults, ("ease_recency",)):
        found.append(
            f"`retrieval.ease_recency` = {retrieval.ease_recency!r}: only a "
            "`retrieval.ensemble` member 'ease' reads it, and this model has none."
        )
    ranked = RankingConfig()
    if ranking.ease_weight == 0 and _changed(ranking, ranked, ("ease_rank",)):
        found.append(
            f"`ranking.ease_rank` = {ranking.ease_rank!r}: only the ranker's EASE "
            "term reads it, and `ranking.ease_weight` = 0 adds none."
        )
    if ranking.architecture == "mlp":
        for name in _changed(
            ranking, ranked, ("cross_layers", "cross_rank", "structure")
        ):
            found.append(
                f"`ranking.{name}` = {getattr(ranking, name)!r}: only the cross "
                "network reads it, and `ranking.architecture` = 'mlp' has none."
            )
    if data.label_col is None and data.label_threshold != DataConfig().label_threshold:
        found.append(
            f"`data.label_threshold` = {data.label_threshold!r}: it turns the "
            "`data.label_col` column into clicks, and no label column is named."
        )
    return found
