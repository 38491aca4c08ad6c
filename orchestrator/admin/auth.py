"""Bearer-token auth for the admin API: two roles, tokens compared in constant time.

`viewer` may read (GET); `operator` may do everything. Tokens come from `admin.tokens`
in the config (development) and from `admin.tokens_dir`, a mounted Kubernetes Secret
with one file per role, one token per line.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import AdminConfig


class Role(enum.IntEnum):
    """Ordered: a role may do everything the roles below it may."""

    VIEWER = 1
    OPERATOR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role


@dataclass(frozen=True)
class _Token:
    secret: bytes
    principal: Principal


class TokenStore:
    def __init__(self, tokens: list[tuple[str, Role, str]]):
        self._tokens = tuple(_Token(t.encode(), Principal(name, role)) for name, role, t in tokens)

    @classmethod
    def from_config(cls, admin: AdminConfig) -> TokenStore:
        tokens = [(t.name, Role[t.role.upper()], t.token) for t in admin.tokens]
        if admin.tokens_dir:
            tokens += _read_tokens_dir(Path(admin.tokens_dir))
        return cls(tokens)

    @property
    def empty(self) -> bool:
        return not self._tokens

    def authenticate(self, token: str) -> Principal | None:
        """The token's principal, or None. Every token is compared, so timing tells nothing."""
        given = token.encode()
        found = None
        for candidate in self._tokens:
            if hmac.compare_digest(given, candidate.secret):
                found = candidate.principal
        return found


def _read_tokens_dir(path: Path) -> list[tuple[str, Role, str]]:
    tokens = []
    for role in Role:
        file = path / role.label
        if file.is_file():
            lines = [line.strip() for line in file.read_text().splitlines()]
            tokens += [(f"{role.label}-{i}", role, t) for i, t in enumerate(lines) if t]
    return tokens
