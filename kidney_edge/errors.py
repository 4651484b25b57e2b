"""The project's one error type.

The library raises :class:`KidneyEdgeError` (or a subclass) for every problem a user can act on;
the CLI turns it into a one-line message and an exit code. Internal invariants use ``assert``.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar


class KidneyEdgeError(Exception):
    """A failure the user can understand and act on. Exit code 1 in the CLI."""

    exit_code: int = 1


class InputError(KidneyEdgeError):
    """Bad input: a missing or unreadable file, an invalid option value. Exit code 2 in the CLI."""

    exit_code = 2


class ImageReadError(InputError):
    """One image file could not be read; the message names the file and why."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class EmptySplitError(InputError):
    """A split the caller asked for has no rows in the splits.csv (e.g. no val split)."""


Choice = TypeVar("Choice", bound=Enum)


def enum_choice(choices: type[Choice], value: object, flag: str) -> Choice:
    """``value`` as a member of the str Enum ``choices``; an InputError naming ``flag`` and the
    valid values otherwise (the CLI's own choice check covers the command line; this covers
    library callers)."""
    try:
        return choices(value)
    except ValueError:
        valid = ", ".join(str(member.value) for member in choices)
        raise InputError(f"{flag} must be one of {valid}, got {value!r}") from None
