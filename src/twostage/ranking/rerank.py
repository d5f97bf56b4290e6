"""The one re-rank rule of the two-stage list, used by serving and by evaluation.

Retrieval passes ``num_candidates`` items per user; the ranker scores them; the list is
ordered by ``click logit + blend_weight * retrieval logit + ease_weight * EASE term``,
where the retrieval logit is the towers' cosine over their temperature (the logit
retrieval trained on) and the EASE term (``ranking.ease_weight``, off by default) the
user's standardised EASE score (:meth:`twostage.ranking.run.RankingRun.ease_scores`).
Ties keep retrieval order. ``Recommender.recommend`` and
:func:`twostage.ranking.evaluation.evaluate_ranking` both call :func:`rerank`, so the
list a user is served is the list the published figures score.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["BLEND_GRID", "rerank"]

#: The blend weights :func:`twostage.ranking.fit.fit_ranking` tries on validation
#: when ``ranking.blend_weight`` is None.
BLEND_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def rerank(
    click: Tensor,
    retrieval_logits: Tensor,
    *,
    blend_weight: float,
    valid: Tensor | None = None,
    ease: Tensor | None = None,
    ease_weight: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Order each row's candidates by the two-stage key.

    Args:
        click: ``[B, C]`` the ranker's click logits of the candidates.
        retrieval_logits: ``[B, C]`` their retrieval logits (the towers' cosine divided
            by the retrieval temperature), in retrieval order.
        blend_weight: weight of the retrieval logit.
        valid: ``[B, C]`` bool; False marks an empty slot, which goes last.
        ease: ``[B, C]`` the candidates' EASE term, weighted by ``ease_weight``
            (None: no term).

    Returns:
        ``[B, C]`` column order (indices into the candidates, best first) and
        ``[B, C]`` the key of each candidate in that order.
    """
    key = click + blend_weight * retrieval_logits
    if ease is not None and ease_weight:
        key = key + ease_weight * ease
    if valid is not None:
        key = key.masked_fill(~valid, -math.inf)
    order = key.argsort(dim=1, descending=True, stable=True)
    return order, key.gather(1, order)
