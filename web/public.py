"""The routes reachable without login: the login form, `/health`, `/metrics` (unless web.metrics_require_login)."""
from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from db.audit import pseudonym, record, site_key
from db.engine import transaction
from web import auth, sessions
from web.routing import WebState, _principal, client_address

LOG = logging.getLogger("rtprop.web.login")


def _safe_next(target: str | None) -> str:
    """Only a path on this site: "/" then anything but a second "/" or "\\" (browsers read "//host", "/\\host"
    and "///host" as another site), and no control character or space (browsers drop tabs and newlines)."""
    if (not target or not target.startswith("/") or target[1:2] in ("/", "\\")
            or any(c == "\\" or c.isspace() or not c.isprintable() for c in target)):
        return "/"
    return target


async def login_page(request: Request) -> Response:
    state: WebState = request.app.state.web
    if "csrf" not in request.session:
        request.session["csrf"] = auth.new_csrf()
    return state.templates.TemplateResponse(request, "login.html", {
        "next": _safe_next(request.query_params.get("next")), "error": "", "user": None,
        "csrf": request.session["csrf"], "config": state.config, "msg": ""})


def _try_login(state: WebState, name: str, password: str, client: str) -> tuple[str | None, str | None, float]:
    """(user name, session id) when the password is right, else (None, None, seconds to wait when the rate limit
    refused the try before its password was checked)."""
    wait, ticket = state.limiter.attempt(name, client)
    if wait > 0:
        return None, None, wait
    with transaction(state.factory) as session:
        user = auth.check_password(session, name, password)
        if user is None:
            # a name that is no user may be a password typed in the wrong field: only its keyed hash is kept
            who = {"user": name[:64]} if auth.user_exists(session, name) else \
                {"user": "", "unknown_name": pseudonym(site_key(session), name)[:16]}
            record(session, "web.login_failed", component="web", client=client, **who)
            return None, None, 0.0
        state.limiter.succeeded(name, client, ticket)
        sid = sessions.start(session, user, client)
        record(session, "web.login", component="web", user=user.name, client=client)
        return user.name, sid, 0.0


async def login_submit(request: Request) -> Response:
    state: WebState = request.app.state.web
    form = await request.form()
    name, password = str(form.get("username", "")).strip()[:64], str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "")))
    if not auth.csrf_ok(request.session.get("csrf"), str(form.get("csrf_token", ""))):
        return PlainTextResponse("missing or wrong CSRF token: reload the login page", status_code=403)
    user, sid, wait = await run_in_threadpool(_try_login, state, name, password, client_address(request))
    if wait > 0:
        return state.templates.TemplateResponse(request, "login.html", {
            "next": target, "user": None, "csrf": request.session["csrf"], "config": state.config, "msg": "",
            "error": f"Too many failed logins: try again in {int(wait) + 1} s."}, status_code=429,
            headers={"Retry-After": str(int(wait) + 1)})
    if user is None:
        return state.templates.TemplateResponse(request, "login.html", {
            "next": target, "user": None, "csrf": request.session["csrf"], "config": state.config, "msg": "",
            "error": "Wrong user name or password."}, status_code=401)
    request.session.clear()
    request.session.update({"sid": sid, "csrf": auth.new_csrf()})  # a new session after login
    return RedirectResponse(target, status_code=303)


def _logout(state: WebState, sid: str, client: str) -> None:
    with transaction(state.factory) as session:
        live = sessions.find(session, sid, state.config.web)
        if sessions.end(session, sid, "logout") and live is not None:
            record(session, "web.logout", component="web", user=live.user, client=client)


async def logout(request: Request) -> Response:
    state: WebState = request.app.state.web
    form = await request.form()
    sid = request.session.get("sid")
    if sid and auth.csrf_ok(request.session.get("csrf"), str(form.get("csrf_token", ""))):
        await run_in_threadpool(_logout, state, sid, client_address(request))
        request.session.clear()
    return RedirectResponse("/login", status_code=302)


async def health(request: Request) -> Response:
    result = await run_in_threadpool(request.app.state.health)
    return JSONResponse(result, status_code=200 if result["status"] == "ok" else 503)


async def metrics(request: Request) -> Response:
    state: WebState = request.app.state.web
    if state.config.web.metrics_require_login and await run_in_threadpool(_principal, state, request) is None:
        return JSONResponse({"error": "login required"}, status_code=401)
    body = await run_in_threadpool(generate_latest, request.app.state.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def routes() -> list[BaseRoute]:
    return [Route("/login", login_page, methods=["GET"]), Route("/login", login_submit, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]), Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"])]
