"""Errors that mean "the user's input is wrong". The CLI prints them as one line (exit code 2)."""


class UserError(Exception):
    """Bad input from the user: a file, a URI, a flag, a value. The message names it."""


class DataError(UserError):
    """A dataset, file or row cannot be used (unreadable image, missing manifest, bad layout)."""


class StorageError(UserError):
    """Object storage refused or cannot find something (credentials, bucket, endpoint)."""
