"""What a recommendation request carries besides the user ID, checked and encoded:
the session's items (:func:`session_indices`), the item filters
(:class:`ItemFilters`), the context (:func:`encode_context`) and a new user's
features (:func:`encode_user_features`). A bad value is refused with an error that
names the request's field (:func:`client_values`), never a server error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch

from twostage.data.dataset import ITEM, USER, iso_seconds
from twostage.errors import ConfigError, UnknownIdError
from twostage.features.context import context_frame
from twostage.features.spec import FeatureSpec
from twostage.features.vocab import Vocabulary
from twostage.models.fields import UNKNOWN_TIME

__all__ = [
    "NUMBER_KINDS",
    "by_path",
    "candidate_items",
    "new_item_features",
    "new_items_frame",
    "FAR_STANDARD_DEVIATIONS",
    "ItemFilters",
    "check_finite_numbers",
    "check_k",
    "check_raw_id",
    "excluded_items",
    "far_numbers",
    "client_values",
    "encode_context",
    "encode_user_features",
    "session_indices",
]


def check_raw_id(name: str, value: Any) -> None:
    """Refuse a raw ID that is neither an integer nor a string: vocabularies hold
    only those (a log's float column of whole numbers is read as integers), and
    Python's equality would otherwise take ``True`` and ``1.0`` for user 1 and a
    NaN for a new user.

    Raises:
        ConfigError: naming ``name`` and the value's type.
    """
    if isinstance(value, bool) or not isinstance(value, int | np.integer | str):
        raise ConfigError(
            f"`{name}` should be an integer or string ID, as in the log. Received: "
            f"{value!r} ({type(value).__name__})."
        )


def candidate_items(
    candidates: Sequence[Any] | None,
    item_vocab: Vocabulary,
    columns: list[str],
    sets: Mapping[str, str] | None = None,
) -> tuple[torch.Tensor, pl.DataFrame | None] | None:
    """The items a request asks to rank (a candidate list from the client's own
    retrieval), or None when it names none: ``[C]`` vocabulary indices of the known
    ones, and the new ones as rows of ``item_id`` and the model's item feature
    ``columns`` (None when there are none); ``sets``: the set-valued columns
    and their separators (:func:`new_items_frame`).

    An entry is an item ID, or an object with ``item_id`` and feature values
    (nested objects by path, as a log's are read). An object whose ID the model
    does not know is a new item, ranked from the features it carries (the
    columns it leaves out are unknown); a known item is ranked as trained, the
    values sent with it not read.

    Raises:
        ConfigError: not a list, an empty one, an entry that is no ID or no object
            with one, a new item listed twice, or a feature the model does not read.
        UnknownIdError: plain item IDs the model does not know (the first ten
            named).
    """
    if candidates is None:
        return None
    if isinstance(candidates, str | bytes | dict | set) or not isinstance(
        candidates, Sequence
    ):
        raise ConfigError(
            "`candidates` should be a list of item IDs. Received: "
            f"{candidates!r} ({type(candidates).__name__})."
        )
    if not candidates:
        raise ConfigError(
            "`candidates` should name at least one item (leave it out to rank the "
            "whole catalogue)."
        )
    ids: list[Any] = []
    rows: dict[Any, dict[str, Any]] = {}
    for position, value in enumerate(candidates):
        name = f"candidates[{position}]"
        if not isinstance(value, Mapping):
            check_raw_id(name, value)
            ids.append(value)
            continue
        if ITEM not in value:
            raise ConfigError(
                f"`{name}` should hold the item's {ITEM!r} beside its features. "
                f"Received the keys {sorted(map(str, value))}."
            )
        check_raw_id(f"{name}[{ITEM!r}]", value[ITEM])
        raw = value[ITEM]
        if item_vocab.lookup(raw):
            ids.append(raw)  # known: ranked as trained
            continue
        if raw in rows:
            raise ConfigError(
                f"`{name}`: the new item {raw!r} is listed twice; list it once."
            )
        rows[raw] = new_item_features(
            name, {k: v for k, v in value.items() if k != ITEM}, columns
        )
    indices = _known_items(
        "candidates",
        ids,
        item_vocab,
        hint="Leave them out, or send each as an object of its features "
        f'({{"{ITEM}": ..., "<feature>": ...}}; this model reads {columns}) to '
        "rank it as a new item.",
    )
    known = torch.tensor(sorted(set(indices)), dtype=torch.long)
    frame = new_items_frame("candidates", rows, columns, sets) if rows else None
    return known, frame


def new_item_features(
    name: str, features: Mapping[str, Any], columns: list[str]
) -> dict[str, Any]:
    """A new item's feature values as a request gives them under ``name``, nested
    objects by path, checked against the item feature ``columns`` the model reads.

    Raises:
        ConfigError: a feature the model does not read, or one given twice.
    """
    flat = by_path(features, "item")
    unknown = sorted(set(flat) - set(columns))
    if unknown:
        raise ConfigError(
            f"`{name}` holds feature(s) {unknown} this model does not read; "
            f"its item features are {columns}."
        )
    return flat


def refuse_lists(name: str, values: Mapping[str, Any], sets: set[str]) -> None:
    """Refuse a list of values for a column that holds one value (any but the
    set-valued ``sets``): the encoders' error named a dtype, not the field.

    Raises:
        ConfigError: naming the request's field and the column.
    """
    for column, value in values.items():
        if isinstance(value, list | tuple) and column not in sets:
            raise ConfigError(
                f"`{name}`[{column!r}] holds a list, where {column!r} takes one "
                f"value; send one (the set-valued features take lists: "
                f"{sorted(sets) or 'none here'}). Received: {value!r}."
            )


def new_items_frame(
    name: str,
    rows: Mapping[Any, Mapping[str, Any]],
    columns: list[str],
    sets: Mapping[str, str] | None = None,
) -> pl.DataFrame:
    """``item_id`` and the ``columns`` of new items (raw ID -> feature values;
    a column left out is missing). ``sets``: the set-valued columns and their
    separators, whose values may be lists (``["Hair", "Skin"]``) or text as a
    log writes them (``"Hair|Skin"``), one item this way and another that.

    Raises:
        ConfigError: values that no column can hold together (a number beside
            text, say), named under ``name``.
    """
    for features in rows.values():
        refuse_lists(name, features, set(sets or {}))
    with client_values(name, {"new items": list(rows)}, columns):
        values = {c: [f.get(c) for f in rows.values()] for c in columns}
        for column, separator in (sets or {}).items():
            given = values.get(column, [])
            if any(isinstance(v, list) for v in given):
                values[column] = [
                    [p.strip() for p in v.split(separator) if p.strip()]
                    if isinstance(v, str)
                    else v
                    for v in given
                ]
        return pl.DataFrame({ITEM: list(rows), **values})


def by_path(features: Mapping[str, Any], what: str = "user") -> dict[str, Any]:
    """``features`` with a nested object's values under their paths
    (``{"geo": {"country": "NO"}}`` as ``{"geo.country": "NO"}``), as a log's
    nested objects are read. (A loop, not recursion: a client's JSON may nest
    deeper than Python's stack.)

    Raises:
        ConfigError: two entries name one feature (``"geo.country"`` beside
            ``"geo": {"country": ...}``).
    """
    out: dict[str, Any] = {}
    pending = [("", features)]
    while pending:
        prefix, mapping = pending.pop()
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                pending.append((f"{name}.", value))
            elif name in out:
                raise ConfigError(
                    f"the {what} feature {name!r} is given twice (as a name with a "
                    "dot and inside an object); give it once."
                )
            else:
                out[name] = value
    return out


def _known_items(
    name: str,
    ids: list[Any],
    item_vocab: Vocabulary,
    *,
    hint: str = "Leave them out (items added after training have no embedding).",
) -> list[int]:
    """The vocabulary indices of item IDs a request lists under ``name``.

    Raises:
        UnknownIdError: naming the IDs the model does not know (the first ten).
    """
    indices = [item_vocab.lookup(i) for i in ids]
    unknown = [i for i, idx in zip(ids, indices, strict=True) if idx == 0]
    if unknown:
        raise UnknownIdError(
            f"`{name}` holds item IDs this model does not know: {unknown[:10]}"
            + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            + f". {hint}"
        )
    return indices


def excluded_items(
    exclude: Sequence[Any] | None, item_vocab: Vocabulary
) -> tuple[np.ndarray | None, list[Any]]:
    """The vocabulary indices of the items a request asks to leave out (None:
    it names none), and the IDs among them the model does not know (which no
    answer can hold; the answer lists them).

    Raises:
        ConfigError: not a list, or an entry that is no item ID.
    """
    if exclude is None:
        return None, []
    if isinstance(exclude, str | bytes | dict | set) or not isinstance(
        exclude, Sequence
    ):
        raise ConfigError(
            "`exclude` should be a list of item IDs. Received: "
            f"{exclude!r} ({type(exclude).__name__})."
        )
    for position, value in enumerate(exclude):
        check_raw_id(f"exclude[{position}]", value)
    indices = np.array([item_vocab.lookup(i) for i in exclude], dtype=np.int64)
    unknown = [i for i, idx in zip(exclude, indices, strict=True) if idx == 0]
    return np.unique(indices[indices > 0]), list(dict.fromkeys(unknown))


def refuse_stray_keys(
    name: str,
    by_key: Mapping[Any, Any],
    given: list[Any],
    *,
    noun: str = "user",
    field: str = "user_ids",
) -> None:
    """Refuse a mapping of a table of lists (``exclude``, ``user_features``:
    ``name``) that names a key without a list here (keys matched as text).

    Raises:
        ConfigError: naming the first five such keys.
    """
    listed = {str(u) for u in given}
    stray = [u for u in by_key if str(u) not in listed]
    if stray:
        raise ConfigError(
            f"`{name}` names {len(stray)} {noun}(s) without a list here: "
            f"{stray[:5]!r}{' ...' if len(stray) > 5 else ''}; leave them out or "
            f"add them to `{field}`."
        )


def exclusions_by_key(
    given: list[Any],
    exclude: Mapping[Any, Sequence[Any]] | None,
    item_vocab: Vocabulary,
    *,
    noun: str = "user",
    field: str = "user_ids",
) -> tuple[list[Sequence[Any] | None], list[np.ndarray | None]]:
    """Per position of ``given`` (the users, or sessions, ``noun``, of a
    table of lists), the raw item IDs ``exclude`` (``{key: item IDs}``, keys
    matched as text: ``42`` and ``"42"`` are one) leaves out of that list, and
    their vocabulary indices (None: none).

    Raises:
        ConfigError: not a mapping, a value that is not a list of IDs, or a
            key that is not in ``given`` (the request's ``field``).
    """
    nothing: list[Any] = [None] * len(given)
    if exclude is None:
        return nothing, list(nothing)
    if not isinstance(exclude, Mapping):
        raise ConfigError(
            f"`exclude` should map {noun} IDs to the item IDs to leave out of "
            f"their lists. Received: a {type(exclude).__name__}."
        )
    by_text: dict[str, Any] = {}
    for key, items in exclude.items():
        check_raw_id(f"exclude's {noun} ID", key)
        excluded_items(items, item_vocab)  # checks the list
        # 42 and "42" are one key: their items join
        by_text.setdefault(str(key), []).extend(items or [])
    for text, items in by_text.items():
        by_text[text] = (items, excluded_items(items, item_vocab)[0])
    refuse_stray_keys("exclude", exclude, given, noun=noun, field=field)
    found = [by_text.get(str(u)) for u in given]
    return (
        [None if f is None else f[0] for f in found],
        [None if f is None else f[1] for f in found],
    )


def check_k(name: str, value: int) -> int:
    """``value`` as a Python int, if it is a positive integer (numpy's too)."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ConfigError(
            f"`{name}` should be a positive integer. Received: `{name}` = {value!r}."
        )
    return int(value)


def _moment(value: Any) -> Any:
    """A session entry's ``timestamp``: an ISO 8601 text as its seconds since
    1970; anything else as given, for the checks to name."""
    if isinstance(value, str):
        seconds = iso_seconds(value)
        return value if seconds is None else seconds
    return value


def session_indices(
    session: Sequence[Any] | None,
    item_vocab: Vocabulary,
    *,
    history_length: int,
    rating_range: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``([S], [S], [S])`` item indices of a request's session, oldest first, their
    times (int64 seconds; :data:`~twostage.models.fields.UNKNOWN_TIME` where an entry
    has no numeric timestamp) and their ratings (float64, NaN where an entry has
    none), or None (no session, or an empty one: the usual answer).

    Args:
        session: item IDs, or ``{"item_id", "timestamp", "rating"}`` objects
            (ordered by timestamp when every entry has one), oldest first;
            ``timestamp`` (seconds since 1970, or an ISO 8601 text: without an
            offset, UTC) and ``rating`` optional.
        item_vocab: the model's item vocabulary.
        history_length: how many recent items the model reads (0: none).
        rating_range: the lowest and highest rating the model trained on, where
            it reads ratings: a rating outside it is an error, since the model
            has no bucket for it (one between two levels takes the nearer).

    Raises:
        ConfigError: the model reads no history, or the session is malformed.
        UnknownIdError: item IDs the model does not know (the first ten named).
    """
    if session is None or (isinstance(session, list | tuple) and not session):
        return None
    if isinstance(session, str | bytes | Mapping) or not isinstance(session, Sequence):
        raise ConfigError(
            "`session` should be a list of item IDs or of "
            '{"item_id": ..., "timestamp": ..., "rating": ...} objects, oldest '
            "first. "
            f"Received a {type(session).__name__}."
        )
    if history_length == 0:
        raise ConfigError(
            "`session` is given, but this model reads no history "
            "(`retrieval.history_length` = 0)."
        )
    entries = [e if isinstance(e, Mapping) else {"item_id": e} for e in session]
    keys = {"item_id", "timestamp", "rating"}
    bad = [n for n, e in enumerate(entries) if set(e) - keys]
    if bad or any("item_id" not in e for e in entries):
        raise ConfigError(
            "each `session` entry should be an item ID or an object with "
            "`item_id` and an optional `timestamp` and `rating`. Received: "
            f"{[session[n] for n in bad][:3] or session[:3]}."
        )
    for number, entry in enumerate(entries):  # numbered as the request has them
        check_raw_id(f"session[{number}]", entry["item_id"])
    times = [_moment(e.get("timestamp")) for e in entries]
    numeric = [isinstance(t, int | float) and not isinstance(t, bool) for t in times]
    typed = [
        t
        for t, known in zip(times, numeric, strict=True)
        if t is not None and not known
    ]
    if typed:  # it would have read as no time at all
        raise ConfigError(
            "each `session` timestamp should be a number of seconds since 1970 or "
            "an ISO 8601 date-time (2026-01-01T09:30:00Z), or left out. "
            f"Received: {typed[:3]}."
        )
    odd = [
        t
        for t, known in zip(times, numeric, strict=True)
        if known and not (math.isfinite(t) and abs(t) < 2**62)
    ]
    if odd:
        raise ConfigError(
            "each `session` timestamp should be a finite number of seconds. "
            f"Received: {odd[:3]}."
        )
    ratings = [e.get("rating") for e in entries]
    wrong = [
        (n, r)
        for n, r in enumerate(ratings)
        if r is not None
        and (
            isinstance(r, bool)
            or not isinstance(r, int | float)
            or not math.isfinite(r)
        )
    ]
    if wrong:
        named = ", ".join(f"session[{n}].rating = {r!r}" for n, r in wrong[:3])
        raise ConfigError(
            "each `session` rating should be a finite number (or left out). "
            f"Received: {named}."
        )
    if rating_range is not None:
        low, high = rating_range
        outside = [
            (n, r)
            for n, r in enumerate(ratings)
            if r is not None and not low <= r <= high
        ]
        if outside:
            named = ", ".join(f"session[{n}].rating = {r!r}" for n, r in outside[:3])
            raise ConfigError(
                f"each `session` rating should lie within the ratings this model "
                f"trained on, {low:g} to {high:g}. Received: {named}"
                + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
                + "."
            )
    if all(numeric):
        order = sorted(range(len(entries)), key=lambda n: float(times[n]))
        entries = [entries[n] for n in order]
        times = [times[n] for n in order]
        ratings = [ratings[n] for n in order]
        numeric = [True] * len(entries)
    indices = _known_items("session", [e["item_id"] for e in entries], item_vocab)
    stamps = [
        math.floor(t) if known else UNKNOWN_TIME
        for t, known in zip(times, numeric, strict=True)
    ]
    return (
        torch.tensor(indices, dtype=torch.long),
        torch.tensor(stamps, dtype=torch.long),
        torch.tensor(
            [math.nan if r is None else float(r) for r in ratings], dtype=torch.float64
        ),
    )


class ItemFilters:
    """Metadata filters over the catalogue: ``{column: value}`` keeps the items whose
    column equals the value (or, for a list column, contains it).

    Args:
        frame: the item metadata as columns, row = item index (row 0 the OOV
            item), or None when there is no metadata.
        separators: the list columns read from text (``"hats|kids"``) and
            their separators: a filter value written that way (as the
            metadata shows it) keeps the items holding every one of its
            values.
    """

    #: How many distinct (column, value) masks are kept.
    CACHE_SIZE = 1024

    def __init__(
        self, frame: pl.DataFrame | None, separators: Mapping[str, str] | None = None
    ) -> None:
        self.frame = frame
        self.separators = dict(separators or {})
        self._masks: dict[tuple[str, Any], torch.Tensor] = {}
        self._groups: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def mask(self, filters: dict[str, Any] | None) -> torch.Tensor | None:
        """``[N]`` bool of the items that pass every filter (None: no filters),
        computed column-wise and cached per filter.

        Raises:
            ConfigError: no metadata, an unknown column, or a value that is not a
                single string, number or bool of the column's kind.
        """
        if not filters:
            return None
        frame = self.frame
        if frame is None:
            raise ConfigError(
                "`filters` need item metadata, and this recommender has none."
            )
        columns = [c for c in frame.columns if c != ITEM]
        unknown = sorted(set(filters) - set(columns))
        if unknown:
            raise ConfigError(
                f"unknown filter column(s) {unknown}; the item metadata has {columns}."
            )
        mask = torch.ones(frame.height, dtype=torch.bool)
        for key, wanted in filters.items():
            mask &= self._one(frame, key, wanted)
        return mask

    def from_text(self, texts: Mapping[str, str]) -> dict[str, Any]:
        """Filters typed in as text (``--filter year=1995``) as the values their
        columns hold: numbers for a numeric column or list of numbers, ``true`` /
        ``false`` for a bool column, the text itself otherwise.

        Raises:
            ConfigError: a value is not a number (or bool) its column can hold.
        """
        schema = {} if self.frame is None else dict(self.frame.schema)
        typed: dict[str, Any] = {}
        for key, text in texts.items():
            dtype = schema.get(key)
            inner = dtype.inner if isinstance(dtype, pl.List) else dtype
            if inner is None or inner in (pl.String, pl.Categorical, pl.Null):
                typed[key] = text  # unknown columns: mask() names them
            elif inner == pl.Boolean and text.lower() in ("true", "false"):
                typed[key] = text.lower() == "true"
            elif inner.is_integer() and text.strip().lstrip("-").isdigit():
                typed[key] = int(text)
            elif inner.is_float() and _finite(text):
                typed[key] = float(text)
            else:
                raise ConfigError(
                    f"`filters[{key!r}]` = {text!r} is no value of the {dtype} "
                    f"column {key!r}."
                )
        return typed

    def _one(self, frame: pl.DataFrame, key: str, wanted: Any) -> torch.Tensor:
        if not isinstance(wanted, str | int | float | bool):
            raise ConfigError(
                f"`filters[{key!r}]` should be one string, number or bool. "
                f"Received: {wanted!r}."
            )
        cached = self._masks.get((key, wanted))
        if cached is not None:
            return cached
        column = pl.col(key)
        is_list = isinstance(frame.schema[key], pl.List)
        expr = column.list.contains(wanted) if is_list else column == wanted
        separator = self.separators.get(key)
        if is_list and isinstance(wanted, str) and separator and separator in wanted:
            parts = [p.strip() for p in wanted.split(separator) if p.strip()]
            expr = pl.all_horizontal(column.list.contains(p) for p in parts)
        try:
            values = frame.select(expr.fill_null(False)).to_series().to_numpy()
        except (pl.exceptions.PolarsError, TypeError, ValueError) as e:
            # polars' first line says why; the rest is its query plan.
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(
                f"`filters[{key!r}]` = {wanted!r} cannot be compared with the "
                f"{frame.schema[key]} column {key!r} ({reason}); a filter keeps "
                "the items whose value equals it."
            ) from e
        mask = torch.from_numpy(values.astype(bool))
        if len(self._masks) < self.CACHE_SIZE:  # a bounded cache of what clients use
            self._masks[(key, wanted)] = mask
        return mask

    def check_max_per(self, max_per: Mapping[str, Any] | None) -> dict[str, int]:
        """``max_per`` (``{column: n}``: at most ``n`` items of a list sharing a
        value of the metadata ``column``) checked; ``{}`` for None.

        Raises:
            ConfigError: not a mapping, no metadata, an unknown column, or a
                limit that is not a positive integer.
        """
        if max_per is None:
            return {}
        if not isinstance(max_per, Mapping):
            raise ConfigError(
                "`max_per` should map metadata columns to limits, e.g. "
                f'{{"genres": 3}}. Received: {max_per!r} ({type(max_per).__name__}).'
            )
        if not max_per:
            return {}
        self._check_columns("max_per", list(max_per))
        for column, limit in max_per.items():
            check_k(f"max_per[{column!r}]", limit)
        # A limit past any list's length limits nothing; 2^31 keeps 10^22 from
        # overflowing the counts' int64 (it would end in a 500).
        return {str(c): min(int(n), 2**31) for c, n in max_per.items()}

    def check_column(self, name: str, column: Any) -> str | None:
        """``column`` (a request's field ``name``: one metadata column, e.g.
        ``diversity_by``) checked; None stays None.

        Raises:
            ConfigError: not text, no metadata, or an unknown column.
        """
        if column is None:
            return None
        if not isinstance(column, str):
            raise ConfigError(
                f'`{name}` should name a metadata column, e.g. "genres". '
                f"Received: {column!r} ({type(column).__name__})."
            )
        self._check_columns(name, [column])
        return column

    def _check_columns(self, name: str, given: list[Any]) -> None:
        """Refuse a request's field ``name`` naming columns (``given``) the
        item metadata lacks, or any where there is none."""
        if self.frame is None:
            raise ConfigError(
                f"`{name}` reads item metadata, and this recommender has none."
            )
        columns = [c for c in self.frame.columns if c != ITEM]
        unknown = sorted(set(map(str, given)) - set(columns))
        if unknown:
            raise ConfigError(
                f"unknown `{name}` column(s) {unknown}; the item metadata has "
                f"{columns}."
            )

    def _values(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, offsets)``: item ``i``'s values of ``column`` (each of a
        list column's, one of any other; none where null) as codes, at
        ``codes[offsets[i]:offsets[i + 1]]``; cached per column."""
        cached = self._groups.get(column)
        if cached is not None:
            return cached
        assert self.frame is not None  # check_max_per refused none
        values = self.frame.select(
            pl.int_range(pl.len(), dtype=pl.Int64).alias("_row"), pl.col(column)
        )
        if isinstance(self.frame.schema[column], pl.List):
            values = values.explode(column)
        values = values.drop_nulls(column).with_columns(pl.col(column).cast(pl.String))
        codes = values[column].rank("dense").to_numpy().astype(np.int64) - 1
        rows = values["_row"].to_numpy()
        offsets = np.zeros(self.frame.height + 1, dtype=np.int64)
        np.add.at(offsets, rows + 1, 1)
        found = (codes, np.cumsum(offsets))
        self._groups[column] = found
        return found

    def groups(
        self, items: torch.Tensor, max_per: dict[str, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The groups :func:`~twostage.diversity.diversify` caps: ``([B, W, G],
        [M])``, each of ``items``' (``[B, W]`` item indices, -1: none) groups
        (one per value of each ``max_per`` column; -1 pads) and each group's
        limit."""
        parts, limits, base = [], [], 0
        flat = items.clamp_min(0).numpy().ravel()
        for column, limit in max_per.items():
            codes, offsets = self._values(column)
            starts, lengths = offsets[flat], offsets[flat + 1] - offsets[flat]
            width = max(1, int(lengths.max(initial=0)))
            at = starts[:, None] + np.arange(width)
            found = np.arange(width) < lengths[:, None]
            found &= (items.numpy().ravel() >= 0)[:, None]
            padded = np.append(codes, 0)  # a slot past the values reads 0, unused
            local = np.where(found, padded[np.minimum(at, len(codes))] + base, -1)
            parts.append(local.reshape(*items.shape, width))
            count = int(codes.max(initial=-1)) + 1
            limits.append(np.full(count, limit, dtype=np.int64))
            base += count
        joined = torch.from_numpy(np.concatenate(parts, axis=2))
        # The groups these lists meet, numbered from 0 (a catalogue's brands
        # may be many, a batch's few).
        met, inverse = torch.unique(joined, return_inverse=True)
        every = torch.from_numpy(np.concatenate(limits))
        kept = met >= 0
        local = inverse - int((~kept).sum())  # -1 stays first: the pads
        return local, every[met[kept]]


def _finite(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@contextlib.contextmanager
def client_values(
    name: str, values: Mapping[str, Any], columns: list[str]
) -> Iterator[None]:
    """Turn an encoder's failure on a request's values into the client's error."""
    try:
        yield
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError) as e:
        raise ConfigError(
            f"`{name}` {dict(values)!r} cannot be encoded for this model's columns "
            f"{columns} (a value of the wrong kind?): {e}"
        ) from e


#: Field kinds whose encoder reads numbers (a non-finite one would be "missing").
NUMBER_KINDS = ("numeric", "bucket", "timestamp")


#: A request's number farther than this many training standard deviations from
#: its numeric column's training mean is refused. No value of a column of ``n``
#: training rows lies more than ``sqrt(n - 1)`` of them from its mean
#: (Samuelson's inequality), so nothing a column of up to 10^8 rows held is
#: refused; a price of 1e20 would otherwise be read as finite noise that swamps
#: every other field of the query.
FAR_STANDARD_DEVIATIONS = 1e4


def check_finite_numbers(
    spec: FeatureSpec, name: str, values: Mapping[str, Any]
) -> None:
    """Refuse a request's NaN or infinite number (or text such as "inf"), or a
    value that is no number at all, for a numeric, bucketed or timestamp column:
    the encoders read the first as missing,
    which would answer a client's mistake as if the value had been left out. A
    number of a numeric column farther than :data:`FAR_STANDARD_DEVIATIONS` from
    its training mean is refused too (:func:`far_numbers`).

    Raises:
        ConfigError: naming the request's field and the column.
    """
    numeric = {f.name for f in spec.fields if f.kind in NUMBER_KINDS}
    for column, value in values.items():
        if column not in numeric or value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):  # the encoder's error named no value
            raise ConfigError(
                f"`{name}`[{column!r}] should be a number, or left out when "
                f"unknown. Received: {value!r}."
            ) from None
        if not math.isfinite(number):
            raise ConfigError(
                f"`{name}`[{column!r}] should be a finite number, or left out when "
                f"unknown. Received: {value!r}."
            )
        far = far_numbers(spec, column, pl.Series([number]))
        if len(far):
            raise ConfigError(
                f"`{name}`[{column!r}] = {value!r} lies {far[0][1]:.3g} standard "
                "deviations from the mean of the values this model trained on: it "
                "would read it as noise. Send a value of the range the training "
                "data held, or leave it out when unknown."
            )


def far_numbers(
    spec: FeatureSpec, column: str, values: pl.Series
) -> list[tuple[int, float]]:
    """``(position, distance)`` of each of ``values`` farther than
    :data:`FAR_STANDARD_DEVIATIONS` training standard deviations from the
    training mean of ``column`` (after its ``log1p``, if any); empty for a
    column that is not read as a plain number (buckets and timestamps have
    bounded encodings)."""
    from twostage.features.encoders import NumericEncoder

    keys = [f.key for f in spec.fields if f.name == column and f.kind == "numeric"]
    if not keys:
        return []
    encoder = spec.encoder(keys[0])
    if not isinstance(encoder, NumericEncoder):
        return []
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.abs(encoder.transform(values.cast(pl.Float64, strict=False))[:, 0])
    far = np.flatnonzero(z > FAR_STANDARD_DEVIATIONS)  # NaN (missing) is not far
    return [(int(i), float(z[i])) for i in far]


def encode_context(
    spec: FeatureSpec, keys: list[str], context: Mapping[str, Any] | None
) -> dict[str, torch.Tensor]:
    """``{key: [1, ...]}`` the encoded context of one request (unknown where
    missing); empty for a model that reads no context (``keys`` empty).

    Raises:
        ConfigError: context is given to a model that reads none, or a value cannot
            be encoded for its column.
    """
    if not keys:
        if context:
            raise ConfigError(
                "`context` is given, but this model reads no context "
                f"(received {sorted(context)})."
            )
        return {}
    check_finite_numbers(spec, "context", context or {})
    frame = context_frame(pl.Series(USER, [None]), context, keys)
    with client_values("context", dict(context or {}), keys):
        return {
            info.key: torch.from_numpy(
                np.require(
                    spec.encoder(info.key).transform(frame[info.column]),
                    requirements=["C", "W"],
                )
            )
            for info in spec.describe(side="query")
            if info.column in keys
        }


def encode_user_features(
    spec: FeatureSpec,
    context_keys: list[str],
    user_features: dict[str, Any],
    columns: list[str],
) -> dict[str, torch.Tensor]:
    """``{key: [1, ...]}`` the query fields of a user described by ``columns`` of
    ``user_features`` (the context columns unknown).

    Raises:
        ConfigError: a value is of the wrong kind for its column.
    """
    sets = {f.name for f in spec.fields if f.kind == "multi_hot"}
    refuse_lists("user_features", user_features, sets)
    check_finite_numbers(spec, "user_features", user_features)
    values = {c: [user_features.get(c)] for c in columns}
    with client_values("user_features", user_features, columns):
        frame = pl.DataFrame({USER: [None], **values})
        frame = frame.with_columns(pl.lit(None).alias(c) for c in context_keys)
        return spec.transform_queries(frame)
