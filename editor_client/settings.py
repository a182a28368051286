"""The editor side's settings and limits, with their defaults, in one place.

An editor hands them to the agent as LSP `initializationOptions` (or the `ghostpen` section of its
workspace configuration), e.g. `{"server": "gpu-box:50151", "debounce_max_ms": 200}`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ClientSettings:
    server: str = "127.0.0.1:50151"  # host:port of `ghostpen serve`
    token: str = ""  # sent as `authorization: Bearer <token>` when set
    tls: bool = False  # connect over TLS (a server with tls_cert set)
    tls_ca: str = ""  # PEM file of the CA (or self-signed certificate) to trust; "": the system's
    workspace: str = ""  # repository name for the prompt; "": the workspace folder's name
    max_files: int = 12  # recently touched files kept on the server (the server may allow fewer)
    max_file_bytes: int = 1024 * 1024  # larger files are not sent (the server may allow fewer)
    max_session_bytes: int = 4 * 1024 * 1024  # all files sent, together (or the server's limit)
    debounce_min_ms: int = 25  # the adaptive wait after a keystroke, never shorter...
    debounce_max_ms: int = 250  # ...nor longer
    debounce_rate_min: float = 1.0  # wait this many typical keystroke intervals at a likely
    debounce_rate_max: float = 2.0  # completion point (line end, after "(" or ":")...up to this
    max_chars_after_cursor: int = 3  # no automatic request with more text after it on the line
    cache_entries: int = 32  # completions kept for typing through and going back
    request_timeout_ms: int = 5000  # deadline sent with each request
    max_tokens: int = 0  # 0: the server's default for the mode
    adapter: str = ""  # a LoRA adapter the server loaded (a team's); "": the base model
    connect_timeout_s: float = 3.0  # waiting for the server's welcome
    close_timeout_s: float = 2.0  # at shutdown, waiting for the session to stop
    reconnect_initial_s: float = 0.25  # first wait after a lost connection; doubles...
    reconnect_max_s: float = 10.0  # ...up to this
    max_pending_events: int = 10_000  # telemetry kept while the server is unreachable
    retention_check_s: float = 5.0  # how often due retention checks are made

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> ClientSettings:
        """Settings from an editor's JSON; an unknown name or a wrong type is a ValueError."""
        fields = {item.name: item for item in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in (options or {}).items():
            if name not in fields:
                raise ValueError(f"unknown ghostpen setting {name!r}; known: {', '.join(fields)}")
            kind = type(getattr(cls(), name))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not kind:
                raise ValueError(f"ghostpen setting {name!r} must be a {kind.__name__}: {value!r}")
            values[name] = value
        settings = cls(**values)
        for name in fields:
            value = getattr(settings, name)
            if isinstance(value, int | float) and value < 0:
                raise ValueError(f"ghostpen setting {name!r} must not be negative: {value!r}")
        return settings
