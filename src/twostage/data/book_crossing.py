"""Book-Crossing in the layout of Kaggle's ``Preprocessed_data.csv`` (the TFRS
tutorial's file): reading it, and writing files in the same layout to test with.

The real file has an unnamed index column and a second one (``Unnamed: 0``), ISBNs
as text with leading zeros (and a trailing ``X``), ages as floats (34.7439 where the
age was unknown), a quoted ``location``, multi-line quoted ``Summary`` fields, the
``Category`` as a list written as text (``['Fiction']``), empty ``city``, ``state`` or
``country``, and ``rating`` 0 for an interaction without a rating (1-10 otherwise).
Read it with ``data.unrated_values=0`` so the zeros stay interactions but are not
ratings.

The writer plants structure that a model can learn: books belong to categories with
Zipf-like popularity, each user prefers a category, activity per user is heavy-tailed
(most users have one or two rows, as in the real log), and explicit ratings are higher
in the preferred category.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from twostage.data.dataset import Dataset
from twostage.errors import ConfigError

__all__ = ["BOOK_CROSSING_COLUMNS", "read_book_crossing", "write_book_crossing"]

#: The header of ``Preprocessed_data.csv`` (the first column has no name).
BOOK_CROSSING_COLUMNS = (
    "",
    "Unnamed: 0",
    "user_id",
    "location",
    "age",
    "isbn",
    "rating",
    "book_title",
    "book_author",
    "year_of_publication",
    "publisher",
    "img_s",
    "img_m",
    "img_l",
    "Summary",
    "Language",
    "Category",
    "city",
    "state",
    "country",
)
_CATEGORIES = (
    "Fiction",
    "Juvenile Fiction",
    "Biography & Autobiography",
    "History",
    "Religion",
    "Humor",
    "Cooking",
    "Science",
    "Poetry",
    "Travel",
    "Social Science",
    "Business & Economics",
)
_WORDS = [
    "Silent",
    "River",
    "Garden",
    "Winter",
    "Shadow",
    "Letters",
    "Island",
    "Stone",
    "House",
    "Promise",
    "Night",
    "Summer",
    "Secret",
    "Road",
    "Crown",
    "Mirror",
    "Harvest",
    "Storm",
    "Bridge",
    "Lantern",
    "Orchard",
    "Voyage",
]
_PLACES = (
    ("stockton", "california", "usa"),
    ("timmins", "ontario", "canada"),
    ("ottawa", "ontario", "canada"),
    ("london", "england", "united kingdom"),
    ("n/a", "n/a", "n/a"),
    ("berlin", "berlin", "germany"),
    ("madrid", "madrid", "spain"),
    ("sydney", "new south wales", "australia"),
)


def read_book_crossing(path: str | Path, **options: Any) -> Dataset:
    """Read a ``Preprocessed_data.csv``-layout file: users by ``user_id``, books by
    ``isbn``, ``rating`` (0: no rating; set ``data.unrated_values=0``), user features
    ``age`` and ``country``, item features title, author, year, publisher, language
    and category. ``options`` go to :func:`twostage.data.tables.read_interactions`
    (e.g. ``strict=True``)."""
    from twostage.data.tables import read_interactions

    mapping: dict[str, Any] = {
        "user_col": "user_id",
        "item_col": "isbn",
        "rating_col": "rating",
        "user_features": ["age", "country"],
        "item_features": [
            "book_title",
            "book_author",
            "year_of_publication",
            "publisher",
            "Language",
            "Category",
        ],
        "separator": ",",
        "name": "book-crossing",
    }
    return read_interactions(path, **{**mapping, **options})


def write_book_crossing(
    path: str | Path,
    *,
    num_users: int = 2000,
    num_books: int = 3000,
    num_rows: int = 20_000,
    unrated_share: float = 0.62,
    seed: int = 0,
) -> Path:
    """Write a log in the ``Preprocessed_data.csv`` layout with planted structure.

    Args:
        path: the CSV file to write.
        num_users, num_books, num_rows: sizes (every row is one user-book pair).
        unrated_share: share of rows with rating 0 (the real file: about 62%).
        seed: the random seed; the same seed writes the same bytes.
    """
    for name, value in (("num_users", num_users), ("num_books", num_books)):
        if value < len(_CATEGORIES):
            raise ConfigError(
                f"`{name}` should be at least {len(_CATEGORIES)}. Received: {value!r}."
            )
    if num_rows < 1 or not 0 <= unrated_share < 1:
        raise ConfigError(
            "`num_rows` should be positive and `unrated_share` in [0, 1). Received: "
            f"{num_rows!r} and {unrated_share!r}."
        )
    rng = np.random.default_rng(seed)
    books = _books(rng, num_books)
    users = _users(rng, num_users)
    rows = _pairs(rng, books, users, num_rows)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writerow(BOOK_CROSSING_COLUMNS)
        for number, (user, book) in enumerate(rows):
            preferred = users["category"][user] == books["category"][book]
            rating = 0
            if rng.random() >= unrated_share:
                mean = 8.0 if preferred else 5.5
                rating = int(np.clip(round(rng.normal(mean, 1.5)), 1, 10))
            writer.writerow(_row(number, user, book, rating, users, books))
    return out


def _books(rng: np.random.Generator, num: int) -> dict[str, Any]:
    category = rng.integers(0, len(_CATEGORIES), num)
    popularity = 1.0 / np.arange(1, num + 1) ** 0.9
    rng.shuffle(popularity)
    digits = rng.integers(0, 10**9, num)
    isbn = [f"{d:09d}{'X' if d % 11 == 10 else d % 10}" for d in digits]
    isbn = [f"0{i[1:]}" if n % 3 == 0 else i for n, i in enumerate(isbn)]
    title = [
        f"The {_WORDS[rng.integers(len(_WORDS))]} of the "
        f"{_WORDS[rng.integers(len(_WORDS))]} {n}"
        for n in range(num)
    ]
    return {
        "category": category,
        "popularity": popularity / popularity.sum(),
        "isbn": isbn,
        "title": title,
        "author": [f"Author {n % max(num // 3, 1)}" for n in range(num)],
        "year": rng.integers(1950, 2005, num),
    }


def _users(rng: np.random.Generator, num: int) -> dict[str, Any]:
    known_age = rng.random(num) < 0.6
    age = np.where(known_age, rng.integers(12, 80, num).astype(float), 34.7439)
    activity = 1.0 / np.arange(1, num + 1) ** 1.1
    rng.shuffle(activity)
    return {
        "category": rng.integers(0, len(_CATEGORIES), num),
        "activity": activity / activity.sum(),
        "age": age,
        "place": rng.integers(0, len(_PLACES), num),
        "id": rng.permutation(np.arange(2, 2 + 60 * num, 60))[:num],
    }


def _pairs(
    rng: np.random.Generator, books: dict[str, Any], users: dict[str, Any], num: int
) -> list[tuple[int, int]]:
    """``num`` distinct (user, book) pairs: 70% from the user's category."""
    by_category = [
        np.flatnonzero(books["category"] == c) for c in range(len(_CATEGORIES))
    ]
    seen: set[tuple[int, int]] = set()
    pairs: list[tuple[int, int]] = []
    num_users, num_books = len(users["activity"]), len(books["isbn"])
    limit = min(num, num_users * num_books)
    while len(pairs) < limit:
        user = int(rng.choice(num_users, p=users["activity"]))
        pool = by_category[users["category"][user]]
        if rng.random() < 0.7 and len(pool):
            weights = books["popularity"][pool]
            book = int(pool[rng.choice(len(pool), p=weights / weights.sum())])
        else:
            book = int(rng.choice(num_books, p=books["popularity"]))
        if (user, book) not in seen:
            seen.add((user, book))
            pairs.append((user, book))
    return pairs


def _row(
    number: int,
    user: int,
    book: int,
    rating: int,
    users: dict[str, Any],
    books: dict[str, Any],
) -> list[str]:
    city, state, country = _PLACES[users["place"][user]]
    isbn = books["isbn"][book]
    title = books["title"][book]
    image = f"http://images.amazon.com/images/P/{isbn}.01"
    summary = f'A story of "{title}", told in {books["year"][book]}.'
    if book % 4 == 0:  # some summaries run over several lines, with commas
        summary += "\nA second paragraph, with commas, follows."
    category = _CATEGORIES[books["category"][book]]
    empty = country == "n/a"
    return [
        str(number),
        str(number),
        str(users["id"][user]),
        f"{city}, {state}, {country}",
        f"{users['age'][user]:g}",
        isbn,
        str(rating),
        title,
        books["author"][book],
        f"{float(books['year'][book]):.1f}",
        f"Publisher {book % 40}",
        f"{image}.THUMBZZZ.jpg",
        f"{image}.MZZZZZZZ.jpg",
        f"{image}.LZZZZZZZ.jpg",
        summary,
        "en",
        f"['{category}']",
        "" if empty else city,
        "" if empty else state,
        "" if empty else country,
    ]
