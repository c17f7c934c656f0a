"""Is the Hugging Face Hub usable right now? One answer for datasets and models.

Without this, an offline machine waits for huggingface_hub's retries: about 50 s for a model id before any message.
Offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) means "use the local cache only": then nothing is probed and
the libraries' own cache lookups run, which fail at once when the files are not cached.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "true", "yes", "on")


def offline_mode() -> bool:
    """Whether the user switched the Hub off (the local cache is used instead)."""
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in _TRUE for f in flags)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@functools.lru_cache(maxsize=None)
def _probe(url: str) -> str | None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return None
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"


def unreachable_reason() -> str | None:
    """None when the Hub endpoint accepts a TCP connection, else why not (a few seconds at most, once per process).

    Behind an HTTPS proxy a direct connection proves nothing, so the proxy is trusted (None).
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    return _probe(endpoint())


def reachable() -> bool:
    return unreachable_reason() is None
