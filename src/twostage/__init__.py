"""twostage: a two-stage recommender on PyTorch, from raw logs to an HTTP answer."""

from twostage.data import Dataset, LoadReport
from twostage.errors import TwostageError

__version__ = "0.1.0"

__all__ = ["Dataset", "LoadReport", "TwostageError", "__version__"]
