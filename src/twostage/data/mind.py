"""The MIND layout (Microsoft News Dataset): impression logs of news clicks.

``behaviors.tsv`` has no header; each line is one impression, five tab-separated
fields: the impression's ID, the user, the time (``11/15/2019 8:55:22 AM``), the
user's click history before the log's period (news IDs separated by spaces, oldest
first, the same on each of the user's lines), and the news shown with a ``-1``
(clicked) or ``-0`` (not) each: ``N55689-1 N35729-0``. ``news.tsv`` (no header
either) describes each news item: ID, category, subcategory, title, abstract,
URL and two lists of entities.

:func:`read_mind` makes rows of both: an impression's news are rows at its time,
labelled chosen or shown only (``Dataset.shown``), and the history is read once per
user, from the user's first line, as chosen rows one second apart in the seconds
before that line's time (their order kept; the log has no time for them).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import polars as pl

from twostage.data._layout import TEXT as _TEXT
from twostage.data._layout import read_lines, refuse_options
from twostage.data._table_values import (
    LINE,
    Spec,
    canonical_ints,
    load_frame,
    make_options,
)
from twostage.data.dataset import ITEM, LABEL, TIME, USER, Dataset
from twostage.data.report import MAX_EXAMPLES, LoadReport
from twostage.errors import BadRowError, DataError

__all__ = ["read_mind"]

logger = logging.getLogger(__name__)

_BEHAVIORS = "behaviors.tsv"
_NEWS = "news.tsv"
_NEWS_COLUMNS = (
    "item_id",
    "category",
    "subcategory",
    "title",
    "abstract",
    "url",
    "title_entities",
    "abstract_entities",
)
#: The news columns kept as item features (the URL and entity lists are not).
_FEATURES = ("category", "subcategory", "title", "abstract")
_TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"
_OPTIONS = ("strict", "name", "history")


def read_mind(path: str | Path, **options: Any) -> Dataset:
    """Read a MIND ``behaviors.tsv`` with its ``news.tsv``.

    Args:
        path: the ``behaviors.tsv`` file, or its directory (MIND's ``train/``,
            ``dev/``). A ``news.tsv`` beside it gives the item features
            ``category``, ``subcategory``, ``title`` and ``abstract``.
        **options: ``strict=True`` stops at the first bad line or row (a
            :class:`~twostage.errors.BadRowError` naming its line); ``name``
            names the dataset (default ``mind``); ``history=False`` keeps the
            users' histories apart, as ``Dataset.prior`` (a test file's: clicks
            from before its period, the users' served history, not events to
            predict).

    Returns:
        A dataset of ``user_id``, ``item_id`` (the news) and ``timestamp``: the
        clicked news of each impression and each user's history are its
        interactions, the news shown and not clicked its ``shown`` rows. The
        report counts a row per news of an impression or a history, and rejects
        whole lines as ``blank_line``, ``wrong_field_count`` (not five fields)
        or ``bad_timestamp`` (a time not written as MIND writes it), and single
        news as ``bad_label`` (no ``-1`` / ``-0`` after the ID) or
        ``empty_item_id``.

    Raises:
        ConfigError: an option other than ``strict`` and ``name`` (a column
            mapping: the layout names its columns).
        DataError: no ``behaviors.tsv`` there.
    """
    refuse_options(
        options,
        _OPTIONS,
        "a MIND behaviors file has its columns already (impression, user, time, "
        "history, impressions)",
        "mind:PATH",
    )
    strict = bool(options.get("strict", False))
    root = Path(path).expanduser()
    behaviors = root / _BEHAVIORS if root.is_dir() else root
    if not behaviors.is_file():
        raise DataError(
            f"{str(root)!r} is not a MIND behaviors file, nor a directory holding "
            f"{_BEHAVIORS!r}."
        )
    raw, report, prior = _rows(behaviors, history=bool(options.get("history", True)))
    spec = Spec(
        {USER: USER, ITEM: ITEM, LABEL: LABEL, TIME: TIME},
        (),
        None,
        "keep",
        (USER, ITEM, TIME),
    )
    opts = make_options(
        separator=None,
        has_header=True,
        column_names=None,
        encoding="auto",
        quote_char=None,
        strict=False,  # the first bad line of either kind stops a strict read
        time_format=None,
    )
    parsed, values, _, _ = load_frame(
        raw.drop(LINE), str(behaviors), spec, opts, lines=raw[LINE]
    )
    report.rows_read += values.rows_read
    for reason, count in values.rejected.items():
        report.add_many(reason, count, values.examples.get(reason, []))
    if strict and not report.ok:
        line, reason = min(
            (kept[0][0], reason) for reason, kept in report.examples.items() if kept
        )
        text = _line_text(behaviors, line)  # the line, not the row made of it
        raise BadRowError(str(behaviors), line, reason, text)
    parsed = parsed.with_columns(canonical_ints(parsed, [USER, ITEM]).values())
    if prior is not None:  # typed as the log's IDs (MIND's are text)
        typed = prior.with_columns(
            pl.col(key).cast(parsed.schema[key], strict=False) for key in (USER, ITEM)
        )
        bad = typed[USER].is_null() | typed[ITEM].is_null()
        if bad.any():  # said, not silently dropped
            logger.warning(
                "%d history rows of %s hold an ID that is not of the log's type "
                "(user %s, news %s), e.g. %s; they are left out of the users' "
                "history",
                int(bad.sum()),
                behaviors,
                parsed.schema[USER],
                parsed.schema[ITEM],
                prior.filter(bad).row(0),
            )
        prior = typed.drop_nulls([USER, ITEM])
    shown = parsed.filter(~pl.col(LABEL)).select(USER, ITEM, TIME)
    interactions = parsed.filter(pl.col(LABEL)).select(USER, ITEM, TIME)
    report.rows_loaded = parsed.height
    report.shown_rows = shown.height
    if report.ok:
        logger.debug("%s", report.summary())
    else:
        logger.warning("%s", report.summary())
    news = behaviors.parent / _NEWS
    items = _read_news(news, interactions.schema[ITEM]) if news.is_file() else None
    return Dataset(
        name=str(options.get("name") or "mind"),
        interactions=interactions,
        items=items,
        source=str(behaviors),
        report=report,
        has_time=True,
        shown=shown,
        prior=prior,
    )


def _rows(
    path: Path, *, history: bool = True
) -> tuple[pl.DataFrame, LoadReport, pl.DataFrame | None]:
    """One row per news of each impression and (with ``history``) of each user's
    first history:
    ``user_id``, ``item_id``, ``label`` (text) and ``timestamp`` (seconds), with
    the line each came from; the report counts the lines rejected whole. Without
    ``history``, the history rows (``user_id``, ``item_id``, ``timestamp``) come
    apart, third."""
    lines = read_lines(path, "a MIND behaviors file").with_columns(
        pl.col(_TEXT).str.strip_suffix("\r").str.split("\t").alias("__f")
    )
    field = pl.col("__f").list
    time = field.get(2, null_on_oob=True).str.strptime(
        pl.Datetime("us"), _TIME_FORMAT, strict=False
    )
    blank = pl.col(_TEXT).is_null() | (pl.col(_TEXT).str.strip_chars() == "")
    lines = lines.with_columns(
        pl.when(blank)
        .then(pl.lit("blank_line"))
        .when(field.len() != 5)
        .then(pl.lit("wrong_field_count"))
        .when(time.is_null())
        .then(pl.lit("bad_timestamp"))
        .alias("__reason"),
        (time.dt.epoch("s")).alias(TIME),
    )
    report = LoadReport(path=str(path))
    bad = lines.filter(pl.col("__reason").is_not_null())
    for (reason,), group in bad.group_by("__reason", maintain_order=True):
        head = group.head(MAX_EXAMPLES).select(LINE, _TEXT).rows()
        report.add_many(
            str(reason), group.height, [(n, (t or "")[:200]) for n, t in head]
        )
    report.rows_read = bad.height
    good = lines.filter(pl.col("__reason").is_null()).select(
        LINE,
        field.get(1).str.strip_chars().alias(USER),
        pl.col(TIME),
        field.get(3).alias("__history"),
        field.get(4).alias("__shown"),
    )
    shown = (
        good.select(LINE, USER, TIME, pl.col("__shown").str.split(" "))
        .explode("__shown")
        .filter(pl.col("__shown") != "")
        .with_columns(
            pl.col("__shown").str.extract(r"^(.*)-([01])$", 1).alias(ITEM),
            pl.col("__shown").str.extract(r"^(.*)-([01])$", 2).alias(LABEL),
        )
        .with_columns(
            # a news without its -1 / -0: the whole token is the ID, the label bad
            pl.coalesce(pl.col(ITEM), pl.col("__shown")).alias(ITEM)
        )
        .select(LINE, USER, ITEM, LABEL, TIME)
    )
    opening = good.sort(TIME, LINE).unique(USER, keep="first", maintain_order=True)
    clicked = (
        opening.select(LINE, USER, TIME, pl.col("__history").str.split(" "))
        .explode("__history")
        .filter(pl.col("__history") != "")
        .with_columns(
            # one second apart, the last one a second before the line's time
            (
                pl.col(TIME) - pl.len().over(USER) + pl.int_range(pl.len()).over(USER)
            ).alias(TIME)
        )
        .select(
            LINE,
            USER,
            pl.col("__history").alias(ITEM),
            pl.lit("1").alias(LABEL),
            TIME,
        )
    )
    if not history:  # kept apart: the users' history, not events of the log
        return shown, report, clicked.select(USER, ITEM, TIME)
    rows = pl.concat([clicked, shown], how="vertical").sort(LINE, maintain_order=True)
    return rows, report, None


def _line_text(path: Path, line: int) -> str:
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            if number == line:
                return text.rstrip("\n")[:200]
    return ""


def _read_news(path: Path, key_type: pl.DataType) -> pl.DataFrame:
    """``news.tsv``: ``item_id`` and the features of :data:`_FEATURES`, keys typed
    as the log's."""
    from twostage.data.tables import read_feature_table

    news = read_feature_table(
        path,
        key_col="item_id",
        key_name="item_id",
        columns=list(_FEATURES),
        separator="\t",
        has_header=False,
        column_names=list(_NEWS_COLUMNS),
        quote_char=None,
    )
    return news.with_columns(pl.col(ITEM).cast(key_type))
