"""Running the web app: uvicorn in a thread of `rtprop serve`, or alone (`rtprop web`) on the same storage."""
from __future__ import annotations

import logging
import sys
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

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


def start_web(config: Config, factory: sessionmaker[Session], stop: threading.Event, me: str) -> threading.Thread:
    """Serve the app in a daemon thread of this process until `stop` is set (uvicorn skips signals off the main thread)."""
    server = make_server(config, factory, me)

    def run() -> None:
        threading.Thread(target=_announce, args=(server, config), daemon=True).start()
        threading.Thread(target=lambda: (stop.wait(), setattr(server, "should_exit", True)), daemon=True).start()
        server.run()

    thread = threading.Thread(target=run, name="rtprop-web", daemon=True)
    thread.start()
    return thread


def serve_web(config: Config, factory: sessionmaker[Session], me: str) -> None:
    """Serve the app in this (main) thread until SIGTERM/SIGINT."""
    server = make_server(config, factory, me)
    threading.Thread(target=_announce, args=(server, config), daemon=True).start()
    server.run()
