"""Errors that a user can act on.

Every error raised for bad input or a bad workdir is a ``RetroError``: the CLI
prints its message (which names the file or value and the fix) without a
traceback and exits with status 2.
"""


class RetroError(Exception):
    """A problem the user can fix; the message names the value and the fix."""


class InputError(RetroError, ValueError):
    """Bad input data or a bad setting."""


class WorkdirError(RetroError):
    """The workdir cannot be used as asked (locked, read-only, other settings)."""


class ConfigMismatchError(WorkdirError):
    """Settings differ from the ones recorded in the workdir's config.json."""


class MissingDependencyError(RetroError, ImportError):
    """An optional dependency is missing; the message says what to install."""
