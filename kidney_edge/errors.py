"""The project's one error type.

The library raises :class:`KidneyEdgeError` (or a subclass) for every problem a user can act on;
the CLI turns it into a one-line message and an exit code. Internal invariants use ``assert``.
"""

from __future__ import annotations


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
