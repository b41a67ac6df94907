"""Request plumbing shared by every page module: the app state, the request context, and `route()`.

Every route is declared through `route()`, which puts the login and role check in front of it:
anonymous requests get 302 to /login (pages), 401 (API), or 401 with `HX-Redirect` to the login
(a page's own htmx refresh after its session ended); a role below the route's gets 403; a
state-changing request with the session cookie needs the session's CSRF token. Only the routes in
PUBLIC (login, health, metrics, static files) are reachable without login, and tests walk the route
table to keep it so. A login is a server-side session (web/sessions.py); `audit_read` records who
looked at which patient's data.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import quote

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from config.schema import Config
from db.audit import record
from db.engine import transaction
from db.schema import Job
from web import auth, sessions
from web.overlay import LRU

LOG = logging.getLogger("rtprop.web")
PUBLIC = frozenset({"/login", "/health", "/metrics", "/static"})
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class WebState:
    """What every request handler needs: configuration, database, templates, caches, the login limiter."""

    config: Config
    factory: sessionmaker[Session]
    me: str  # this process' heartbeat name
    templates: Jinja2Templates
    limiter: auth.LoginLimiter
    series_cache: LRU
    overlay_cache: LRU = field(default_factory=lambda: LRU(32))
    revision_cache: LRU = field(default_factory=lambda: LRU(64))  # ROI masks of revisions (pipeline/revisions.py)
    collector: Any = None
    reads: "ReadLog" = field(default_factory=lambda: ReadLog())


@dataclass
class Ctx:
    """One authenticated request: who, and the parsed form or JSON body of a POST."""

    request: Request
    state: WebState
    user: auth.Principal
    form: dict[str, str] = field(default_factory=dict)
    body: Any = None

    def render(self, template: str, status_code: int = 200, **values: Any) -> Response:
        session = self.request.session if "session" in self.request.scope else {}
        return self.state.templates.TemplateResponse(self.request, template, {
            "user": self.user, "csrf": session.get("csrf", ""), "config": self.state.config,
            "msg": self.request.query_params.get("msg", ""), **values}, status_code=status_code)


class ReadLog:
    """When each (user, job, what) read was last audited, for reads audited at most once a while (slice images)."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int, str], float] = {}
        self._lock = threading.Lock()

    def due(self, key: tuple[str, int, str], every_s: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -every_s) < every_s:
                return False
            if len(self._last) > 10000:
                self._last = {k: t for k, t in self._last.items() if now - t < every_s}
            self._last[key] = now
            return True


def client_address(request: Request) -> str:
    return request.client.host if request.client else "?"


def audit_read(ctx: "Ctx", job: Job, what: str, every_s: float = 0.0) -> None:
    """One `web.read` audit row: `ctx.user` looked at `what` of `job`'s patient (its UIDs and patient hash
    are on the row); with `every_s`, at most one such row per user, job and `what` in that time."""
    if every_s and not ctx.state.reads.due((ctx.user.name, job.id, what), every_s):
        return
    with transaction(ctx.state.factory) as session:
        record(session, "web.read", component="web", job_id=job.id, study_instance_uid=job.study_instance_uid,
               series_instance_uid=job.series_instance_uid, patient_id_hash=job.patient_id_hash,
               user=ctx.user.name, what=what, via=ctx.user.via, client=client_address(ctx.request))


def wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _principal(state: WebState, request: Request) -> auth.Principal | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        with transaction(state.factory) as session:
            user = auth.token_user(session, header[7:].strip())
            return auth.Principal(user.name, user.role, "token") if user else None
    with state.factory() as session:
        live = sessions.find(session, request.session.get("sid"), state.config.web)
    if live is None:
        return None
    if live.stale and request.headers.get("hx-request") != "true":  # the pages' own refreshes are not use
        with transaction(state.factory) as session:
            sessions.touch(session, live.session_id)
    return auth.Principal(live.user, live.role, "session")


def route(path: str, endpoint: Callable[[Ctx], Response], *, role: str = "viewer",
          methods: tuple[str, ...] = ("GET",), name: str | None = None) -> Route:
    """A route behind login: `endpoint(ctx)` runs (in a thread) only for a user of `role` or above."""
    async def guarded(request: Request) -> Response:
        state: WebState = request.app.state.web
        user = await run_in_threadpool(_principal, state, request)
        if user is None:
            if wants_json(request):
                return JSONResponse({"error": "login required"}, status_code=401,
                                    headers={"WWW-Authenticate": 'Bearer realm="rtprop"'})
            if request.headers.get("hx-request") == "true":  # a page refreshing itself: send the page to the login
                return PlainTextResponse("login required", status_code=401, headers={"HX-Redirect": "/login"})
            if request.method in UNSAFE:
                return PlainTextResponse("login required", status_code=401)
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target)}", status_code=302)
        if not user.can(role):
            return _refuse(request, 403, f"{user.name} ({user.role}) may not do this: needs {role}")
        ctx = Ctx(request, state, user)
        if request.method in UNSAFE:
            ctype = request.headers.get("content-type", "")
            if "json" in ctype:
                try:
                    ctx.body = json.loads(await request.body() or b"null")
                except ValueError:
                    return _refuse(request, 400, "body is not valid JSON")
            else:
                ctx.form = {k: str(v) for k, v in (await request.form()).items()}
            if user.via == "session" and not auth.csrf_ok(request.session.get("csrf"),
                                                         ctx.form.get("csrf_token") or
                                                         request.headers.get("x-csrf-token")):
                return _refuse(request, 403, "missing or wrong CSRF token: reload the page and try again")
        return await run_in_threadpool(endpoint, ctx)

    return Route(path, guarded, methods=list(methods), name=name or endpoint.__name__)


def _refuse(request: Request, status: int, message: str) -> Response:
    if wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    return PlainTextResponse(message, status_code=status)


