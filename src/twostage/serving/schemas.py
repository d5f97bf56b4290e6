"""Request and response bodies of the HTTP API.

Requests forbid unknown fields, so a typo (``"exclude_sen"``) is a 422 that names the
field instead of a silently ignored option. Responses are documented here for the
OpenAPI page; handlers return plain dicts of the same shape (no second validation pass
on the hot path).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ErrorResponse",
    "Item",
    "PredictRequest",
    "PredictResponse",
    "RecommendRequest",
    "RecommendResponse",
    "SimilarRequest",
    "SimilarResponse",
]

RawId = int | str


class _Strict(BaseModel):
    # strict: no "5" for 5, no true for 1, no "no" for false; docs/serving.md promises a
    # 422 for a wrong type, not a guess.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _unicode_text(cls, data: Any) -> Any:
        """JSON may escape half of a surrogate pair (``"\\ud800"``): no Unicode
        text, so no ID or value can hold it, and an answer echoing it could not be
        encoded (a 500). Refused, with where it is."""
        where = _surrogate_at(data, "")
        if where is not None:
            raise ValueError(
                f"{where or 'the body'} holds an unpaired surrogate escape "
                "(\\ud800-\\udfff alone), which is not Unicode text"
            )
        return data


def _surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string (value or key) holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _surrogate_at(key, "") is not None:
                return f"{path or 'the body'}: a key"
            found = _surrogate_at(item, inner)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _surrogate_at(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


_INT64 = 2**63


def _plain(value: Any) -> bool:
    """Whether ``value`` is null, a string, a bool or a finite number within
    int64."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -_INT64 <= value < _INT64
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | bool)


def _plain_values(
    values: dict[str, Any] | None,
    name: str,
    *,
    nested: bool = False,
    lists: bool = False,
) -> dict[str, Any] | None:
    """Feature or context values must be null, a string, a finite number within
    int64, or a bool: anything else is a client's mistake, reported as such.
    ``nested``: an object of such values too (a user's record as the log nests
    it, ``{"geo": {"country": "NO"}}``), at any depth; ``lists``: a list of
    them too, the values of a set-valued feature (``["Hair", "Skin"]``)."""
    if values is None:
        return None
    pending = [(name, values)]
    while pending:  # a loop: a body may nest deeper than Python's stack
        where, mapping = pending.pop()
        for key, value in mapping.items():
            ok = _plain(value)
            if nested and isinstance(value, dict):
                pending.append((f"{where}[{key!r}]", value))
                continue
            if lists and isinstance(value, list):
                ok = all(v is not None and _plain(v) for v in value)
            if not ok:
                what = (", an object of them" if nested else "") + (
                    ", a list of strings, bools or numbers" if lists else ""
                )
                raise ValueError(
                    f"{where}[{key!r}] should be null, a string, a bool or a finite "
                    f"number within int64{what}; received {value!r}"
                )
    return values


class SessionItem(_Strict):
    """One item of the current session, with the moment it was met."""

    item_id: RawId
    timestamp: int | float | str | None = Field(
        None,
        description="Seconds since the epoch, or an ISO 8601 date-time "
        '("2026-01-01T09:30:00Z"; without an offset, UTC); orders the session '
        "when given.",
    )
    rating: int | float | None = Field(
        None,
        description="The user's rating of the item, on the training log's scale; "
        "read by models with `retrieval.sequence_ratings` (left out: not known).",
    )


class RecommendRequest(_Strict):
    """Top-k items for one user: a known ``user_id``, or features for a new user."""

    model: str | None = Field(
        None, description="Model name; optional when the server holds one model."
    )
    user_id: RawId | None = Field(
        None, description="Raw user ID. Unknown or absent: the cold-start answer."
    )
    user_features: dict[str, Any] | None = Field(
        None, description='Raw features of a new user, e.g. {"age": 30}.'
    )
    k: int = Field(10, description="How many items (1 to the server's maximum).")
    exclude_seen: bool = Field(True, description="Drop the user's training items.")
    filters: dict[str, Any] | None = Field(
        None,
        description='Keep items whose metadata matches, e.g. {"genres": "Comedy"}.',
    )
    include_history: bool = Field(
        False, description="Also return the user's training items."
    )
    use_ranker: bool = Field(
        True,
        description="Apply the ranking stage; false: retrieval's order (to compare "
        "the two lists).",
    )
    explain: bool = Field(
        False,
        description="Add `because` to each item: the user's training item closest "
        'to it ("because you watched ...").',
    )
    context: dict[str, Any] | None = Field(
        None,
        description="The moment of the request, for a model that reads "
        'per-interaction context, e.g. {"timestamp": 1700000000}.',
    )
    candidates: list[RawId | dict[str, Any]] | None = Field(
        None,
        description="Rank these items only (your own candidate list), as the "
        "catalogue would be ranked; ask for `k` as long as the list to get all. "
        'An entry may be an object, {"item_id": ..., "<feature>": ...}: one whose '
        "ID the model does not know is a new item, ranked from those features.",
    )

    session: list[RawId | SessionItem] | None = Field(
        None,
        description="The current session's items, oldest first (IDs, or objects "
        "with `item_id`, `timestamp` and `rating`): they extend the user's history "
        "and are "
        "excluded as seen; without a `user_id` the session alone is the query. "
        "The ranking stage reads them as the query's history too. An item added "
        "to the catalogue after training is excluded but not read (the answer's "
        "`unread_session_items`).",
    )
    exclude: list[RawId] | None = Field(
        None,
        description="Item IDs to leave out of this answer (the basket, the items "
        "shown on the page before), as seen items are; not read as history. "
        "IDs the model does not know are listed in `unknown_excluded_items`.",
    )
    diversity: float = Field(
        0.0,
        ge=0,
        le=1,
        description="0 (the list as scored) to 1: re-pick the `k` items from "
        "the candidates trading each item's score against its likeness to those "
        "picked before it (maximal marginal relevance over the candidate "
        "embeddings); the items keep their scores, so a diverse list is not in "
        "score order.",
    )
    diversity_by: str | None = Field(
        None,
        description="With `diversity`: a metadata column whose values make two "
        'items alike (e.g. "genres": the cosine of their multi-hot rows) '
        "instead of their embeddings.",
    )
    max_per: dict[str, int] | None = Field(
        None,
        description="At most n items sharing a value of a metadata column, e.g. "
        '{"genres": 3} (an item of a list column counts towards each of its '
        "values); an item past the limit gives its place to the next candidate, "
        "and a list the limits leave short is picked again from a pool four "
        "times as wide (up to 16 times `num_candidates`, or the catalogue).",
    )
    num_candidates: int | None = Field(
        None,
        ge=1,
        description="How many retrieved items the ranking stage re-scores and "
        "`diversity` and `max_per` pick from (at least `k`; at most the server's "
        "`--max-num-candidates`); default: the server's `--num-candidates`, else "
        "the model's.",
    )

    def session_items(self) -> list[Any] | None:
        """The session as the Recommender takes it."""
        if self.session is None:
            return None
        return [
            e.model_dump(exclude_none=True) if isinstance(e, SessionItem) else e
            for e in self.session
        ]

    @field_validator("user_features")
    @classmethod
    def _features(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _plain_values(value, "user_features", nested=True, lists=True)

    @field_validator("context")
    @classmethod
    def _context(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _plain_values(value, "context")

    @field_validator("candidates")
    @classmethod
    def _candidates(
        cls, value: list[RawId | dict[str, Any]] | None
    ) -> list[RawId | dict[str, Any]] | None:
        for position, entry in enumerate(value or []):
            if isinstance(entry, dict):
                where = f"candidates[{position}]"
                if not isinstance(entry.get("item_id"), int | str) or isinstance(
                    entry.get("item_id"), bool
                ):
                    raise ValueError(
                        f"{where} should hold its item_id (an integer or a string) "
                        "beside the item's features"
                    )
                _plain_values(entry, where, nested=True, lists=True)
        return value

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _plain_values(value, "filters")


class SimilarRequest(_Strict):
    """Items most similar to one item ("people who watched this also watched")."""

    model: str | None = None
    item_id: RawId
    k: int = 10
    filters: dict[str, Any] | None = Field(
        None,
        description='Keep items whose metadata matches, e.g. {"in_stock": true}.',
    )
    diversity: float = Field(
        0.0,
        ge=0,
        le=1,
        description="0 (the closest first) to 1: pick the `k` from the closest "
        "trading closeness against likeness to those picked before, as in "
        "/v1/recommend.",
    )
    diversity_by: str | None = Field(
        None,
        description="With `diversity`: a metadata column whose values make two "
        "items alike, as in /v1/recommend.",
    )
    max_per: dict[str, int] | None = Field(
        None,
        description="At most n items sharing a value of a metadata column, e.g. "
        '{"brand": 2}, as in /v1/recommend.',
    )
    num_candidates: int | None = Field(
        None,
        ge=1,
        description="How many of the closest items `diversity` and `max_per` "
        "pick from (at least `k`; at most the server's `--max-num-candidates`), "
        "as in /v1/recommend.",
    )
    exclude: list[RawId] | None = Field(
        None,
        description="Item IDs to leave out of this answer (the basket, the items "
        "already on the page); IDs the model does not know are listed in "
        "`unknown_excluded_items`.",
    )
    item_features: dict[str, Any] | None = Field(
        None,
        description="The features of an item the model never trained on (a new "
        'product), e.g. {"genres": "Drama"}: the catalogue items closest to it '
        "come back. Not read for a known item.",
    )

    @field_validator("item_features")
    @classmethod
    def _item_features(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _plain_values(value, "item_features", nested=True, lists=True)

    @field_validator("filters")
    @classmethod
    def _filters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return _plain_values(value, "filters")


class PredictRequest(_Strict):
    """TF Serving's REST request shapes, one user per instance: the row form
    ``instances`` (a user ID such as ``"42"``, as the TFRS tutorials send it, or
    an object ``{"user_id": "42", "k": 5}``), or the columnar form ``inputs``
    (a list of user IDs, or ``{"user_id": [...], "k": [...]}`` lists of one length),
    answered as ``outputs``. Exactly one of the two.
    """

    instances: list[RawId | dict[str, Any]] | None = None
    inputs: list[RawId] | dict[str, list[Any]] | None = None
    signature_name: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> PredictRequest:
        if self.signature_name not in (None, "serving_default"):
            # TF Serving refuses a signature the model lacks; so does this server
            raise ValueError(
                f"`signature_name` {self.signature_name!r} is not a signature of "
                "this model: it has one, 'serving_default' (or leave it out)"
            )
        if (self.instances is None) == (self.inputs is None):
            raise ValueError(
                "give `instances` (one entry per user) or `inputs` (columns), "
                "exactly one of them"
            )
        if isinstance(self.inputs, dict):
            lengths = {name: len(values) for name, values in self.inputs.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(
                    f"the `inputs` columns should have one length; received {lengths}"
                )
        return self

    def rows(self) -> list[RawId | dict[str, Any]]:
        """One entry per user, whichever form the request took."""
        if self.instances is not None:
            return self.instances
        if isinstance(self.inputs, dict):
            names = list(self.inputs)
            count = len(self.inputs[names[0]]) if names else 0
            return [{n: self.inputs[n][row] for n in names} for row in range(count)]
        return list(self.inputs or [])


class Item(BaseModel):
    """One recommended item; metadata columns (title, genres...) are added as fields."""

    model_config = ConfigDict(extra="allow")

    item_id: RawId
    score: float = Field(description="Retrieval score (dot product of embeddings).")
    rank_score: float | None = Field(
        None, description="Ranking-stage score, when the model has a ranking stage."
    )
    predicted_rating: float | None = None
    label: str | None = Field(
        None,
        description="What to call the item: its title column (data.title_col, or "
        "a guess such as title or name); null without item metadata.",
    )
    tags: list[str] = Field(
        default_factory=list,
        description="Its tags column (data.tags_col, or a guess such as genres).",
    )
    because: dict[str, Any] | None = Field(
        None,
        description="With `explain`: the user's training item closest to this one "
        "(`item_id`, `label`).",
    )
    new_item: bool | None = Field(
        None,
        description="True for a new item of the request's `candidates`, ranked "
        "from the features it was sent with (which the answer shows).",
    )


class LeftOutCandidate(BaseModel):
    position: int = Field(description="The entry's index in `candidates`.")
    item_id: RawId
    reason: Literal["excluded", "seen", "filters", "repeated"] = Field(
        description="`excluded`: in the request's `exclude`; `seen`: the query's "
        "seen items are excluded (`exclude_seen`); `filters`: outside the "
        "request's `filters`; `repeated`: the item is listed earlier and ranked "
        "once."
    )


class RecommendResponse(BaseModel):
    model: str
    version: int
    user_id: RawId | None
    path: Literal["personalised", "session", "cold_start_features", "popularity"]
    items: list[Item]
    history: list[Item] | None = None
    unread_session_items: list[RawId] | None = Field(
        None,
        description="The request's `session` items added to the catalogue after "
        "training: excluded from the answer as seen, but not read by the model, "
        "which knows nothing of them yet (present only when there are some).",
    )
    left_out_candidates: list[LeftOutCandidate] | None = Field(
        None,
        description="The request's `candidates` entries the answer cannot hold "
        "(present only when there are some).",
    )
    alike_new_items: list[RawId] | None = Field(
        None,
        description="The request's new items (`candidates` sent as objects) when "
        "the model reads no item feature beside the ID: each is the unknown "
        "item's vector, so they score alike and their order among themselves "
        "means nothing (present only when there are some).",
    )
    unknown_excluded_items: list[RawId] | None = Field(
        None,
        description="The request's `exclude` IDs the model does not know: no "
        "answer could hold them, and they are listed so that a mistyped ID does "
        "not pass unseen (present only when there are some).",
    )
    short_reason: Literal["no_more_items", "max_per"] | None = Field(
        None,
        description="Why `items` holds fewer than `k` (present only then): "
        "`no_more_items`, the catalogue less the seen, excluded and filtered "
        "items (or the request's `candidates`) held no more; `max_per`, the "
        "limits passed over candidates of the widest pool looked at (a larger "
        "`num_candidates` looks further).",
    )
    user_features_unread: Literal["known_user", "popularity_fallback"] | None = Field(
        None,
        description="Why the request's `user_features` were not read (present "
        "only then): `known_user`, the model has learned this user; "
        "`popularity_fallback`, the model's fallback answers users with few "
        "training items (a new one too) by popularity.",
    )


class SimilarResponse(BaseModel):
    model: str
    version: int
    item_id: RawId
    items: list[Item]
    unknown_excluded_items: list[RawId] | None = Field(
        None,
        description="The request's `exclude` IDs the model does not know "
        "(present only when there are some).",
    )


class SearchResponse(BaseModel):
    model: str
    version: int
    query: str
    items: list[dict[str, Any]]


class PredictResponse(BaseModel):
    """``output_1``: scores, ``output_2``: item IDs, as the tutorials' exported index:
    per user under ``predictions`` (the row form), or per output under ``outputs``,
    one list per user (the columnar form). A third output,
    ``unread_session_items``, is there only when a request's session held items
    added to the catalogue after training: excluded as seen, not read; so are
    ``left_out_candidates``, ``alike_new_items``, ``unknown_excluded_items``
    and ``short_reason`` (null for an instance whose list is full), as in
    ``/v1/recommend``."""

    predictions: list[dict[str, Any]] | None = None
    outputs: dict[str, list[Any]] | None = None


class ErrorResponse(BaseModel):
    error: str
    details: list[str] = []
