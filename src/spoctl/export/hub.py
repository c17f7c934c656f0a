"""Uploading an export to the Hugging Face Hub. The token comes from HF_TOKEN only and is never printed or saved."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

_TRUTHY = {"1", "true", "yes", "on"}


def push_folder(folder: Path, repo: str, *, private: bool, message: str) -> str:
    """create_repo (if needed) + upload_folder; returns the repository URL. Any failure is a UsageError that says
    the local export is intact, so the caller can retry the upload alone."""
    import huggingface_hub
    from huggingface_hub import HfApi

    keep = f"the local export in {folder} is complete; upload it later with `hf upload {repo} {folder}`"
    # Read at call time: huggingface_hub reads these only when it is first imported.
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUTHY or huggingface_hub.constants.HF_HUB_OFFLINE:
        raise UsageError(f"--push-to-hub {repo}: offline (HF_HUB_OFFLINE is set); {keep}")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise UsageError(f"--push-to-hub {repo}: set the HF_TOKEN environment variable to a write token; {keep}")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message)
    except Exception as err:  # network, auth, permissions: all end the same way
        first = (str(err).splitlines() or [""])[0].replace(token, "***")
        raise UsageError(f"--push-to-hub {repo}: upload failed ({type(err).__name__}: {first}); {keep}") from None
    return str(url)
