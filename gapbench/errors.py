"""The exception a user can act on.

Anything raised as :class:`GapbenchError` is bad input or a missing resource,
and the command line shows it as one line (no traceback) and exits with
status 2. Everything else is a bug and keeps its traceback.
"""


class GapbenchError(Exception):
    """A problem with the user's input or environment, with its fix in the message."""
