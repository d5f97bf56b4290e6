"""Fitting the retrieval stage: from a config (and data) to a trained, evaluated
:class:`~twostage.retrieval.run.RetrievalRun`."""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from twostage import distributed
from twostage.baselines import EASE, Transition
from twostage.config import (
    CLOSED_FORM_MEMBERS,
    ExperimentConfig,
    RetrievalConfig,
    TrainConfig,
    to_dict,
)
from twostage.config.unread import unread_settings
from twostage.data.dataset import ITEM, USER, Dataset
from twostage.data.registry import load_dataset_for, recorded_dataset
from twostage.data.split import ExperimentSplit, prepare_split
from twostage.data.user_items import UserItems
from twostage.errors import ConfigError, DataError
from twostage.evaluate import evaluate_embeddings
from twostage.features import FeatureSpec
from twostage.features.context import add_context_columns, context_frame
from twostage.models import session_knn
from twostage.models.ensemble import (
    EnsembleModel,
    member_configs,
    member_kinds,
    member_seeds,
)
from twostage.models.fused import fused_tables, require_fbgemm
from twostage.models.linear_items import LinearItemsModel
from twostage.models.retrieval import RetrievalModel
from twostage.models.sharded import require_torchrec, sharded_tables
from twostage.retrieval.evaluation import eval_queries
from twostage.retrieval.fallback import (
    FALLBACK_GRID,
    choose_popularity_fallback,
    choose_term_weight,
)
from twostage.retrieval.run import (
    RetrievalRun,
    Towers,
    build_member,
    encode_queries,
    refuse_foreign_target,
    spec_for,
)
from twostage.retrieval.task import (
    UserExamples,
    interaction_loss,
    sequence_loss,
    user_loss,
    validation_loss,
)
from twostage.retrieval.tensors import (
    RetrievalTensors,
    TimedRows,
    build_tensors,
    context_keys,
    row_order_note,
    timed_rows,
    with_history_of,
)
from twostage.training import ProgressFn, TrainResult, merge_results
from twostage.training.loop import (
    data_digest,
    few_steps,
    resume_fingerprint,
    run_training,
)
from twostage.training.optim import resolve_device

if TYPE_CHECKING:
    from twostage.recommender import Recommender

__all__ = [
    "Validator",
    "check_validation_choices",
    "choose_on_validation",
    "fit_retrieval",
    "train_retrieval",
]

logger = logging.getLogger(__name__)

#: The config sections a retrieval checkpoint depends on.
_RETRIEVAL_SECTIONS = ("data", "retrieval", "train")


def fit_retrieval(
    config: ExperimentConfig,
    *,
    dataset: Dataset | None = None,
    split: ExperimentSplit | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    on_step: ProgressFn | None = None,
    on_epoch: ProgressFn | None = None,
    evaluate_test: bool = True,
    keep_queries: bool = False,
    allow_config_change: bool = False,
    warm_from: Recommender | None = None,
) -> tuple[RetrievalRun, ExperimentSplit]:
    """Train a two-tower retrieval model from a config and evaluate it on the test split.

    The split comes from the config (:func:`twostage.data.split.prepare_split`); the
    returned run's tables hold the training and validation rows as history and seen
    items, as served.

    Args:
        config: data, model and training settings (saved with the run).
        dataset: the data; loaded from ``config.data.dataset`` when None.
        split: the parts to use as they are (e.g. tables a caller split itself);
            then ``dataset`` and the config's split settings are not used.
        out_dir: where checkpoints and the finished run are written.
        resume: continue an interrupted run from ``out_dir``'s checkpoint.
        on_step: progress callback of the training loop.
        on_epoch: called with each epoch's history record (validation included;
            with ``"member"`` in an ensemble); an exception it raises ends the
            run there.
        evaluate_test: compute test metrics (stored in ``run.metrics``).
        keep_queries: keep each test query's figures too (``run.test_queries``,
            :class:`twostage.metrics.QueryFigures` by mode, for paired
            comparisons) instead of measuring the test split a second time.
        allow_config_change: resume even though the config differs from the
            checkpoint's (beyond epochs, threads and device).
        warm_from: a fitted model whose weights the new one starts from (as
            ``train.warm_start`` does with a saved one, which it replaces).
    """
    given = split.fit if split is not None else dataset
    if given is not None:  # data handed over in Python: recorded only if re-readable
        recorded = recorded_dataset(given, config.data.dataset)
        data = dataclasses.replace(config.data, dataset=recorded)
        config = dataclasses.replace(config, data=data)
    set_threads(config)
    if out_dir is not None:
        refuse_foreign_target(out_dir)  # before training, not at the save
    world = distributed.init_from_env(config.train.device)
    if split is None:
        if dataset is None:
            dataset = load_dataset_for(config)
        split = prepare_split(dataset, config)
    wanted = config.retrieval.query_fields
    train = add_context_columns(split.fit, wanted)
    validation = split.validation
    if train.num_interactions == 0:
        raise DataError("the training split is empty: nothing to train on.")
    check_validation_choices(
        config,
        has_validation=validation is not None and validation.num_interactions > 0,
    )
    started = time.perf_counter()
    spec = spec_for(train, config).fit(train)
    tensors = build_tensors(spec, train, config.retrieval)
    warn_exact_term(config, spec.vocabulary(USER).size - 1)  # less the unknown
    warn_unread_settings(config)
    order = row_order_note(config.retrieval, train)
    if order is not None and distributed.is_main():
        logger.warning(order)
    run, members, validate = train_members(
        config,
        spec,
        tensors,
        validation=validation,
        rows=lambda: timed_rows(spec, train),
        checkpoints=Path(out_dir) if out_dir is not None else None,
        resume=resume,
        on_step=on_step,
        on_epoch=on_epoch,
        allow_config_change=allow_config_change,
        warm_from=warm_from,
    )
    logger.info("trained in %.1f s (data prep included)", time.perf_counter() - started)
    choose_on_validation(run, validate)
    if validation is not None and validation.num_interactions:
        # At inference the validation rows are history like any other training row:
        # they feed the query history and are excluded as seen.
        run.tensors = with_history_of(run.tensors, spec, split.train, config.retrieval)
        # The closed-form members are refitted on those rows too (the trained ones
        # keep their weights): what follows a user's last item is most often learnt
        # from other users' last items, which leave-one-out validation holds.
        closed = closed_form_members(members)
        every_row = timed_rows(spec, split.train) if closed else None
        for kind, model in closed:
            assert every_row is not None
            fit_closed_form(model, kind, config, run.tensors, every_row)
    # Every rank scores its share of the test users; one rank saves.
    if evaluate_test and split.test.num_interactions:
        found = run.evaluate(
            split.test, shard=world is not None, keep_queries=keep_queries
        )
        run.metrics = found.to_dict()
        run.test_queries = found.queries if keep_queries else None
    if out_dir is not None and distributed.is_main():
        run.save(out_dir)
        if split.fit.items is not None:  # what `twostage recommend RUN` shows
            split.fit.items.write_parquet(Path(out_dir) / "items.parquet")
    return run, split


def train_members(
    config: ExperimentConfig,
    spec: FeatureSpec,
    tensors: RetrievalTensors,
    *,
    validation: Dataset | None,
    rows: Callable[[], TimedRows],
    checkpoints: Path | None = None,
    resume: bool = False,
    on_step: ProgressFn | None = None,
    on_epoch: ProgressFn | None = None,
    allow_config_change: bool = False,
    warm_from: Recommender | None = None,
) -> tuple[RetrievalRun, list[tuple[str, RetrievalRun]], Validator | None]:
    """Build and train the model ``config`` asks for on ``tensors``: one set of
    towers, or each member of ``retrieval.ensemble`` in turn (the trained ones
    from their seeds, each validated on ``validation`` and checkpointed in
    ``checkpoints/member-i``; the closed-form ones by :func:`fit_closed_form`, a
    ``transition`` member on ``rows()``, the training rows in time order). What
    the in-memory and the streamed paths share.

    ``warm_from`` (a fitted model), or else the saved model ``train.warm_start``
    names, gives the trained members their first weights
    (:func:`warm_start_members`).

    Returns:
        ``(run, members, validate)``: the run (the ensemble of the members, or the
        one member, with ``config``), ``(kind, member run)`` of each member, and
        the validator of the run (None without validation rows).
    """
    kinds = member_kinds(config.retrieval)
    limit = EASE().max_items
    for closed in CLOSED_FORM_MEMBERS:
        if closed in kinds and tensors.num_items > limit:
            raise ConfigError(  # before any member trains
                f"`retrieval.ensemble` entry {closed!r} fits a dense items x items "
                f"matrix: {tensors.num_items} items is above EASE's {limit}. Drop "
                f"{closed!r} from `retrieval.ensemble` for this catalogue."
            )
    members = []
    seeds = member_seeds(config.retrieval, config.train.seed)
    for kind, member, seed in zip(
        kinds, member_configs(config.retrieval), seeds, strict=True
    ):
        # Each encoder's first member trains from the run's seed: the first member is
        # the run a config without `retrieval.ensemble` trains, weight for weight.
        train_config = dataclasses.replace(config.train, seed=seed)
        torch.manual_seed(seed)  # the initial weights are part of the run
        members.append(  # every member built first: a bad setting fails at once
            RetrievalRun(
                config=dataclasses.replace(
                    config, retrieval=member, train=train_config
                ),
                spec=spec,
                # an `ease` member's run only carries its model to the ensemble
                model=build_member(spec, member, kind=kind),  # type: ignore[arg-type]
                tensors=tensors,
            )
        )
    from twostage.training.warm import warm_source

    source = warm_source(config.train.warm_start, warm_from)
    if source is not None:
        warm_start_members(config, kinds, members, source)
    validate = None  # its queries are computed once, for every member
    if validation is not None and validation.num_interactions:
        validate = Validator(members[0], validation)
    # What the checkpoints are of, for resume to compare (the members share it).
    digest = (
        None
        if checkpoints is None
        else data_digest(
            tensors.users, tensors.items, tensors.weights, tensors.sequences
        )
    )
    for i, member_run in enumerate(members):
        if isinstance(member_run.model, LinearItemsModel):
            fitted = time.perf_counter()
            fit_closed_form(member_run.model, kinds[i], config, tensors, rows)
            member_run.train_result = TrainResult(seconds=time.perf_counter() - fitted)
            logger.info(
                "ensemble member %d/%d: %s, fitted in closed form (rank %d)",
                i + 1,
                len(members),
                kinds[i],
                config.retrieval.ease_rank,
            )
            continue
        if validate is not None:
            validate = validate.for_run(member_run)
        step_fn, epoch_fn = on_step, on_epoch
        if config.retrieval.ensemble:
            logger.info(
                "ensemble member %d/%d: query_encoder=%s, seed %d",
                i + 1,
                len(members),
                kinds[i],
                member_run.config.train.seed,
            )
            if on_step is not None:  # each step record says whose step it is
                step_fn = functools.partial(_tag_member, on_step, i)
            if on_epoch is not None:
                epoch_fn = functools.partial(_tag_member, on_epoch, i)
        if checkpoints is not None and config.retrieval.ensemble:
            member_dir: Path | None = checkpoints / f"member-{i}"
        else:
            member_dir = checkpoints
        member_run.train_result = train_retrieval(
            member_run.model,  # type: ignore[arg-type]
            tensors,
            member_run.config.train,
            validate=validate,
            checkpoint_dir=member_dir,
            resume=resume,
            on_step=step_fn,
            on_epoch=epoch_fn,
            fingerprint=checkpoint_fingerprint(
                member_run.config if config.retrieval.ensemble else config, digest
            ),
            allow_config_change=allow_config_change,
        )
    if len(members) == 1:
        run = members[0]
        run.config = config
        if validate is not None:
            validate = validate.for_run(run)
    else:
        model = EnsembleModel([m.model for m in members], config.retrieval)  # type: ignore[misc]
        run = RetrievalRun(config=config, spec=spec, model=model, tensors=tensors)
        run.train_result = merge_results([m.train_result for m in members])
        validate = validate.for_run(run) if validate is not None else None
    return run, list(zip(kinds, members, strict=True)), validate


def warm_start_members(
    config: ExperimentConfig,
    kinds: Sequence[str],
    members: list[RetrievalRun],
    source: tuple[Recommender, str],
) -> None:
    """Copy the weights of ``source`` (a model and its name: the saved model
    ``train.warm_start`` names, or one handed over) into the trained members
    (:func:`twostage.training.warm.copy_weights`): member ``i`` from the
    source's member ``i``, which must be of the same kind."""
    from twostage.training.warm import WarmStart, copy_weights

    saved, path = source[0].run, source[1]
    saved_kinds = member_kinds(saved.config.retrieval)
    if saved_kinds != list(kinds):
        raise ConfigError(
            f"The warm start's model ({path}) holds the members {saved_kinds}, and "
            f"this config trains {kinds} (`retrieval.query_encoder`, "
            "`retrieval.ensemble`): a warm start copies each member from the "
            "saved one of the same kind. Train with its settings, or without a "
            "warm start."
        )
    backends = {saved.config.retrieval.embedding_backend}
    backends.add(config.retrieval.embedding_backend)
    if backends != {"torch"}:
        raise ConfigError(
            "`train.warm_start` copies the torch backend's tables "
            "(`retrieval.embedding_backend` = 'torch'), in the saved model and "
            f"in this config; found {sorted(backends)}."
        )
    saved_models = (
        list(saved.model.members)
        if isinstance(saved.model, EnsembleModel)
        else [saved.model]
    )
    report = WarmStart(source=path)
    for i, (member, old) in enumerate(zip(members, saved_models, strict=True)):
        if kinds[i] in CLOSED_FORM_MEMBERS:  # fitted again on the new rows
            continue
        copy_weights(
            member.model,
            member.spec,
            old,
            saved.spec,
            report=report,
            prefix=f"member {i} ({kinds[i]}) " if len(members) > 1 else "",
        )
    if distributed.is_main():
        logger.info("retrieval %s", report.summary())


def closed_form_members(
    members: list[tuple[str, RetrievalRun]],
) -> list[tuple[str, LinearItemsModel]]:
    """``(kind, model)`` of the members :func:`train_members` fitted in closed form."""
    return [
        (kind, run.model)
        for kind, run in members
        if isinstance(run.model, LinearItemsModel)
    ]


def checkpoint_fingerprint(
    config: ExperimentConfig, rows: str | None
) -> dict[str, Any]:
    """What a retrieval checkpoint is of, for ``--resume`` to compare: the data,
    retrieval and train settings, and ``rows``, the digest of the training rows
    (:func:`twostage.training.loop.data_digest`)."""
    sections = to_dict(config)
    return resume_fingerprint(
        {k: v for k, v in sections.items() if k in _RETRIEVAL_SECTIONS}, data=rows
    )


def train_retrieval(
    model: RetrievalModel,
    tensors: RetrievalTensors,
    config: TrainConfig,
    *,
    validate: Callable[[RetrievalModel], dict[str, float]] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_step: ProgressFn | None = None,
    on_epoch: ProgressFn | None = None,
    stop_after_epoch: int | None = None,
    fingerprint: dict[str, Any] | None = None,
    allow_config_change: bool = False,
) -> TrainResult:
    """Train the two towers in place with :func:`twostage.training.loop.run_training`.

    Args:
        model: the two towers (its config says loss options).
        tensors: the training tables.
        config: optimisation settings.
        validate: returns ``{"metric": value to maximise, ...}`` (e.g. Recall@100 on
            a validation carve-out); without it every epoch counts as the best.
        checkpoint_dir, resume, on_step, on_epoch, stop_after_epoch, fingerprint,
        allow_config_change: as for ``run_training``.
    """
    model_config: RetrievalConfig = model.config
    device = resolve_device(config.device)
    tensors = tensors.to(device)
    by_user = UserExamples.of(tensors) if model_config.examples == "users" else None
    num_examples = tensors.num_examples
    if by_user is not None:
        num_examples = len(by_user.users)
    elif model_config.examples == "sequences":
        num_examples = len(tensors.sequences)
    warning = few_steps(
        "retrieval", num_examples, config.batch_size, "train.batch_size"
    )
    if warning and distributed.is_main():
        logger.warning(warning)

    def batch_loss(batch: Tensor, generator: torch.Generator) -> Tensor:
        if model_config.examples == "sequences":
            return sequence_loss(model, model_config, tensors, batch, generator)
        if by_user is None:
            return interaction_loss(model, model_config, tensors, batch, generator)
        return user_loss(model, model_config, tensors, by_user, batch, generator)

    with ExitStack() as stack:
        backend = model_config.embedding_backend
        if backend != "torch":
            _check_backend(model_config, device)
            tables = fused_tables if backend == "fbgemm" else sharded_tables
            stack.enter_context(tables(model, learning_rate=config.learning_rate))
        return run_training(
            model,
            config,
            num_examples=num_examples,
            batch_loss=batch_loss,
            device=device,
            validate=validate,  # type: ignore[arg-type]
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            on_step=on_step,
            on_epoch=on_epoch,
            stop_after_epoch=stop_after_epoch,
            fingerprint=fingerprint,
            allow_config_change=allow_config_change,
        )


def _check_backend(config: RetrievalConfig, device: torch.device) -> None:
    """Refuse what the fbgemm and torchrec backends cannot train."""
    backend = f"`retrieval.embedding_backend={config.embedding_backend}`"
    if config.embedding_backend == "fbgemm":
        require_fbgemm()
        if distributed.current() is not None:
            raise ConfigError(
                f"{backend} updates its tables inside backward, where data-parallel "
                "training cannot average them: train it in one process (no torchrun, "
                "no --nproc), or use retrieval.embedding_backend=torchrec, whose "
                "sharded tables train under torchrun."
            )
    else:
        require_torchrec()
    if device.type != "cpu":
        raise ConfigError(
            f"{backend} runs fbgemm's CPU build here (the CUDA path has not run): set "
            f"`train.device=cpu`. Received: `train.device` = {str(device)!r}."
        )
    if config.share_item_embeddings:
        raise ConfigError(
            f"{backend} trains the candidate tower's item table inside backward, "
            "which the history cannot share: set "
            "`retrieval.share_item_embeddings=false` or use the torch backend."
        )


class Validator:
    """The figures training keeps the best epoch by: Recall@``train.eval_k`` (seen
    items excluded) of the run's queries on a validation carve-out, and the in-batch
    loss of its known (user, item) pairs. The queries, their features and the pairs
    are computed once; each call embeds them with the current weights.

    The run's tables are the training rows' (history, seen items), as each epoch
    trained them; the carve-out's rows join them only after training.
    """

    def __init__(self, run: RetrievalRun, validation: Dataset) -> None:
        spec, self.run = run.spec, run
        self.pairs = _pairs(spec, validation)
        self.queries = eval_queries(run, validation)
        frame = context_frame(
            self.queries.user_ids, self.queries.context, context_keys(spec)
        )
        self.features = spec.transform_queries(frame, users=validation.users)
        self.user_idx = torch.from_numpy(self.queries.user_idx)

    def for_run(self, run: RetrievalRun) -> Validator:
        """The same queries for another run on the same spec and tables (an
        ensemble's members, then the ensemble)."""
        other = copy.copy(self)
        other.run = run
        return other

    def query_embeddings(self, model: Towers) -> Tensor:
        self.features.update(self.run.tensors.history_features(self.user_idx))
        return encode_queries(model, self.features)

    def __call__(self, model: RetrievalModel) -> dict[str, float]:
        k, queries = self.run.config.train.eval_k, self.queries
        result = evaluate_embeddings(
            self.query_embeddings(model),
            queries.pad_items(self.run.item_embeddings()),
            relevant=queries.relevant,
            seen=queries.seen,
            ks=(k,),
            valid_items=queries.valid_items,
        )
        loss = validation_loss(model, self.run.tensors, *self.pairs, self.run.config)
        return {"metric": result.metrics["exclude_seen"]["recall"][k], "loss": loss}


def choose_on_validation(run: RetrievalRun, validate: Validator | None) -> None:
    """Set the serving rules a config leaves to validation (-1): first
    ``run.session_knn_weight``, then ``run.popularity_fallback`` with that term."""
    choose_session_knn_weight(run, validate)
    choose_fallback(run, validate)


def warn_unread_settings(config: ExperimentConfig) -> None:
    """Log a warning for each setting ``config`` changes that its model does
    not read (:func:`twostage.config.unread.unread_settings`), once per run."""
    if not distributed.is_main():
        return
    for sentence in unread_settings(config):
        logger.warning("%s It has no effect on this run.", sentence)


def warn_exact_term(config: ExperimentConfig, num_users: int) -> None:
    """Log a warning where the session-kNN term would compare every query with
    ``num_users`` >= :data:`~twostage.models.session_knn.EXACT_TERM_USERS` stored users (no
    ``retrieval.session_knn_sample``), as serving, the weight's pick on validation
    and evaluation do once per user."""
    cfg = config.retrieval
    if cfg.session_knn_weight == 0 or cfg.session_knn_sample:
        return
    if num_users < session_knn.EXACT_TERM_USERS:
        return
    if distributed.is_main():
        logger.warning(
            "the session-kNN term (retrieval.session_knn_weight) compares each query "
            "with every one of the %d stored users: about 21 ms a query at 10^6 "
            "users on 2 cores, paid by every request, and once per user by the "
            "weight's pick on validation and by evaluation. "
            "retrieval.session_knn_sample=1000 takes the 1,000 latest active users "
            "who share an item instead (docs/scaling.md).",
            num_users,
        )


def check_validation_choices(config: ExperimentConfig, *, has_validation: bool) -> None:
    """Refuse, before training, a config that leaves the session-kNN weight to a
    validation carve-out the run does not have."""
    if config.retrieval.session_knn_weight == -1 and not has_validation:
        raise ConfigError(
            "`retrieval.session_knn_weight=-1` picks the session-kNN term's weight "
            "on the validation carve-out, and this run has no validation rows. Set "
            "`data.validation_fraction` above 0, or the weight itself (0: no term)."
        )


def choose_session_knn_weight(run: RetrievalRun, validate: Validator | None) -> None:
    """With ``retrieval.session_knn_weight=-1``, set ``run.session_knn_weight`` to
    the weight whose lists, with the popularity fallback, score best on validation
    (:func:`choose_term_weight`); the config's weight is the run's otherwise."""
    if run.config.retrieval.session_knn_weight != -1:
        return
    if validate is None:
        check_validation_choices(run.config, has_validation=False)  # raises
        return
    queries = validate.queries
    user_idx = torch.from_numpy(queries.user_idx)

    def term(start: int, stop: int) -> torch.Tensor:
        return run.neighbour_term(user_idx[start:stop], weight=1.0)

    # Each weight is measured as served: with the config's fallback threshold, or
    # with each one's best when the threshold is picked next (the best pair).
    wanted = run.config.retrieval.popularity_fallback
    tensors = run.tensors
    with torch.no_grad():
        choice = choose_term_weight(
            validate.query_embeddings(run.model),
            run.item_embeddings(),
            term,
            relevant=queries.relevant,
            seen=queries.seen,
            item_probs=tensors.fallback_popularity,
            num_train_items=tensors.seen().lengths()[queries.user_idx],
            thresholds=FALLBACK_GRID if wanted < 0 else (wanted,),
        )
    run.session_knn_weight = choice.weight
    run.session_knn = choice.to_dict()
    if choice.weight == 0:  # no term: its sequences are neither served nor saved
        run.tensors = run.tensors.without_neighbours()


def choose_fallback(run: RetrievalRun, validate: Validator | None) -> None:
    """Set ``run.popularity_fallback``: the config's threshold, or with
    ``retrieval.popularity_fallback`` < 0 the one that scores best on validation
    (:func:`choose_popularity_fallback`; 0 without a validation carve-out)."""
    wanted = run.config.retrieval.popularity_fallback
    run.popularity_fallback = max(wanted, 0)
    if wanted >= 0 or validate is None:
        return
    queries, tensors = validate.queries, run.tensors
    user_idx = torch.from_numpy(queries.user_idx)

    def term(start: int, stop: int) -> torch.Tensor:
        return run.neighbour_term(user_idx[start:stop])

    with torch.no_grad():
        choice = choose_popularity_fallback(
            validate.query_embeddings(run.model),
            run.item_embeddings(),
            tensors.fallback_popularity,
            relevant=queries.relevant,
            seen=queries.seen,
            num_train_items=tensors.seen().lengths()[queries.user_idx],
            extra_scores=term if run.scores_exactly else None,
        )
    run.popularity_fallback = choice.max_interactions
    run.fallback = choice.to_dict()


def _pairs(spec: FeatureSpec, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Known (user_idx, item_idx) pairs of a split; pairs with an unknown side dropped."""
    users = spec.vocabulary(USER).transform(data.interactions[USER])
    items = spec.vocabulary(ITEM).transform(data.interactions[ITEM])
    known = (users > 0) & (items > 0)
    return torch.from_numpy(users[known]), torch.from_numpy(items[known])


def fit_closed_form(
    model: LinearItemsModel,
    kind: str,
    config: ExperimentConfig,
    tensors: RetrievalTensors,
    rows: TimedRows | Callable[[], TimedRows],
) -> None:
    """Fit an ``ease`` member on ``tensors``' seen items, or a ``transition``
    member on ``rows`` (the same rows, in time order; or a function that reads
    them, called only for a ``transition`` member)."""
    if kind == "transition":
        fit_transition(model, rows if isinstance(rows, TimedRows) else rows())
    else:
        fit_ease(model, tensors.seen(), l2=config.retrieval.ease_l2)


def fit_ease(model: LinearItemsModel, seen: UserItems, *, l2: float) -> None:
    """Fit EASE's closed form (:class:`twostage.baselines.EASE`, ridge ``l2``) on
    ``seen`` (one row of items per user) into ``model``, factorised: the
    ``retrieval.ensemble`` entry ``ease`` and the ranker's EASE term."""
    ease = EASE(l2=l2).fit(seen, num_items=model.left.shape[0])
    assert ease.weights is not None
    model.fit(ease.weights)


def fit_transition(model: LinearItemsModel, rows: TimedRows) -> None:
    """Fit the ``transition`` member on the training rows: ``log(1 + n)``, ``n`` the
    times item ``k`` followed item ``j`` in a user's time-ordered log
    (:meth:`twostage.baselines.Transition.fit_log`, ties in row order), factorised
    into ``model``; the rows of unknown users (index 0) are left out."""
    # Users the vocabulary does not know would all be user 0, one sequence of
    # many users' rows whose joins count as transitions: left out.
    known = rows.users > 0
    transition = Transition().fit_log(
        rows.users[known],
        rows.items[known],
        rows.times[known],
        num_users=rows.num_users,
        num_items=model.left.shape[0],
    )
    assert transition.counts is not None
    model.fit(torch.log1p(transition.counts.to_dense()))


def _tag_member(on_step: ProgressFn, member: int, info: dict[str, Any]) -> None:
    on_step({**info, "member": member})


def set_threads(config: ExperimentConfig) -> None:
    """torch's intra-op threads to ``train.num_threads`` (0: torch's default)."""
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)
