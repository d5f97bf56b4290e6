"""The served lists of a saved model under its list rules (``diversity``,
``max_per``), measured on a test split beside the lists as scored.

The figures of ``twostage evaluate`` score the model's own order. A service that
answers with ``diversity`` or ``max_per`` serves other lists; this module writes
those lists for every test user as :meth:`Recommender.recommend_table` serves
them (both stages, seen items excluded) and measures them as the lists as
scored are measured: NDCG, Recall and HitRate at ``k`` on the test rows, the
mean intra-list diversity in the candidate embedding space
(:func:`twostage.diversity.intra_list_diversity`), catalogue coverage and the
lists' mean length (a limit leaves a list short where the candidates run out).
``twostage evaluate --diversity W --max-per column=N`` prints both rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from twostage.data.dataset import ITEM, USER, Dataset
from twostage.diversity import intra_list_diversity, intra_list_value_diversity
from twostage.errors import ConfigError
from twostage.inputs import check_k
from twostage.metrics import compute_metrics
from twostage.retrieval.evaluation import EvalQueries, eval_queries

if TYPE_CHECKING:
    from twostage.recommender import Recommender

__all__ = ["evaluate_list_rules", "list_figures", "served_lists"]


def served_lists(
    rec: Recommender,
    queries: EvalQueries,
    k: int,
    *,
    use_ranker: bool = True,
    diversity: float = 0.0,
    max_per: Mapping[str, int] | None = None,
    num_candidates: int | None = None,
    diversity_by: str | None = None,
) -> torch.Tensor:
    """``[Q, k]`` the item indices each test user is served, best first (-1
    past a short list), as :meth:`Recommender.recommend_table` writes them; for
    a model that reads per-interaction context, each test row's list at its
    own moment, as :meth:`Recommender.recommend` answers a request with it."""
    if queries.context is not None:
        return _lists_in_context(
            rec,
            queries,
            k,
            use_ranker=use_ranker,
            diversity=diversity,
            max_per=max_per,
            num_candidates=num_candidates,
            diversity_by=diversity_by,
        )
    users = queries.user_ids.to_list()
    table = rec.recommend_table(
        users,
        k,
        use_ranker=use_ranker,
        diversity=diversity,
        max_per=max_per,
        num_candidates=num_candidates,
        diversity_by=diversity_by,
    )
    position = {user: row for row, user in enumerate(users)}
    lists = torch.full((len(users), k), -1, dtype=torch.long)
    rows = torch.tensor([position[u] for u in table[USER].to_list()], dtype=torch.long)
    ranks = torch.from_numpy(table["rank"].to_numpy().astype(np.int64)) - 1
    items = torch.from_numpy(rec.item_vocab.transform(table[ITEM]).astype(np.int64))
    lists[rows, ranks] = items
    return lists


def _lists_in_context(
    rec: Recommender,
    queries: EvalQueries,
    k: int,
    **options: Any,
) -> torch.Tensor:
    """:func:`served_lists` of queries that each carry their context (a test
    row's moment and context columns): one request each."""
    lists = torch.full((len(queries.user_ids), k), -1, dtype=torch.long)
    assert queries.context is not None
    rows = queries.context.iter_rows(named=True)
    for row, (user, context) in enumerate(zip(queries.user_ids, rows, strict=True)):
        answer = rec.recommend(user, k, context=context, **options)
        found = [rec.item_vocab.lookup(item["item_id"]) for item in answer.items]
        lists[row, : len(found)] = torch.tensor(found, dtype=torch.long)
    return lists


def _as_evaluated(
    rec: Recommender, queries: EvalQueries, lists: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """``lists`` of the recommender's item indices in the evaluated catalogue's
    indices, and that catalogue's coverage universe. The trained items keep
    their indices; an item added after training (``add_items``) is the test's
    unknown item of the same ID where the test holds one (so a hit on it
    counts), else a column of its own past the test's items, which no test row
    holds; both count towards coverage."""
    trained = rec.num_trained_items
    if rec.item_vocab.size == trained:
        return lists, queries.valid_items
    first_cold = queries.num_items - queries.num_cold_items
    cold = {name: first_cold + i for i, name in enumerate(queries.cold_item_ids)}
    mapping = torch.arange(rec.item_vocab.size)
    extra = queries.num_items
    for index in range(trained, rec.item_vocab.size):
        found = cold.get(str(rec.item_ids[index]))
        if found is None:
            found, extra = extra, extra + 1
        mapping[index] = found
    valid = np.ones(extra, dtype=bool)
    valid[: queries.num_items] = queries.valid_items
    valid[mapping[trained:].numpy()] = True
    judged = torch.where(lists >= 0, mapping[lists.clamp_min(0)], lists)
    return judged, valid


def list_figures(
    rec: Recommender,
    queries: EvalQueries,
    lists: torch.Tensor,
    k: int,
    by: str | None = None,
) -> dict[str, float]:
    """One set of lists' figures (``ndcg``, ``recall``, ``hit_rate`` at ``k``
    over the users with an unseen test item, as the figures of ``evaluate``
    with seen items excluded; ``intra_list_diversity``, ``coverage``,
    ``mean_length`` over every list; with ``by``, a metadata column,
    ``value_diversity``: the lists' spread by its values)."""
    judged, valid = _as_evaluated(rec, queries, lists)
    found = compute_metrics(
        judged,
        queries.relevant.difference(queries.seen),
        ks=(k,),
        num_items=int(valid.shape[0]),
        valid_items=valid,
    )
    filled = lists >= 0
    vectors = rec.item_embeddings[lists.clamp_min(0)]
    spread = intra_list_diversity(vectors, filled)
    out = {
        "ndcg": found["ndcg"][k],
        "recall": found["recall"][k],
        "hit_rate": found["hit_rate"][k],
        "intra_list_diversity": float(spread.nanmean()),
        "coverage": found["coverage"][k],
        "mean_length": float(filled.sum(dim=1).float().mean()),
    }
    if by is not None:
        values, _ = rec.item_filters.groups(lists, {by: 1})
        figures = intra_list_value_diversity(values, filled)
        out["value_diversity"] = float(figures.nanmean())
    return out


def evaluate_list_rules(
    rec: Recommender,
    test: Dataset,
    *,
    k: int = 10,
    diversity: float = 0.0,
    max_per: Mapping[str, int] | None = None,
    use_ranker: bool = True,
    num_candidates: int | None = None,
    diversity_by: str | None = None,
) -> dict[str, Any]:
    """The served lists of every test user as scored and under the rules
    (picked from ``num_candidates``, default the ranking stage's number; the
    lists as scored always from that number, as the ranking report's).

    ``diversity_by``: as :meth:`Recommender.recommend` takes it; both rows
    then add ``value_diversity``, the lists' spread by that column's values.

    Returns:
        ``{"k", "diversity", "max_per", "diversity_by", "users" (the lists
        written), "per" ("test user", or "test row" where each row carries its
        context), "scored_users" (those with an unseen test item),
        "as_scored": figures,
        "with_rules": figures}``, each figures dict with ``ndcg``, ``recall``,
        ``hit_rate``, ``intra_list_diversity``, ``coverage``, ``mean_length``
        and ``seconds`` (writing the lists).

    Raises:
        ConfigError: rules that are not the recommender's to take, or test
            queries a table of lists cannot pose (a test file's new users with
            prior histories). A model that reads per-interaction context is
            measured a test row at a time, each row's list at its moment
            (``users`` then counts those rows).
    """
    k = check_k("k", k)
    rules = rec.list_rules(diversity, max_per, diversity_by)
    queries = eval_queries(rec.run, test)
    if queries.prior is not None:
        raise ConfigError(
            "the served lists under list rules are measured a user at a time, "
            "and this model's test queries of new users each carry their own "
            "prior history; measure the rules on a test without it."
        )
    out: dict[str, Any] = {
        "k": k,
        "diversity": rules.diversity,
        "max_per": rules.max_per,
        "diversity_by": rules.diversity_by,
        "num_candidates": rec.candidate_width(num_candidates, k),
        "users": len(queries.user_ids),
        # A list per test row where the model reads each row's context.
        "per": "test user" if queries.context is None else "test row",
        "scored_users": int(
            (queries.relevant.difference(queries.seen).lengths() > 0).sum()
        ),
    }
    for name, chosen in (("as_scored", None), ("with_rules", rules)):
        started = time.perf_counter()
        lists = served_lists(
            rec,
            queries,
            k,
            use_ranker=use_ranker,
            diversity=chosen.diversity if chosen else 0.0,
            max_per=chosen.max_per if chosen else None,
            num_candidates=num_candidates if chosen else None,
            diversity_by=chosen.diversity_by if chosen else None,
        )
        seconds = time.perf_counter() - started
        figures = list_figures(rec, queries, lists, k, rules.diversity_by)
        out[name] = {**figures, "seconds": seconds}
    return out
