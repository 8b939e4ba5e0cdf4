"""API keys with roles for REST; stream tokens (proctor.tokens) for the WebSocket.

Roles: system (the exam platform's backend: starts and ends sessions),
proctor (reads sessions and alerts), admin (everything, incl. /admin and /metrics).
Keys are stored as SHA-256 hashes; the plain key is shown once, when created.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from livekit_proctor.db import ApiKey

ROLES = ("system", "proctor", "admin")
# Which roles may do what.
CAN_MANAGE_SESSIONS = frozenset({"system", "admin"})
CAN_READ_SESSIONS = frozenset({"system", "proctor", "admin"})
CAN_ADMIN = frozenset({"admin"})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "pk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    role: str
    key_id: str  # first characters of the hash, safe to log

    @property
    def actor(self) -> str:
        return f"{self.role}:{self.key_id}"


class KeyStore:
    def __init__(self, sm: sessionmaker, static_keys: str = "") -> None:
        self._sm = sm
        self._static: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in static_keys.split(","))):
            key, _, role = item.rpartition(":")
            if not key or role not in ROLES:
                raise ValueError(f"PROCTOR_API_KEYS entry must be 'key:role' with role in {ROLES}")
            self._static[hash_key(key)] = role
        self._cache: dict[str, str] = {}

    def create(self, role: str, label: str = "") -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        key = new_key()
        with self._sm.begin() as db:
            db.add(ApiKey(key_hash=hash_key(key), role=role, label=label))
        return key

    def count(self) -> int:
        with self._sm() as db:
            return len(db.scalars(select(ApiKey.key_hash)).all()) + len(self._static)

    def bootstrap(self) -> str | None:
        """On first start (no key anywhere) creates an admin key and returns it for printing."""
        if self.count() == 0:
            return self.create("admin", "bootstrap")
        return None

    def lookup(self, key: str) -> Principal | None:
        h = hash_key(key)
        role = self._static.get(h) or self._cache.get(h)
        if role is None:
            with self._sm() as db:
                row = db.get(ApiKey, h)
            if row is None:
                return None
            role = self._cache[h] = row.role
        return Principal(role=role, key_id=h[:8])


# The two ways to present an API key; as FastAPI security schemes they are declared in the OpenAPI document.
bearer_scheme = HTTPBearer(
    scheme_name="ApiKeyBearer", description="An API key: `Authorization: Bearer <key>`", auto_error=False
)
header_scheme = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKeyHeader",
    description="The same API key in an X-API-Key header",
    auto_error=False,
)


def presented_key(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    header: Annotated[str | None, Security(header_scheme)],
) -> str | None:
    """FastAPI dependency: the API key of the request (the bearer one first), None when there is none."""
    return (bearer.credentials if bearer else None) or header or None


def require(roles: frozenset[str]):
    """FastAPI dependency: a valid API key whose role is in `roles`."""

    def dep(request: Request, key: Annotated[str | None, Security(presented_key)]) -> Principal:
        if not key:
            raise HTTPException(401, "missing API key (Authorization: Bearer <key> or X-API-Key)")
        principal = request.app.state.keys.lookup(key)
        if principal is None:
            raise HTTPException(401, "invalid API key")
        if principal.role not in roles:
            raise HTTPException(403, f"role '{principal.role}' may not do this (needs one of {sorted(roles)})")
        return principal

    return dep
