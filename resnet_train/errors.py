"""Errors that a user can fix: the command line prints their one-line message and exits 2."""


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
