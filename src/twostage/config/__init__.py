"""Typed, strict configuration: frozen dataclasses, JSON files and ``key=value`` overrides.

A config is saved beside the weights; reloading rebuilds the model from the saved config,
never from today's defaults. Unknown keys, wrong types and values out of range are
errors, not warnings. The sections are in :mod:`twostage.config.sections`, reading and
writing in :mod:`twostage.config.io`.
"""

from twostage.config.io import (
    apply_overrides,
    apply_settings,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from twostage.config.sections import (
    CLOSED_FORM_MEMBERS,
    KS,
    DataConfig,
    ExperimentConfig,
    IndexConfig,
    RankingConfig,
    RetrievalConfig,
    TrainConfig,
)

__all__ = [
    "CLOSED_FORM_MEMBERS",
    "KS",
    "DataConfig",
    "ExperimentConfig",
    "IndexConfig",
    "RankingConfig",
    "RetrievalConfig",
    "TrainConfig",
    "apply_overrides",
    "apply_settings",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]
