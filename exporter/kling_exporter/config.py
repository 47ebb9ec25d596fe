"""The config's schema: every section a typed, immutable struct, every key with its
default, so ``Config()`` is a working configuration. The file is read and validated
in ``configfile``; a refused value is put in words, naming the key path
(``budgets[2].period``), in ``validation``.
"""

from __future__ import annotations

import re
import socket
import zoneinfo

import msgspec
import msgspec.inspect

from kling_exporter.globs import glob_matches
from kling_exporter.periods import PERIOD_KINDS
from kling_exporter.vocabulary import KINDS, MODES, START_AT, normalize_mode, parse_duration


def _one_of(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: expected one of {', '.join(allowed)}, got {value!r}")


class LogsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    paths: list[str] = msgspec.field(default_factory=lambda: ["logs/kling-*.jsonl"])
    start_at: str = "beginning"
    poll_interval: str | float = "1s"
    max_line_bytes: int = 1 << 20
    rotate_wait: str | float = "5s"
    # An event time further ahead of the time of reading is a broken clock: the time of
    # reading is taken instead (and counted).
    max_clock_ahead: str | float = "5m"
    # Files unchanged this long are closed (and opened again at their offset when they
    # grow), so old daily files do not hold a descriptor each.
    idle_close: str | float = "1m"
    follow_symlinks: bool = False
    # The file the gateway and Kling's callbacks write their events to; empty: beside
    # the first glob's files (logs/kling-*.jsonl gives logs/kling-callbacks.jsonl). Give
    # it a folder of its own, matched by a glob too, to keep the logs read-only.
    journal: str = ""

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("paths: at least one glob is needed")
        if any(not p for p in self.paths):
            raise ValueError("paths: a glob must not be empty")
        if self.journal and not any(glob_matches(self.journal, p) for p in self.paths):
            raise ValueError(
                f"journal: {self.journal!r} is matched by none of logs.paths, so its events "
                "would never be counted; add a glob that matches it"
            )
        _one_of("start_at", self.start_at, START_AT)
        if parse_duration(self.poll_interval, "poll_interval") <= 0:
            raise ValueError("poll_interval: must be greater than 0")
        parse_duration(self.rotate_wait, "rotate_wait")
        parse_duration(self.max_clock_ahead, "max_clock_ahead")
        parse_duration(self.idle_close, "idle_close")
        if self.max_line_bytes < 1024:
            raise ValueError(f"max_line_bytes: must be at least 1024, got {self.max_line_bytes}")

    @property
    def poll_seconds(self) -> float:
        return parse_duration(self.poll_interval, "poll_interval")

    @property
    def rotate_wait_seconds(self) -> float:
        return parse_duration(self.rotate_wait, "rotate_wait")

    @property
    def max_clock_ahead_seconds(self) -> float:
        return parse_duration(self.max_clock_ahead, "max_clock_ahead")

    @property
    def idle_close_seconds(self) -> float:
        return parse_duration(self.idle_close, "idle_close")


class StateConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    path: str = "kling-exporter.state"
    interval: str | float = "10s"

    def __post_init__(self) -> None:
        if parse_duration(self.interval, "interval") <= 0:
            raise ValueError("interval: must be greater than 0")

    @property
    def interval_seconds(self) -> float:
        return parse_duration(self.interval, "interval")


class PriceRule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    credits: float
    kind: str | None = None
    mode: str | None = None
    duration: int | None = None
    audio: bool | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.credits < 0:
            raise ValueError(f"credits: must not be negative, got {self.credits}")
        if self.kind is not None:
            _one_of("kind", self.kind, KINDS)
        if self.mode is not None:
            _one_of("mode", normalize_mode(self.mode) or self.mode, MODES)
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"duration: must be greater than 0, got {self.duration}")


def _default_rules() -> list[PriceRule]:
    return [
        PriceRule(kind="image", credits=1),
        PriceRule(kind="try_on", credits=5),
        PriceRule(mode="standard", duration=5, audio=True, credits=50),
        PriceRule(mode="professional", duration=10, audio=True, credits=200),
        PriceRule(mode="standard", duration=5, credits=10),
        PriceRule(mode="professional", duration=5, credits=35),
        PriceRule(mode="standard", duration=10, credits=20),
        PriceRule(mode="professional", duration=10, credits=70),
    ]


class ModelMultiplier(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Credits of a model matching ``model`` (a shell-style pattern) times ``multiplier``."""

    model: str
    multiplier: float

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: must not be empty")
        if self.multiplier < 0:
            raise ValueError(f"multiplier: must not be negative, got {self.multiplier}")


class PricingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    usd_per_credit: float = 0.14
    rules: list[PriceRule] = msgspec.field(default_factory=_default_rules)
    credits_per_second: float = 2
    audio_multiplier: float = 5
    # Applied to whatever a rule or the fallback gives; the first matching pattern wins.
    model_multipliers: list[ModelMultiplier] = msgspec.field(default_factory=list)
    # By mode (standard, professional, or Kling's std, pro): applied to the fallback and
    # to rules that name no mode, since a rule that names one has priced it already.
    mode_multipliers: dict[str, float] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("usd_per_credit", "credits_per_second", "audio_multiplier"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must not be negative, got {getattr(self, key)}")
        for mode, factor in self.mode_multipliers.items():
            key = f"mode_multipliers.{mode}"
            _one_of(key, normalize_mode(mode) or mode, MODES)
            if factor < 0:
                raise ValueError(f"{key}: must not be negative, got {factor}")
        long_names = [normalize_mode(mode) for mode in self.mode_multipliers]
        if len(set(long_names)) != len(long_names):
            raise ValueError(
                "mode_multipliers: a mode is named twice (std is standard, pro is professional)"
            )

    def mode_multiplier(self, mode: str | None) -> float:
        """The factor for ``mode`` (any spelling; None is Kling's default, standard)."""
        if not self.mode_multipliers:
            return 1.0
        wanted = normalize_mode(mode or "standard")
        for name, factor in self.mode_multipliers.items():
            if normalize_mode(name) == wanted:
                return factor
        return 1.0


class BudgetConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    name: str
    period: str = "monthly"
    project: str | None = None
    user: str | None = None
    limit_credits: float | None = None
    limit_usd: float | None = None
    alert_threshold: float = 0.8

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        _one_of("period", self.period, PERIOD_KINDS)
        if self.limit_credits is None and self.limit_usd is None:
            raise ValueError("limit_credits: a budget needs limit_credits, limit_usd or both")
        for key in ("limit_credits", "limit_usd"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ValueError(f"{key}: must be greater than 0, got {value}")
        if not 0 < self.alert_threshold <= 1:
            raise ValueError(
                f"alert_threshold: expected a ratio in (0, 1], got {self.alert_threshold}"
            )


class LabelsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    max_projects: int = 1000
    max_models: int = 100
    max_error_types: int = 100
    # Users are no metric label, but usage is kept per project and user for user budgets
    # and reports: past this many, users fold into __other__ (those a budget names never).
    max_users: int = 10_000

    def __post_init__(self) -> None:
        for key in ("max_projects", "max_models", "max_error_types", "max_users"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")


class TasksConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How long the task index remembers a task, to join and deduplicate its events."""

    ttl: str | float = "24h"
    max_tasks: int = 1_000_000
    # How long (time of reading) a completion or error read before its submission waits
    # for it before it is counted on its own; 0 counts it at once.
    orphan_wait: str | float = "5m"

    def __post_init__(self) -> None:
        if parse_duration(self.ttl, "ttl") <= 0:
            raise ValueError("ttl: must be greater than 0")
        parse_duration(self.orphan_wait, "orphan_wait")
        if self.max_tasks < 1:
            raise ValueError(f"max_tasks: must be at least 1, got {self.max_tasks}")

    @property
    def ttl_seconds(self) -> float:
        return parse_duration(self.ttl, "ttl")

    @property
    def orphan_wait_seconds(self) -> float:
        return parse_duration(self.orphan_wait, "orphan_wait")


class ReservationsConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Bounds on holds (POST /api/v1/reservations and the gateway's), which any client
    can make: ``max_live`` in all, and ``max_live_per_project`` for one project, so that
    a flood of holds for one project cannot take every other project's room."""

    max_live: int = 20_000
    max_live_per_project: int = 2_000

    def __post_init__(self) -> None:
        if self.max_live < 1:
            raise ValueError(f"max_live: must be at least 1, got {self.max_live}")
        if self.max_live_per_project < 1:
            raise ValueError(
                f"max_live_per_project: must be at least 1, got {self.max_live_per_project}"
            )


class KlingConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Kling's own numbers. With API keys (files, or KLING_ACCESS_KEY and
    KLING_SECRET_KEY in the environment) the account's resource packs are polled;
    ``callback_token`` enables ``POST /api/v1/kling/callback`` (Kling calls it with
    ``?token=``; empty, the endpoint answers 404)."""

    api_base: str = "https://api-singapore.klingai.com"
    access_key_file: str = ""
    secret_key_file: str = ""
    account_poll_interval: str | float = "10m"
    callback_token: str = ""

    def __post_init__(self) -> None:
        if self.callback_token and len(self.callback_token) < 16:
            raise ValueError("callback_token: use at least 16 characters (it is a password)")
        if not self.api_base.startswith(("https://", "http://")):
            raise ValueError(f"api_base: expected an http(s) URL, got {self.api_base!r}")
        if parse_duration(self.account_poll_interval, "account_poll_interval") < 1:
            raise ValueError("account_poll_interval: at least 1s (Kling allows 1 query a second)")

    @property
    def poll_seconds(self) -> float:
        return parse_duration(self.account_poll_interval, "account_poll_interval")


FLEET_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")


class FleetConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Budgets shared by several exporters through Redis; ``redis_url`` empty: alone.
    Every exporter of a fleet needs the same budgets and time zone, and its own
    ``instance`` name (the host name unless given)."""

    redis_url: str = ""
    instance: str = ""
    key_prefix: str = "kling:"
    publish_interval: str | float = "1s"
    on_unavailable: str = "allow"  # or refuse: what pre-flight does without Redis
    # How long one answer from Redis may take before it counts as unavailable.
    timeout: str | float = "500ms"

    def __post_init__(self) -> None:
        _one_of("on_unavailable", self.on_unavailable, ("allow", "refuse"))
        if self.redis_url and not self.redis_url.startswith(FLEET_SCHEMES):
            raise ValueError(
                f"redis_url: expected a URL starting with one of {', '.join(FLEET_SCHEMES)}"
            )
        if not 0.1 <= parse_duration(self.publish_interval, "publish_interval") <= 60:
            raise ValueError("publish_interval: expected 100ms to 1m")
        if not 0.01 <= parse_duration(self.timeout, "timeout") <= 10:
            raise ValueError("timeout: expected 10ms to 10s")
        if len(self.instance) > 128 or not self.instance.isprintable():
            raise ValueError("instance: expected up to 128 printable characters")
        if not self.key_prefix.isprintable() or "{" in self.key_prefix:
            raise ValueError("key_prefix: expected printable characters without '{'")

    @property
    def publish_seconds(self) -> float:
        return parse_duration(self.publish_interval, "publish_interval")

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout, "timeout")

    @property
    def instance_name(self) -> str:
        return self.instance or socket.gethostname()


# A header name: an HTTP token (RFC 9110).
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# A path prefix: one or more segments of unreserved characters, no trailing slash.
_PREFIX_RE = re.compile(r"^(?:/[A-Za-z0-9._~-]+)+$")
# Paths the exporter answers itself, which the gateway's prefix must not take.
_OWN_PATHS = ("/api", "/-", "/metrics", "/demo")


class GatewayConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Kling's API served under ``path_prefix`` on the exporter's own listener: every
    request is passed on to ``upstream``, and a task-creating one only once every
    matching budget has room for it. ``enabled`` and ``path_prefix`` take effect at a
    restart; the other keys at a reload."""

    enabled: bool = False
    upstream: str = "https://api-singapore.klingai.com"
    path_prefix: str = "/kling"
    project_header: str = "X-Kling-Project"
    # The JWT's iss (the producer's access key) -> the project its tasks count against.
    # A mapped key binds its project: the header cannot move its tasks elsewhere.
    projects_by_access_key: dict[str, str] = msgspec.field(default_factory=dict)
    # The project header chooses a project only when this is true (for producers whose
    # keys are not mapped); off, it is ignored.
    trust_project_header: bool = False
    user_header: str = "X-Kling-User"
    users_by_access_key: dict[str, str] = msgspec.field(default_factory=dict)
    trust_user_header: bool = False
    default_project: str = ""  # "" = a create request with no project is refused (400)
    # The exporter's callback endpoint, given to create requests that carry no
    # callback_url, with a token of that task's own (needs kling.callback_token).
    inject_callback_url: str = ""
    unpriced: str = "refuse"  # refuse | allow: a write the gateway cannot price
    timeout: str | float = "60s"

    def __post_init__(self) -> None:
        if not self.upstream.startswith(("https://", "http://")) or "?" in self.upstream:
            raise ValueError(f"upstream: expected an http(s) URL, got {self.upstream!r}")
        prefix = self.path_prefix
        if not _PREFIX_RE.match(prefix):
            raise ValueError(
                f"path_prefix: expected a path like '/kling' (no trailing slash), got {prefix!r}"
            )
        if any(prefix == own or prefix.startswith(own + "/") for own in _OWN_PATHS):
            raise ValueError(f"path_prefix: {prefix!r} is a path the exporter answers itself")
        if not _TOKEN_RE.match(self.project_header):
            raise ValueError(
                f"project_header: expected an HTTP header name, got {self.project_header!r}"
            )
        if not _TOKEN_RE.match(self.user_header):
            raise ValueError(f"user_header: expected an HTTP header name, got {self.user_header!r}")
        for table in ("projects_by_access_key", "users_by_access_key"):
            for key, name in getattr(self, table).items():
                if not key or not 0 < len(name) <= 128 or not name.isprintable():
                    raise ValueError(
                        f"{table}.{key}: expected a name of 1 to 128 printable characters"
                    )
        _one_of("unpriced", self.unpriced, ("refuse", "allow"))
        if len(self.default_project) > 128 or not self.default_project.isprintable():
            raise ValueError("default_project: expected up to 128 printable characters")
        callback = self.inject_callback_url
        if callback and (not callback.startswith(("https://", "http://")) or "#" in callback):
            raise ValueError(
                f"inject_callback_url: expected an http(s) URL or '', got {callback!r}"
            )
        if not 1 <= parse_duration(self.timeout, "timeout") <= 600:
            raise ValueError("timeout: expected 1s to 10m")

    @property
    def timeout_seconds(self) -> float:
        return parse_duration(self.timeout, "timeout")


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    logs: LogsConfig = msgspec.field(default_factory=LogsConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    timezone: str = "UTC"
    pricing: PricingConfig = msgspec.field(default_factory=PricingConfig)
    budgets: list[BudgetConfig] = msgspec.field(default_factory=list)
    labels: LabelsConfig = msgspec.field(default_factory=LabelsConfig)
    tasks: TasksConfig = msgspec.field(default_factory=TasksConfig)
    reservations: ReservationsConfig = msgspec.field(default_factory=ReservationsConfig)
    kling: KlingConfig = msgspec.field(default_factory=KlingConfig)
    fleet: FleetConfig = msgspec.field(default_factory=FleetConfig)
    gateway: GatewayConfig = msgspec.field(default_factory=GatewayConfig)

    def __post_init__(self) -> None:
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"timezone: unknown time zone {self.timezone!r} (use an IANA name like "
                "'Europe/Berlin')"
            ) from None
        seen: set[str] = set()
        for i, budget in enumerate(self.budgets):
            if budget.name in seen:
                raise ValueError(f"budgets[{i}].name: duplicate budget name {budget.name!r}")
            seen.add(budget.name)
        if self.gateway.inject_callback_url and not self.kling.callback_token:
            raise ValueError(
                "gateway.inject_callback_url: needs kling.callback_token, the key each "
                "task's own callback token is signed with"
            )

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)
