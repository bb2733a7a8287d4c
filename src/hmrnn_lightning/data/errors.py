"""The one exception of the data layer that the CLI reports as a user error (one line, exit 2)."""


class DataError(RuntimeError):
    """Missing, empty or unreadable data, or a cache that cannot be written, with what to do about it."""
