"""Running the web app: uvicorn in a thread of `rtprop serve`, or alone (`rtprop web`) on the same storage."""
from __future__ import annotations

import logging
import socket
import sys
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from config.errors import UserError
from config.schema import Config

LOG = logging.getLogger("rtprop.web.server")
READY_LINE = "rtprop web ready"


def make_server(config: Config, factory: sessionmaker[Session], me: str):  # type: ignore[no-untyped-def]
    """A uvicorn server for the app on web.host:web.port (HTTPS when web.tls_certificate is set)."""
    import uvicorn

    from web.app import create_app

    web = config.web
    if (web.tls_certificate is None) != (web.tls_private_key is None):
        raise ValueError("web.tls_certificate and web.tls_private_key must be given together")
    settings = uvicorn.Config(create_app(config, factory, me), host=web.host, port=web.port or 0,
                              ssl_certfile=str(web.tls_certificate) if web.tls_certificate else None,
                              ssl_keyfile=str(web.tls_private_key) if web.tls_private_key else None,
                              proxy_headers=True, forwarded_allow_ips=web.forwarded_allow_ips,
                              log_level="warning", access_log=False, server_header=False,
                              log_config=None)  # rtprop's own handler: one line per record (pipeline/logline.py)
    return uvicorn.Server(settings)


def url(config: Config) -> str:
    return f"{'https' if config.web.tls_certificate else 'http'}://{config.web.host}:{config.web.port}"


def _announce(server, config: Config) -> None:  # type: ignore[no-untyped-def]
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        print(f"{READY_LINE} {url(config)}", file=sys.stderr, flush=True)


def listen_socket(config: Config) -> socket.socket:
    """The web app's listening socket on web.host:web.port, bound before anything is served: a port in use is a
    start-up error naming it (UserError, exit 2), never a node left running without its web app and /health."""
    family = socket.AF_INET6 if ":" in config.web.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.web.host, config.web.port or 0))
    except OSError as exc:
        sock.close()
        raise UserError(f"web.port {config.web.port} on {config.web.host}: cannot listen ({exc.strerror}): another "
                        "process uses it; give another --http-port or web.port") from None
    sock.set_inheritable(True)
    return sock


def start_web(config: Config, factory: sessionmaker[Session], stop: threading.Event, me: str) -> threading.Thread:
    """Serve the app in a daemon thread of this process until `stop` is set (uvicorn skips signals off the main thread).
    The port is bound here, in the caller's thread: a busy one raises before the thread starts."""
    sock = listen_socket(config)
    server = make_server(config, factory, me)

    def run() -> None:
        threading.Thread(target=_announce, args=(server, config), daemon=True).start()
        threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)), daemon=True).start()
        server.run(sockets=[sock])

    thread = threading.Thread(target=run, name="rtprop-web", daemon=True)
    thread.start()
    return thread


def serve_web(config: Config, factory: sessionmaker[Session], me: str) -> None:
    """Serve the app in this (main) thread until SIGTERM/SIGINT."""
    sock = listen_socket(config)
    server = make_server(config, factory, me)
    threading.Thread(target=_announce, args=(server, config), daemon=True).start()
    server.run(sockets=[sock])
