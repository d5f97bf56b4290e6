"""The command groups of the CLI: click's, refusing an option given twice that
takes one value.

click keeps the last occurrence of such an option and drops the others without a
word (``add-items --items a.csv --items b.csv`` would add ``b.csv`` alone), where
our rule is that nothing given is silently dropped. The options that take many
values are declared repeatable (``--filter``, ``--set``, ``--session``...), and
switches may repeat (the last wins, as in any CLI).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import typer
from typer.core import TyperGroup, TyperOption

__all__ = ["OnceGroup", "joined", "repeated_options"]


def repeated_options(command: Any, args: list[str]) -> list[tuple[str, int]]:
    """``(flag, times)`` of each option of ``command`` that takes one value and
    is given more than once in ``args`` (its own arguments: a group's stop at its
    subcommand's name, and every command's at ``--``)."""
    single: dict[str, TyperOption] = {}
    valued: set[str] = set()  # every flag followed by its value
    for param in command.params:
        if isinstance(param, TyperOption) and not (param.count or param.is_flag):
            valued.update(param.opts)
            if not param.multiple:
                single.update(dict.fromkeys(param.opts, param))
    stop = set(command.commands) if isinstance(command, TyperGroup) else set()
    counts: Counter[str] = Counter()
    expects_value = False
    for token in args:
        if expects_value:  # the value of the option before, whatever it reads
            expects_value = False
            continue
        if token == "--" or token in stop:
            break
        flag = token.split("=", 1)[0] if token.startswith("--") else token
        if flag in single:
            counts[single[flag].opts[0]] += 1
        expects_value = flag in valued and "=" not in token
    return [(flag, times) for flag, times in counts.items() if times > 1]


class OnceGroup(TyperGroup):
    """A typer group whose commands refuse an option given twice that takes one
    value (a usage error naming it, exit code 2), before the command runs."""

    def resolve_command(
        self, ctx: Any, args: list[str]
    ) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            repeated = repeated_options(command, rest)
            if repeated:
                flag, times = repeated[0]
                raise typer.BadParameter(
                    f"given {times} times; it takes one value, and a second would "
                    "replace the first. Give it once.",
                    ctx=ctx,
                    param_hint=flag,
                )
        return name, command, rest


def joined(values: list[str] | None) -> str | None:
    """A repeatable comma-separated option's occurrences as one list, in order
    (``--session 50 --session 172,181`` is ``50,172,181``); None if not given."""
    return ",".join(values) if values else None
