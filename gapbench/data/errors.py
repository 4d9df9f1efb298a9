"""The error every user-facing data problem raises: missing, corrupt or misnamed."""

from gapbench.errors import GapbenchError


class DataError(GapbenchError):
    """A dataset is missing, damaged or unknown; the one-line message says what and how to fix it."""
