"""Every setting and limit, with its default, in one place.

`Settings.load()` is called once at start-up; each component is handed only its own section.
Nothing else reads the environment. Any field can be set as `GHOSTPEN_<FIELD>` (upper case),
or with `ghostpen serve --set field=value`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostpen.context.settings import ContextSettings

ENV_PREFIX = "GHOSTPEN_"
QUEUE_ORDERS = ("newest", "oldest")
ENGINES = ("auto", "llama.cpp", "vllm", "llama-server", "remote")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50151
    metrics_port: int = 9464  # /metrics and /dashboard; 0 picks a free port, -1 turns them off
    shutdown_grace_s: float = 5.0
    max_message_bytes: int = 8 * 1024 * 1024  # a gRPC message larger than this is refused
    keepalive_s: float = 60.0  # the server pings an idle connection this often
    keepalive_timeout_s: float = 20.0  # and closes it if the ping is not answered in this time


@dataclass(frozen=True)
class AuthSettings:
    """Who may call (server/auth.py). Authentication is on while the tokens file holds a token
    or `auth_token` is set."""

    tokens_file: str = ""  # "": cache_dir/tokens.json; written by `ghostpen tokens`
    auth_token: str = ""  # one token shared by everyone, as the user "shared"
    metrics_token: str = ""  # also admits Prometheus to /metrics (scrape configs hold one token)
    auth_failures_max: int = 10  # failed attempts from one address within the window...
    auth_failure_window_s: float = 60.0  # ...after which it is refused until the window passes
    tls_cert: str = ""  # PEM certificate chain: gRPC and HTTP serve TLS only (with tls_key)
    tls_key: str = ""  # PEM private key
    # Users (comma-separated) who may change from the dashboard what everyone is served:
    # experiments, prompt versions, trials. Without authentication the developer at the
    # server may; the CLI, which opens the database itself, is not bound by this.
    admins: str = ""

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together: set both, or neither")

    def admin(self, user: str) -> bool:
        return user in {name.strip() for name in self.admins.split(",") if name.strip()}


@dataclass(frozen=True)
class LimitSettings:
    max_files: int = 12  # files a session keeps; the least recently touched is evicted
    max_file_bytes: int = 1024 * 1024
    # Text a session keeps, in UTF-8 bytes; past it the least recently touched files are evicted.
    max_session_bytes: int = 4 * 1024 * 1024
    max_context_files: int = 12  # inline context files on a Complete call
    max_edits_per_update: int = 1000
    max_request_id_chars: int = 128
    max_affinity_chars: int = 128  # the x-ghostpen-affinity header (proto/ghostpen.proto)
    max_path_chars: int = 1024
    max_language_chars: int = 64  # an editor's language id ("python", "typescriptreact")
    max_sessions: int = 1000  # open Session streams; one more is refused RESOURCE_EXHAUSTED
    max_sessions_per_user: int = 64  # open Session streams of one user (with authentication)
    max_calls_per_user: int = 32  # Complete calls of one user in flight (with authentication)
    # Replies waiting for a client that does not read; past it the stream ends RESOURCE_EXHAUSTED.
    max_queued_messages: int = 4096
    session_idle_s: float = 1800.0  # a Session without a client message this long is ended
    max_error_chars: int = 1024  # an error's message is cut here: it must not echo unbounded input
    max_correction_chars: int = 16_384  # Retention.final_text: the corrected region of a completion
    max_tokens_limit: int = 512  # the most a request may ask for
    default_max_tokens_single_line: int = 48
    default_max_tokens_multi_line: int = 192
    default_timeout_ms: int = 10_000  # deadline for requests that give none

    def __post_init__(self) -> None:
        if self.max_file_bytes > self.max_session_bytes:
            raise ValueError(
                f"max_file_bytes={self.max_file_bytes} must fit in "
                f"max_session_bytes={self.max_session_bytes}"
            )


@dataclass(frozen=True)
class EngineSettings:
    engine: str = "auto"  # auto | llama.cpp | vllm | remote
    model: str = "qwen2.5-coder-0.5b-instruct-q4_k_m"  # a registry name or a path
    context_window: int = 2048  # tokens of one request: prompt and completion
    # llama.cpp: compute threads; 0: every core this process may use but one (engines/llama_cpp.py)
    threads: int = 0
    batch_tokens: int = 128  # llama.cpp prompt tokens per step; also how often a stale read stops
    kv_cache_tokens: int = 16 * 2048  # llama.cpp KV cache: kv_cache_tokens // context_window
    #                                   sessions stay resident; the least recently used is evicted
    # llama.cpp: a run of at least this many cached tokens that moved in the prompt is shifted
    # to its new place instead of read again (engines/sequences.py); 0: off
    kv_shift_min_tokens: int = 0
    queue_order: str = "newest"  # llama.cpp: which waiting request runs next: newest | oldest
    flash_attention: bool = False  # llama.cpp: measured slower on our CPUs
    extra_buffer_types: bool = False  # llama.cpp weight repacking (AMX...): crashed on a Xeon
    lora_adapters: str = ""  # name=path.gguf[,name=path] (llama.cpp) or name=peft-dir (vllm)
    max_lora_rank: int = 64  # vllm: the largest adapter rank it reserves room for
    # The engine runs in a supervised child process (engines/supervisor.py).
    engine_process: bool = True  # false: in the server's own process (a crash takes it down)
    engine_start_timeout_s: float = 600.0
    engine_stop_timeout_s: float = 10.0
    restart_backoff_s: float = 0.5  # doubles with each crash in the window
    restart_backoff_max_s: float = 10.0
    crash_loop_restarts: int = 5  # this many crashes within crash_loop_window_s: stop restarting
    crash_loop_window_s: float = 60.0
    quantization: str = ""  # vllm: fp8 | awq | gptq | compressed-tensors | ""
    enforce_eager: bool = True
    gpu_memory_utilization: float = 0.85
    kv_cache_gib: float = 0.0  # vllm KV cache; 0: vLLM's default (CPU 4 GiB, GPU by utilization)

    # engine = remote: OpenAI-compatible /v1/completions servers (engines/remote.py)
    upstreams: str = ""  # base URLs, comma-separated: http://vllm-0:8000,http://vllm-1:8000
    upstream_model: str = ""  # the model name they serve; "": the first in their /v1/models
    upstream_api_key: str = ""  # sent as a bearer token
    upstream_health_s: float = 2.0  # each upstream's /health is checked this often
    upstream_timeout_s: float = 2.0  # to connect, and for a health check to answer
    upstream_connections: int = 64  # pooled connections to each upstream
    upstream_attempts: int = 2  # upstreams tried before the first token; none after it

    def __post_init__(self) -> None:
        if self.kv_cache_tokens < self.context_window:
            raise ValueError(
                f"kv_cache_tokens={self.kv_cache_tokens} must hold at least one sequence of "
                f"context_window={self.context_window} tokens"
            )
        self.adapter_paths()
        if self.engine == "remote" and not self.upstream_urls():
            raise ValueError("engine=remote needs upstreams: base URLs, comma-separated")
        if self.upstream_attempts < 1:
            raise ValueError(f"upstream_attempts must be at least 1: {self.upstream_attempts}")
        if self.queue_order not in QUEUE_ORDERS:
            raise ValueError(
                f"queue_order must be one of {', '.join(QUEUE_ORDERS)}: {self.queue_order!r}"
            )

    def upstream_urls(self) -> tuple[str, ...]:
        """upstreams, each without a trailing slash, in the order given."""
        urls = tuple(u.strip().rstrip("/") for u in self.upstreams.split(",") if u.strip())
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"upstreams are http:// or https:// base URLs: {url!r}")
        return urls

    def adapter_paths(self) -> dict[str, Path]:
        """lora_adapters by name, in the order given."""
        adapters = {}
        for item in filter(None, (part.strip() for part in self.lora_adapters.split(","))):
            name, sep, path = (part.strip() for part in item.partition("="))
            if not sep or not name or not path:
                raise ValueError(f"lora_adapters wants name=path[,name=path]: {item!r}")
            adapters[name] = Path(path).expanduser()
        return adapters


@dataclass(frozen=True)
class TelemetrySettings:
    database: str = ""  # "": SQLite in cache_dir/telemetry.db; or a file path; or postgresql://
    max_events_per_report: int = 1000
    write_batch_max: int = 5000  # queued items written per transaction
    known_completions: int = 100_000  # completions kept in memory to join events without a query
    # A finished completion's final chunk waits this long for its record's commit (normally a
    # few ms); past it, or with the store down, the chunk goes and the record is written later.
    record_commit_wait_ms: int = 100
    retry_s: float = 1.0  # records of a failed write are written again after this
    store_probe_s: float = 1.0  # while the store is down (health NOT_SERVING), tried this often
    dashboard_cache_s: float = 5.0  # /dashboard and /dashboard.json reuse a report this long
    # Consent to keep text for training (server/training): each completion's prompt inputs and
    # suggestion, and the developer's correction of it. "": none (the default); "*": every
    # tenant; or tenants, comma-separated.
    capture_text: str = ""
    capture_retention_days: float = 30.0  # captured text older than this is deleted
    capture_purge_s: float = 3600.0  # how often expired captured text is looked for
    # How often a server reads which experiment runs and which arm is the default: a start, stop
    # or promotion (CLI or dashboard) reaches new sessions within this
    experiment_refresh_s: float = 5.0
    # The dashboard's trials of a template (server/trials.py): the evaluation suite they draw
    # tasks from, how many, how many completions in flight beside the developers' own, the
    # prompts a preview shows, and the trials remembered
    trial_suite: str = "gate"
    trial_tasks: int = 24
    trial_concurrency: int = 2
    preview_samples: int = 3
    trials_kept: int = 16

    def __post_init__(self) -> None:
        if self.capture_purge_s <= 0 or self.capture_retention_days < 0:
            raise ValueError(
                "capture_purge_s must be above 0 and capture_retention_days at least 0: "
                f"{self.capture_purge_s}, {self.capture_retention_days}"
            )
        if self.experiment_refresh_s <= 0:
            raise ValueError(f"experiment_refresh_s must be above 0: {self.experiment_refresh_s}")
        trial = {
            "trial_tasks": self.trial_tasks,
            "trial_concurrency": self.trial_concurrency,
            "preview_samples": self.preview_samples,
            "trials_kept": self.trials_kept,
        }
        if min(trial.values()) < 1:
            raise ValueError(f"each of these must be at least 1: {trial}")

    def captures(self, tenant: str) -> bool:
        """Whether text of `tenant`'s completions is kept."""
        tenants = {t.strip() for t in self.capture_text.split(",") if t.strip()}
        return "*" in tenants or tenant in tenants


@dataclass(frozen=True)
class Settings:
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "ghostpen")
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    context: ContextSettings = field(default_factory=ContextSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)

    @classmethod
    def load(
        cls, overrides: Mapping[str, str] = {}, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Defaults, then `GHOSTPEN_*` variables, then explicit overrides (CLI)."""
        environ = os.environ if environ is None else environ
        values = {
            name[len(ENV_PREFIX) :].lower(): value
            for name, value in environ.items()
            if name.startswith(ENV_PREFIX) and name != f"{ENV_PREFIX}HOME"
        }
        if f"{ENV_PREFIX}HOME" in environ:
            values.setdefault("cache_dir", environ[f"{ENV_PREFIX}HOME"])
        values.update(overrides)
        return cls.from_values(values)

    @classmethod
    def from_values(cls, values: Mapping[str, str]) -> Settings:
        pending = dict(values)
        sections: dict[str, Any] = {}
        for section in dataclasses.fields(cls):
            if section.name == "cache_dir":
                continue
            section_type = section.default_factory  # type: ignore[misc]
            known = {f.name for f in dataclasses.fields(section_type)}
            chosen = {k: pending.pop(k) for k in list(pending) if k in known}
            sections[section.name] = updated(section_type(), chosen)
        cache_dir = Path(pending.pop("cache_dir")).expanduser() if "cache_dir" in pending else None
        if pending:
            raise ValueError(f"unknown setting(s): {', '.join(sorted(pending))}")
        settings = cls(**sections)
        return dataclasses.replace(settings, cache_dir=cache_dir) if cache_dir else settings


def updated(section: Any, values: Mapping[str, str]) -> Any:
    """The settings section with `values` (names and texts, as `--set` gives them) in place;
    ValueError for a name it does not have or a text that is not its type."""
    known = {f.name: f for f in dataclasses.fields(section)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
    return dataclasses.replace(
        section, **{name: _convert(known[name].type, raw) for name, raw in values.items()}
    )


def _convert(type_name: Any, raw: str) -> Any:
    kind = type_name if isinstance(type_name, str) else type_name.__name__
    if kind == "bool":
        if raw.lower() in {"1", "true", "yes", "on"}:
            return True
        if raw.lower() in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    return {"int": int, "float": float, "str": str}[kind](raw)
