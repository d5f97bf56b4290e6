"""The config sections: one frozen dataclass per stage, each checking its ranges when
it is built (the :class:`ConfigError` names the key, the allowed range and the value
received), and :class:`ExperimentConfig`, which holds them all."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from twostage.errors import ConfigError

__all__ = [
    "CLOSED_FORM_MEMBERS",
    "KS",
    "DataConfig",
    "ExperimentConfig",
    "IndexConfig",
    "RankingConfig",
    "RetrievalConfig",
    "TrainConfig",
]


#: The list lengths every evaluation reports; a ranker retrieves at least the largest.
KS = (1, 5, 10, 50, 100)
#: ``retrieval.ensemble`` entries fitted in closed form, with no training loop.
CLOSED_FORM_MEMBERS = ("ease", "transition")


class _Checked:
    """Range checks of a config section, run when the section is built."""

    SECTION: ClassVar[str] = ""

    def _rules(self) -> dict[str, tuple[bool, str]]:
        """``key -> (value is in range, the allowed range in words)``."""
        return {}

    def __post_init__(self) -> None:
        # No setting takes NaN or an infinity: each would pass a range check
        # (inf > 0) and turn every score, loss or weight it touches into NaN.
        for name, value in vars(self).items():
            numbers = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                self._refuse(name, "a finite number")
        for name, (ok, expected) in self._rules().items():
            if not ok:
                self._refuse(name, expected)

    def _refuse(self, name: str, expected: str) -> None:
        key = f"{self.SECTION}.{name}" if self.SECTION else name
        raise ConfigError(
            f"`{key}` should be {expected}. Received: `{key}` = {getattr(self, name)!r}."
        )


#: The field kinds ``retrieval.field_kinds`` may set: those whose encoders need no
#: option (``hash`` needs its ``num_buckets``; ``id`` is the key's).
FIELD_KIND_CHOICES = (
    "categorical",
    "bucket",
    "numeric",
    "timestamp",
    "multi_hot",
    "text",
)


def named_weight(entry: str) -> tuple[str, float] | None:
    """``"view=1"`` as ``("view", 1.0)``: one entry of ``data.weight_values`` (or of
    ``--weight-values``); None when it is not ``value=number``."""
    name, sep, weight = entry.rpartition("=")
    try:
        number = float(weight)
    except ValueError:
        return None
    return (name.strip(), number) if sep and name.strip() else None


def _named_weight(entry: str) -> bool:
    """Whether ``entry`` is ``value=weight`` with a finite weight >= 0."""
    pair = named_weight(entry)
    return pair is not None and math.isfinite(pair[1]) and pair[1] >= 0


def _fraction(value: float, *, closed_low: bool = True) -> bool:
    return (value >= 0.0 if closed_low else value > 0.0) and value < 1.0


@dataclass(frozen=True)
class DataConfig(_Checked):
    """Which data, and how it is split.

    ``user_features``/``item_features`` name extra columns of a user's own log that become
    side features; the ``*_col`` options map the log's columns. ``title_col`` and
    ``tags_col`` name the item-table columns shown for an item (None: guessed, see
    :mod:`twostage.display`). ``unrated_values`` are rating values that mean "an
    interaction without a rating" (Book-Crossing's 0): such rows stay interactions
    for retrieval, but their rating is missing, so the ranker's rating regression and
    RMSE skip them. ``train_file`` / ``test_file`` take the split from two files (as
    ``twostage data split`` writes them) instead of drawing it; the ``dataset`` still
    gives the user and item tables. ``test_users`` > 0 evaluates on at most that many
    test users, the same ones for every model and run (those with the smallest stable
    hash of their ID and ``seed``; :func:`twostage.data.split.sample_users`): the
    other test rows are left out of evaluation, not moved into training. 0: every
    test user. A streamed run (``--stream``) samples its validation users the same
    way: every epoch scores them. ``weight_col`` names a column of the log whose
    non-negative values scale each training row's share of the retrieval and the
    ranking losses (play counts, dwell time...); unset, every row weighs 1.
    ``label_col`` names the column of an impression log that says whether the
    user chose the item shown (1, true, yes: clicked, bought) or not (0, false,
    no): the rows not chosen are kept apart from the interactions
    (``Dataset.shown``), so retrieval never learns them as choices; each split
    side keeps its own, the ranker draws ``ranking.num_shown_negatives`` of them
    per positive, and evaluation reports the click AUC of the test's chosen items
    against the same users' test items shown and not chosen (``shown_auc``).
    ``label_threshold`` reads a label column of numbers: at or above it a row is
    chosen, below it shown and not chosen (KuaiRec's ``watch_ratio`` with 2).
    ``time_format`` parses the time column with a strptime format (``"%Y%m%d"``
    for dates written as numbers, ``"%m/%d/%Y %H:%M"``) instead of epoch seconds
    or ISO 8601. ``time_unit`` is the unit of numeric timestamps since the epoch:
    ``s`` (default), ``ms`` (Java and JavaScript logs), ``us`` or ``ns``, floored to
    whole seconds.
    ``column_names`` names the columns of a headerless text file, in order (its
    first line is a row; Amazon's ratings CSVs, Taobao's UserBehavior.csv); the
    roles then map these names (or name them ``user_id``, ``item_id``, ``rating``,
    ``timestamp``).
    ``missing_ratings`` says what an empty or missing rating is: ``reject``
    (default; a ``bad_rating`` row) or ``unrated``, an interaction without a
    rating (a log of purchases and reviews).
    ``quote_char`` is the quote character of a text log and of its text feature
    tables (default ``"``); ``""`` reads quotes as text (Last.fm's tab-separated
    dumps, where a field may start with one). ``comment_prefix`` starts the comment
    lines of a text log and of its text feature tables, which are skipped and
    counted (SNAP's ``#``, KONECT's ``%``); ``""`` (default): none.
    ``duplicates`` says what to do with rows of the same user, item and time
    (logged twice): ``keep`` them (default), keep the ``first`` or ``last`` (the
    others counted as ``duplicate``), or stop (``error``).
    ``min_user_rows`` / ``min_item_rows`` drop the users and items with fewer
    rows before splitting, until every one left has as many (the "5-core" of the
    literature: :func:`twostage.data.filtering.min_counts`); 0: no minimum.
    ``weight_values`` gives the weight of each value of ``weight_col`` when it
    holds names such as event types: ``("view=1", "cart=3", "purchase=5")``
    (``--weight-values view=1,cart=3,purchase=5``); a value it does not list is a
    bad row.
    ``user_table`` / ``item_table`` name files of user / item features (CSV, JSON
    lines or Parquet; a product catalogue, a user profile export), keyed by the
    log's user / item column name (``user_col`` / ``item_col``) or ``user_id`` /
    ``item_id``, or by ``user_table_key`` / ``item_table_key`` when the file names
    its key otherwise (Steam's games keyed ``id``, Last.fm's profiles ``#id``);
    their other columns join the log's own feature columns.
    ``user_table_columns`` / ``item_table_columns`` name the columns of a headerless
    table file, in order (MovieLens-1M's ``users.dat``, Last.fm-360K's profiles), as
    ``column_names`` names the log's.
    """

    dataset: str = "movielens-100k"
    split: Literal["random", "temporal", "leave-last-out"] = "random"
    test_fraction: float = 0.2
    validation_fraction: float = 0.05
    seed: int = 42
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    rating_col: str | None = None
    weight_col: str | None = None
    label_col: str | None = None
    label_threshold: float | None = None
    separator: str | None = None
    user_features: tuple[str, ...] = ()
    item_features: tuple[str, ...] = ()
    cold_user_fraction: float = 0.0
    title_col: str | None = None
    tags_col: str | None = None
    unrated_values: tuple[float, ...] = ()
    train_file: str | None = None
    test_file: str | None = None
    test_users: int = 0
    user_table: str | None = None
    item_table: str | None = None
    user_table_key: str | None = None
    item_table_key: str | None = None
    user_table_columns: tuple[str, ...] = ()
    item_table_columns: tuple[str, ...] = ()
    time_format: str | None = None
    time_unit: Literal["s", "ms", "us", "ns"] = "s"
    weight_values: tuple[str, ...] = ()
    column_names: tuple[str, ...] = ()
    min_user_rows: int = 0
    min_item_rows: int = 0
    duplicates: Literal["keep", "first", "last", "error"] = "keep"
    quote_char: str = '"'
    comment_prefix: str = ""
    missing_ratings: Literal["reject", "unrated"] = "reject"

    SECTION: ClassVar[str] = "data"

    @property
    def weights_of_values(self) -> dict[str, float] | None:
        """``weight_values`` as ``{value: weight}`` (None when unset)."""
        if not self.weight_values:
            return None
        pairs = [named_weight(entry) for entry in self.weight_values]
        return {pair[0]: pair[1] for pair in pairs if pair is not None}  # all: _rules

    def _rules(self) -> dict[str, tuple[bool, str]]:
        return {
            "test_fraction": (
                _fraction(self.test_fraction, closed_low=False),
                "in (0, 1)",
            ),
            "validation_fraction": (_fraction(self.validation_fraction), "in [0, 1)"),
            "cold_user_fraction": (_fraction(self.cold_user_fraction), "in [0, 1)"),
            "test_users": (self.test_users >= 0, "0 (every test user) or more"),
            "min_user_rows": (self.min_user_rows >= 0, "0 (no minimum) or more"),
            "min_item_rows": (self.min_item_rows >= 0, "0 (no minimum) or more"),
            "quote_char": (
                len(self.quote_char) <= 1 and self.quote_char not in ("\r", "\n"),
                'one character, or "" for none (quotes are text)',
            ),
            "comment_prefix": (
                len(self.comment_prefix) <= 5
                and (not self.comment_prefix or bool(self.comment_prefix.strip()))
                and not {"\r", "\n"} & set(self.comment_prefix),
                'up to 5 characters that start comment lines (e.g. "#"), or "" for '
                "none",
            ),
            "weight_values": (
                all(_named_weight(e) for e in self.weight_values),
                "value=weight entries (e.g. view=1,purchase=5), each weight a finite "
                "number >= 0",
            ),
        }


@dataclass(frozen=True)
class RetrievalConfig(_Checked):
    """Shape of the two-tower retrieval model and its loss.

    ``query_fields`` / ``candidate_fields`` restrict the side features to these columns
    (the ID fields are always used); empty means every column the data offers.
    ``query_fields`` may also name per-interaction context: ``timestamp``, a per-row
    column of the log, or ``hour_of_day`` / ``day_of_week``
    (:mod:`twostage.features.context`); with context, every test interaction is its
    own evaluation query, and ``examples=users`` sees no context.
    ``field_kinds`` sets how side-feature columns are encoded where the default
    (:mod:`twostage.features.infer`) does not suit: ``("category_id=categorical",
    "price=bucket")``, each kind one of ``FIELD_KIND_CHOICES`` with its default
    options; a column left out by default (URLs...) joins with the kind given.

    ``examples`` is ``interactions`` (one training example per (user, item) row: the
    query sees the user's history without that item and must pick it) or ``users`` (one
    example per user, as in Mult-DAE, Liang et al., WWW 2018: the query sees the user's
    history with ``history_dropout`` of it hidden, and must put every one of the user's
    training items high; with ``in_batch`` negatives the candidates are the items of the
    batch's users, logQ corrected). ``history_dropout`` hides that share of the history
    items from each training query, at random (``interactions`` and ``users``
    examples; ``sequences`` trains each position on every item before it). ``max_positives_per_user`` > 0 draws at
    most that many of a user's training items as the positives of each users-mode
    example (a fresh draw every time), so a user with a very long log neither fills a
    batch's memory nor outweighs everyone else in the loss (YouTube's candidate
    generation model, Covington et al. 2016, also caps examples per user); 0 uses
    them all.

    ``query_encoder`` reads the history as a bag (``pooling``, by
    ``history_pooling``) or in order: ``transformer`` (a causal transformer of
    ``sequence_layers`` blocks of ``sequence_heads`` heads, SASRec style) or ``gru``
    (:mod:`twostage.models.sequence`), with ``sequence_dropout``;
    ``share_item_embeddings`` makes it read the items from the candidate tower's
    item ID table (input and output tied, as SASRec does);
    ``sequence_item_features`` adds each history item's side-feature vectors (genres,
    year...: the candidate tower's tables for them, so the two towers read an item's
    features alike) to its ID vector (no effect without item side features);
    ``sequence_time_gaps`` adds a learned vector for the time since the previous
    history item (buckets of powers of two seconds; a session's items without
    timestamps read "unknown"). ``sequence_ratings`` adds a learned vector for the
    rating the user gave each history item (the training log's rating levels, up
    to 16 buckets; a session entry without a rating adds none; needs
    a ``rating`` column). ``examples`` =
    ``sequences`` trains next-item prediction on every position of each user's last
    ``history_length`` training items at once (one example per user; the query at a
    position sees that item and the earlier ones), the way ordered encoders learn;
    the other example modes also work with them.

    ``negatives`` is ``in_batch`` (the other positives of the batch, plus
    ``num_extra_negatives`` uniform draws, with the logQ correction) or ``full`` (an
    exact softmax over the whole catalogue, for catalogues up to some tens of thousands
    of items); with ``full``, ``mask_seen_negatives`` keeps the user's other training
    items (its history) out of the negatives.

    ``popularity_fallback``: users with at most this many training items get the
    most-popular list instead of the model's, in evaluation and serving; -1 (the
    default) picks it on the validation carve-out (0 without one), which matters on
    sparse logs where most-popular beats the model for the least active users
    (:mod:`twostage.retrieval.fallback`). Users the model does not know have no
    training items, so a threshold of 1 or more covers them as well.
    ``popularity_days`` > 0 ranks that most-popular list by the training log's last
    that many days (older counts break ties) instead of all time: what is popular
    now, which serves new users far better when the test lies after the training
    period (a temporal split).

    ``embedding_backend`` = ``fbgemm`` trains the towers' ID and categorical tables
    with fbgemm's table-batched embedding kernel (the one TorchRec's sharded tables
    run on; the optional ``fbgemm-gpu-cpu`` package), its row-wise Adagrad fused into
    the backward pass, on the CPU and in one process
    (:mod:`twostage.models.fused`). ``torchrec`` shards the same tables by rows over
    the run's ranks with TorchRec (``torchrun``; one rank without it), each rank
    holding and updating its share of every table with the same kernel and update
    (:mod:`twostage.models.sharded`; the optional ``torchrec`` package). The saved run
    holds plain tables either way, so serving never needs fbgemm or TorchRec. Neither
    lets the history share the item table (``share_item_embeddings``).

    ``combine`` joins a tower's field embeddings (and the pooled history): ``sum`` (the
    default) adds them, as factorisation machines and LightFM do, so an item's vector
    is its ID vector plus its features' vectors and a field that does not help can fade
    to zero; ``concat`` passes their concatenation through the head (an MLP or one
    linear layer).

    ``ensemble`` names more query encoders (``pooling``, ``transformer``, ``gru``),
    and two closed-form members with no training loop: ``ease``, EASE's
    item-to-item model fitted on the training rows (ridge ``ease_l2``), which reads
    the query's history as a set (or, with ``ease_recency`` > 0, weighs each
    history item by ``exp(-d / ease_recency)``, ``d`` its distance from the most
    recent one, as the ``ease-recency`` baseline does), and ``transition``, the counts of which item
    followed which in the training users' time-ordered logs (``log(1 + n)``), which
    reads the history's last item; each is factorised to ``ease_rank`` and
    standardised per query (:mod:`twostage.models.linear_items`), refitted with the
    validation rows once training ends (they are served history), and costs an
    items x items matrix (EASE's ``max_items`` bound applies). Each other entry
    trains a whole two-tower
    model of its own, apart, after the
    ``query_encoder`` one, with every other setting of this section; a ``pooling``
    model goes without the settings only an ordered history reads
    (``share_item_embeddings``, ``sequence_item_features``, ``sequence_time_gaps``,
    ``sequence_ratings``).
    Each encoder's first model trains from ``train.seed``; a repeated encoder's next
    ones from ``train.seed`` + 1, + 2... (another draw, not a copy). The run serves
    their weighted mean score, by ``ensemble_weights`` (one per model,
    ``query_encoder``'s first; empty: equal), normalised to sum to 1. It stays one
    dot product: each model's unit query and item vectors, times the square root of
    its weight, are concatenated (:mod:`twostage.models.ensemble`), so the vectors
    have ``output_dim`` per model (``ease_rank`` for ``ease`` and ``transition``),
    unit norm but for those two, and the index, evaluation, export and serving work
    unchanged. Models
    that read the history in different ways err differently: on leave-one-out
    MovieLens-100k the transformer and GRU mixed 0.7 / 0.3 score 10 to 14% above
    either, and the transformer with ``ease`` nearly as much in half the time
    (docs/benchmarks.md).

    ``session_knn_weight`` > 0 adds a term no dot product holds: the
    sequence-aware user neighbourhood (session-kNN, :mod:`twostage.models.session_knn`)
    over every user's latest ``session_knn_length`` training items, with
    ``session_knn_neighbours`` neighbours and the decays ``session_knn_recency``
    (the query's items) and ``session_knn_proximity`` (a neighbour's items around
    the shared one). Each query's session-kNN scores are standardised over the
    catalogue and added, times the weight, to the model's dot products; the query
    is the user's own stored sequence (they are never their own neighbour), or it
    followed by a request's session. Retrieval then scores every item exactly
    (evaluation, serving, the ranker's candidates): an approximate index is not
    searched, and an exported query tower does not hold the term. The table is
    built from the served rows (validation included) and saved with the run.
    Every stored user is a candidate neighbour, so a query's cost grows with the
    users (about 21 ms at 10^6 on 2 cores, docs/scaling.md); ``session_knn_sample``
    > 0 takes as candidates only that many users, those who share one of the
    query's items and were active last (V-SKNN's sample of recent sessions), at a
    cost that no longer grows with the users.
    -1 picks the weight once training ends, as ``popularity_fallback`` does: the one
    of :data:`twostage.retrieval.fallback.SESSION_KNN_GRID` (0 included) whose lists,
    the popularity fallback applied (the best pair when both are picked), score the
    best NDCG@10 on the validation carve-out (which such a run needs); the run saves
    it, and serves and is evaluated with it.
    """

    embedding_dim: int = 64
    output_dim: int = 64
    hidden_dims: tuple[int, ...] = ()
    combine: Literal["concat", "sum"] = "sum"
    use_side_features: bool = True
    query_fields: tuple[str, ...] = ()
    candidate_fields: tuple[str, ...] = ()
    field_kinds: tuple[str, ...] = ()
    history_length: int = 100
    history_pooling: Literal["mean", "attention"] = "mean"
    history_dropout: float = 0.0
    query_encoder: Literal["pooling", "transformer", "gru"] = "pooling"
    sequence_layers: int = 2
    sequence_heads: int = 2
    sequence_dropout: float = 0.2
    share_item_embeddings: bool = False
    sequence_item_features: bool = False
    sequence_time_gaps: bool = False
    sequence_ratings: bool = False
    examples: Literal["interactions", "users", "sequences"] = "interactions"
    max_positives_per_user: int = 0
    temperature: float = 0.3
    learn_temperature: bool = False
    logq_correction: bool = True
    logq_weight: float = 1.0
    num_extra_negatives: int = 0
    negatives: Literal["in_batch", "full"] = "in_batch"
    mask_seen_negatives: bool = True
    rating_weights: bool = False
    id_dropout: float = 0.1
    dropout: float = 0.0
    sparse_embeddings: bool = False
    embedding_backend: Literal["torch", "fbgemm", "torchrec"] = "torch"
    popularity_fallback: int = -1
    popularity_days: float = 0.0
    ensemble: tuple[
        Literal["pooling", "transformer", "gru", "ease", "transition"], ...
    ] = ()
    ensemble_weights: tuple[float, ...] = ()
    ease_l2: float = 500.0
    ease_rank: int = 128
    ease_recency: float = 0.0
    session_knn_weight: float = 0.0
    session_knn_neighbours: int = 50
    session_knn_recency: float = 5.0
    session_knn_proximity: float = 5.0
    session_knn_length: int = 200
    session_knn_sample: int = 0

    SECTION: ClassVar[str] = "retrieval"

    @property
    def served_dim(self) -> int:
        """Width of the run's query and item vectors: ``output_dim`` per trained
        model, ``ease_rank`` per closed-form member (``ease``, ``transition``)."""
        closed = sum(self.ensemble.count(k) for k in CLOSED_FORM_MEMBERS)
        return (
            self.output_dim * (1 + len(self.ensemble) - closed)
            + self.ease_rank * closed
        )

    def _reads_order(self) -> bool:
        """Whether the model reads the history in order (and needs one)."""
        encoders = (self.query_encoder, *self.ensemble)
        return self.examples == "sequences" or any(
            e in ("transformer", "gru") for e in encoders
        )

    def _rules(self) -> dict[str, tuple[bool, str]]:
        return {
            "field_kinds": (
                all(
                    e.partition("=")[0].strip()
                    and e.partition("=")[2].strip() in FIELD_KIND_CHOICES
                    for e in self.field_kinds
                ),
                f"column=kind entries, each kind one of {list(FIELD_KIND_CHOICES)}",
            ),
            "embedding_dim": (self.embedding_dim >= 1, "a positive integer"),
            "output_dim": (self.output_dim >= 1, "a positive integer"),
            "hidden_dims": (all(h >= 1 for h in self.hidden_dims), "positive widths"),
            "history_length": (
                self.history_length >= 1
                or (self.history_length == 0 and not self._reads_order()),
                "0 (no history) or more; at least 1 with a transformer or GRU "
                "query encoder or `examples=sequences`, which read the history",
            ),
            "history_dropout": (_fraction(self.history_dropout), "in [0, 1)"),
            "sequence_layers": (self.sequence_layers >= 1, "a positive integer"),
            "sequence_heads": (
                self.sequence_heads >= 1
                and self.embedding_dim % self.sequence_heads == 0,
                f"a positive divisor of `retrieval.embedding_dim` "
                f"({self.embedding_dim})",
            ),
            "sequence_dropout": (_fraction(self.sequence_dropout), "in [0, 1)"),
            "max_positives_per_user": (
                self.max_positives_per_user >= 0,
                "0 (no cap) or positive",
            ),
            "temperature": (self.temperature > 0, "positive"),
            "logq_weight": (self.logq_weight >= 0, "non-negative"),
            "num_extra_negatives": (self.num_extra_negatives >= 0, "non-negative"),
            "id_dropout": (_fraction(self.id_dropout), "in [0, 1)"),
            "dropout": (_fraction(self.dropout), "in [0, 1)"),
            "popularity_fallback": (
                self.popularity_fallback >= -1,
                "-1 (picked on validation), 0 (never) or positive",
            ),
            "popularity_days": (
                self.popularity_days >= 0,
                "0 (all-time popularity) or a positive number of days",
            ),
            "ensemble": (
                all(self.ensemble.count(k) <= 1 for k in CLOSED_FORM_MEMBERS),
                "query encoders (`pooling`, `transformer`, `gru`), at most one "
                "`ease` and at most one `transition`",
            ),
            "ease_l2": (self.ease_l2 > 0, "positive"),
            "ease_rank": (self.ease_rank >= 1, "a positive integer"),
            "ease_recency": (self.ease_recency >= 0, ">= 0"),
            "session_knn_weight": (
                self.session_knn_weight == -1 or self.session_knn_weight >= 0,
                "-1 (picked on validation), 0 (no session-kNN term) or positive",
            ),
            "session_knn_neighbours": (
                self.session_knn_neighbours >= 1,
                "a positive integer",
            ),
            "session_knn_recency": (self.session_knn_recency > 0, "positive"),
            "session_knn_proximity": (self.session_knn_proximity > 0, "positive"),
            "session_knn_length": (self.session_knn_length >= 1, "a positive integer"),
            "session_knn_sample": (
                self.session_knn_sample >= 0,
                "0 (every stored user) or a positive integer",
            ),
            "ensemble_weights": (
                all(w > 0 for w in self.ensemble_weights)
                and len(self.ensemble_weights) in (0, 1 + len(self.ensemble)),
                f"empty (equal weights) or {1 + len(self.ensemble)} positive "
                "numbers: one for `retrieval.query_encoder`, then one per "
                "`retrieval.ensemble` entry",
            ),
        }


@dataclass(frozen=True)
class TrainConfig(_Checked):
    """The optimisation loop.

    ``max_steps`` > 0 stops after that many optimiser steps in all (smoke runs and
    throughput benchmarks). ``device`` is ``auto`` (CUDA when present), ``cpu`` or
    ``cuda[:n]``; ``num_threads`` > 0 sets torch's CPU threads. ``precision=bf16``
    runs the forward pass under ``torch.autocast`` in bfloat16 (weights, optimiser
    state and the loss's softmax stay float32): the GPU setting; on CPUs without
    bf16 units it is slower. ``checkpoint_steps`` > 0 also writes the checkpoint
    every that many steps within an epoch (where the run has a checkpoint
    directory), so a crash loses at most that many steps of a long epoch;
    ``checkpoint_minutes`` > 0 writes it when that many minutes have passed since
    the last one (any rank's clock, under torchrun). A stop request (SIGTERM, the
    first Ctrl-C) writes one after the step in progress whatever they are, and
    ``--resume`` continues from any of them exactly. ``warm_start`` names a saved
    model (a bundle, a model's directory of versions or a run directory) whose
    weights the new model starts from, where they mean the same thing: each ID
    both vocabularies hold keeps its saved vectors, new IDs start fresh
    (:mod:`twostage.training.warm`); the architecture must be the saved one's.
    """

    epochs: int = 10
    batch_size: int = 512
    learning_rate: float = 0.005
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "adagrad"] = "adam"
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 50
    grad_clip: float = 1.0
    early_stopping_patience: int = 3
    eval_k: int = 100
    max_steps: int = 0
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    checkpoint_steps: int = 0
    checkpoint_minutes: float = 0.0
    warm_start: str | None = None

    SECTION: ClassVar[str] = "train"

    def _rules(self) -> dict[str, tuple[bool, str]]:
        return {
            "epochs": (self.epochs >= 1, "a positive integer"),
            "batch_size": (self.batch_size >= 1, "a positive integer"),
            "learning_rate": (self.learning_rate > 0, "positive"),
            "weight_decay": (self.weight_decay >= 0, "non-negative"),
            "warmup_steps": (self.warmup_steps >= 0, "non-negative"),
            "grad_clip": (self.grad_clip >= 0, "0 (no clipping) or positive"),
            "early_stopping_patience": (
                self.early_stopping_patience >= 0,
                "0 (never stop early) or positive",
            ),
            "eval_k": (self.eval_k >= 1, "a positive integer"),
            "max_steps": (self.max_steps >= 0, "0 (no limit) or positive"),
            "seed": (self.seed >= 0, "a non-negative integer"),
            "num_threads": (self.num_threads >= 0, "0 (torch's default) or positive"),
            "checkpoint_steps": (
                self.checkpoint_steps >= 0,
                "0 (a checkpoint at each epoch's end only) or positive",
            ),
            "checkpoint_minutes": (
                self.checkpoint_minutes >= 0 and math.isfinite(self.checkpoint_minutes),
                "0 (no clock) or a positive number of minutes",
            ),
        }


@dataclass(frozen=True)
class IndexConfig(_Checked):
    """The nearest-neighbour index the Recommender retrieves with.

    ``exact`` (chunked matrix product + top-k) is right for catalogues up to a few
    hundred thousand items; ``hnsw`` and ``ivf`` are faiss backends for millions,
    ``ivf_sq`` is ``ivf`` with 8-bit codes (a quarter of the memory) for tens of
    millions,
    ``scann`` needs the optional ``scann`` package. Zero means "pick from the catalogue
    size" for ``ivf_nlist`` and the measured default for the other numbers.
    """

    kind: Literal["exact", "hnsw", "ivf", "ivf_sq", "scann"] = "exact"
    hnsw_m: int = 32
    ef_construction: int = 0
    ef_search: int = 0
    ivf_nlist: int = 0
    nprobe: int = 0
    chunk_size: int = 65536
    device: str = "cpu"

    SECTION: ClassVar[str] = "index"

    def _rules(self) -> dict[str, tuple[bool, str]]:
        return {
            "hnsw_m": (self.hnsw_m >= 2, "an integer >= 2"),
            "ef_construction": (self.ef_construction >= 0, "0 (measured) or positive"),
            "ef_search": (self.ef_search >= 0, "0 (measured) or positive"),
            "ivf_nlist": (self.ivf_nlist >= 0, "0 (from the catalogue) or positive"),
            "nprobe": (self.nprobe >= 0, "0 (measured) or positive"),
            "chunk_size": (self.chunk_size >= 1, "a positive integer"),
        }


@dataclass(frozen=True)
class RankingConfig(_Checked):
    """Shape of the ranker, its objectives and its optimisation (saved with it).

    The ranker trains with the same loop as retrieval (AdamW, constant learning rate);
    the seed, device and threads are ``train``'s, its validation rows the ``data``
    section's carve-out.

    Attributes:
        embedding_dim: width of every field vector.
        architecture: ``dcn`` (cross network and MLP) or ``mlp`` (MLP only).
        cross_layers: DCN-v2 cross layers; ``structure``: beside (``parallel``) or
            before (``stacked``) the MLP of ``hidden_dims``, with ``dropout``.
        cross_rank: 0 for full-rank cross layers, else the rank ``r`` of low-rank
            ones (``W = U V``, ``2 r / width`` of the cost).
        use_history: pool the user's recent items (SVD++-like implicit feedback).
        use_biases: global mean, user/item biases and the factorisation term.
        use_retrieval_features: feed the retrieval score and both tower embeddings.
        use_context: when retrieval reads per-interaction context
            (``retrieval.query_fields``), train and score the ranker with each
            row's own context too (the request's, when serving) rather than with
            the context unknown; its retrieval embedding and score are then the
            contextual ones (a streamed log's too; the exported ranker then
            takes the context fields as inputs).
        rating_weight: weight of the rating MSE; ``click_weight``: of the click BCE.
        listwise_weight: weight of a softmax cross-entropy of each positive against
            its sampled negatives (0: none), added to the click BCE: it trains the
            click logits to order a user's candidates, as the served list does,
            where the BCE scores each pair on its own.
        num_hard_negatives: click negatives per positive drawn from the user's
            ``hard_negative_pool`` best unseen retrieval items; ``num_random_negatives``
            drawn uniformly; ``num_shown_negatives`` drawn from the items the user
            was shown and did not choose in the training rows of an impression log
            (``data.label_col``; none without one, or for a user never shown one).
        num_candidates: items retrieval passes to the ranker per user, in evaluation
            and when serving (``Recommender.recommend``'s default). On
            MovieLens-100k, 100 gave every user the same top 10 as 200, at a lower
            serving cost; 50 changed 11 users' lists.
        blend_weight: weight of the retrieval logit in the re-ranking order; None picks
            it per run from :data:`twostage.ranking.rerank.BLEND_GRID` on validation,
            by the NDCG@10 of the lists evaluation reports (a validation user the
            model never trained on scored from its features; set it when ``click_weight`` is 0: the click head is then untrained). The
            default 0.5 was the best on the MovieLens-100k validation carve-out;
            per-run picks swing between 0.25 and 2 with the seed, as 5% of the data is
            a noisy judge.
        ease_weight: weight of an EASE score in the re-ranking order (0: none). EASE
            (:class:`twostage.baselines.EASE`, ridge ``ease_l2``) is fitted in closed
            form on the ranker's rows, factorised to rank ``ease_rank``, and each
            candidate gets the user's standardised EASE score (over the catalogue,
            from all of the user's seen items): the item-to-item signal the towers
            miss. Catalogues above 50,000 items are refused before training.
        epochs, batch_size, learning_rate, weight_decay, grad_clip,
        early_stopping_patience: the training loop's settings for the ranker
            (patience counts epochs without a better validation RMSE, or click AUC
            without ratings; the best epoch's weights are kept).
        max_steps: > 0 stops the ranker after that many optimiser steps in all, as
            ``train.max_steps`` stops the towers (on a log of 10^8 rows one epoch
            of the ranker is hours on a few CPU cores; the last, partial epoch is
            validated and counts like the others).
        sparse_embeddings: the ranker's ID-keyed tables (fields, history, biases)
            take sparse gradients and a row-wise Adam step, so a step touches only
            the batch's rows; dense AdamW updates every row of every table on every
            step, which dominates at millions of users (docs/scaling.md). Weight
            decay does not reach those tables then.

    ``architecture="mlp"`` with ``use_history``, ``use_biases``,
    ``use_retrieval_features`` off and ``click_weight=0`` is the TFRS basic ranking
    model.
    """

    embedding_dim: int = 32
    architecture: Literal["dcn", "mlp"] = "dcn"
    cross_layers: int = 2
    cross_rank: int = 0
    structure: Literal["parallel", "stacked"] = "parallel"
    hidden_dims: tuple[int, ...] = (256, 64)
    dropout: float = 0.2
    use_history: bool = True
    use_biases: bool = True
    use_retrieval_features: bool = True
    use_context: bool = True
    rating_weight: float = 1.0
    click_weight: float = 0.5
    listwise_weight: float = 0.0
    num_hard_negatives: int = 2
    num_random_negatives: int = 2
    num_shown_negatives: int = 4
    hard_negative_pool: int = 500
    num_candidates: int = 100
    blend_weight: float | None = 0.5
    ease_weight: float = 0.0
    ease_l2: float = 500.0
    ease_rank: int = 128
    epochs: int = 30
    batch_size: int = 1024
    learning_rate: float = 0.003
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    early_stopping_patience: int = 3
    max_steps: int = 0
    sparse_embeddings: bool = False

    SECTION: ClassVar[str] = "ranking"

    def _rules(self) -> dict[str, tuple[bool, str]]:
        return {
            "architecture": (self.architecture in ("dcn", "mlp"), "dcn or mlp"),
            "structure": (
                self.structure in ("parallel", "stacked"),
                "parallel or stacked",
            ),
            "embedding_dim": (self.embedding_dim >= 1, "a positive integer"),
            "cross_layers": (self.cross_layers >= 0, "a non-negative integer"),
            "cross_rank": (self.cross_rank >= 0, "a non-negative integer"),
            "hidden_dims": (all(h >= 1 for h in self.hidden_dims), "positive widths"),
            "dropout": (_fraction(self.dropout), "in [0, 1)"),
            "rating_weight": (self.rating_weight >= 0, "non-negative"),
            "click_weight": (self.click_weight >= 0, "non-negative"),
            "listwise_weight": (self.listwise_weight >= 0, "non-negative"),
            "num_hard_negatives": (self.num_hard_negatives >= 0, "non-negative"),
            "num_random_negatives": (self.num_random_negatives >= 0, "non-negative"),
            "num_shown_negatives": (self.num_shown_negatives >= 0, "non-negative"),
            "hard_negative_pool": (self.hard_negative_pool >= 1, "positive"),
            "num_candidates": (self.num_candidates >= max(KS), f">= {max(KS)}"),
            "ease_weight": (self.ease_weight >= 0, "0 (no EASE term) or positive"),
            "ease_l2": (self.ease_l2 > 0, "positive"),
            "ease_rank": (self.ease_rank >= 1, "a positive integer"),
            "epochs": (self.epochs >= 1, "a positive integer"),
            "batch_size": (self.batch_size >= 1, "a positive integer"),
            "learning_rate": (self.learning_rate > 0, "positive"),
            "weight_decay": (self.weight_decay >= 0, "non-negative"),
            "grad_clip": (self.grad_clip >= 0, "0 (no clipping) or positive"),
            "early_stopping_patience": (
                self.early_stopping_patience >= 0,
                "0 (never stop early) or positive",
            ),
            "max_steps": (self.max_steps >= 0, "0 (no limit) or positive"),
        }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rating_weight + self.click_weight + self.listwise_weight == 0:
            raise ConfigError(
                "`ranking.rating_weight`, `ranking.click_weight` and "
                "`ranking.listwise_weight` should not all be 0: nothing would be "
                "learned. Received: 0, 0 and 0."
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RankingConfig:
        """Strict: unknown keys and wrong types are :class:`ConfigError`."""
        from twostage.config.io import from_dict

        return from_dict(cls, values)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a training run needs; saved with the model."""

    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
