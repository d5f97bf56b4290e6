"""The twostage exception hierarchy.

Every error twostage raises on purpose derives from :class:`TwostageError` and from the
built-in exception a caller would expect (``ValueError``, ``KeyError``, ...), so both
``except TwostageError`` and ``except ValueError`` work.
"""

from __future__ import annotations

__all__ = [
    "TwostageError",
    "ConfigError",
    "DataError",
    "BadRowError",
    "DatasetUnavailableError",
    "ChecksumError",
    "NotFittedError",
    "UnknownIdError",
    "ArtifactError",
    "WorkerError",
    "clause",
]


def clause(error: BaseException) -> str:
    """An error's message to quote inside another sentence: without the full stop
    our own messages end with (so ``f"cannot load x: {clause(e)}."`` reads once)."""
    return str(error).rstrip().rstrip(".")


class TwostageError(Exception):
    """Base class of every error raised by twostage."""


class ConfigError(TwostageError, ValueError):
    """A configuration value or override is unknown, mistyped or out of range."""


class DataError(TwostageError, ValueError):
    """Input data cannot be read or does not have the expected shape or columns."""


class BadRowError(DataError):
    """A row of an input file is malformed and ``strict=True`` was requested.

    Attributes:
        path: the file being read.
        line: 1-based physical line number of the bad row.
        reason: machine-readable reason, e.g. ``"wrong_field_count"``.
        content: the raw text of the row (truncated to 200 characters).
    """

    def __init__(self, path: str, line: int, reason: str, content: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        self.content = content
        super().__init__(
            f"{path}:{line}: bad row ({reason}): {content[:200]!r}. "
            "Fix the row, or read without strict mode (the CLI: leave out --strict; "
            "Python: strict=False) to skip and count bad rows."
        )


class DatasetUnavailableError(TwostageError, OSError):
    """A dataset could not be obtained from any of its sources."""


class ChecksumError(TwostageError, OSError):
    """A downloaded or stored file does not match its expected SHA-256."""


class NotFittedError(TwostageError, RuntimeError):
    """An encoder or model was used before ``fit``."""


class UnknownIdError(TwostageError, KeyError):
    """A raw user or item ID is not known to the vocabulary or the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class ArtifactError(TwostageError, OSError):
    """A saved bundle or checkpoint is missing, tampered, truncated or incompatible."""


class WorkerError(TwostageError, RuntimeError):
    """A worker process ended before its work did (killed, out of memory, or
    a script that starts spawned workers without a ``__main__`` guard)."""
