"""Helpers for the web app tests: users made with the real CLI, `rtprop web` in a subprocess, a real
HTTP client (urllib, cookies kept), and Debian's Chromium driven by Playwright (never a browser download).
"""
from __future__ import annotations

import functools
import http.client
import http.cookiejar
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from node_helpers import REPO, VENV_BIN, free_port, port_open, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
ARTIFACTS = REPO / "tests" / "artifacts"


def ensure_chromium() -> None:
    """Debian's chromium, installed here if missing (CI has only what the project installs)."""
    if Path(CHROMIUM).exists():
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], check=False,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True, timeout=900)
    if not Path(CHROMIUM).exists():
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=False, capture_output=True, timeout=600)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True, timeout=900)


def rtprop(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(VENV_BIN / "rtprop"), *args], input=stdin, capture_output=True, text=True, timeout=120,
                       cwd=str(REPO))
    if check and r.returncode != 0:
        raise AssertionError(f"rtprop {' '.join(args)} failed ({r.returncode}): {r.stdout}{r.stderr}")
    return r


def add_user(storage: Path, name: str, role: str, password: str) -> None:
    rtprop("users", "add", name, "--role", role, "--password-stdin", "--storage", str(storage), stdin=password + "\n")


def token(storage: Path, name: str) -> str:
    return rtprop("users", "token", name, "--storage", str(storage)).stdout.strip().splitlines()[-1]


class WebProcess:
    """`rtprop web` on a free port over `storage`; always stopped by the caller."""

    def __init__(self, workdir: Path, storage: Path, config: Path | None = None) -> None:
        self.port = free_port()
        self.storage = storage
        self.args = ["web", "--storage", str(storage), "--http-port", str(self.port)]
        if config is not None:
            self.args += ["--config", str(config)]
        self.log_path = workdir / f"web-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "WebProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(VENV_BIN / "rtprop"), *self.args], stdout=log, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: self.proc.poll() is not None or port_open(self.port), 60, what="rtprop web to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"rtprop web exited: {self.log_path.read_text()[-3000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "WebProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:  # type: ignore[override]
        return None


class _FromAddress(urllib.request.HTTPHandler):
    """Connections from a chosen local address (e.g. 127.0.0.2: another client machine on loopback)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def http_open(self, req):  # type: ignore[no-untyped-def]
        return self.do_open(functools.partial(http.client.HTTPConnection, source_address=(self.source, 0)), req)


class Client:
    """A plain HTTP client with a cookie jar; redirects are NOT followed (tests look at 302/303). `source`: the
    local address to connect from (another client machine, for per-address limits)."""

    def __init__(self, base: str, source: str | None = None) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        handlers = [urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()]
        if source is not None:
            handlers.append(_FromAddress(source))
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, method: str, path: str, *, form: dict | None = None, body: Any = None,
                headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        data, hdrs = None, dict(headers or {})
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            hdrs["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with self.opener.open(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", path, **kw)

    def csrf(self, path: str = "/login") -> str:
        status, _, body = self.get(path)
        match = re.search(rb'name="csrf_token" value="([^"]+)"', body)
        assert match, f"no CSRF token on {path} ({status})"
        return match.group(1).decode()

    def login(self, name: str, password: str) -> int:
        status, _, _ = self.post("/login", form={"username": name, "password": password,
                                                 "csrf_token": self.csrf(), "next": "/"})
        return status


def browser():  # type: ignore[no-untyped-def]
    """(playwright, browser): Debian's Chromium, headless; the caller closes both."""
    from playwright.sync_api import sync_playwright

    ensure_chromium()
    pw = sync_playwright().start()
    return pw, pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)


def have_playwright() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return shutil.which("storescu") is not None


def run_dropped_cases(config, cases: list[Path]):  # type: ignore[no-untyped-def]
    """Drop `cases` in the inbox, take them in, run the workers until every job rests; (factory, worker)."""
    import shutil

    from db.engine import open_database
    from pipeline.dropin import DropIn
    from pipeline.worker import Worker

    factory = open_database(config.storage.database)
    config.dropin.inbox.mkdir(parents=True, exist_ok=True)
    for case in cases:
        shutil.copytree(case, config.dropin.inbox / case.name)
    DropIn(factory, config).take_all()
    worker = Worker(factory, config)
    worker.drain(120)
    return factory, worker
