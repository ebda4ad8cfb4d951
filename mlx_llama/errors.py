"""One exception type for mistakes a user can fix (bad paths, broken configs, bad options).

The command-line tools print these as a single line and exit non-zero; anything else is a bug
and keeps its traceback.
"""


class MlxLlamaError(Exception):
    """A user-facing error: the message names the cause and, where there is one, the file."""
