"""Who a completion and its events belong to: a user, the team it reports under, and a tenant.

Every completion is recorded with its owner, and an event is taken only from the owner of the
completion it is about. Without authentication every caller is `LOCAL`.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Identity:
    user: str
    team: str = ""
    tenant: str = DEFAULT_TENANT


LOCAL = Identity("local")  # a server without authentication: one user, the developer at it
SHARED = Identity("shared")  # whoever holds the shared `auth_token`
