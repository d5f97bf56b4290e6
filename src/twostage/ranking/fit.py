"""Training the ranker: pairs, click negatives, the loss; the loop is the one both
stages share (:func:`twostage.training.loop.run_training`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from twostage import distributed
from twostage.baselines import EASE
from twostage.config import RankingConfig, TrainConfig, to_dict
from twostage.data.dataset import ITEM, USER, Dataset
from twostage.data.split import validation_split
from twostage.errors import ConfigError, DataError
from twostage.models.linear_items import LinearItemsModel
from twostage.ranking.evaluation import auc, pick_blend, rmse, shown_auc
from twostage.ranking.run import (
    Pairs,
    RankingRun,
    build_ranking_model,
    forward_pairs,
    is_pair,
    pairs_context,
    pairs_of,
    top_unseen,
    weighted_pairs_of,
)
from twostage.retrieval.fit import fit_ease
from twostage.retrieval.run import RetrievalRun
from twostage.retrieval.tensors import RetrievalTensors, with_history_of
from twostage.training import ProgressFn, TrainResult
from twostage.training.loop import (
    data_digest,
    few_steps,
    resume_fingerprint,
    run_training,
)
from twostage.training.optim import resolve_device
from twostage.training.warm import warm_source

if TYPE_CHECKING:
    from twostage.recommender import Recommender

__all__ = ["fit_ease_term", "fit_ranking", "fit_ranking_pairs"]

logger = logging.getLogger(__name__)

#: A user's items shown and not chosen, as vocabulary indices: ``(user_idx,
#: item_idx)`` of the known pairs (an impression log's ``Dataset.shown``).
ShownPairs = tuple[Tensor, Tensor]


@dataclass
class _Negatives:
    """Samples click negatives: hard ones from a retrieval pool, uniform ones, and
    the items each user was shown and did not choose."""

    pool: Tensor  # (U, P) each user's top unseen retrieval items, 0 where exhausted
    known: Tensor  # (n,) sorted user_idx * num_items + item_idx of training pairs
    num_items: int
    num_hard: int
    num_random: int
    # (U + 1,) offsets into ``shown_items`` of each user's shown items, grouped by
    # user; empty when nothing is drawn from them
    shown_start: Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )
    shown_items: Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )
    num_shown: int = 0

    def sample(
        self, users: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """``[B]`` users -> ``[B, M]`` item_idx and ``[B, M]`` bool (usable draw)."""
        shape = (len(users), self.num_hard)
        cols = torch.randint(0, self.pool.shape[1], shape, generator=generator)
        hard = self.pool[users[:, None], cols.to(users.device)]
        shape = (len(users), self.num_random)
        uniform = torch.randint(1, self.num_items, shape, generator=generator)
        parts = [hard, uniform.to(users.device)]
        if self.num_shown:
            start = self.shown_start[users]
            count = self.shown_start[users + 1] - start
            draw = torch.rand((len(users), self.num_shown), generator=generator)
            offset = (draw.to(users.device) * count[:, None]).long()
            at = (start[:, None] + offset).clamp_max(max(len(self.shown_items) - 1, 0))
            shown = self.shown_items[at] if len(self.shown_items) else at * 0
            parts.append(shown.masked_fill(count[:, None] == 0, 0))
        items = torch.cat(parts, dim=1)
        known = is_pair(self.known, users[:, None], items, self.num_items)
        return items, (items > 0) & ~known

    def to(self, device: torch.device) -> _Negatives:
        return dataclasses.replace(
            self,
            pool=self.pool.to(device),
            known=self.known.to(device),
            shown_start=self.shown_start.to(device),
            shown_items=self.shown_items.to(device),
        )


def _loss(
    run: RankingRun,
    negatives: _Negatives | None,
    batch: Pairs,
    generator: torch.Generator,
    weights: Tensor | None = None,
    context: dict[str, Tensor] | None = None,
) -> Tensor:
    """Rating MSE (rated positives) plus click BCE (positives, negatives) plus,
    with ``listwise_weight``, the softmax cross-entropy of each positive against
    its usable negatives, each a mean over the batch's rows weighted by
    ``weights`` (the log's row weights: a row's rating error and its positive and
    negatives count that much; all 1 when None). ``context``: the rows' encoded
    context, for a ranker that reads it.

    In a data-parallel run (:mod:`twostage.distributed`) ``batch`` is the global
    batch: the negatives are drawn for all of it, this rank scores its share, and the
    means divide by the global totals times the number of ranks, so that DDP's
    averaged gradient is the global batch's.
    """
    config, (users, items, ratings) = run.config, batch
    candidates = items[:, None]
    usable = torch.ones(len(items), 1, dtype=torch.bool, device=items.device)
    if negatives is not None:
        sampled, ok = negatives.sample(users, generator)
        candidates = torch.cat([candidates, sampled], dim=1)  # (B, 1 + M)
        usable = torch.cat([usable, ok], dim=1)
    rated = ~torch.isnan(ratings)
    rows = torch.ones_like(ratings) if weights is None else weights
    cells = usable * rows[:, None]  # each candidate's weight in the BCE
    num_rated, num_usable, ranks = rows[rated].sum(), cells.sum(), 1
    num_rows = rows.sum()
    world = distributed.current()
    if world is not None:  # the global totals, then this rank's rows
        share = world.shard(torch.arange(len(users), device=users.device))
        users, candidates, cells = users[share], candidates[share], cells[share]
        ratings, rated, rows = ratings[share], rated[share], rows[share]
        if context is not None:
            context = {k: v[share] for k, v in context.items()}
        ranks = world.size
    out = forward_pairs(run, users, candidates, exclude_target=True, context=context)
    loss = torch.zeros((), device=items.device)
    if config.rating_weight > 0 and num_rated > 0:
        error = out["rating"][:, 0][rated] - ratings[rated]
        squared = (rows[rated] * error.pow(2)).sum()
        loss = loss + config.rating_weight * ranks * squared / num_rated
    if config.click_weight > 0 and num_usable > 0:
        labels = torch.zeros_like(out["click"])
        labels[:, 0] = 1.0
        bce = F.binary_cross_entropy_with_logits(
            out["click"], labels, weight=cells, reduction="sum"
        )
        loss = loss + config.click_weight * ranks * bce / num_usable
    if config.listwise_weight > 0 and out["click"].shape[1] > 1 and num_rows > 0:
        # The positive against its usable negatives (column 0 is always usable).
        logits = out["click"].masked_fill(cells == 0, -torch.inf)
        logits[:, 0] = out["click"][:, 0]
        softmax = (torch.logsumexp(logits, dim=1) - logits[:, 0]) * rows
        loss = loss + config.listwise_weight * ranks * softmax.sum() / num_rows
    return loss


def _validate(
    run: RankingRun,
    pairs: Pairs,
    held: Dataset | None = None,
    context: dict[str, Tensor] | None = None,
) -> dict[str, float]:
    """Validation RMSE (rating head, clipped) and click AUC against uniform items;
    ``metric`` (maximised) is minus the RMSE, or the AUC without ratings: the AUC
    against the items shown and not chosen when ``held`` (the validation rows)
    has some, which is what a click model of an impression log is for."""
    users, items, ratings = pairs
    generator = torch.Generator().manual_seed(_train_config(run).seed + 17)
    uniform = torch.randint(
        1, run.tensors.num_items, (len(users),), generator=generator
    )
    out = run.score(users, torch.stack([items, uniform], dim=1), context=context)
    result = {"auc": auc(out["click"][:, 0], out["click"][:, 1])}
    rated = ~torch.isnan(ratings)
    result["metric"] = result["auc"]
    if held is not None and held.num_shown:
        shown = shown_auc(run, held, impression_figures=False)
        if "shown_auc" in shown:
            result["metric"] = result["shown_auc"] = shown["shown_auc"]
    if rated.any():
        result["rmse"] = rmse(out["rating"][:, 0][rated], ratings[rated])
        result["metric"] = -result["rmse"]
    return result


def fit_ranking(
    run: RetrievalRun,
    train: Dataset,
    *,
    config: RankingConfig | None = None,
    validation: Dataset | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: ProgressFn | None = None,
    on_epoch: ProgressFn | None = None,
    stop_after_epoch: int | None = None,
    allow_config_change: bool = False,
    warm_from: Recommender | None = None,
) -> RankingRun:
    """Train a ranker on a retrieval run's features and candidates.

    Args:
        run: the trained retrieval run (features, vocabularies, candidate source); its
            config's ``train`` section gives the seed, device and threads.
        train: the ranker's training pairs (pairs with unknown IDs are skipped).
        config: the ranker's settings; ``run.config.ranking`` when None.
        validation: held-out pairs, disjoint from ``train``, for early stopping and the
            blend weight; carved out of ``train`` (``data.validation_fraction`` of it)
            when None. Best: the retrieval run's own carve-out, which
            :func:`twostage.two_stage.fit_two_stage` passes.
        checkpoint_dir: where the loop writes a checkpoint after every epoch.
        resume: continue from the checkpoint in ``checkpoint_dir``.
        on_step: called after every step with ``{"epoch", "step", "loss", "examples"}``.
        on_epoch: called with each epoch's record (``validation``: the figure
            early stopping reads, higher is better); an exception it raises
            ends training there (a tuner pruning a trial).
        stop_after_epoch: stop (as if killed) after this many epochs; for tests.
        allow_config_change: resume even though the settings differ from the
            checkpoint's.
        warm_from: a fitted model whose ranker the new one starts from (as
            ``train.warm_start`` does with a saved one, which it replaces).

    Returns:
        The run; its tables hold ``train`` and ``validation`` as history and seen items
        (as a retrieval run's tables do after training).
    """
    started = time.perf_counter()
    if validation is None and run.config.data.validation_fraction > 0:
        train, validation = validation_split(
            train,
            fraction=run.config.data.validation_fraction,
            seed=run.config.train.seed,
        )
    held = validation

    def served() -> RetrievalTensors:  # the training and validation rows
        rows = train.interactions
        if held is not None:
            # diagonal: held-out rows may lack the training rows' weights
            rows = pl.concat([rows, held.interactions], how="diagonal_relaxed")
        both = train.with_interactions(rows)
        return with_history_of(run.tensors, run.spec, both, run.config.retrieval)

    pairs, weights = weighted_pairs_of(run, train, known_only=True)
    ranking = fit_ranking_pairs(
        run,
        pairs,
        with_history_of(run.tensors, run.spec, train, run.config.retrieval),
        weights=weights,
        context=(
            pairs_context(run, train, known_only=True)
            if (config or run.config.ranking).use_context
            else None
        ),
        shown=shown_pairs_of(run, train),
        served=served,
        config=config,
        validation=validation,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_step=on_step,
        on_epoch=on_epoch,
        stop_after_epoch=stop_after_epoch,
        allow_config_change=allow_config_change,
        warm_from=warm_from,
    )
    ranking.train_seconds = time.perf_counter() - started
    return ranking


def fit_ranking_pairs(
    run: RetrievalRun,
    pairs: Pairs,
    tables: RetrievalTensors,
    *,
    served: Callable[[], RetrievalTensors],
    weights: Tensor | None = None,
    shown: ShownPairs | None = None,
    context: dict[str, Tensor] | None = None,
    config: RankingConfig | None = None,
    validation: Dataset | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: ProgressFn | None = None,
    on_epoch: ProgressFn | None = None,
    stop_after_epoch: int | None = None,
    allow_config_change: bool = False,
    warm_from: Recommender | None = None,
) -> RankingRun:
    """:func:`fit_ranking` from the training rows as vocabulary indices: what a
    streamed log gives (:func:`twostage.retrieval.streamed.fit_streamed_two_stage`).

    Args:
        run: the trained retrieval run.
        pairs: the training rows' known ``(user_idx, item_idx, rating)`` (NaN: no
            rating).
        tables: the retrieval tables of those rows (history, seen items) the
            ranker trains with.
        served: the tables it serves with afterwards (the validation rows joined).
        weights: the rows' weights (the log's ``weight`` column), which scale each
            row's share of the loss; every row weighs 1 when None.
        shown: the items the users were shown and did not choose in the training
            rows (:func:`shown_pairs_of`), which ``num_shown_negatives`` draws from.
        context: the training rows' encoded per-interaction context
            (:func:`~twostage.ranking.run.pairs_context`): the ranker then reads
            each row's own (:attr:`RankingRun.reads_context`), and the
            validation rows' their own; None trains it with the context unknown.
        validation: held-out rows for early stopping and the blend weight.
        config, checkpoint_dir, resume, on_step, on_epoch, stop_after_epoch,
        allow_config_change: as for :func:`fit_ranking`.
    """
    config = config or run.config.ranking
    started = time.perf_counter()
    rated = pairs[2][~torch.isnan(pairs[2])]
    if not len(pairs[0]) or (
        config.rating_weight > 0
        and not len(rated)
        and config.click_weight + config.listwise_weight == 0
    ):
        raise DataError(
            "`train` should hold pairs of known users and items, with ratings when "
            f"rating_weight > 0 (else set rating_weight=0). Received: {len(pairs[0])} "
            f"known pairs, {len(rated)} rated."
        )
    if config.rating_weight > 0 and not len(rated):
        # An implicit log (views, plays, clicks): the default settings ended in the
        # error above, after retrieval had trained.
        logger.warning(
            "the training rows hold no ratings: the ranker learns clicks only "
            "(ranking.rating_weight=%g is not used; set it to 0 to say so)",
            config.rating_weight,
        )
        config = dataclasses.replace(config, rating_weight=0.0)
    elif config.rating_weight > 0 and bool((rated == rated[0]).all()):
        # Implicit feedback written as a rating of 1: RMSE 0.0000 said nothing.
        logger.warning(
            "every training rating is %g: the rating head has nothing to learn and "
            "RMSE / MAE say nothing (an implicit log written with one rating?); "
            'read the log without ratings (--rating-col "", rating_col="") or '
            "set ranking.rating_weight=0, so the ranker learns clicks only",
            float(rated[0]),
        )
    limit = EASE().max_items
    if config.ease_weight > 0 and tables.num_items > limit:
        raise ConfigError(  # before the ranker trains
            "`ranking.ease_weight` > 0 fits EASE, a dense items x items matrix: "
            f"{tables.num_items} items is above EASE's {limit}. Set "
            "`ranking.ease_weight=0` for this catalogue."
        )
    warning = few_steps(
        "the ranker", len(pairs[0]), config.batch_size, "ranking.batch_size"
    )
    if warning:
        logger.warning(warning)
    catalogue = tables.num_items - 1  # row 0 is padding
    if config.num_candidates >= catalogue:
        logger.warning(
            "ranking.num_candidates=%d is not below the catalogue's %d items: the "
            "ranking stage re-scores every unseen item, and retrieval does not narrow "
            "the list. A smaller number keeps the ranker to retrieval's best.",
            config.num_candidates,
            catalogue,
        )
    torch.manual_seed(run.config.train.seed)  # the initial weights are part of the run
    mean = float(rated.mean()) if len(rated) else 0.0
    ranking = RankingRun(
        config=config,
        retrieval=run,
        model=build_ranking_model(run, config, rating_mean=mean),
        tensors=tables,
        # On the training rows, so that the blend picked on validation does not
        # read the validation rows; refitted below on every row it serves with.
        ease=fit_ease_term(config, tables),
    )
    if len(rated):
        ranking.rating_bounds = (float(rated.min()), float(rated.max()))
    source = warm_source(run.config.train.warm_start, warm_from)
    if source is not None:
        _warm_start(ranking, *source)
    ranking.reads_context = context is not None
    val_pairs = val_context = None
    if validation is not None:
        val_pairs = pairs_of(run, validation, known_only=True)
        if context is not None:
            val_context = pairs_context(run, validation, known_only=True)
    result = _train(
        ranking,
        pairs,
        val_pairs if val_pairs is not None and len(val_pairs[0]) else None,
        weights=weights,
        shown=shown,
        context=context,
        val_context=val_context,
        held=validation,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        resume=resume,
        on_step=on_step,
        on_epoch=on_epoch,
        stop_after_epoch=stop_after_epoch,
        fingerprint=resume_fingerprint(
            {
                "data": to_dict(run.config.data),
                "ranking": _fingerprinted(config, reads_context=context is not None),
                "train": {"seed": run.config.train.seed},
            },
            # Weights and shown rows join the digest only when given: earlier
            # checkpoints resume.
            data=None
            if checkpoint_dir is None
            else data_digest(
                *pairs,
                *([] if weights is None else [weights]),
                *([] if shown is None else shown),
                *([] if context is None else [context[k] for k in sorted(context)]),
            ),
        ),
        allow_config_change=allow_config_change,
    )
    ranking.history = result.history
    ranking.blend_weight = (
        pick_blend(ranking, validation)
        if config.blend_weight is None and validation is not None
        else (config.blend_weight or 0.0)
    )
    served_tables = served()
    if ranking.ease is not None and served_tables.num_examples != tables.num_examples:
        ranking.ease = fit_ease_term(config, served_tables)
    ranking.tensors = served_tables
    ranking._vectors = None  # the retrieval query vectors depend on the history
    ranking.train_seconds = time.perf_counter() - started
    logger.info("ranker trained in %.1f s", ranking.train_seconds)
    return ranking


def _warm_start(ranking: RankingRun, saved: Recommender, path: str) -> None:
    """Copy the ranker's weights of ``saved`` (named ``path``: the saved model
    ``train.warm_start`` names, or one handed over) into a new one
    (:func:`twostage.training.warm.copy_weights`); a model without a ranker
    leaves it as built, and says so."""
    from twostage.training.warm import WarmStart, copy_weights

    if saved.ranker is None:
        logger.warning(
            "The warm start's model (%s) has no ranking stage: the ranker starts "
            "from fresh weights.",
            path,
        )
        return
    assert isinstance(saved.ranker, RankingRun)  # what load_ranking returns
    report = WarmStart(source=path)
    copy_weights(
        ranking.model,
        ranking.retrieval.spec,
        saved.ranker.model,
        saved.run.spec,
        report=report,
    )
    if distributed.is_main():
        logger.info("ranking %s", report.summary())


def _fingerprinted(config: RankingConfig, *, reads_context: bool) -> dict[str, Any]:
    """The ranking settings a checkpoint is resumed under; ``listwise_weight`` only
    when set and ``use_context`` only when the ranker reads context, so that
    checkpoints written before they existed still resume (and one of a ranker
    that read no context does not resume as one that does)."""
    values = to_dict(config)
    if config.listwise_weight == 0:
        del values["listwise_weight"]
    if not reads_context:
        del values["use_context"]
    return values


def fit_ease_term(
    config: RankingConfig, tables: RetrievalTensors
) -> LinearItemsModel | None:
    """The ranker's EASE term (``ranking.ease_weight`` > 0) fitted on the rows of
    ``tables``: EASE's closed form, ridge ``ease_l2``, factorised to ``ease_rank``;
    None when the weight is 0."""
    if config.ease_weight == 0:
        return None
    term = LinearItemsModel(tables.num_items, config.ease_rank)
    fit_ease(term, tables.seen(), l2=config.ease_l2)
    return term


def _train_config(ranking: RankingRun) -> TrainConfig:
    """The loop settings of the ranker: its own epochs, batch, LR, clipping,
    patience and step limit; the retrieval run's seed, device, threads and
    precision."""
    config, shared = ranking.config, ranking.retrieval.config.train
    return TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        optimizer="adamw",
        lr_schedule="constant",
        warmup_steps=0,
        grad_clip=config.grad_clip,
        early_stopping_patience=config.early_stopping_patience,
        max_steps=config.max_steps,
        seed=shared.seed,
        device=shared.device,
        num_threads=shared.num_threads,
        precision=shared.precision,
    )


def _train(
    ranking: RankingRun,
    pairs: Pairs,
    validation: Pairs | None,
    *,
    weights: Tensor | None = None,
    shown: ShownPairs | None = None,
    context: dict[str, Tensor] | None = None,
    val_context: dict[str, Tensor] | None = None,
    held: Dataset | None = None,
    **loop: Any,
) -> TrainResult:
    """The shared loop over the ranker's pairs; on a GPU the tables train there and
    validation runs on the host copies (``held``: the validation rows, whose
    shown rows, if any, validate the click head)."""
    train_config = _train_config(ranking)
    device = resolve_device(train_config.device)
    host = ranking.tensors
    negatives = _negatives(ranking, pairs, shown)  # on the host, before any move
    moved = device.type != "cpu"
    if moved:
        ranking.tensors = host.to(device)
        host_vectors = ranking.retrieval_vectors()
        ranking._vectors = (host_vectors[0].to(device), host_vectors[1].to(device))
        pairs = (pairs[0].to(device), pairs[1].to(device), pairs[2].to(device))
        weights = None if weights is None else weights.to(device)
        if context is not None:
            context = {k: v.to(device) for k, v in context.items()}
        if negatives is not None:
            negatives = negatives.to(device)

    def batch_loss(batch: Tensor, generator: torch.Generator) -> Tensor:
        users, items, ratings = (p[batch] for p in pairs)
        rows = None if weights is None else weights[batch]
        rows_context = None
        if context is not None:
            rows_context = {k: v[batch] for k, v in context.items()}
        return _loss(
            ranking, negatives, (users, items, ratings), generator, rows, rows_context
        )

    validate = None
    if validation is not None:

        def validate(model: torch.nn.Module) -> dict[str, float]:
            if moved:  # the loop validates on the host
                ranking.tensors, ranking._vectors = host, host_vectors
            try:
                return _validate(ranking, validation, held, val_context)
            finally:
                if moved:
                    ranking.tensors = host.to(device)
                    ranking._vectors = (
                        host_vectors[0].to(device),
                        host_vectors[1].to(device),
                    )

    try:
        return run_training(
            ranking.model,
            train_config,
            num_examples=len(pairs[0]),
            batch_loss=batch_loss,
            device=device,
            validate=validate,
            **loop,
        )
    finally:
        if moved:
            ranking.tensors, ranking._vectors = host, None


def shown_pairs_of(run: RetrievalRun, dataset: Dataset) -> ShownPairs | None:
    """``dataset.shown`` as the vocabulary indices of its known pairs (None
    without shown rows)."""
    shown = dataset.shown
    if shown is None or not shown.height:
        return None
    users = torch.from_numpy(run.spec.vocabulary(USER).transform(shown[USER]))
    items = torch.from_numpy(run.spec.vocabulary(ITEM).transform(shown[ITEM]))
    keep = (users > 0) & (items > 0)
    return users[keep], items[keep]


def _negatives(
    ranking: RankingRun, pairs: Pairs, shown: ShownPairs | None = None
) -> _Negatives | None:
    config, num_items = ranking.config, ranking.tensors.num_items
    if config.click_weight == 0 and config.listwise_weight == 0:
        return None
    num_shown = config.num_shown_negatives if shown is not None else 0
    if config.num_hard_negatives + config.num_random_negatives + num_shown == 0:
        return None
    num_users = ranking.tensors.history.shape[0]
    pool = torch.zeros(num_users, 1, dtype=torch.long)
    if config.num_hard_negatives > 0:
        seen = ranking.tensors.seen()
        chunks = [
            top_unseen(
                ranking, users, seen.take(users.numpy()), config.hard_negative_pool
            )
            for users in torch.arange(num_users).split(1024)
        ]
        pool = torch.cat([ids for ids, _ in chunks]).clamp_min(0)
    negatives = _Negatives(
        pool=pool,
        known=(pairs[0] * num_items + pairs[1]).unique(),  # sorted
        num_items=num_items,
        num_hard=config.num_hard_negatives,
        num_random=config.num_random_negatives,
    )
    if num_shown and shown is not None and len(shown[0]):
        users, items = (part[shown[0] < num_users] for part in shown)
        order = users.argsort(stable=True)
        counts = torch.bincount(users, minlength=num_users)
        start = torch.zeros(num_users + 1, dtype=torch.long)
        start[1:] = counts.cumsum(0)
        negatives.shown_start, negatives.shown_items = start, items[order]
        negatives.num_shown = num_shown
    return negatives
