"""The routes reachable without login: the login form, `/health`, `/metrics` (unless web.metrics_require_login)."""
from __future__ import annotations

import logging
from urllib.parse import urlparse

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from db.audit import record
from db.engine import transaction
from web import auth
from web.routing import WebState, _principal

LOG = logging.getLogger("rtprop.web.login")


def _safe_next(target: str | None) -> str:
    """Only a path on this site (no scheme, no host): no open redirect after login."""
    if not target:
        return "/"
    parsed = urlparse(target)
    return target if not parsed.scheme and not parsed.netloc and target.startswith("/") else "/"


async def login_page(request: Request) -> Response:
    state: WebState = request.app.state.web
    if "csrf" not in request.session:
        request.session["csrf"] = auth.new_csrf()
    return state.templates.TemplateResponse(request, "login.html", {
        "next": _safe_next(request.query_params.get("next")), "error": "", "user": None,
        "csrf": request.session["csrf"], "config": state.config, "msg": ""})


def _try_login(state: WebState, name: str, password: str, client: str) -> tuple[str | None, float]:
    """(user name or None, seconds to wait when refused by the rate limit)."""
    keys = (f"user:{name}", f"addr:{client}")
    wait = state.limiter.retry_after_s(*keys)
    if wait > 0:
        return None, wait
    with transaction(state.factory) as session:
        user = auth.check_password(session, name, password)
        if user is None:
            state.limiter.failed(*keys)
            record(session, "web.login_failed", component="web", user=name[:64], client=client)
            return None, 0.0
        state.limiter.succeeded(*keys)
        record(session, "web.login", component="web", user=user.name, client=client)
        return user.name, 0.0


async def login_submit(request: Request) -> Response:
    state: WebState = request.app.state.web
    form = await request.form()
    name, password = str(form.get("username", "")).strip(), str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "")))
    if not auth.csrf_ok(request.session.get("csrf"), str(form.get("csrf_token", ""))):
        return PlainTextResponse("missing or wrong CSRF token: reload the login page", status_code=403)
    client = request.client.host if request.client else "?"
    user, wait = await run_in_threadpool(_try_login, state, name, password, client)
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
    request.session.update({"user": user, "csrf": auth.new_csrf()})  # a new session after login
    return RedirectResponse(target, status_code=303)


async def logout(request: Request) -> Response:
    form = await request.form()
    if request.session.get("user") and auth.csrf_ok(request.session.get("csrf"), str(form.get("csrf_token", ""))):
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
