"""Errors that tell the user what went wrong and what would be valid."""


class CollieError(Exception):
    """Base class of every error collie raises on purpose."""


class ConfigError(CollieError, ValueError):
    """A configuration value, key or combination is invalid; the message names the key path."""


class CheckpointError(CollieError):
    """A checkpoint or model directory is missing, corrupted or does not fit the model; names the file."""


class DataError(CollieError, ValueError):
    """A dataset record or data file is malformed; names the file, record and field."""
