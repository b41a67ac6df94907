"""Users, passwords, API tokens, login rate limit, CSRF: everything about who is asking.

- Passwords: argon2id (argon2-cffi's defaults: 64 MiB, 3 passes), never stored or logged in clear.
  A new password needs at least 12 characters and must not be a common one (`password_problem`).
- API tokens: 32 random bytes shown once; only their SHA-256 is stored (a token is as strong as a key,
  so a fast hash is enough and lets a token be looked up).
- Roles: viewer < reviewer < admin, enforced on the server for every route (web/routing.py).
- Sessions: kept on the server (web/sessions.py); disabling a user or setting a new password ends them.
- Login attempts (`LoginLimiter`): counted before the password is checked, so tries sent at once
  cannot all be checked. After `web.login_max_failures` failures for one user name from one client
  address (4 times as many from one address, whatever the names) within `web.login_lockout_s`,
  further tries from there are refused (HTTP 429) until the window has passed, whether or not the
  password is right. Another address can still log in as that user, so nobody can lock a colleague
  out; an admin sees and clears the locks on /logins.
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
from functools import cache
from importlib.resources import files

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from config.errors import UserError
from db.schema import ApiToken, User, utcnow
from web import sessions

ROLES = ("viewer", "reviewer", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}
TOKEN_PREFIX = "rtp_"
MIN_PASSWORD = 12
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


PADDING = "0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"  # stripped from both ends before the list check
UNLEET = str.maketrans("013457@$!", "oieastasi")


@cache
def common_passwords() -> frozenset[str]:
    """The shipped list (web/common-passwords.txt): frequent passwords and the words they are made of."""
    text = files("web").joinpath("common-passwords.txt").read_text(encoding="utf-8")
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#"))


def password_problem(password: str, user: str = "") -> str:
    """Why `password` is refused ('' if it is not): shorter than 12; or, lower-cased, with digits and symbols
    taken off both ends and look-alike digits read as letters, it is empty, on the shipped list of common
    passwords, one short piece repeated, of fewer than 4 different characters, or the user's name."""
    if len(password) < MIN_PASSWORD:
        return f"password too short: at least {MIN_PASSWORD} characters"
    lowered = password.lower()
    core = lowered.strip(PADDING)
    cores = {core, core.translate(UNLEET).strip(PADDING)}
    for core in list(cores):
        for size in range(1, len(core) // 2 + 1):  # "passwordpassword", "abcabcabcabc"
            if len(core) % size == 0 and core == core[:size] * (len(core) // size):
                cores.add(core[:size])
                break
    name = user.strip().lower()
    if any(not c or c in common_passwords() or len(set(c)) < 4 or (len(name) >= 3 and c == name) for c in cores):
        return "password too common or too easy to guess: choose a longer phrase of your own"
    if len(name) >= 4 and name in lowered:
        return "password contains the user name"
    return ""


def hash_password(password: str, user: str = "") -> str:
    problem = password_problem(password, user)
    if problem:
        raise AuthError(problem)
    return _HASHER.hash(password)


def add_user(session: Session, name: str, role: str, password: str) -> User:
    name = name.strip()
    if role not in ROLES:
        raise AuthError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    if not name or len(name) > 64 or any(c.isspace() for c in name):
        raise AuthError(f"user name {name!r}: 1 to 64 characters, no spaces")
    if session.execute(select(User.id).where(User.name == name)).scalar() is not None:
        raise AuthError(f"user {name!r} exists already")
    user = User(name=name, role=role, password_hash=hash_password(password, name), disabled=False,
                created_at=utcnow())
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


def disable_user(session: Session, name: str) -> tuple[int, int]:
    """Disable `name`, revoke its tokens and end its sessions; returns (tokens revoked, sessions ended)."""
    user = get_user(session, name)
    user.disabled = True
    tokens = session.execute(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked.is_(False))
                             ).scalars().all()
    for t in tokens:
        t.revoked = True
    return len(tokens), sessions.end_all(session, user.id, "disabled")


def set_password(session: Session, name: str, password: str) -> int:
    """Give `name` a new password (the same rule as a new user's) and end its sessions; returns how many."""
    user = get_user(session, name)
    user.password_hash = hash_password(password, user.name)
    return sessions.end_all(session, user.id, "password")


def user_exists(session: Session, name: str) -> bool:
    return session.execute(select(User.id).where(User.name == name)).scalar() is not None


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


Key = tuple[str, str]  # (client address, user name); "" as the name: the address' tries under any name


@dataclass(frozen=True)
class Lock:
    """Login tries refused from `address` (as `user`, or under every name when `user` is "") for `retry_after_s`."""

    address: str
    user: str
    failures: int
    retry_after_s: float


class LoginLimiter:
    """Login tries per (client address, user name) and per client address in a sliding window; in memory, per
    process. A try is counted before its password is checked (`attempt`) and forgiven if it succeeds."""

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[Key, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _trim(self, key: Key, now: float) -> deque[float]:
        q = self._failures.get(key, deque())
        while q and now - q[0] > self.window_s:
            q.popleft()
        if not q:
            self._failures.pop(key, None)  # a probe of many names must not grow the table for good
        return q

    def limit(self, key: Key) -> int:
        return self.max_failures * (1 if key[1] else ADDRESS_FACTOR)

    def _wait(self, key: Key, now: float) -> float:
        q = self._trim(key, now)
        return self.window_s - (now - q[-self.limit(key)]) if len(q) >= self.limit(key) else 0.0

    def attempt(self, user: str, address: str) -> tuple[float, float]:
        """Count a try before its password is checked: (0, ticket) when it may be checked, else (seconds to
        wait, 0) and it is not counted. Give the ticket to `succeeded` if the password was right."""
        now = time.monotonic()
        keys = ((address, user), (address, ""))
        with self._lock:
            wait = max(self._wait(k, now) for k in keys)
            if wait > 0:
                return wait, 0.0
            for k in keys:
                self._failures[k].append(now)
            return 0.0, now

    def succeeded(self, user: str, address: str, ticket: float) -> None:
        """The try was right: the name's failures from that address are forgotten and the try is taken back
        from the address' count (its other failures stay: logging in as oneself does not reset them)."""
        with self._lock:
            self._failures.pop((address, user), None)
            q = self._failures.get((address, ""))
            if q is not None and ticket in q:
                q.remove(ticket)

    def locks(self) -> list[Lock]:
        """Every (address, name) and address refused now, longest wait first."""
        now = time.monotonic()
        with self._lock:
            out = [Lock(key[0], key[1], len(self._failures[key]), round(wait, 1))
                   for key in list(self._failures) if (wait := self._wait(key, now)) > 0]
        return sorted(out, key=lambda lock: -lock.retry_after_s)

    def clear(self, address: str, user: str) -> bool:
        with self._lock:
            return self._failures.pop((address, user), None) is not None
