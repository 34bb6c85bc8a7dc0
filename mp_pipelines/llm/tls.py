"""The TLS context the model clients verify servers with: built once per process, ahead of the first call.

Loading the certificate authorities takes 20 ms on a quiet machine and over 100 ms while a run's threads compete
for the interpreter; done on the event loop that sends every call of the process, it held back the first calls of
a run. So a client starts building the shared context in a thread when it is made (`prepare`; OpenSSL loads the
authorities without holding the interpreter), and its first call finds it ready. Every endpoint gets it, a plain
`http://` one too: a proxy from the environment or a redirect to https may still lead it into a handshake.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

_lock = threading.Lock()
_contexts: dict[tuple[str, str | None, str | None], Any] = {}
# Contexts a `prepare` thread is building, under a lock of their own: `_lock` is held while one is built.
_preparing: set[tuple[str, str | None, str | None]] = set()
_preparing_lock = threading.Lock()


def _new_lock_in_child() -> None:
    global _lock, _preparing_lock
    _lock, _preparing_lock = threading.Lock(), threading.Lock()  # a thread of the parent may have held them
    _preparing.clear()  # and the parent's `prepare` threads are not in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def verifying_context(factory: type) -> Any:
    """The context the SDK's HTTP client class `factory` would build for itself (its CA bundle, or SSL_CERT_FILE /
    SSL_CERT_DIR), made once per process and those two settings; `True` (the library's own default) when its HTTP
    library has no `create_ssl_context`."""
    http_module = _http_module(factory)
    key = _key(http_module)
    with _lock:
        if key not in _contexts:
            create = getattr(http_module, "create_ssl_context", None)
            _contexts[key] = create(trust_env=True) if create is not None else True
        return _contexts[key]


def _http_module(factory: type) -> Any:
    return sys.modules[factory.__mro__[1].__module__.split(".")[0]]  # httpx, or httpx2 from openai 3.x


def _key(http_module: Any) -> tuple[str, str | None, str | None]:
    return http_module.__name__, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")


def prepare(factory: type) -> None:
    """Start building `verifying_context(factory)` in a daemon thread, so that it is ready by the first call; nothing
    to do when it is built or being built already (a run's resource and its client both ask)."""
    key = _key(_http_module(factory))
    with _preparing_lock:
        if key in _contexts or key in _preparing:
            return
        _preparing.add(key)
    threading.Thread(target=_prepared, args=(factory, key), name="mp-tls-context", daemon=True).start()


def _prepared(factory: type, key: tuple[str, str | None, str | None]) -> None:
    try:
        verifying_context(factory)
    except Exception:  # noqa: BLE001 - a bad SSL_CERT_FILE: the first call builds it again and reports it
        pass
    finally:
        with _preparing_lock:
            _preparing.discard(key)
