"""The openai judge's endpoint URL: the credentials it may carry, kept out of everything spoctl prints or saves.

A URL such as `https://user:secret@host/v1?api-version=2024-06-01&api_key=secret` is split into what the requests
use (the URL without the user part, the query as given; the user part becomes HTTP Basic authentication) and
two credential-free forms: `redacted` for messages and reports (`https://***@host/v1?api-version=...&api_key=***`)
and `identity` for the judgment cache key (scheme and host lower-cased, default port, trailing slash and every
credential dropped), so one endpoint keeps its cache however its URL is spelt or its keys rotate.

Plain standard library, no torch: `spoctl.config` masks the URL with `redact_url` when a configuration is shown.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry a secret: api_key, api-key, key, token, access_token, sig (Azure SAS), code, ...
_SECRET_PARAM = re.compile(r"(key|token|secret|passw|sig|auth|code|credential)", re.I)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def is_secret_param(name: str) -> bool:
    return bool(_SECRET_PARAM.search(name))


@dataclass(frozen=True)
class Endpoint:
    request_base: str  # scheme://host[:port]/path, no user part, no query
    query: list[tuple[str, str]]  # as given (credentials included): sent with every request
    basic_auth: str | None  # "Basic ..." from the URL's user part, if any
    redacted: str
    identity: str
    secrets: tuple[str, ...]  # every secret string in the URL, raw and as spelt in it, for scrubbing messages

    def url(self, route: str) -> str:
        """The request URL of `route` (e.g. "chat/completions"), with the query the endpoint was given."""
        return f"{self.request_base}/{route}" + (f"?{urlencode(self.query)}" if self.query else "")


def parse_endpoint(url: str) -> Endpoint:
    """Raises ValueError (with the URL redacted) when `url` is not an http(s) URL with a host."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        host, port = (parts.hostname or "").lower(), parts.port
    except ValueError:
        host, port = "", None
    if scheme not in _DEFAULT_PORTS or not host:
        raise ValueError(f"{redact_url(url)!r} is not an http(s) URL such as https://api.openai.com/v1")
    netloc_host = f"[{host}]" if ":" in host else host
    shown_port = f":{port}" if port is not None else ""
    path = parts.path.rstrip("/")
    query = parse_qsl(parts.query, keep_blank_values=True)

    secrets: list[str] = []
    basic = None
    if parts.username is not None or parts.password is not None:
        user, password = unquote(parts.username or ""), unquote(parts.password or "")
        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        secrets += [s for s in (password, parts.password or "", basic.split()[1]) if s]
        if user:
            secrets += [user, parts.username or ""]
    for name, value in query:
        if is_secret_param(name) and value:
            secrets += [value, quote(value, safe=""), quote(value)]

    redacted_query = [(n, MASK if is_secret_param(n) else v) for n, v in query]
    user_part = f"{MASK}@" if basic else ""
    redacted = urlunsplit((scheme, f"{user_part}{netloc_host}{shown_port}", path,
                           urlencode(redacted_query, safe="*"), ""))
    ident_port = "" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}"
    identity = urlunsplit((scheme, f"{netloc_host}{ident_port}", path,
                           urlencode([(n, v) for n, v in query if not is_secret_param(n)]), ""))
    return Endpoint(request_base=urlunsplit((scheme, f"{netloc_host}{shown_port}", path, "", "")), query=query,
                    basic_auth=basic, redacted=redacted, identity=identity,
                    secrets=tuple(sorted({s for s in secrets if s}, key=len, reverse=True)))


def redact_url(url: str) -> str:
    """`url` with its user part and secret query values masked; anything unparsable is masked whole."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return MASK
    if not parts.netloc and "@" in url:  # e.g. user:key@host/v1 without a scheme: no way to tell what is secret
        return MASK
    user_part = f"{MASK}@" if (parts.username is not None or parts.password is not None) else ""
    netloc = f"{user_part}{f'[{host}]' if ':' in host else host}{port}" if parts.netloc else ""
    query = [(n, MASK if is_secret_param(n) else v) for n, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="*"), ""))


def scrub(text: str, secrets: tuple[str, ...] | list[str]) -> str:
    """`text` with every secret replaced by the mask (longest first, so no fragment of a secret survives)."""
    for s in sorted(set(secrets), key=len, reverse=True):
        if s:
            text = text.replace(s, MASK)
    return text
