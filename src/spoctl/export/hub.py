"""Uploading an export to the Hugging Face Hub.

The token is huggingface_hub's own (`get_token()`: $HF_TOKEN, else the one `hf auth login` stored under $HF_HOME),
and it is checked *before* the export starts (`check_hub_access`): a missing, refused or read-only token, or an
offline machine, fails in seconds instead of after the weights are written. The token is never printed or saved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

_TRUTHY = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class HubAccess:
    """A token that the Hub accepted for `repo`, and the account it belongs to."""

    repo: str
    token: str
    user: str | None
    endpoint: str | None  # $HF_ENDPOINT (read at call time: huggingface_hub reads it only when imported)

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "***")


def offline() -> bool:
    import huggingface_hub

    # Read at call time as well: huggingface_hub reads HF_HUB_OFFLINE only when it is first imported.
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUTHY or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def check_hub_access(repo: str) -> HubAccess:
    """The token for `--push-to-hub repo`, checked with the Hub (`whoami`) before anything is exported."""
    from huggingface_hub import HfApi, get_token

    later = "or export without --push-to-hub and upload later with `hf upload`"
    if offline():
        raise UsageError(f"--push-to-hub {repo}: this machine is offline (HF_HUB_OFFLINE is set), so nothing could be"
                         f" uploaded; nothing was exported. Unset HF_HUB_OFFLINE, {later}")
    token = get_token()
    if not token:
        raise UsageError(f"--push-to-hub {repo}: no Hugging Face token; set HF_TOKEN to a write token or run"
                         f" `hf auth login` (nothing was exported), {later}")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    access = HubAccess(repo=repo, token=token, user=None, endpoint=endpoint)
    try:
        info = HfApi(endpoint=endpoint, token=token).whoami()
    except Exception as err:  # HTTP errors, network errors: both end the same way, before any work
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise UsageError(f"--push-to-hub {repo}: the Hub refused the token (HTTP {status}); set HF_TOKEN to a"
                             " valid write token or run `hf auth login` again (nothing was exported)") from None
        first = access.scrub((str(err).splitlines() or [""])[0])
        raise UsageError(f"--push-to-hub {repo}: cannot check the token with the Hub ({type(err).__name__}: {first});"
                         f" nothing was exported. Check the network (and HF_ENDPOINT), {later}") from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise UsageError(f"--push-to-hub {repo}: the token is read-only; create a write token (nothing was exported)")
    return HubAccess(repo=repo, token=token, user=info.get("name"), endpoint=endpoint)


def push_folder(folder: Path, access: HubAccess, *, private: bool, message: str) -> str:
    """create_repo (if needed) + upload_folder; returns the repository URL. Any failure is a UsageError that says
    the local export is intact, so the caller can retry the upload alone."""
    from huggingface_hub import HfApi

    repo = access.repo
    keep = f"the local export in {folder} is complete; upload it later with `hf upload {repo} {folder}`"
    api = HfApi(endpoint=access.endpoint, token=access.token)
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model", commit_message=message)
    except Exception as err:  # network, auth, permissions: all end the same way
        first = access.scrub((str(err).splitlines() or [""])[0])
        raise UsageError(f"--push-to-hub {repo}: upload failed ({type(err).__name__}: {first}); {keep}") from None
    return str(url)
