"""nginx with the shipped deploy/nginx config, as a real non-root process on loopback, for end-to-end tests.

The shipped site file is used as it is, except for what a test machine must change: the listen port, the
webserver's address and the folder of the htpasswd files and the guard script (a temporary one per proxy).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from mp_pipelines_tests.services import REPO, free_port, unavailable

DEPLOY = REPO / "deploy" / "nginx"
SITE = DEPLOY / "mp-pipelines.conf"
GUARD = DEPLOY / "graphql_guard.js"
SHIPPED_FOLDER = "/etc/nginx/mp-pipelines"
SHIPPED_LISTEN = "listen 8080;"
SHIPPED_UPSTREAM = "server 127.0.0.1:3000;"
JS_MODULE = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Proxy:
    url: str
    folder: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for name in ("error.log", "access.log"):
            path = self.folder / name
            if path.exists():
                text += f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


def htpasswd_line(user: str, password: str) -> str:
    """One htpasswd line, hashed as docs/deployment.md says (`openssl passwd -apr1`)."""
    hashed = subprocess.run(["openssl", "passwd", "-apr1", "-stdin"], input=password, capture_output=True,
                            text=True, check=True).stdout.strip()
    return f"{user}:{hashed}\n"


def render_site(folder: Path, port: int, upstream: str) -> str:
    """The shipped site config with this proxy's port, upstream and folder; fails if the markers moved."""
    text = SITE.read_text()
    for marker in (SHIPPED_LISTEN, SHIPPED_UPSTREAM, SHIPPED_FOLDER):
        assert marker in text, f"{SITE} no longer holds {marker!r}; update mp_pipelines_tests/proxy.py"
    return (text.replace(SHIPPED_LISTEN, f"listen 127.0.0.1:{port};")
            .replace(SHIPPED_UPSTREAM, f"server {upstream};")
            .replace(SHIPPED_FOLDER, str(folder)))


def _answers(proxy: Proxy) -> bool:
    try:
        return httpx.get(proxy.url + "/server_info", timeout=2).status_code == 401
    except httpx.TransportError:
        return False


@contextmanager
def nginx_proxy(upstream: str, users: Mapping[str, Mapping[str, str]]) -> Iterator[Proxy]:
    """nginx in front of `upstream` (host:port) with `users` = {"viewers": {name: password}, "operators": {...}}.

    Run as `nobody` when the tests run as root, so nginx never has root's rights here either.
    """
    if not JS_MODULE.exists() or not Path(NGINX).exists():
        unavailable(f"nginx or its njs module ({JS_MODULE}) is missing: apt-get install nginx-light "
                    "libnginx-mod-http-js (.ci/run does)")
    folder = Path(tempfile.mkdtemp(prefix="mp-nginx-"))
    port = free_port()
    for role in ("viewers", "operators"):
        (folder / f"{role}.htpasswd").write_text("".join(htpasswd_line(u, p) for u, p in users.get(role, {}).items()))
    shutil.copy(GUARD, folder / GUARD.name)
    (folder / "site.conf").write_text(render_site(folder, port, upstream))
    (folder / "nginx.conf").write_text(f"""
daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
load_module {JS_MODULE};
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/site.conf;
}}
""")
    user = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        user = nobody.pw_uid
        for path in [folder, *folder.iterdir()]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
    process = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e",
                                str(folder / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, user=user, start_new_session=True)
    proxy = Proxy(f"http://127.0.0.1:{port}", folder, process)
    try:
        deadline = time.monotonic() + 30
        while not _answers(proxy):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx on {proxy.url} did not start (exit code {process.poll()})\n"
                                   + proxy.log_tail())
            time.sleep(0.1)
        yield proxy
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        shutil.rmtree(folder, ignore_errors=True)
