"""Response headers every answer of the web app carries (an ASGI middleware, outermost but for errors).

- Content-Security-Policy: scripts, styles, images and requests from this site only; no inline
  script or style (pages keep theirs in /static), no plug-ins, no <base>, forms post here only, and
  no other site may frame a page (frame-ancestors; X-Frame-Options for older browsers).
- X-Content-Type-Options: nosniff; Referrer-Policy: no-referrer (URLs carry job ids; nothing leaves).
- Cache-Control: no-store on everything but /static: pages, slice images and API answers carry
  patient data and must not stay in a browser's disk cache or a proxy.
- Strict-Transport-Security when the request came over HTTPS (directly or through a trusted proxy).
"""
from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer"}


class SecurityHeaders:
    """Adds the module docstring's headers to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
                if not static:
                    headers["Cache-Control"] = "no-store"
                if https:
                    headers["Strict-Transport-Security"] = "max-age=31536000"
            await send(message)

        await self.app(scope, receive, send_with_headers)
