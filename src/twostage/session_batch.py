"""Lists for many sessions at once: a table of session rows in, a row per session
and rank out (offline scoring of a day's visits, a cache to fill), with every row
the model could not read counted and reported with its reason. The next-item
figures of such sessions are :mod:`twostage.session_evaluation`'s."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch

from twostage.data.dataset import ITEM, RATING, TIME, USER
from twostage.data.frames import FRAME_KINDS, as_polars
from twostage.data.user_items import UserItems
from twostage.diversity import ListRules
from twostage.errors import ConfigError
from twostage.inputs import check_k, exclusions_by_key, session_indices
from twostage.models.fields import HISTORY, HISTORY_RATINGS, HISTORY_TIMES
from twostage.ranking.rerank import rerank
from twostage.retrieval.tensors import context_keys, session_history

if TYPE_CHECKING:
    from twostage.recommender import Recommender

__all__ = [
    "SESSION",
    "SessionLists",
    "SessionTableError",
    "recommend_sessions",
]

#: The column that groups a sessions table's rows into sessions.
SESSION = "session_id"
#: The columns a sessions table may have: each row one item of one session.
_COLUMNS = (SESSION, ITEM, TIME, RATING, USER)


class SessionTableError(ConfigError):
    """A sessions table that cannot be read as a whole (a missing column, one of
    the wrong type, ratings for a model that reads none...): the table's mistake,
    where a bad ``k`` or filter is the request's."""


@dataclass
class SessionLists:
    """What :func:`recommend_sessions` answers.

    Attributes:
        lists: a row per session and rank: ``session_id``, ``rank`` (1 is the
            best), ``item_id``, ``score`` (the key the list is ordered by),
            ``retrieval_score`` and ``path`` (``session``; ``personalised`` for a
            session of a known user; ``popularity`` for one with no row read).
        unread: the rows not read, one each: ``row`` (1-based, in the table's
            order), ``session_id``, ``item_id`` and ``reason``. An item added to
            the catalogue after training is here too: it counts as seen, but the
            model has learned nothing of it to read.
        table_order: the sessions read in the table's order although some of
            their rows have a timestamp: others have none (a session is read in
            time order only where every row read has one).
    """

    lists: pl.DataFrame
    unread: pl.DataFrame
    table_order: list[Any] = field(default_factory=list)

    @property
    def num_sessions(self) -> int:
        """How many sessions were answered (one list each)."""
        return int(self.lists[SESSION].n_unique()) if self.lists.height else 0


def recommend_sessions(
    rec: Recommender,
    sessions: Any,
    k: int = 10,
    *,
    exclude_seen: bool = True,
    use_ranker: bool = True,
    filters: dict[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    session_contexts: Mapping[Any, Mapping[str, Any]] | None = None,
    rules: ListRules | None = None,
    num_candidates: int | None = None,
    exclude: Mapping[Any, Sequence[Any]] | None = None,
) -> SessionLists:
    """A list for every session of ``sessions``, as :meth:`Recommender.recommend`
    answers one ``session`` each.

    Args:
        rec: the model.
        sessions: a row per session item: ``session_id`` and ``item_id``, and
            optionally ``timestamp`` (seconds; a session whose rows all have one is
            read in time order, else in the table's), ``rating`` (for a model
            trained with ``retrieval.sequence_ratings``) and ``user_id`` (one per
            session: its items follow that user's history). Sessions are answered
            in the order they first appear.
        k, exclude_seen, use_ranker, filters: as :meth:`Recommender.recommend`.
            The sessions are answered :data:`BATCH_SESSIONS` at a time
            (:func:`_batched_lists`; filters applied, and each session's context);
            one that reads an item added after training, or whose query is not
            finite, alone.
        context: one moment for every list (``{"timestamp": ...}``), for a
            model that reads per-request context, as :meth:`Recommender.recommend`
            takes it (without it, such a model reads the context as unknown).
        session_contexts: ``{session_id: context}``, a session's own moment in
            place of ``context`` (:func:`~twostage.session_evaluation.evaluate_sessions`
            gives each the time of its held-out row).
        rules: ``diversity`` and ``max_per``, as :meth:`Recommender.recommend`
            takes them (:meth:`Recommender.list_rules`).
        num_candidates: as :meth:`Recommender.recommend` takes it.
        exclude: ``{session_id: item IDs}``, each session's items to leave out
            of its list (shown on its earlier pages), matched as text; a
            session the table lacks is refused by name.

    Returns:
        The lists, and the rows not read with their reasons (an unknown item, a
        row without a session or item, a rating that is not a number or lies
        outside the training ratings); a session whose rows were all unread is
        answered as a session without items is.

    Raises:
        SessionTableError: the table misses a column, has one it does not read,
            a column of the wrong type, ratings for a model that reads none, or
            a session of two users; or the model reads no history.
        ConfigError: ``k`` or ``filters`` is not one ``recommend`` takes.
    """
    k = check_k("k", k)  # named before any list, an empty table's too
    width = rec.candidate_width(num_candidates, k)
    # A mistake in one is named here too (a model that reads none refuses it).
    shared = rec.encode_context(context) if context else {}
    moments = {
        session: rec.encode_context(moment) if moment else {}
        for session, moment in (session_contexts or {}).items()
    }
    sessions = sessions_table(rec, sessions)
    rows = sessions.to_dicts()
    owners = session_users(rows) if USER in sessions.columns else {}
    entries, numbers, unread = readable_rows(rec, rows)
    lists: list[tuple[Any, int, Any, float, float, str]] = []
    vocab = rec.item_vocab
    answerable = [s for s, rows in entries.items() if rows]
    # each session's user_idx (0: none, or unknown)
    users = {s: rec.user_vocab.lookup(u) for s, u in owners.items()}
    ranker = rec.ranker if use_ranker else None
    encoded = None
    if context_keys(rec.run.spec):
        encoded = {s: moments.get(s, shared) for s in answerable}
    order = list(entries)
    asked, indices = exclusions_by_key(
        order, exclude, vocab, noun="session", field="sessions"
    )
    left_out = dict(zip(order, indices, strict=True))
    named = dict(zip(order, asked, strict=True))
    batched = _batched_lists(
        rec,
        answerable,
        entries,
        users,
        k,
        exclude_seen,
        ranker,
        filters,
        encoded,
        rules,
        width,
        left_out=left_out,
    )
    for session, readable in entries.items():
        if session in batched:  # what recommend() answers it, in batches
            items, keys, scores = batched[session]
            path = "personalised" if users.get(session) else "session"
            lists.extend(
                (session, rank, item, key, score, path)
                for rank, (item, key, score) in enumerate(
                    zip(items, keys, scores, strict=True), 1
                )
            )
            continue
        answer = rec.recommend(
            owners.get(session),
            k,
            session=readable or None,
            exclude_seen=exclude_seen,
            use_ranker=use_ranker,
            filters=filters,
            context=(session_contexts or {}).get(session, context),
            diversity=rules.diversity if rules else 0.0,
            max_per=rules.max_per if rules else None,
            diversity_by=rules.diversity_by if rules else None,
            num_candidates=width,
            exclude=named[session],
        )
        # items added after training: seen, but the model learned nothing of them
        added = {vocab.lookup(item) for item in answer.unread_session_items}
        for number, entry in zip(numbers[session], readable, strict=True):
            if added and vocab.lookup(entry[ITEM]) in added:
                unread.append(
                    (
                        number,
                        session,
                        entry[ITEM],
                        "added after training: seen, not read",
                    )
                )
        for rank, found in enumerate(answer.items, 1):
            key = found.get("rank_score", found["score"])
            lists.append((session, rank, found[ITEM], key, found["score"], answer.path))
    unread.sort(key=lambda entry: entry[0])
    given = {c: sessions[c].dtype for c in (SESSION, ITEM)}
    model_items = vocab.values.dtype  # the IDs as the model has them
    return SessionLists(
        lists=_table(
            lists,
            {
                SESSION: given[SESSION],
                "rank": pl.Int32(),
                ITEM: model_items,
                "score": pl.Float32(),
                "retrieval_score": pl.Float32(),
                "path": pl.String(),
            },
        ),
        unread=_table(
            unread,
            {"row": pl.Int64(), **given, "reason": pl.String()},
        ),
        table_order=[
            session
            for session, readable in entries.items()
            if 0 < sum(TIME in entry for entry in readable) < len(readable)
        ],
    )


#: How many sessions share one query pass and one index search.
BATCH_SESSIONS = 512


def _batched_lists(
    rec: Recommender,
    sessions: list[Any],
    entries: dict[Any, list[dict[str, Any]]],
    users: dict[Any, int],
    k: int,
    exclude_seen: bool,
    ranker: Any = None,
    filters: dict[str, Any] | None = None,
    contexts: dict[Any, dict[str, torch.Tensor]] | None = None,
    rules: ListRules | None = None,
    width: int | None = None,
    deepest: int | None = None,
    left_out: Mapping[Any, np.ndarray | None] | None = None,
) -> dict[Any, tuple[list[Any], list[float], list[float]]]:
    """``{session: (item IDs, keys, retrieval scores)}``: the lists
    :meth:`Recommender.recommend` gives these sessions (of the users
    ``users`` names by ``user_idx``, after their stored history; anonymous
    where it names none), up to float
    rounding in the scores, :data:`BATCH_SESSIONS` at a time: one query pass,
    one index search (or one exact scoring with the session-kNN term) and, with
    a ``ranker``, one ranker call and re-rank (the keys: its order's; else the
    retrieval scores); with ``filters``, of the items that pass (an exact
    index of them, as ``recommend`` searches them); with ``contexts``
    (``{session: encoded context}``, :meth:`Recommender.encode_context`; ``{}``:
    unknown), a model that reads per-request context reads each session's; under
    ``rules``, each list picked as ``recommend`` picks one (a list ``max_per``
    left short picked again from a wider pool, up to ``deepest``);
    ``left_out``: per session, items to leave out beside the seen ones. A
    session that reads an item added after training, or whose query is not
    finite, is left out: ``recommend`` answers (or refuses) it."""
    search = rec.batch_index(filters)  # a bad filter: named before any list
    tensors = rec.run.tensors
    context_fields = {key for moment in (contexts or {}).values() for key in moment}
    length = int(tensors.history.shape[1])
    bounds = tensors.rating_range.tolist()
    read = {}
    for session in sessions:
        got = session_indices(
            entries[session],
            rec.item_vocab,
            history_length=length,
            rating_range=(bounds[0], bounds[1]) if bounds else None,
        )
        if got is not None and not bool((got[0] >= rec.num_trained_items).any()):
            read[session] = got
    width = width or max(rec.num_candidates, k)
    deepest = deepest or rec.deepest_width(width)
    deepen = rules is not None and bool(rules.max_per) and width < deepest
    short: list[Any] = []  # lists the limits left short of a full pool
    found: dict[Any, tuple[list[Any], list[float], list[float]]] = {}
    names = list(read)
    for start in range(0, len(names), BATCH_SESSIONS):
        part = names[start : start + BATCH_SESSIONS]
        who = torch.tensor([users.get(s, 0) for s in part], dtype=torch.long)
        moments = None if contexts is None else [contexts.get(s, {}) for s in part]
        queries, fields = _session_queries(
            rec, [read[s] for s in part], who, length, moments
        )
        if ranker is not None and not ranker.reads_context:
            # A ranker that trained without the request's context reads it as
            # unknown (left out), as `recommend` gives it.
            fields = {f: v for f, v in fields.items() if f not in context_fields}
        finite = torch.isfinite(queries).all(dim=1)
        items = [read[s][0] for s in part]
        # what a known user trained on, with the session: seen, and EASE's basket
        baskets = [
            np.union1d(rec.seen_items(int(u)) if u > 0 else [], i.numpy()).astype(
                np.int64
            )
            for u, i in zip(who, items, strict=True)
        ]
        seen = [b if exclude_seen else None for b in baskets]
        if left_out is not None:  # the session's exclusions, seen or not
            seen = [
                own
                if (extra := left_out.get(s)) is None
                else np.union1d(own if own is not None else [], extra).astype(np.int64)
                for own, s in zip(seen, part, strict=True)
            ]
        if search is None:  # no item passes the filters: empty lists
            top_idx = torch.full((len(part), 1), -1, dtype=torch.long)
            top_scores = torch.full((len(part), 1), -torch.inf)
        elif rec.run.scores_exactly:
            top_scores, top_idx = _exact_search(
                rec, queries, who, items, seen, width, filters
            )
        else:
            top_scores, top_idx = search.search(queries, width, exclude=seen)
        order, keys = _reranked(
            rec, ranker, fields, queries, who, baskets, top_scores, top_idx
        )
        order, keys = rec.picked(order, keys, top_idx, k, rules or ListRules())
        chosen = top_idx.gather(1, order)
        plain = top_scores.gather(1, order)
        # rows run short where the catalogue does, or the rules' limits
        kept = (chosen >= 0) & torch.isfinite(keys)
        full = (top_idx >= 0).all(dim=1)
        flat = chosen.clamp_min(0).numpy().ravel()
        ids = rec.item_vocab.inverse_transform(flat).to_list()
        for row, session in enumerate(part):
            if bool(finite[row]):
                n = int(kept[row].sum())  # the kept slots lead each row
                if deepen and n < k and bool(full[row]):
                    short.append(session)
                at = row * chosen.shape[1]
                found[session] = (
                    ids[at : at + n],
                    keys[row, :n].tolist(),
                    plain[row, :n].tolist(),
                )
    if short:
        found.update(
            _batched_lists(
                rec,
                short,
                entries,
                users,
                k,
                exclude_seen,
                ranker,
                filters,
                contexts,
                rules,
                min(4 * width, deepest),
                deepest,
                left_out,
            )
        )
    return found


def _reranked(
    rec: Recommender,
    ranker: Any,
    fields: dict[str, torch.Tensor],
    queries: torch.Tensor,
    users: torch.Tensor,
    baskets: list[np.ndarray],
    top_scores: torch.Tensor,
    top_idx: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, W], [B, W])`` each row's order of its candidates and their keys: the
    ranker's re-rank of them (click logit, a share of the retrieval logit and
    the EASE term over each row's ``baskets``: the session's items, with a known
    user's), as ``recommend`` orders one session's; retrieval's own order
    without a ranker."""
    valid = top_idx >= 0
    if ranker is None:
        return torch.arange(top_idx.shape[1]).expand_as(top_idx), top_scores
    candidates = top_idx.clamp_min(0)
    out = ranker.score_users(fields, queries, candidates)
    ease = None
    if ranker.ease is not None:
        rows = UserItems.from_pairs(
            np.repeat(np.arange(len(baskets)), [len(b) for b in baskets]),
            np.concatenate(baskets),
            num_rows=len(baskets),
        )
        ease = ranker.ease_scores(users, candidates, rows=rows)
    logits = top_scores.masked_fill(~valid, 0.0) / float(rec.run.model.temperature)
    return rerank(
        out["click"],
        logits,
        blend_weight=ranker.blend_weight,
        valid=valid,
        ease=ease,
        ease_weight=ranker.config.ease_weight,
    )


def _exact_search(
    rec: Recommender,
    queries: torch.Tensor,
    users: torch.Tensor,
    sessions: list[torch.Tensor],
    seen: list[np.ndarray | None],
    width: int,
    filters: dict[str, Any] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, W], [B, W])`` :meth:`Recommender.exact_search` of sessions: the
    term reads each session's items (right-aligned, most recent last) after
    its user's stored ones."""
    return rec.exact_search(
        queries,
        users,
        width,
        exclude=seen,
        sessions=right_aligned(sessions),
        filters=filters,
    )


def right_aligned(sequences: list[torch.Tensor]) -> torch.Tensor:
    """``[B, L]`` item sequences right-aligned (most recent last), 0-padded to
    the longest of them (at least one column)."""
    longest = max((len(items) for items in sequences), default=0)
    padded = torch.zeros(len(sequences), max(longest, 1), dtype=torch.long)
    for row, items in enumerate(sequences):
        padded[row, padded.shape[1] - len(items) :] = items
    return padded


def _session_queries(
    rec: Recommender,
    sessions: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    users: torch.Tensor,
    length: int,
    contexts: list[dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``[B, D]`` the queries of sessions (``[S]`` item indices, times and
    ratings each, oldest first) of ``users`` (``[B]`` user_idx, 0: anonymous),
    as ``recommend`` builds one, and the encoded fields they came from (what the
    ranker reads): the user's fields and the last ``length`` items of their
    stored history then the session, right-aligned. ``contexts``: each
    session's encoded context (``{}``: unknown), which the queries read (and
    the fields hold)."""
    tensors = rec.run.tensors
    batch = len(sessions)
    features = {key: value[users] for key, value in tensors.user_features.items()}
    for key in {key for moment in contexts or [] for key in moment}:
        features[key] = torch.cat(
            [
                moment[key] if key in moment else features[key][row : row + 1]
                for row, moment in enumerate(contexts or [])
            ]
        )
    history = torch.zeros(batch, length, dtype=torch.long)
    times = torch.zeros(batch, length, dtype=torch.long)
    ratings = torch.zeros(batch, length, dtype=torch.long)
    for row, session in enumerate(sessions):
        items, stamps, buckets = session_history(tensors, int(users[row]), session)
        recent = items[-length:]
        history[row, length - len(recent) :] = recent
        # (a known user's stored times and ratings lead only where kept)
        if tensors.history_times.numel():
            times[row, length - len(recent) :] = stamps[-length:]
        if tensors.history_ratings.numel():
            ratings[row, length - len(recent) :] = buckets[-length:]
    features[HISTORY] = history
    if tensors.history_times.numel():
        features[HISTORY_TIMES] = times
    if tensors.history_ratings.numel():
        features[HISTORY_RATINGS] = ratings
    with torch.no_grad():
        return rec.run.model.encode_queries(features), features


def sessions_table(rec: Recommender, given: Any) -> pl.DataFrame:
    """``given`` as a polars frame (any table
    :func:`~twostage.data.frames.as_polars` reads), or refused if it cannot be
    read as a whole: one that is not a table, misses ``session_id`` or
    ``item_id``, has a column nothing reads or of the wrong type, or ratings
    for a model that reads none."""
    sessions = as_polars(given, columns=False)
    if sessions is None:
        raise SessionTableError(
            f"`sessions` should be {FRAME_KINDS} with a row per session item. "
            f"Received a {type(given).__name__}."
        )
    columns = sessions.columns
    missing = [c for c in (SESSION, ITEM) if c not in columns]
    extra = [c for c in columns if c not in _COLUMNS]
    if missing or extra:
        raise SessionTableError(
            f"the sessions table should have the columns {SESSION!r} and {ITEM!r}, "
            f"and may have {TIME!r}, {RATING!r} and {USER!r}"
            + (f"; it lacks {missing}" if missing else "")
            + (f"; it has {extra}, which nothing reads" if extra else "")
            + f". Received columns: {columns}."
        )
    for column in (SESSION, ITEM, USER):
        dtype = sessions[column].dtype if column in columns else pl.Null
        if not (dtype.is_integer() or dtype in (pl.String, pl.Null)):
            raise SessionTableError(
                f"the sessions table's {column!r} column should hold IDs: integers "
                f"or text. Received a {dtype} column."
            )
    if TIME in columns and sessions[TIME].dtype.is_temporal():
        # A Date or Datetime column (Parquet, pandas): its seconds since 1970,
        # naive times as UTC, as the log's times are read.
        stamp = sessions[TIME]
        if stamp.dtype == pl.Date:
            stamp = stamp.cast(pl.Datetime("ms"))
        if stamp.dtype == pl.Time or isinstance(stamp.dtype, pl.Duration):
            raise SessionTableError(
                f"the sessions table's {TIME!r} column should hold moments "
                f"(seconds since 1970, dates or date-times). Received a "
                f"{stamp.dtype} column."
            )
        sessions = sessions.with_columns(stamp.dt.epoch("s").alias(TIME))
    for column in (TIME, RATING):
        if column in columns and not (
            sessions[column].dtype.is_numeric() or sessions[column].dtype == pl.Null
        ):
            raise SessionTableError(
                f"the sessions table's {column!r} column should hold numbers. "
                f"Received a {sessions[column].dtype} column."
            )
    if not rec.run.tensors.history.shape[1]:
        raise SessionTableError(
            "this model reads no history (`retrieval.history_length` = 0), so a "
            "session says nothing to it; train one with a history to answer "
            "sessions."
        )
    if RATING in columns and not rec.run.tensors.reads_ratings:
        raise SessionTableError(
            f"the sessions table has a {RATING!r} column, which this model does not "
            "read (it was trained without `retrieval.sequence_ratings`); drop it."
        )
    return sessions


def readable_rows(
    rec: Recommender, rows: list[dict[str, Any]]
) -> tuple[dict[Any, list[dict[str, Any]]], dict[Any, list[int]], list[Any]]:
    """(each session's entries as ``recommend`` takes them, the rows they came
    from (1-based), the rows not read as ``(row, session_id, item_id, reason)``),
    sessions in the order they first appear."""
    bounds = rec.run.tensors.rating_range.tolist()
    entries: dict[Any, list[dict[str, Any]]] = {}
    numbers: dict[Any, list[int]] = {}  # each session's rows read, in order
    unread: list[tuple[int, Any, Any, str]] = []
    for number, row in enumerate(rows, 1):
        reason = _unread_reason(rec, row, bounds)
        session, item = row[SESSION], row[ITEM]
        if session is not None:
            entries.setdefault(session, [])
            numbers.setdefault(session, [])
        if reason is not None:
            unread.append((number, session, item, reason))
            continue
        entry = {ITEM: item}
        entry.update({c: row[c] for c in (TIME, RATING) if row.get(c) is not None})
        entries[session].append(entry)
        numbers[session].append(number)
    return entries, numbers, unread


def session_users(rows: list[dict[str, Any]]) -> dict[Any, Any]:
    """Each session's user (None: anonymous), from its rows' ``user_id``.

    Raises:
        ConfigError: a session's rows name two users.
    """
    owners: dict[Any, Any] = {}
    for number, row in enumerate(rows, 1):
        session, user = row[SESSION], row[USER]
        if user is None or session is None:
            continue
        known = owners.setdefault(session, user)
        if known != user:
            raise SessionTableError(
                f"session {session!r} has rows of two users, {known!r} and {user!r} "
                f"(row {number}); a session is one user's."
            )
    return owners


def _unread_reason(
    rec: Recommender, row: dict[str, Any], bounds: list[float]
) -> str | None:
    """Why ``row`` cannot be read into its session (None: it can)."""
    if row[SESSION] is None:
        return f"no {SESSION}"
    if row[ITEM] is None:
        return f"no {ITEM}"
    stamp = row.get(TIME)
    if stamp is not None and not (math.isfinite(stamp) and abs(stamp) < 2**62):
        return f"{TIME} is not a finite number of seconds"
    rating = row.get(RATING)
    if rating is not None:
        if not math.isfinite(rating):
            return f"{RATING} is not a finite number"
        if bounds and not bounds[0] <= rating <= bounds[1]:
            return (
                f"{RATING} outside the training ratings, {bounds[0]:g} to {bounds[1]:g}"
            )
    if not rec.item_vocab.contains(row[ITEM]):
        return "item not known to the model"
    return None


def _table(rows: list[tuple[Any, ...]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """``rows`` as a frame of ``schema``."""
    return pl.DataFrame(rows, schema=schema, orient="row")
