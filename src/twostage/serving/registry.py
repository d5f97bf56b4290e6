"""Which model versions the server holds, and the atomic swap to a newer one.

Bundles live in ``<root>/<name>/<version>/`` (TF Serving's layout). A :class:`ModelSlot`
serves the newest version that loads; :meth:`ModelRegistry.refresh` (called by a
watcher thread) looks for newer version directories, loads and verifies one *beside*
the serving version, warms it up, and only then replaces the slot's reference: a
request in flight keeps the :class:`LoadedModel` it started with, so no request fails
during a swap. A corrupt or half-written version is refused, logged and shown in the
status route, and the previous version keeps serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from twostage.artifacts import MANIFEST, is_version_name, versioning_hint
from twostage.errors import ArtifactError, ConfigError, TwostageError
from twostage.recommender import Recommender, load
from twostage.retrieval.run import RUN_WEIGHTS

__all__ = [
    "LoadedModel",
    "ModelRegistry",
    "ModelSlot",
    "UnknownModelError",
    "VersionStatus",
]

logger = logging.getLogger(__name__)


class UnknownModelError(TwostageError, KeyError):
    """A request named a model this server does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


State = Literal["LOADING", "AVAILABLE", "FAILED", "END"]


@dataclass(frozen=True)
class LoadedModel:
    """One loaded, verified version: what a request holds while it is answered."""

    name: str
    version: int
    path: Path
    recommender: Recommender
    loaded_at: float


@dataclass
class VersionStatus:
    """TF Serving's per-version status: state plus an error message when it failed."""

    version: int
    state: State
    error: str = ""
    stamp: tuple[int, int, int] = (0, 0, 0)  # the files' signature when last tried

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": str(self.version),
            "state": self.state,
            "status": {
                "error_code": "OK" if self.state != "FAILED" else "FAILED_PRECONDITION",
                "error_message": self.error,
            },
        }


@dataclass
class ModelSlot:
    """One model name: its serving version and the status of every version seen."""

    name: str
    directory: Path
    current: LoadedModel | None = None
    versions: dict[int, VersionStatus] = field(default_factory=dict)
    # Why the directory holds no version to look for (a bundle saved in it
    # directly, without a version number); "" when it is a directory of versions.
    problem: str = ""

    def candidates(self) -> list[tuple[int, Path, tuple[int, int, int]]]:
        """(version, path, signature of its files) of complete-looking versions,
        newest first. A version is tried again whenever its signature changes: a
        copy that wrote the manifest before the weights (rsync's order) is retried
        once the weights arrive."""
        found: list[tuple[int, Path, tuple[int, int, int]]] = []
        if not self.directory.is_dir():
            return found
        for path in self.directory.iterdir():
            if not (path.is_dir() and is_version_name(path.name)):
                continue  # temp dirs of an atomic write start with a dot
            # No manifest yet: half-copied, looked at again next time; unless it
            # is a training run (which has none either), refused saying so.
            if not (path / MANIFEST).exists() and not (path / RUN_WEIGHTS).exists():
                continue
            try:
                stamp = _signature(path)
            except OSError:
                continue  # files moving under us: looked at again next time
            found.append((int(path.name), path, stamp))
        return sorted(found, key=lambda entry: entry[0], reverse=True)


def _signature(path: Path) -> tuple[int, int, int]:
    """(newest mtime in ns, number of files, total bytes) of a directory tree."""
    newest = count = size = 0
    for item in path.rglob("*"):
        info = item.lstat()
        newest = max(newest, info.st_mtime_ns)
        count += 1
        size += info.st_size
    return newest, count, size


def _training_run(path: Path, instead: str = "a bundle") -> str:
    """Why a training run's directory is not served, and what to do."""
    return (
        f"{str(path)!r} is a training run (the --out of `twostage train "
        f"retrieval`), not {instead}. Serve a bundle: train one "
        "with `twostage train --out models/<name>/1` (--no-ranking for "
        "retrieval alone), or save this run as one in Python, "
        f"`Recommender(load_run({str(path)!r})).save('models/<name>/1')`."
    )


def _warm_up(recommender: Recommender) -> None:
    """Answer one request so caches (all users' query embeddings) exist before a swap."""
    users = recommender.user_vocab.values
    user_id = users[0] if len(users) else None
    recommender.recommend(user_id, 1)


class ModelRegistry:
    """The models under a root directory, refreshed on demand or by a watcher thread.

    Args:
        root: ``models/`` holding ``<name>/<version>/`` bundles, or one model's
            directory holding ``<version>/`` bundles directly.
        poll_seconds: how often the watcher looks for new versions (0: never).
    """

    def __init__(
        self, root: str | Path, *, poll_seconds: float = 5.0, widening: int = 16
    ) -> None:
        self.root = Path(root)
        self.poll_seconds = poll_seconds
        self.widening = widening  # each loaded model's Recommender.widening
        self.slots: dict[str, ModelSlot] = {}
        self._lock = threading.Lock()  # one refresh at a time; readers never lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.root.is_dir():
            raise ConfigError(
                f"`models` should be a directory holding <name>/<version>/ bundles. "
                f"Received: {str(self.root)!r}, which is not a directory."
            )
        if (self.root / RUN_WEIGHTS).exists():
            raise ConfigError(_training_run(self.root, "a directory of bundles"))
        if (self.root / MANIFEST).exists() and is_version_name(self.root.name):
            raise ConfigError(
                f"{str(self.root)!r} is one bundle version; serve the directory above "
                f"it ({str(self.root.parent)!r}) so new versions can be picked up."
            )
        if (self.root / MANIFEST).exists():
            raise ConfigError(
                f"{str(self.root)!r} is a bundle saved without a version number; "
                "`serve` reads <name>/<version>/ bundles, so that a new version can "
                f"replace the one it serves. {versioning_hint(self.root)} Then serve "
                f"{str(self.root.parent)!r}."
            )

    # -- discovery -----------------------------------------------------------------
    def _model_dirs(self) -> dict[str, Path]:
        children = [p for p in self.root.iterdir() if p.is_dir()]
        if any(is_version_name(p.name) for p in children):
            return {self.root.name: self.root}  # one model's directory
        return {p.name: p for p in children if not p.name.startswith(".")}

    def refresh(self) -> list[str]:
        """Load any newer version of every model; returns what changed, for logs."""
        with self._lock:
            events = []
            for name, directory in self._model_dirs().items():
                slot = self.slots.setdefault(name, ModelSlot(name, directory))
                event = self._refresh_slot(slot)
                if event:
                    events.append(event)
            return events

    def _refresh_slot(self, slot: ModelSlot) -> str | None:
        unversioned = (slot.directory / MANIFEST).exists()
        if unversioned and not slot.problem:  # said once, and by every request
            slot.problem = (
                f"{str(slot.directory)!r} is a bundle saved without a version "
                "number, where `serve` looks for <name>/<version>/ bundles. "
                f"{versioning_hint(slot.directory)}"
            )
            logger.error("model %s: %s", slot.name, slot.problem)
        elif not unversioned:
            slot.problem = ""
        serving = slot.current.version if slot.current else 0
        for version, path, stamp in slot.candidates():
            if version <= serving:
                break
            known = slot.versions.get(version)
            if known is not None and known.state == "FAILED" and known.stamp == stamp:
                continue  # already refused; tried again only if it is rewritten
            status = VersionStatus(version, "LOADING", stamp=stamp)
            slot.versions[version] = status
            try:
                if not (path / MANIFEST).exists():  # a bundle never holds RUN_WEIGHTS
                    raise ConfigError(_training_run(path))
                recommender = load(path)
                recommender.widening = self.widening
                _warm_up(recommender)
            except Exception as e:
                # A bad version must never stop the server or block other models:
                # whatever it raised (a malformed manifest, a corrupt table, a JSON
                # nested 100,000 deep), it is refused with the reason, and an older
                # version keeps (or starts) serving.
                reason = (
                    str(e)
                    if isinstance(e, TwostageError)
                    else f"{type(e).__name__}: {e}"
                )
                status.state, status.error = "FAILED", reason[:2000]
                logger.error(
                    "model %s version %d refused: %s", slot.name, version, reason
                )
                continue
            previous = slot.current
            slot.current = LoadedModel(
                slot.name, version, path, recommender, time.time()
            )  # the swap: one reference assignment
            status.state = "AVAILABLE"
            if previous is not None:
                slot.versions[previous.version].state = "END"
            logger.info("model %s now serves version %d", slot.name, version)
            return f"{slot.name}: version {version}"
        return None

    # -- lookups -------------------------------------------------------------------
    def get(self, name: str | None) -> LoadedModel:
        """The serving version of a model (the only model when ``name`` is None).

        Raises:
            ConfigError: no name given and several models are served.
            UnknownModelError: the name is unknown.
            ArtifactError: the model has no loadable version.
        """
        if name is None:
            if len(self.slots) != 1:
                raise ConfigError(
                    f"`model` is required: this server holds {sorted(self.slots)}."
                )
            (name,) = self.slots
        slot = self.slots.get(name)
        if slot is None:
            raise UnknownModelError(
                f"unknown model {name!r}; this server holds {sorted(self.slots)}."
            )
        if slot.current is None:
            failed = [s.error for s in slot.versions.values() if s.error]
            raise ArtifactError(
                f"model {name!r} has no loadable version"
                + (f" (last error: {failed[-1]})" if failed else "")
                + (f": {slot.problem}" if slot.problem else ".")
            )
        return slot.current

    # -- watcher -------------------------------------------------------------------
    def start(self) -> None:
        """Start the watcher thread (no-op when ``poll_seconds`` is 0)."""
        if self.poll_seconds <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._watch, name="twostage-model-watcher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # the watcher must outlive any one bad directory
                logger.exception("model refresh failed")
