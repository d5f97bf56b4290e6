"""Training the ranker: pairs, click negatives, the loss and the loop."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from twostage.data.dataset import Dataset
from twostage.data.split import validation_split
from twostage.errors import DataError
from twostage.experiment import RetrievalRun
from twostage.prepare import with_history_of
from twostage.ranking.evaluation import _pick_blend, auc, rmse
from twostage.ranking.run import (
    Pairs,
    RankingConfig,
    RankingRun,
    _forward,
    _is_pair,
    _pairs,
    _seen,
    _top_unseen,
    build_ranking_model,
)
from twostage.train import ProgressFn

logger = logging.getLogger(__name__)


@dataclass
class _Negatives:
    """Samples click negatives: hard ones from a retrieval pool, uniform ones."""

    pool: Tensor  # (U, P) each user's top unseen retrieval items, 0 where exhausted
    known: Tensor  # (n,) sorted user_idx * num_items + item_idx of training pairs
    num_items: int
    num_hard: int
    num_random: int

    def sample(
        self, users: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """``[B]`` users -> ``[B, M]`` item_idx and ``[B, M]`` bool (usable draw)."""
        shape = (len(users), self.num_hard)
        cols = torch.randint(0, self.pool.shape[1], shape, generator=generator)
        hard = self.pool[users[:, None], cols]
        shape = (len(users), self.num_random)
        uniform = torch.randint(1, self.num_items, shape, generator=generator)
        items = torch.cat([hard, uniform], dim=1)
        known = _is_pair(self.known, users[:, None], items, self.num_items)
        return items, (items > 0) & ~known


def _loss(
    run: RankingRun,
    negatives: _Negatives | None,
    batch: Pairs,
    generator: torch.Generator,
) -> Tensor:
    """Weighted rating MSE (rated positives) plus click BCE (positives, negatives)."""
    config, (users, items, ratings) = run.config, batch
    candidates, usable = items[:, None], torch.ones(len(items), 1, dtype=torch.bool)
    if negatives is not None:
        sampled, ok = negatives.sample(users, generator)
        candidates = torch.cat([candidates, sampled], dim=1)  # (B, 1 + M)
        usable = torch.cat([usable, ok], dim=1)
    out = _forward(run, users, candidates, exclude_target=True)
    loss = torch.zeros(())
    rated = ~torch.isnan(ratings)
    if config.rating_weight > 0 and rated.any():
        error = out["rating"][:, 0][rated] - ratings[rated]
        loss = loss + config.rating_weight * error.pow(2).mean()
    if config.click_weight > 0:
        labels = torch.zeros_like(out["click"])
        labels[:, 0] = 1.0
        bce = F.binary_cross_entropy_with_logits(
            out["click"], labels, weight=usable.float(), reduction="sum"
        )
        loss = loss + config.click_weight * bce / usable.sum()
    return loss


def _validate(run: RankingRun, pairs: Pairs) -> dict[str, float]:
    """Validation RMSE (rating head, clipped) and click AUC against uniform items."""
    users, items, ratings = pairs
    generator = torch.Generator().manual_seed(run.config.seed + 17)
    uniform = torch.randint(
        1, run.tensors.num_items, (len(users),), generator=generator
    )
    out = run.score(users, torch.stack([items, uniform], dim=1))
    result = {"auc": auc(out["click"][:, 0], out["click"][:, 1])}
    rated = ~torch.isnan(ratings)
    if rated.any():
        result["rmse"] = rmse(out["rating"][:, 0][rated], ratings[rated])
    return result


def fit_ranking(
    run: RetrievalRun,
    train: Dataset,
    *,
    config: RankingConfig | None = None,
    validation: Dataset | None = None,
    on_step: ProgressFn | None = None,
) -> RankingRun:
    """Train a ranker on a retrieval run's features and candidates.

    Args:
        run: the trained retrieval run (features, vocabularies, candidate source).
        train: the ranker's training pairs (pairs with unknown IDs are skipped).
        config: the ranker's settings; ``RankingConfig()`` when None.
        validation: held-out pairs, disjoint from ``train``, for early stopping and the
            blend weight; carved out of ``train`` (``config.validation_fraction``) when
            None. Best: the retrieval run's own carve-out (module docstring).
        on_step: called after every step with ``{"epoch", "step", "loss", "examples"}``.

    Returns:
        The run; its tables hold ``train`` and ``validation`` as history and seen items
        (as a retrieval run's tables do after training).
    """
    config = config or RankingConfig()
    started = time.perf_counter()
    if validation is None:
        train, validation = validation_split(
            train, fraction=config.validation_fraction, seed=config.seed
        )
    pairs = _pairs(run, train, known_only=True)
    rated = pairs[2][~torch.isnan(pairs[2])]
    if not len(pairs[0]) or (config.rating_weight > 0 and not len(rated)):
        raise DataError(
            "`train` should hold pairs of known users and items, with ratings when "
            f"rating_weight > 0 (else set rating_weight=0). Received: {len(pairs[0])} "
            f"known pairs, {len(rated)} rated."
        )
    torch.manual_seed(config.seed)  # the initial weights are part of the run
    mean = float(rated.mean()) if len(rated) else 0.0
    ranking = RankingRun(
        config=config,
        retrieval=run,
        model=build_ranking_model(run, config, rating_mean=mean),
        tensors=with_history_of(run.tensors, run.spec, train, run.config.retrieval),
    )
    if len(rated):
        ranking.rating_bounds = (float(rated.min()), float(rated.max()))
    val_pairs = _pairs(run, validation, known_only=True)
    ranking.history = _train(
        ranking,
        pairs,
        _negatives(ranking, pairs),
        val_pairs if len(val_pairs[0]) else None,
        on_step,
    )
    ranking.blend_weight = (
        _pick_blend(ranking, validation)
        if config.blend_weight is None
        else config.blend_weight
    )
    both = train.with_interactions(
        pl.concat([train.interactions, validation.interactions])
    )
    ranking.tensors = with_history_of(run.tensors, run.spec, both, run.config.retrieval)
    ranking._vectors = None  # the retrieval query vectors depend on the history
    ranking.train_seconds = time.perf_counter() - started
    logger.info("ranker trained in %.1f s", ranking.train_seconds)
    return ranking


def _negatives(ranking: RankingRun, pairs: Pairs) -> _Negatives | None:
    config, num_items = ranking.config, ranking.tensors.num_items
    if config.click_weight == 0:
        return None
    if config.num_hard_negatives + config.num_random_negatives == 0:
        return None
    num_users = ranking.tensors.history.shape[0]
    pool = torch.zeros(num_users, 1, dtype=torch.long)
    if config.num_hard_negatives > 0:
        seen = _seen(ranking.tensors)
        chunks = [
            _top_unseen(
                ranking, users, seen.take(users.numpy()), config.hard_negative_pool
            )
            for users in torch.arange(num_users).split(1024)
        ]
        pool = torch.cat([ids for ids, _ in chunks]).clamp_min(0)
    return _Negatives(
        pool=pool,
        known=(pairs[0] * num_items + pairs[1]).unique(),  # sorted
        num_items=num_items,
        num_hard=config.num_hard_negatives,
        num_random=config.num_random_negatives,
    )


def _train(
    ranking: RankingRun,
    pairs: Pairs,
    negatives: _Negatives | None,
    validation: Pairs | None,
    on_step: ProgressFn | None,
) -> list[dict[str, float]]:
    """Per epoch: shuffle, then per step loss, backward, step; then validate, keep best."""
    config, model = ranking.config, ranking.model
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    history: list[dict[str, float]] = []
    best, best_state, bad_epochs = math.inf, None, 0
    num_pairs, step, started = len(pairs[0]), 0, time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        torch.manual_seed(config.seed * 100_003 + epoch)  # dropout masks
        total = 0.0
        for batch in torch.randperm(num_pairs, generator=generator).split(
            config.batch_size
        ):
            users, items, ratings = (p[batch] for p in pairs)
            loss = _loss(ranking, negatives, (users, items, ratings), generator)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            step += 1
            if on_step is not None:
                progress = {"loss": loss.item(), "examples": len(batch)}
                on_step({"epoch": epoch, "step": step, **progress})
        record = {"epoch": float(epoch), "train_loss": total / num_pairs}
        if validation is not None:
            record.update(_validate(ranking, validation))
        record["seconds"] = time.perf_counter() - started
        logger.info("ranking epoch %d: %s", epoch, record)
        history.append(record)
        metric = record.get("rmse", -record.get("auc", -record["train_loss"]))
        if metric < best:
            best, bad_epochs = metric, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
            if bad_epochs >= config.early_stopping_patience > 0:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history
