"""Errors that a user can fix: the command line prints their one-line message and exits 2."""

from __future__ import annotations

from collections.abc import Callable


class UserError(Exception):
    """Bad input: a config value, a missing data set, an unusable checkpoint."""


class ConfigError(UserError, ValueError):
    """A config value out of range or not one of the allowed choices."""


class DataError(UserError):
    """Data set files missing, unreadable or inconsistent with the config."""


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the run."""


class RunDirError(UserError):
    """A run directory that already holds another run."""


class MissingDependencyError(UserError):
    """An optional dependency (an extra of the package) that a feature needs is not installed."""


def cause_in_chain(
    error: BaseException, match: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first error in `error`'s chain (itself, then each __cause__ or __context__) that
    matches: a library may raise its own error from the one that matters (a Ctrl-C, an OSError)."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if match(cause):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
