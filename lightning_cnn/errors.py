"""Errors that mean bad input from the user. The CLI prints their message alone and exits with status 2."""


class UserError(Exception):
    """Bad input: the message says what was wrong and what to do about it."""


class ConfigError(UserError, ValueError):
    """An impossible or inconsistent setting."""


class DataError(UserError, RuntimeError):
    """Data is missing, unreadable or malformed."""


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""
