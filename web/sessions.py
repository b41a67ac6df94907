"""Web sessions kept on the server (table `web_sessions`), so that a login can be ended.

The signed cookie (Starlette's SessionMiddleware) carries only a random session id and the CSRF
token; the id's SHA-256 is the row's key. A session is valid while its row is not ended, its user is
enabled, it is younger than `web.session_max_age_s` and it was used within
`web.session_idle_timeout_s`. It is ended by logout, `rtprop users disable` and `rtprop users
password` (a copied cookie then opens nothing), or lapses by those two times.

"Used" is refreshed at most every `TOUCH_EVERY_S` (one small write, not one per slice image), and
not by the pages' own background refreshes (htmx polls), so an unattended dashboard still times out.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from config.schema import WebConfig
from db.schema import User, WebSession, aware, utcnow

TOUCH_EVERY_S = 60.0


@dataclass(frozen=True)
class Live:
    """A valid session: its row id, its user, and whether its last use should be written now."""

    session_id: int
    user: str
    role: str
    stale: bool


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def start(session: Session, user: User, client: str) -> str:
    """A new session for `user`; returns the id for the cookie (only its hash is stored)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(WebSession(token_sha256=_digest(token), user_id=user.id, client=client[:64], created_at=now,
                           last_seen_at=now))
    session.flush()
    return token


def find(session: Session, token: str | None, web: WebConfig, now: datetime | None = None) -> Live | None:
    """The session `token` names if it is still valid (module docstring), else None. Reads only."""
    if not token:
        return None
    row = session.execute(select(WebSession, User).join(User, User.id == WebSession.user_id)
                          .where(WebSession.token_sha256 == _digest(str(token)))).first()
    if row is None:
        return None
    ws, user = row
    now = now or utcnow()
    idle = (now - aware(ws.last_seen_at)).total_seconds()
    if (ws.ended_at is not None or user.disabled or idle > web.session_idle_timeout_s
            or (now - aware(ws.created_at)).total_seconds() > web.session_max_age_s):
        return None
    return Live(ws.id, user.name, user.role, stale=idle > min(TOUCH_EVERY_S, web.session_idle_timeout_s / 10))


def touch(session: Session, session_id: int) -> None:
    session.execute(update(WebSession).where(WebSession.id == session_id).values(last_seen_at=utcnow()))


def end(session: Session, token: str | None, reason: str) -> bool:
    """End the session `token` names; True if it was open."""
    if not token:
        return False
    result = session.execute(update(WebSession).where(WebSession.token_sha256 == _digest(str(token)),
                                                      WebSession.ended_at.is_(None))
                             .values(ended_at=utcnow(), end_reason=reason))
    return bool(result.rowcount)


def end_all(session: Session, user_id: int, reason: str) -> int:
    """End every open session of a user (disabled, new password); returns how many."""
    result = session.execute(update(WebSession).where(WebSession.user_id == user_id, WebSession.ended_at.is_(None))
                             .values(ended_at=utcnow(), end_reason=reason))
    return int(result.rowcount or 0)

