"""The web app: one Starlette application over the node's storage and database (see web/routing.py for
the login, role and CSRF checks every route goes through, web/security.py for the headers every answer
carries)."""
from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from config.schema import Config
from web import auth
from web.overlay import LRU
from web.routing import PUBLIC, WebState
from web.security import SecurityHeaders

__all__ = ["PUBLIC", "create_app", "routes", "secret_key"]
LOG = logging.getLogger("rtprop.web")
HERE = Path(__file__).resolve().parent


def secret_key(config: Config) -> str:
    """The cookie-signing key: web.session_secret_file under the storage root, created 0600 on first start."""
    path = config.web.session_secret_file
    path = path if path.is_absolute() else Path(config.storage.root) / path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            LOG.warning("%s is readable by others: chmod 600 it", path)
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path.read_text().strip()


def routes() -> list[BaseRoute]:
    from web import api, pages, review, public

    return [*public.routes(), *pages.routes(), *review.routes(), *api.routes(),
            Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static")]


def create_app(config: Config, factory: sessionmaker[Session], me: str = "web") -> Starlette:
    """The application for `config`'s storage (paths already resolved) and its database."""
    from prometheus_client import CollectorRegistry

    from web.health import CachedHealth, DatabaseCollector

    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["tojson_compact"] = lambda v: json.dumps(v, separators=(",", ":"), default=str)
    state = WebState(config=config, factory=factory, me=me, templates=templates,
                     limiter=auth.LoginLimiter(config.web.login_max_failures, config.web.login_lockout_s),
                     series_cache=LRU(config.web.volume_cache_series))
    registry = CollectorRegistry(auto_describe=False)
    state.collector = DatabaseCollector(factory, config)
    registry.register(state.collector)
    secure = config.web.secure_cookies or config.web.tls_certificate is not None
    # The cookie holds the server-side session's id and the CSRF token (web/sessions.py decides validity)
    app = Starlette(routes=routes(), middleware=[Middleware(SecurityHeaders), Middleware(
        SessionMiddleware, secret_key=secret_key(config), session_cookie="rtprop_session",
        max_age=config.web.session_max_age_s, same_site="strict", https_only=secure)])
    app.state.web = state
    app.state.registry = registry
    app.state.health = CachedHealth(factory, config)
    return app
