"""Accounts: argon2id password hashing, user management, login checks.

Two modes. With no account that has a password, the app is single-user: everything belongs to the
built-in `local` user and no login is asked. As soon as one account with a password exists (made by
`sharedllm users add` or the first-run admin from settings), the web UI requires a login and each
request acts as the logged-in user only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.throttle import LoginThrottle
from storage import User

logger = logging.getLogger(__name__)

LOCAL_USER = "local"
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,150}$")
MIN_PASSWORD_LEN = 8

# argon2id with the library's defaults (RFC 9106 "low memory" profile): 64 MiB, 3 passes.
_hasher = PasswordHasher()
# A fixed hash verified against when the user does not exist, so a login for an unknown name costs
# the same time as one with a wrong password.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


class AuthError(ValueError):
    """Invalid username/password input or an unknown user; the message is safe to show."""


@dataclass(frozen=True)
class UserInfo:
    id: int
    username: str
    is_admin: bool
    has_password: bool
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserInfo:
        return cls(user.id, user.username, user.is_admin, bool(user.password_hash), user.created_at)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "username": self.username,
            "is_admin": self.is_admin,
            "created_at": self.created_at.isoformat() if self.created_at else None,
        }


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    if not password_hash:
        _safe_verify(_DUMMY_HASH, password)
        return False
    return _safe_verify(password_hash, password)


def _safe_verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


class AuthService:
    """User accounts in the database. Every method opens and closes its own session."""

    def __init__(self, session_factory: sessionmaker[Session], throttle: LoginThrottle | None = None):
        self._sessions = session_factory
        # failed logins per account: a locked account refuses even the right password for a while
        self._throttle = throttle or LoginThrottle(max_failures=5, window_s=900.0)

    def add_user(self, username: str, password: str, is_admin: bool = False) -> UserInfo:
        if not USERNAME_RE.match(username) or username == LOCAL_USER:
            raise AuthError(
                f"invalid username {username!r}: use 1-150 letters, digits or _.@- (not '{LOCAL_USER}')"
            )
        if len(password) < MIN_PASSWORD_LEN:
            raise AuthError(f"password too short: at least {MIN_PASSWORD_LEN} characters")
        with self._sessions.begin() as session:
            if session.scalar(select(User).where(User.username == username)) is not None:
                raise AuthError(f"user {username!r} already exists")
            user = User(username=username, password_hash=hash_password(password), is_admin=is_admin)
            session.add(user)
            session.flush()
            logger.info("created user %s (admin=%s)", username, is_admin)
            return UserInfo.of(user)

    def set_password(self, username: str, password: str) -> None:
        if len(password) < MIN_PASSWORD_LEN:
            raise AuthError(f"password too short: at least {MIN_PASSWORD_LEN} characters")
        with self._sessions.begin() as session:
            user = self._get(session, username)
            user.password_hash = hash_password(password)

    def list_users(self) -> list[UserInfo]:
        with self._sessions() as session:
            users = session.scalars(select(User).where(User.password_hash.is_not(None)).order_by(User.id))
            return [UserInfo.of(u) for u in users]

    def remove_user(self, username: str) -> None:
        """Delete the account and, by cascade, its documents and conversations (tensor files: see caller)."""
        with self._sessions.begin() as session:
            session.delete(self._get(session, username))
            logger.info("removed user %s", username)

    def get(self, username: str) -> UserInfo:
        with self._sessions() as session:
            return UserInfo.of(self._get(session, username))

    def has_accounts(self) -> bool:
        """True when at least one account has a password: the UI then requires a login."""
        with self._sessions() as session:
            count = session.scalar(select(func.count(User.id)).where(User.password_hash.is_not(None)))
            return bool(count)

    def check_login(self, username: str, password: str) -> bool:
        """Gradio's auth callable: constant-ish time whether or not the user exists; an account with
        too many recent failures is refused without looking at the password."""
        if self._throttle.blocked(username):
            verify_password(None, password)  # the same cost as a real check
            logger.warning("login for %r refused: locked after repeated failures", username)
            return False
        with self._sessions() as session:
            user = session.scalar(select(User).where(User.username == username))
            ok = verify_password(user.password_hash if user else None, password)
            if ok and _hasher.check_needs_rehash(user.password_hash):
                user.password_hash = hash_password(password)
                session.commit()
        if ok:
            self._throttle.succeeded(username)
        else:
            self._throttle.failed(username)
            logger.warning("failed login for %r", username)
        return ok

    def local_user(self) -> UserInfo:
        """The single-user mode owner, created on first use (no password: it can never log in)."""
        with self._sessions.begin() as session:
            user = session.scalar(select(User).where(User.username == LOCAL_USER))
            if user is None:
                user = User(username=LOCAL_USER, password_hash=None, is_admin=True)
                session.add(user)
                session.flush()
            return UserInfo.of(user)

    def resolve(self, username: str | None) -> UserInfo:
        """The acting user: the logged-in account, or `local` when no login is in force."""
        if username:
            return self.get(username)
        if self.has_accounts():
            raise AuthError("login required")
        return self.local_user()

    def ensure_admin(self, username: str, password: str | None) -> None:
        """First-run admin: create it when a password is configured and no account exists yet."""
        if password and not self.has_accounts():
            self.add_user(username, password, is_admin=True)
            logger.info("first-run admin %r created from settings", username)

    @staticmethod
    def _get(session: Session, username: str) -> User:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise AuthError(f"no such user {username!r}")
        return user
