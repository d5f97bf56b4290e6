"""Which columns name and tag an item, for MovieLens and for other catalogues."""

import polars as pl
import pytest

from twostage.display import DisplayColumns, display_columns, label_and_tags
from twostage.errors import ConfigError


def test_movielens_book_crossing_and_plain_tables() -> None:
    movies = pl.DataFrame(
        {
            "item_id": [1],
            "title": ["Toy Story"],
            "year": [1995],
            "display_title": ["Toy Story (1995)"],
            "genres": [["Animation", "Comedy"]],
        }
    )
    assert display_columns(movies) == DisplayColumns("display_title", "genres")
    books = pl.DataFrame(
        {
            "item_id": ["0195153448"],
            "book_author": ["Mark P. O. Morford"],
            "book_title": ["Classical Mythology"],
            "Category": ["['Social Science']"],
        }
    )
    columns = display_columns(books)
    assert columns == DisplayColumns("book_title", "Category")
    row = books.to_dicts()[0]
    assert label_and_tags(row, columns) == {
        "label": "Classical Mythology",
        "tags": ["Social Science"],
    }
    # No column named like a title: the text column with the most distinct values.
    plain = pl.DataFrame({"item_id": [1, 2], "kind": ["a", "a"], "sku": ["x", "y"]})
    assert display_columns(plain) == DisplayColumns("sku", None)
    assert display_columns(None) == DisplayColumns()


def test_configured_columns_win_and_are_checked() -> None:
    books = pl.DataFrame({"item_id": [1], "book_title": ["A"], "publisher": ["P"]})
    chosen = display_columns(books, title="publisher")
    assert chosen.title == "publisher"
    with pytest.raises(ConfigError, match=r"data\.title_col"):
        display_columns(books, title="Book-Title")


def test_a_configured_column_without_an_item_table_is_reported(caplog) -> None:
    """A title column named for a model without an item table showed nothing,
    and nothing said why."""
    with caplog.at_level("WARNING", logger="twostage.display"):
        assert display_columns(None) == DisplayColumns()
        assert not caplog.records
        assert display_columns(None, title="name", tags="kw") == DisplayColumns()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "`data.title_col` = 'name' is not shown" in said[0]
    assert "data.item_features" in said[0] and "`data.tags_col` = 'kw'" in said[1]


def test_recommender_labels_items_of_any_catalogue(small_recommender) -> None:
    answer = small_recommender.recommend(3, k=3)
    for entry in answer.items:
        assert entry["label"] and isinstance(entry["tags"], list)
