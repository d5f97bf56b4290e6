"""Lists for many sessions at once: a table of session rows in, a row per session
and rank out (offline scoring of a day's visits, a cache to fill), with every row
the model could not read counted and reported with its reason."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from twostage.data.dataset import ITEM, RATING, TIME, USER
from twostage.errors import ConfigError

if TYPE_CHECKING:
    from twostage.recommender import Recommender

__all__ = ["SESSION", "SessionLists", "recommend_sessions"]

#: The column that groups a sessions table's rows into sessions.
SESSION = "session_id"
#: The columns a sessions table may have: each row one item of one session.
_COLUMNS = (SESSION, ITEM, TIME, RATING, USER)


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
    """

    lists: pl.DataFrame
    unread: pl.DataFrame

    @property
    def num_sessions(self) -> int:
        """How many sessions were answered (one list each)."""
        return int(self.lists[SESSION].n_unique()) if self.lists.height else 0


def recommend_sessions(
    rec: Recommender,
    sessions: pl.DataFrame,
    k: int = 10,
    *,
    exclude_seen: bool = True,
    use_ranker: bool = True,
    filters: dict[str, Any] | None = None,
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

    Returns:
        The lists, and the rows not read with their reasons (an unknown item, a
        row without a session or item, a rating that is not a number or lies
        outside the training ratings); a session whose rows were all unread is
        answered as a session without items is.

    Raises:
        ConfigError: the table misses a column, has one it does not read, a
            column of the wrong type, ratings for a model that reads none, or a
            session of two users.
    """
    _check_table(rec, sessions)
    rows = sessions.to_dicts()
    owners = _session_users(rows) if USER in sessions.columns else {}
    entries, numbers, unread = _readable_rows(rec, rows)
    lists: list[tuple[Any, int, Any, float, float, str]] = []
    vocab = rec.item_vocab
    for session, readable in entries.items():
        answer = rec.recommend(
            owners.get(session),
            k,
            session=readable or None,
            exclude_seen=exclude_seen,
            use_ranker=use_ranker,
            filters=filters,
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
    )


def _check_table(rec: Recommender, sessions: pl.DataFrame) -> None:
    """Refuse a sessions table that cannot be read as a whole: one that is not a
    frame, misses ``session_id`` or ``item_id``, has a column nothing reads or
    of the wrong type, or ratings for a model that reads none."""
    if not isinstance(sessions, pl.DataFrame):
        raise ConfigError(
            "`sessions` should be a polars DataFrame with a row per session item. "
            f"Received a {type(sessions).__name__}."
        )
    columns = sessions.columns
    missing = [c for c in (SESSION, ITEM) if c not in columns]
    extra = [c for c in columns if c not in _COLUMNS]
    if missing or extra:
        raise ConfigError(
            f"the sessions table should have the columns {SESSION!r} and {ITEM!r}, "
            f"and may have {TIME!r}, {RATING!r} and {USER!r}"
            + (f"; it lacks {missing}" if missing else "")
            + (f"; it has {extra}, which nothing reads" if extra else "")
            + f". Received columns: {columns}."
        )
    for column in (SESSION, ITEM, USER):
        dtype = sessions[column].dtype if column in columns else pl.Null
        if not (dtype.is_integer() or dtype in (pl.String, pl.Null)):
            raise ConfigError(
                f"the sessions table's {column!r} column should hold IDs: integers "
                f"or text. Received a {dtype} column."
            )
    for column in (TIME, RATING):
        if column in columns and not (
            sessions[column].dtype.is_numeric() or sessions[column].dtype == pl.Null
        ):
            raise ConfigError(
                f"the sessions table's {column!r} column should hold numbers. "
                f"Received a {sessions[column].dtype} column."
            )
    if RATING in columns and not rec.run.tensors.reads_ratings:
        raise ConfigError(
            f"the sessions table has a {RATING!r} column, which this model does not "
            "read (it was trained without `retrieval.sequence_ratings`); drop it."
        )


def _readable_rows(
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


def _session_users(rows: list[dict[str, Any]]) -> dict[Any, Any]:
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
            raise ConfigError(
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
