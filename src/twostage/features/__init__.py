"""Feature layer: vocabularies, encoders and the two-tower feature spec.

Encoders are fitted on the training split only and save to JSON; a
:class:`FeatureSpec` turns frames into ``dict[str, torch.Tensor]`` for each tower.
"""

from twostage.features.base import Encoder, FeatureOutput, encoder_from_dict
from twostage.features.encoders import (
    BucketEncoder,
    CategoricalEncoder,
    NumericEncoder,
    TimestampEncoder,
)
from twostage.features.fields import FIELD_KINDS, FeatureInfo, Field
from twostage.features.hashing import stable_hash
from twostage.features.sequences import (
    MultiHotEncoder,
    TextEncoder,
    parse_lists,
    tokenize,
)
from twostage.features.spec import FeatureSpec
from twostage.features.vocab import HashingEncoder, Vocabulary

__all__ = [
    "FIELD_KINDS",
    "BucketEncoder",
    "CategoricalEncoder",
    "Encoder",
    "FeatureInfo",
    "FeatureOutput",
    "FeatureSpec",
    "Field",
    "HashingEncoder",
    "MultiHotEncoder",
    "NumericEncoder",
    "TextEncoder",
    "TimestampEncoder",
    "Vocabulary",
    "encoder_from_dict",
    "parse_lists",
    "stable_hash",
    "tokenize",
]
