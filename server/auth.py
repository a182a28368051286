"""Authentication: per-user tokens hashed at rest, the shared `auth_token`, and a limit on
failed attempts per peer address.

    ghostpen tokens add alice --team platform     # prints the token, once
    ghostpen tokens list
    ghostpen tokens revoke alice                  # a user, or one token by its id

The tokens file (`tokens_file`, default $GHOSTPEN_HOME/tokens.json) keeps the SHA-256 of each
token, never the token: tokens are 256 random bits, so a plain hash cannot be reversed, and a
lookup by hash compares nothing byte by byte. The server rereads the file when it changes, so an
added or revoked token counts within `TOKENS_RECHECK_S`, without a restart. Authentication is on
while the file holds a token or `auth_token` is set; otherwise every caller is `LOCAL`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ghostpen.server.errors import LimitExceeded, Unauthenticated, over_limit
from ghostpen.server.identity import DEFAULT_TENANT, LOCAL, SHARED, Identity
from ghostpen.server.settings import AuthSettings

TOKEN_PREFIX = "gp_"
TOKENS_RECHECK_S = 1.0  # how often the tokens file's modification time is looked at
PEERS_TRACKED = 10_000  # addresses whose failed attempts are remembered, least recent out
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEntry:
    token_id: str
    user: str
    team: str
    tenant: str
    sha256: str
    created: str

    @property
    def identity(self) -> Identity:
        return Identity(self.user, self.team, self.tenant)


class TokenFile:
    """The tokens file: read by the server, written by `ghostpen tokens` (atomically, mode 600)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def at(cls, settings: AuthSettings, cache_dir: Path) -> TokenFile:
        return cls(
            Path(settings.tokens_file) if settings.tokens_file else cache_dir / "tokens.json"
        )

    def entries(self) -> list[TokenEntry]:
        """The tokens in the file; none if there is no file. ValueError names a broken file."""
        try:
            data = json.loads(self.path.read_text())
            return [TokenEntry(**entry) for entry in data["tokens"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the tokens file {self.path} is not valid: {exc}") from exc

    def add(
        self, user: str, team: str = "", tenant: str = DEFAULT_TENANT
    ) -> tuple[str, TokenEntry]:
        """A new token for `user`: returned once, its hash kept."""
        if not user:
            raise ValueError("a token needs a user")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = TokenEntry(
            token_id=secrets.token_hex(4),
            user=user,
            team=team,
            tenant=tenant,
            sha256=token_hash(token),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._save([*self.entries(), entry])
        return token, entry

    def revoke(self, who: str) -> list[TokenEntry]:
        """Remove the token with this id, or every token of this user; returns those removed."""
        entries = self.entries()
        gone = [e for e in entries if who in (e.token_id, e.user)]
        if gone:
            self._save([e for e in entries if e not in gone])
        return gone

    def _save(self, entries: list[TokenEntry]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = self.path.with_suffix(".tmp")
        text = json.dumps({"tokens": [dataclasses.asdict(e) for e in entries]}, indent=2)
        descriptor = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(text + "\n")
        os.replace(fresh, self.path)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Turns a call's credentials into an Identity, or refuses it."""

    def __init__(self, settings: AuthSettings, tokens: TokenFile) -> None:
        self._settings = settings
        self._tokens = tokens
        self._by_hash: dict[str, Identity] = {}
        self._seen: tuple[int, int] | None = None  # the file's (mtime_ns, size) when read
        self._checked = 0.0
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._reload(strict=True)

    @property
    def enabled(self) -> bool:
        self._recheck()
        return bool(self._by_hash or self._settings.auth_token)

    def identify(self, authorization: str, peer: str) -> Identity:
        """The caller of a call that sent `authorization` (its header, "" if none) from `peer`.

        Raises Unauthenticated for a missing or unknown token, LimitExceeded while `peer` is
        past `auth_failures_max` failed attempts in `auth_failure_window_s`."""
        if not self.enabled:
            return LOCAL
        address = _address(peer)
        self._check_rate(address)
        token = _token(authorization)
        shared = self._settings.auth_token
        if shared and secrets.compare_digest(token.encode(), shared.encode()):
            return SHARED
        found = self._by_hash.get(token_hash(token)) if token else None
        if found is not None:
            return found
        self._failed(address)
        if not authorization:
            raise Unauthenticated(
                "no token: this server requires one; send 'authorization: Bearer <token>' "
                "(ghostpen tokens add <user> makes one)"
            )
        raise Unauthenticated("unknown or revoked token")

    def _check_rate(self, address: str) -> None:
        window, limit = self._settings.auth_failure_window_s, self._settings.auth_failures_max
        failures = self._failures.get(address)
        if failures is None:
            return
        while failures and failures[0] < time.monotonic() - window:
            failures.popleft()
        if len(failures) >= limit:
            wait = failures[0] + window - time.monotonic()
            raise LimitExceeded(
                over_limit(
                    f"{len(failures)} failed authentications from this address in "
                    f"{window:g} s (auth_failure_window_s); retry in {wait:.0f} s",
                    "auth_failures_max",
                    limit,
                )
            )

    def _failed(self, address: str) -> None:
        failures = self._failures.setdefault(address, deque())
        failures.append(time.monotonic())
        self._failures.move_to_end(address)
        if len(self._failures) > PEERS_TRACKED:
            self._failures.popitem(last=False)

    def _recheck(self) -> None:
        if time.monotonic() - self._checked >= TOKENS_RECHECK_S:
            self._reload(strict=False)

    def _reload(self, strict: bool) -> None:
        """Read the file if it changed. A file broken at start stops the start; one broken
        later is logged and the tokens read before stay in force."""
        self._checked = time.monotonic()
        try:
            stat = self._tokens.path.stat()
            seen = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen and not strict:
            return
        try:
            entries = self._tokens.entries()
        except ValueError as error:
            if strict:
                raise
            log.error("%s; the tokens read before stay in force", error)
            return
        self._by_hash = {e.sha256: e.identity for e in entries}
        self._seen = seen


def _token(authorization: str) -> str:
    """The token in a `Bearer <token>` header, or the password of a `Basic` one (a browser's)."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError):
            return base64.b64decode(value, validate=True).decode().partition(":")[2]
    return ""


def _address(peer: str) -> str:
    """The address of a gRPC peer ("ipv4:10.0.0.7:51234", "ipv6:[::1]:51234") without its port;
    an HTTP peer is already an address."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    return rest.rsplit(":", 1)[0].strip("[]")
