"""Field names as the names of the modules that embed them.

torch refuses a submodule name holding a ``.`` (it separates the parts of a
``state_dict`` key), and a feature column may hold one (``details.Brand``, a
nested JSON key read as a column). :func:`module_key` escapes it, and ``%``
with it so that two names never meet; a name with neither keeps its key, so the
bundles saved before read as they did.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["FieldModules", "module_key"]


def module_key(name: str) -> str:
    """``name`` as a submodule's name: ``.`` as ``%2E``, ``%`` as ``%25``."""
    return name.replace("%", "%25").replace(".", "%2E")


class FieldModules(nn.ModuleDict):
    """A ``ModuleDict`` of one module per field, indexed by the field's name
    (kept as :func:`module_key` of it)."""

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(module_key(name))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(module_key(name), module)

    def __delitem__(self, name: str) -> None:
        super().__delitem__(module_key(name))

    def __contains__(self, name: Any) -> bool:
        return isinstance(name, str) and super().__contains__(module_key(name))
