"""Keys for the status API the business's app calls.

A key reads `rcv_<id>_<secret>`: the id finds its row, and the secret is
compared with the stored SHA-256 in constant time, so neither a copy of the
database nor the time an answer takes gives a key away. A revoked key is
refused at its next request: nothing is cached.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime

from sqlalchemy.orm import Session

from recovery.models import ApiKey

SCOPES = ("status", "links")
_KEY = re.compile(r"rcv_([0-9]{1,18})_([A-Za-z0-9_-]{20,100})")


class KeyRefused(ValueError):
    """A key that cannot be made or changed; the message says why."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def scopes_of(names: str) -> list[str]:
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in SCOPES]
    if unknown or not wanted:
        raise KeyRefused(f"scopes are some of: {', '.join(SCOPES)}")
    return wanted


def create(session: Session, name: str, scopes: list[str], now: datetime) -> str:
    """A new key; the whole key, which is never stored."""
    if not name.strip() or len(name) > 64:
        raise KeyRefused("a key needs a name of at most 64 characters")
    secret = secrets.token_urlsafe(24)
    key = ApiKey(name=name.strip(), scopes=scopes, secret_hash=_hash(secret), created_at=now)
    session.add(key)
    session.flush()
    return f"rcv_{key.id}_{secret}"


def revoke(session: Session, key_id: int, now: datetime) -> None:
    key = session.get(ApiKey, key_id, with_for_update=True)
    if key is None:
        raise KeyRefused(f"no API key {key_id} (see `recovery api-keys list`)")
    key.revoked_at = key.revoked_at or now


def authenticate(session: Session, presented: str, now: datetime) -> ApiKey | None:
    """The live key presented, or None."""
    found = _KEY.fullmatch(presented)
    if found is None:
        return None
    key = session.get(ApiKey, int(found.group(1)))
    expected = key.secret_hash if key is not None else _hash("no such key")
    matches = hmac.compare_digest(expected, _hash(found.group(2)))
    if key is None or not matches or key.revoked_at is not None:
        return None
    key.last_used_at = now
    return key
