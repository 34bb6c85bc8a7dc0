"""The TLS context the model clients verify servers with: built once per process, ahead of the first call.

Loading the certificate authorities takes 20 ms on a quiet machine and over 100 ms while a run's threads compete
for the interpreter; done on the event loop that sends every call of the process, it would hold back the first
calls of a run. So a client that will need TLS starts building the shared context in a thread when it is made
(`prepare`), and a client of a plain-HTTP endpoint (a local vLLM, Ollama or test server) reached without a proxy
never loads the authorities: it gets a context that trusts none (`trusting_no_one`), so a TLS handshake it were
ever led into would fail verification rather than pass it.
"""

from __future__ import annotations

import os
import ssl
import sys
import threading
from typing import Any
from urllib.parse import urlsplit

# Proxy settings httpx reads from the environment (trust_env); a proxy may itself be reached over TLS.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")

_lock = threading.Lock()
_contexts: dict[tuple[str, str | None, str | None], Any] = {}


def needs_tls(base_url: str) -> bool:
    """Whether requests to `base_url` can make a TLS handshake: an https:// endpoint, or any endpoint while a proxy
    is set in the environment."""
    if urlsplit(base_url).scheme.lower() != "http":
        return True
    return any(os.environ.get(name) or os.environ.get(name.upper()) for name in PROXY_VARIABLES)


def verifying_context(factory: type) -> Any:
    """The context the SDK's HTTP client class `factory` would build for itself (its CA bundle, or SSL_CERT_FILE /
    SSL_CERT_DIR), made once per process and those two settings; `True` (the library's own default) when its HTTP
    library has no `create_ssl_context`."""
    http_module = sys.modules[factory.__mro__[1].__module__.split(".")[0]]  # httpx, or httpx2 from openai 3.x
    key = (http_module.__name__, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    with _lock:
        if key not in _contexts:
            create = getattr(http_module, "create_ssl_context", None)
            _contexts[key] = create(trust_env=True) if create is not None else True
        return _contexts[key]


def trusting_no_one() -> ssl.SSLContext:
    """A client context that verifies certificates and host names but trusts no certificate authority."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def prepare(factory: type) -> None:
    """Start building `verifying_context(factory)` in a daemon thread, so that it is ready by the first call."""
    threading.Thread(target=verifying_context, args=(factory,), name="mp-tls-context", daemon=True).start()
