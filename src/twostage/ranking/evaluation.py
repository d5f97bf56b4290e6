"""Evaluating the ranker: rating error, click AUC and two-stage lists."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor

from twostage.config import KS
from twostage.data.dataset import Dataset
from twostage.data.user_items import UserItems
from twostage.errors import DataError
from twostage.metrics import MetricAccumulator, QueryFigures
from twostage.ranking.rerank import BLEND_GRID, rerank
from twostage.ranking.run import (
    RankingRun,
    is_pair,
    pairs_context,
    pairs_of,
    top_unseen,
)
from twostage.retrieval.evaluation import eval_queries
from twostage.retrieval.fallback import format_by_weight, popularity_top

logger = logging.getLogger(__name__)


def rmse(predicted: Tensor, target: Tensor) -> float:
    """Root mean squared error of two ``[n]`` tensors."""
    return float(torch.sqrt(torch.mean((predicted.double() - target.double()) ** 2)))


def mae(predicted: Tensor, target: Tensor) -> float:
    """Mean absolute error of two ``[n]`` tensors."""
    return float(torch.mean(torch.abs(predicted.double() - target.double())))


def auc(positive: Tensor, negative: Tensor) -> float:
    """P(a random positive outscores a random negative), ties counting 1/2.

    Args:
        positive: ``[p]`` scores of positive examples.
        negative: ``[n]`` scores of negative examples.
    """
    p, n = positive.numel(), negative.numel()
    if p == 0 or n == 0:
        raise DataError(
            "`auc` needs at least one positive and one negative score. "
            f"Received: {p} positive(s), {n} negative(s)."
        )
    scores = torch.cat([positive, negative]).double()
    order = scores.argsort()
    # Mann-Whitney U with 1-based ranks averaged over ties.
    _, inverse, counts = torch.unique_consecutive(
        scores[order], return_inverse=True, return_counts=True
    )
    tie_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(scores)
    ranks[order] = tie_rank[inverse]
    return float((ranks[:p].sum() - p * (p + 1) / 2) / (p * n))


def _two_stage(
    ranking: RankingRun,
    user_idx: Tensor,
    seen: UserItems,
    blend_weights: tuple[float, ...],
    *,
    reading: Tensor | None = None,
    context: pl.DataFrame | None = None,
    chunk: int = 256,
) -> tuple[Tensor, dict[float, Tensor]]:
    """Retrieve ``num_candidates`` unseen items per user, then re-rank them
    (:func:`twostage.ranking.rerank.rerank`, the rule serving uses); the EASE
    term reads each user's ``seen`` items. ``reading [Q]``: the new users read
    from a prior history (:meth:`RankingRun.with_users`), answered as a session
    is, never by the popularity fallback. ``context``: each query's context
    columns, which retrieval reads as it reads a request's (its candidates and
    logits are the served ones, and a ranker that reads context reads it too).

    Returns:
        ``[Q, C]`` item_idx in retrieval order and, per blend weight, ``[Q, C]`` in
        re-ranked order; ``-1`` marks empty slots, which stay last.
    """
    k = ranking.config.num_candidates
    retrieved: list[Tensor] = []
    reranked: dict[float, list[Tensor]] = {w: [] for w in blend_weights}
    # The run's popularity fallback: those users get most-popular, not re-ranked
    # (a user past the retrieval run's rows, `with_users`, is an unknown user).
    popular = torch.from_numpy(
        ranking.retrieval.uses_popularity(ranking.as_trained_users(user_idx).numpy())
    )
    if reading is not None:
        popular &= ~reading
    valid = torch.ones(ranking.tensors.num_items, dtype=torch.bool)
    valid[0] = False
    for start in range(0, len(user_idx), chunk):
        users = user_idx[start : start + chunk]
        part = seen.slice(start, start + len(users))
        queries = encoded = None
        if context is not None:
            encoded = ranking.encode_context(context[start : start + chunk])
            queries = ranking.context_queries(users, encoded)
        ids, logits = top_unseen(ranking, users, part, k, queries=queries)
        click = ranking.score(users, ids.clamp_min(0), context=encoded)["click"]
        ease = ranking.ease_scores(users, ids.clamp_min(0), rows=part)
        fallback = popular[start : start + len(users)]
        if fallback.any():
            rows = [part.row(r) for r in torch.nonzero(fallback).flatten().tolist()]
            probs = ranking.retrieval.tensors.fallback_popularity
            ids[fallback] = popularity_top(probs, rows, k, valid=valid)
        retrieved.append(ids)
        for w in blend_weights:
            order, _ = rerank(
                click,
                logits,
                blend_weight=w,
                valid=ids >= 0,
                ease=ease,
                ease_weight=ranking.config.ease_weight,
            )
            order[fallback] = torch.arange(k)  # most-popular order, as served
            reranked[w].append(ids.gather(1, order))
    return torch.cat(retrieved), {w: torch.cat(v) for w, v in reranked.items()}


def evaluated_lists(ranking: RankingRun, data: Dataset) -> tuple[Tensor, Tensor]:
    """The two-stage list evaluation scores for every user of ``data``.

    Returns:
        ``[Q]`` user_idx (0: a user unknown to the model) and ``[Q, C]`` item_idx in
        re-ranked order, ``C = num_candidates``, ``-1`` for empty slots (last). For
        a known user this is the list ``Recommender.recommend`` serves; for one
        the model never trained on, the list it serves with the user's row of
        ``data.users`` as ``user_features``.
    """
    queries, _, lists = _lists(ranking, data, (ranking.blend_weight,))
    return queries.user_idx, lists[ranking.blend_weight]


def _lists(
    ranking: RankingRun, data: Dataset, blend_weights: tuple[float, ...]
) -> tuple[_Queries, Tensor, dict[float, Tensor]]:
    """:func:`_two_stage` for every user of ``data`` (:func:`_queries`), new users
    scored as serving answers them (:func:`_with_new_users`)."""
    queries = _queries(ranking, data)
    scorer, scored = _with_new_users(ranking, data, queries)
    retrieved, lists = _two_stage(
        scorer,
        scored,
        queries.seen,
        blend_weights,
        reading=queries.reading,
        context=queries.context,
    )
    return queries, retrieved, lists


def _with_new_users(
    ranking: RankingRun, data: Dataset, queries: _Queries
) -> tuple[RankingRun, Tensor]:
    """The ranker to score ``data``'s users with and their indices there: each
    user the model never trained on as serving answers one sent with its
    features (``cold_start_features``), from its row of ``data.users``
    (:meth:`RankingRun.with_users`; the unknown user's row without one), and
    with its rows of ``data.prior`` as a session (:attr:`_Queries.reading`)."""
    if not bool((queries.user_idx == 0).any()):
        return ranking, queries.user_idx
    prior = data.prior if bool(queries.reading.any()) else None
    scorer, scored, _ = ranking.with_users(queries.ids, data.users, prior)
    return scorer, scored


def _list_metrics(
    ids: Tensor, relevant: UserItems, num_items: int
) -> dict[str, dict[str, float]]:
    """``{"ndcg", "hit_rate", "recall"} -> "k" -> value`` of ``[Q, K]`` ranked
    item_idx."""
    return _list_figures(ids, relevant, num_items)[0]


def _list_figures(
    ids: Tensor, relevant: UserItems, num_items: int, keep_queries: bool = False
) -> tuple[
    dict[str, dict[str, float]], dict[str, dict[str, float]], QueryFigures | None
]:
    """:func:`_list_metrics`, the standard error of each figure and, with
    ``keep_queries``, each query's figures."""
    acc = MetricAccumulator(ks=KS, num_items=num_items, keep_queries=keep_queries)
    acc.update(ids, relevant)
    names = ("ndcg", "hit_rate", "recall")
    metrics, errors = (
        {m: {str(k): v for k, v in found[m].items()} for m in names}
        for found in (acc.compute(), acc.standard_errors())
    )
    return metrics, errors, acc.queries() if keep_queries else None


@dataclass
class _Queries:
    """One query per user of a test split, for the two-stage lists."""

    user_idx: Tensor  # [Q] (0: a user the model never trained on)
    relevant: UserItems  # their test items, less the seen ones
    seen: UserItems  # their training items (a new user's: its prior items)
    num_items: int  # the evaluated catalogue (unknown test items each count)
    ids: pl.Series  # [Q] raw user IDs
    reading: Tensor  # [Q] bool: new users read from their prior rows
    # [Q] each query's context columns (one query per interaction), if read
    context: pl.DataFrame | None = None


def _queries(ranking: RankingRun, data: Dataset) -> _Queries:
    """One query per user of ``data``: the width of the evaluated catalogue
    counts each unknown test item past the vocabulary
    (:class:`~twostage.retrieval.evaluation.EvalQueries`), and a new user's rows
    of ``data.prior`` are its history and seen items (:func:`eval_queries`)."""
    queries = eval_queries(ranking.retrieval, data)
    seen = ranking.tensors.seen().take(queries.user_idx)
    if queries.prior is not None:
        seen = seen.union(queries.prior.seen())
    return _Queries(
        user_idx=torch.from_numpy(queries.user_idx),
        relevant=queries.relevant.difference(seen),
        seen=seen,
        num_items=queries.num_items,
        ids=queries.user_ids,
        reading=torch.from_numpy(queries.reads_prior()),
        context=queries.context,
    )


def blend_ndcg(ranking: RankingRun, validation: Dataset) -> dict[float, float]:
    """Validation NDCG@10 of the two-stage list at each weight of
    :data:`BLEND_GRID` (empty when ``validation`` has no rows).

    The lists are :func:`evaluated_lists`' at each weight: a validation user the
    model never trained on is scored from its row of ``validation.users``, as
    serving answers one sent with its features."""
    if not validation.num_interactions:
        return {}
    queries, _, lists = _lists(ranking, validation, BLEND_GRID)
    return {
        w: _list_metrics(ids, queries.relevant, queries.num_items)["ndcg"]["10"]
        for w, ids in lists.items()
    }


def pick_blend(ranking: RankingRun, validation: Dataset) -> float:
    """The blend weight of :data:`BLEND_GRID` with the best validation NDCG@10
    (:func:`blend_ndcg`; 0 without validation rows)."""
    ndcg = blend_ndcg(ranking, validation)
    if not ndcg:
        return 0.0
    logger.info("validation NDCG@10 by blend weight: %s", format_by_weight(ndcg))
    return max(ndcg, key=ndcg.__getitem__)


def evaluate_ranking(
    ranking: RankingRun, test: Dataset, *, seed: int = 0, keep_queries: bool = False
) -> dict[str, Any]:
    """Rating error, click AUC and the two-stage list quality on a test split.

    Args:
        ranking: the trained ranker (its tables say which items are seen).
        test: held-out interactions; a user's test items are the relevant ones.
        seed: seed of the AUC's negatives.
        keep_queries: also return each test user's figures of both lists, to
            compare them with another model's on the same split
            (:func:`twostage.metrics.paired_standard_error`).

    Returns:
        ``rmse`` and ``mae`` of the rating head on the rated test pairs (clipped to the
        training range; unknown IDs use the OOV rows); ``auc`` of the click head, each
        test pair against one uniform item that is neither a training nor a test item
        of the user; ``retrieval_only`` and ``two_stage``: ``{"ndcg", "hit_rate",
        "recall"}`` -> ``"k"`` -> per-user mean (users with a relevant unseen
        item; a user the model never trained on is answered from its row of
        ``test.users``, as serving answers one sent with its features, or as
        the unknown user without one) for k in 1, 5, 10, 50, 100;
        ``standard_errors``: the standard error of each of those means,
        ``{"retrieval_only", "two_stage"}`` -> metric -> ``"k"``; and ``blend_weight``,
        ``ease_weight``, ``num_candidates``, ``num_test_pairs``. When ``test``
        holds rows shown and not chosen (an impression log read with
        ``label_col``), ``shown_auc``: the click AUC of each user's test items
        against the items the same user was shown and did not choose in the test
        rows, the mean over the ``shown_auc_users`` users with both (users and
        items the model never saw scored from the test's tables, and counted:
        :func:`shown_auc`), as MIND's per-impression AUC: whether the
        ranker orders what the user actually saw; and ``impressions``, MIND's
        per-impression figures (:func:`shown_auc`). With ``keep_queries``,
        ``queries``: ``{"retrieval_only", "two_stage"}`` -> their
        :class:`~twostage.metrics.QueryFigures`, rows as
        :meth:`~twostage.retrieval.run.RetrievalRun.evaluate`'s (not JSON:
        take it out before writing the report).
    """
    users, items, ratings = pairs_of(ranking.retrieval, test, known_only=False)
    context = None
    if ranking.reads_context:
        context = pairs_context(ranking.retrieval, test, known_only=False)
    predicted = torch.cat(
        [
            ranking.score(users[part], items[part, None], context=_rows(context, part))[
                "rating"
            ][:, 0]
            for part in torch.arange(len(users)).split(8192)
        ]
    )
    rated = ~torch.isnan(ratings)
    result: dict[str, Any] = {"num_test_pairs": len(users)}
    if rated.any():
        result["rmse"] = rmse(predicted[rated], ratings[rated])
        result["mae"] = mae(predicted[rated], ratings[rated])
    result["auc"] = _test_auc(ranking, users, items, seed, context)
    if test.num_shown:
        result.update(shown_auc(ranking, test))
    queries, retrieved, lists = _lists(ranking, test, (ranking.blend_weight,))
    relevant, num_items = queries.relevant, queries.num_items
    result["standard_errors"] = {}
    kept = {}
    for name, ids in (
        ("retrieval_only", retrieved),
        ("two_stage", lists[ranking.blend_weight]),
    ):
        result[name], result["standard_errors"][name], found = _list_figures(
            ids, relevant, num_items, keep_queries
        )
        if found is not None:
            kept[name] = found
    result["blend_weight"] = ranking.blend_weight
    result["ease_weight"] = ranking.config.ease_weight
    result["num_candidates"] = ranking.config.num_candidates
    if keep_queries:
        result["queries"] = kept
    return result


def shown_auc(
    ranking: RankingRun, test: Dataset, *, impression_figures: bool = True
) -> dict[str, Any]:
    """The figures of :func:`evaluate_ranking` on the test's rows shown and not
    chosen (an item both chosen and shown counts as chosen where both are).

    Every row counts, as MIND's leaderboard counts every impression: a user the
    model does not know is scored as a cold start, from its row of ``test.users``
    and its rows of ``test.prior`` as its history (a MIND test file's click
    histories, read as serving reads a session; :meth:`RankingRun.with_users`),
    and an item it never trained on (only ever shown, or new since) from its row
    of ``test.items`` (:meth:`RankingRun.with_items`), each with its ID at the
    unknown row. ``shown_cold_users`` and ``shown_cold_items`` count those users
    and items, ``shown_cold_users_with_history`` the new users read from a
    history.

    ``shown_auc``: per user, the click AUC of the test items chosen against those
    shown and not chosen, ties counting 1/2, averaged over the ``shown_auc_users``
    users with both. ``impressions``, where some of the test's impressions (a
    user's rows of one timestamp) hold both: MIND's per-impression ``auc``,
    ``mrr`` (the mean of 1/rank over the items chosen) and ``ndcg@5`` /
    ``ndcg@10`` (binary gains) of the impression's items ordered by the click
    head (ties by item index), averaged over the ``count`` impressions (not
    computed when ``impression_figures`` is False). A ranker that reads context
    scores each row at its own (a pair shown at several moments: the mean of
    its rows' scores).
    """
    from twostage.data.dataset import ITEM, TIME, USER
    from twostage.features.context import DERIVED
    from twostage.retrieval.tensors import context_keys

    assert test.shown is not None
    frames = (test.interactions, test.shown)
    keys = context_keys(ranking.retrieval.spec) if ranking.reads_context else []
    columns = list(dict.fromkeys([USER, ITEM, TIME, *keys]))  # the time may be one

    def derived(frame: pl.DataFrame) -> pl.DataFrame:  # hour_of_day...: from TIME
        made = [n for n in keys if n in DERIVED and n not in frame.columns]
        frame = frame.with_columns(DERIVED[n].alias(n) for n in made)
        return frame.select(c for c in columns if c in frame.columns)

    both = pl.concat([derived(f) for f in frames], how="diagonal_relaxed")
    scorer, item_idx, cold_items = ranking.with_items(both[ITEM], test.items)
    scorer, user_idx, cold_users = scorer.with_users(both[USER], test.users, test.prior)
    rows = pl.DataFrame(
        {
            "user": both[USER],
            "u": user_idx.numpy(),
            "i": item_idx.numpy(),
            "t": both[TIME],
            "chosen": np.repeat([True, False], [f.height for f in frames]),
        }
    )
    pairs = (
        rows.group_by("user", "u", "i").agg(pl.col("chosen").any()).sort("user", "i")
    )
    mixed = pairs.group_by("user").agg(pl.col("chosen").n_unique() == 2)
    if not mixed["chosen"].any():
        logger.warning(
            "no test user has both a chosen item and one shown and not chosen: "
            "shown_auc is not measured"
        )
        return {"shown_auc_users": 0}
    if keys:  # each row at its context: the rows' scores, then each pair's mean
        extra = [c for c in both.columns if c in keys and c != TIME]
        rows = rows.with_columns(both.select(extra)).with_row_index("row")
        scored = rows.unique([c for c in rows.columns if c not in ("row", "chosen")])
        click = _row_clicks(scorer, scored.rename({"t": TIME}))
        scored = scored.select("u", "i", "t", *extra).with_columns(
            pl.Series("s", click.double().numpy())
        )
        rows = rows.join(scored, on=["u", "i", "t", *extra], nulls_equal=True)
        rows = rows.sort("row").drop("row", *extra)
        means = rows.group_by("u", "i").agg(pl.col("s").mean())
        pairs = pairs.join(means, on=["u", "i"], maintain_order="left")
    else:
        scored = pairs.select("u", "i").unique().sort("u", "i")
        users = torch.from_numpy(scored["u"].to_numpy().copy())
        items = torch.from_numpy(scored["i"].to_numpy().copy())
        splits = zip(users.split(8192), items.split(8192), strict=True)
        click = torch.cat(
            [scorer.score(u, i[:, None])["click"][:, 0] for u, i in splits]
        )
        scored = scored.with_columns(pl.Series("s", click.double().numpy()))
        pairs = pairs.join(scored, on=["u", "i"], maintain_order="left")
    result: dict[str, Any] = {}
    per_user = _group_auc(pairs, ["user"])
    result["shown_auc"] = float(per_user["auc"].mean())  # type: ignore[arg-type]
    result["shown_auc_users"] = per_user.height
    result["shown_cold_users"] = cold_users
    result["shown_cold_users_with_history"] = _with_history(ranking, test, both[USER])
    result["shown_cold_items"] = cold_items
    if not impression_figures:  # validation reads shown_auc only
        return result
    if keys:  # the impression's own moment
        impressions = (
            rows.group_by("user", "t", "i")
            .agg(pl.col("chosen").any(), pl.col("s").mean())
            .sort("user", "t", "i")
        )
    else:
        impressions = (
            rows.group_by("user", "t", "i")
            .agg(pl.col("chosen").any())
            .join(pairs.select("user", "i", "s"), on=["user", "i"])
            .sort("user", "t", "i")
        )
    per_impression = _group_auc(impressions, ["user", "t"])
    if per_impression.height:
        result["impressions"] = {
            "auc": float(per_impression["auc"].mean()),  # type: ignore[arg-type]
            **_impression_ranks(impressions, per_impression),
            "count": per_impression.height,
        }
    return result


def _row_clicks(ranking: RankingRun, rows: pl.DataFrame) -> Tensor:
    """``[n]`` the click logits of ``rows`` (``u``, ``i`` indices and the
    context columns), each at its own context."""
    encoded = ranking.encode_context(rows)
    users = torch.from_numpy(rows["u"].to_numpy().copy())
    items = torch.from_numpy(rows["i"].to_numpy().copy())
    out = []
    for part in torch.arange(len(users)).split(8192):
        context = {k: v[part] for k, v in encoded.items()}
        scored = ranking.score(users[part], items[part, None], context=context)
        out.append(scored["click"][:, 0])
    return torch.cat(out) if out else torch.zeros(0)


def _with_history(ranking: RankingRun, test: Dataset, users: pl.Series) -> int:
    """How many of ``users`` the model never trained on have a prior row
    (``test.prior``) of an item it knows: those scored from their history."""
    from twostage.data.dataset import USER
    from twostage.retrieval.tensors import PriorHistory

    if test.prior is None or not test.prior.height:
        return 0
    spec = ranking.retrieval.spec
    distinct = users.unique()
    new = spec.vocabulary(USER).transform(distinct) == 0
    history = PriorHistory.of(spec, distinct, test.prior, reads=new)
    return int((history.lengths() > 0).sum())


def _group_auc(pairs: pl.DataFrame, group: list[str]) -> pl.DataFrame:
    """Per group of ``pairs`` (scores ``s``, labels ``chosen``) holding both labels:
    its keys, ``p`` and ``n`` (the chosen and other items) and the AUC."""
    ranked = pairs.with_columns(pl.col("s").rank("average").over(group).alias("r"))
    counts = ranked.group_by(group, maintain_order=True).agg(
        p=pl.col("chosen").sum(),
        n=(~pl.col("chosen")).sum(),
        r=pl.col("r").filter(pl.col("chosen")).sum(),
    )
    both = counts.filter((pl.col("p") > 0) & (pl.col("n") > 0))
    return both.with_columns(
        (
            (pl.col("r") - pl.col("p") * (pl.col("p") + 1) / 2)
            / (pl.col("p") * pl.col("n"))
        ).alias("auc")
    )


def _impression_ranks(
    impressions: pl.DataFrame, kept: pl.DataFrame
) -> dict[str, float]:
    """MRR and nDCG@5 / @10 over the impressions in ``kept`` (keys ``user``, ``t``)."""
    ranked = (
        impressions.join(kept.select("user", "t", "p"), on=["user", "t"])
        .with_columns(
            # 1-based position by score, the highest first; ties by item index
            pl.col("s").rank("ordinal", descending=True).over("user", "t").alias("r")
        )
        .filter(pl.col("chosen"))
    )
    out: dict[str, float] = {}
    per = ranked.group_by("user", "t").agg(
        mrr=(1.0 / pl.col("r")).sum() / pl.len(),
        p=pl.col("p").first(),
        **{
            f"dcg{k}": (1.0 / (pl.col("r") + 1).log(2)).filter(pl.col("r") <= k).sum()
            for k in (5, 10)
        },
    )
    out["mrr"] = float(per["mrr"].mean())  # type: ignore[arg-type]
    gains = 1.0 / np.log2(np.arange(2, 12))  # positions 1..10
    ideal = np.concatenate([[0.0], np.cumsum(gains)])
    chosen = per["p"].to_numpy()
    for k in (5, 10):
        best = ideal[np.minimum(chosen, k)]
        out[f"ndcg@{k}"] = float((per[f"dcg{k}"].to_numpy() / best).mean())
    return out


def _rows(context: dict[str, Tensor] | None, part: Tensor) -> dict[str, Tensor] | None:
    """The rows ``part`` of an encoded context (None stays None)."""
    return None if context is None else {k: v[part] for k, v in context.items()}


def _test_auc(
    ranking: RankingRun,
    users: Tensor,
    items: Tensor,
    seed: int,
    context: dict[str, Tensor] | None = None,
) -> float:
    """Click AUC: each test pair against a uniform item unknown to its user."""
    num_items, tensors = ranking.tensors.num_items, ranking.tensors
    pair_keys = torch.cat(
        [tensors.users * num_items + tensors.items, users * num_items + items]
    )
    known = pair_keys.unique()  # sorted
    generator = torch.Generator().manual_seed(seed)
    negatives = torch.randint(1, num_items, (len(users),), generator=generator)
    for _ in range(20):  # redraw the negatives that are a known pair of their user
        clash = is_pair(known, users, negatives, num_items)
        if not clash.any():
            break
        redraw = torch.randint(1, num_items, (int(clash.sum()),), generator=generator)
        negatives[clash] = redraw
    candidates = torch.stack([items, negatives], dim=1)
    click = torch.cat(
        [
            ranking.score(users[part], candidates[part], context=_rows(context, part))[
                "click"
            ]
            for part in torch.arange(len(users)).split(8192)
        ]
    )
    return auc(click[:, 0], click[:, 1])
