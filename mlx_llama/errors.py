"""One exception type for mistakes a user can fix (bad paths, broken configs, bad options).

The command-line tools print these as a single line and exit non-zero; anything else is a bug
and keeps its traceback.
"""


import json
from pathlib import Path


class MlxLlamaError(Exception):
    """A user-facing error: the message names the cause and, where there is one, the file."""


def read_json_object(path: Path, what: str, error=MlxLlamaError) -> dict:
    """The JSON object in ``path``; a missing or unreadable file, or not an object, raises ``error``
    naming the file (``what`` says what the directory was expected to be)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: missing (not {what}?)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
