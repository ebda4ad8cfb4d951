"""Resolve a model argument to a local directory: an existing path, or a Hub repo id.

Hub downloads go through huggingface_hub, so HF_HOME, HF_HUB_OFFLINE and the usual cache layout
apply; only the files a conversion needs are fetched.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .errors import MlxLlamaError

ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
]
# Taken only when a repo has no safetensors: pickled PyTorch weights (read without running pickle code).
TORCH_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_or_repo: str, revision: Optional[str] = None) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MlxLlamaError(f"{path}: not a directory")
        if revision is not None:
            # A local directory has one version, whatever is on disk; we do not check out git revisions.
            # Refused rather than warned about: the user asked for specific weights, and the likeliest
            # cause is a local directory shadowing the repo id they meant (./org/name), so going on
            # would convert or run something other than what was asked for.
            raise MlxLlamaError(
                f"{path}: --revision {revision} applies only to Hub repo ids, and this is a local directory"
            )
        return path
    if not _REPO_ID.match(str(path_or_repo)):
        raise MlxLlamaError(f"{path_or_repo}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=ALLOW_PATTERNS))
        if not any(path.glob("*.safetensors")):  # safetensors preferred; .bin only when there are none
            path = Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=TORCH_PATTERNS))
        return path
    except Exception as e:  # huggingface_hub raises many types (offline, 404, auth, network)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlxLlamaError(
            f"{path_or_repo}: no such directory, and it could not be fetched from the Hugging Face Hub ({why})"
        ) from None
