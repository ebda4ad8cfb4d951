"""One exception type for mistakes a user can fix (bad paths, broken configs, bad options).

The command-line tools print these as a single line and exit non-zero; anything else is a bug
and keeps its traceback.
"""


import json
import os
import stat
from pathlib import Path

# config.json, params.json and index files are a few KB (a 400B model's index is well under 1 MB);
# anything past this is not one, and reading it whole could exhaust memory.
MAX_JSON_BYTES = 16 << 20


class MlxLlamaError(Exception):
    """A user-facing error: the message names the cause and, where there is one, the file."""


def broken_symlink(path: Path) -> bool:
    """A symlink whose target is gone (say, a Hub cache blob that was deleted)."""
    return os.path.islink(path) and not os.path.exists(path)


def broken_symlink_message(path: Path) -> str:
    return f"{path}: broken symlink (its target {os.readlink(path)} does not exist)"


def read_small_file(path: Path, error=MlxLlamaError, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a small regular file. A device, FIFO or directory (a symlink to /dev/zero
    would never end), a file over ``limit`` bytes or a broken symlink raises ``error`` naming the
    file; FileNotFoundError and other OSErrors are left to the caller."""
    try:
        st = os.stat(path)  # before opening: opening a FIFO would wait for a writer
    except FileNotFoundError:
        if broken_symlink(path):
            raise error(broken_symlink_message(path)) from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file")
    if st.st_size > limit:
        raise error(f"{path}: {st.st_size} bytes, too large for a JSON metadata file (limit {limit})")
    with open(path, "rb") as f:
        data = f.read(limit + 1)  # the file may have grown since the stat
    if len(data) > limit:
        raise error(f"{path}: more than {limit} bytes, too large for a JSON metadata file")
    return data


def read_json_object(path: Path, what: str, error=MlxLlamaError) -> dict:
    """The JSON object in ``path``; a missing or unreadable file, or not an object, raises ``error``
    naming the file (``what`` says what the directory was expected to be)."""
    try:
        data = json.loads(read_small_file(path, error))
    except FileNotFoundError:
        raise error(f"{path}: missing (not {what}?)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data
