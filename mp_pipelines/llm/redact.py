"""Credentials out of text: every message, log line or record that holds text from an endpoint or a URL
passes through `redact` first.

An endpoint may echo what it was sent (a gateway's 400 body repeating the `Authorization` header), and a
URL may carry `user:password@`; neither may reach a log, an event, an error or storage.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MASK = "***"
_MIN_SECRET = 4  # shorter known secrets are not replaced: "ab" would mangle every message
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s'\"<>]*@")
# An HTTP authorization value after its scheme, e.g. in an echoed `Authorization: Basic dXNlcjpwdw==`.
_AUTH_VALUE = re.compile(r"\b(?P<scheme>Bearer|Basic)(?P<gap>\s+)(?P<value>[A-Za-z0-9._~+/\-]{4,}=*)", re.IGNORECASE)
_API_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without `secrets`, URL `user:password@` parts, authorization values and `sk-…` keys."""
    for secret in sorted((s for s in secrets if s and len(s) >= _MIN_SECRET), key=len, reverse=True):
        text = text.replace(secret, MASK)  # longest first: a secret holding a shorter one leaves no fragment
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _AUTH_VALUE.sub(_mask_credential, text)
    return _API_KEY.sub(f"sk-{MASK}", text)


def _mask_credential(match: re.Match[str]) -> str:
    """`Basic ***` for what looks like a credential; prose such as "basic validation" stays (credentials carry
    digits or base64 padding and symbols, or are long)."""
    value = match["value"]
    if len(value) < 24 and not any(c.isdigit() or c in "+/=" for c in value):
        return match[0]
    return f"{match['scheme']}{match['gap']}{MASK}"


@dataclass(frozen=True)
class UrlCredentials:
    """The `user:password@` of a URL, split off so that only the URL without them is ever shown."""

    public_url: str  # the URL without user:password
    username: str = ""  # percent-decoded, as HTTP Basic auth sends it
    password: str = field(default="", repr=False)

    @property
    def present(self) -> bool:
        return bool(self.username or self.password)

    def basic_token(self) -> str:
        """The base64 `user:password` of an HTTP Basic `Authorization` header."""
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def secrets(self) -> tuple[str, ...]:
        """What must never appear in a message: the password and the Basic token it is sent as."""
        return tuple(s for s in (self.password, self.basic_token()) if s) if self.present else ()


def split_credentials(url: str) -> UrlCredentials:
    """`url` without its `user:password@` (kept apart, decoded); a URL without them comes back unchanged."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not at:
        return UrlCredentials(url)
    username, _, password = userinfo.partition(":")
    public = parts._replace(netloc=host).geturl()
    return UrlCredentials(public, unquote(username), unquote(password))
