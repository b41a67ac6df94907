"""Users, passwords, API tokens, login rate limit, CSRF: everything about who is asking.

- Passwords: argon2id (argon2-cffi's defaults: 64 MiB, 3 passes), never stored or logged in clear.
- API tokens: 32 random bytes shown once; only their SHA-256 is stored (a token is as strong as a key,
  so a fast hash is enough and lets a token be looked up).
- Roles: viewer < reviewer < admin, enforced on the server for every route (web/app.py).
- Login attempts: after `web.login_max_failures` failures for one user name (4 times as many for one
  client address, so one mistyping colleague does not lock out a shared workstation) within
  `web.login_lockout_s`, further tries are refused (HTTP 429) until the window has passed, whether
  or not the password is right.
- CSRF: a random token per session, required on every state-changing request made with the session
  cookie (form field `csrf_token` or header `X-CSRF-Token`); Bearer-token API calls carry no cookie.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.errors import UserError
from db.schema import ApiToken, User, utcnow

ROLES = ("viewer", "reviewer", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}
TOKEN_PREFIX = "rtp_"
MIN_PASSWORD = 8
ADDRESS_FACTOR = 4  # failures allowed per client address, in multiples of web.login_max_failures
_HASHER = PasswordHasher()
# Verified against when the user name is unknown, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _HASHER.hash("rtprop-no-such-user")


class AuthError(UserError):
    """A user-management request that cannot be done (unknown user, weak password, bad role)."""


@dataclass(frozen=True)
class Principal:
    """Who is asking: a logged-in person or an API token's owner."""

    name: str
    role: str
    via: str  # session | token

    def can(self, role: str) -> bool:
        return RANK[self.role] >= RANK[role]


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"password too short: at least {MIN_PASSWORD} characters")
    return _HASHER.hash(password)


def add_user(session: Session, name: str, role: str, password: str) -> User:
    name = name.strip()
    if role not in ROLES:
        raise AuthError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    if not name or len(name) > 64 or any(c.isspace() for c in name):
        raise AuthError(f"user name {name!r}: 1 to 64 characters, no spaces")
    if session.execute(select(User.id).where(User.name == name)).scalar() is not None:
        raise AuthError(f"user {name!r} exists already")
    user = User(name=name, role=role, password_hash=hash_password(password), disabled=False, created_at=utcnow())
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.execute(select(User).where(User.name == name)).scalar()
    if user is None:
        raise AuthError(f"no user {name!r}")
    return user


def check_password(session: Session, name: str, password: str) -> User | None:
    """The enabled user `name` if `password` is theirs, else None (same cost either way)."""
    user = session.execute(select(User).where(User.name == name)).scalar()
    try:
        _HASHER.verify(user.password_hash if user is not None else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled:
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    user.last_login_at = utcnow()
    return user


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(session: Session, user: User) -> str:
    """Make an API token for `user`; the caller shows it once (only its hash is kept)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(user_id=user.id, token_sha256=token_digest(token), created_at=utcnow(), revoked=False))
    session.flush()
    return token


def token_user(session: Session, token: str) -> User | None:
    row = session.execute(select(ApiToken).where(ApiToken.token_sha256 == token_digest(token),
                                                 ApiToken.revoked.is_(False))).scalar()
    if row is None:
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    row.last_used_at = utcnow()
    return user


def disable_user(session: Session, name: str) -> int:
    """Disable `name` and revoke its tokens (its sessions stop at their next request); returns tokens revoked."""
    user = get_user(session, name)
    user.disabled = True
    tokens = session.execute(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked.is_(False))
                             ).scalars().all()
    for t in tokens:
        t.revoked = True
    return len(tokens)


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


class LoginLimiter:
    """Failed logins per key (user name, client address) in a sliding window; in memory, per process."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _trim(self, key: str, now: float) -> deque[float]:
        q = self._failures[key]
        while q and now - q[0] > self.window_s:
            q.popleft()
        return q

    def limit(self, key: str) -> int:
        return self.max_failures * (ADDRESS_FACTOR if key.startswith("addr:") else 1)

    def retry_after_s(self, *keys: str) -> float:
        """0 if a try is allowed now, else the seconds until it is."""
        now = time.monotonic()
        with self._lock:
            waits = [self.window_s - (now - q[-self.limit(k)]) for k in keys
                     if len(q := self._trim(k, now)) >= self.limit(k)]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._trim(k, now).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)
