"""``--web.config.file``: TLS, basic auth and response headers in the format of the
Prometheus exporter-toolkit, so an operator configures this exporter like the others.

    tls_server_config: {cert_file, key_file, client_auth_type, client_ca_file,
                        min_version, max_version}
    http_server_config: {headers: {...}}
    basic_auth_users: {name: bcrypt hash}
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path

import bcrypt
import msgspec

from kling_exporter.configfile import ConfigError, read_yaml
from kling_exporter.validation import describe_validation_error

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
# The client_auth_type values of the toolkit that Python's ssl module can honour.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# The toolkit allows exactly these response headers.
ALLOWED_HEADERS = (
    "Strict-Transport-Security",
    "X-Content-Type-Options",
    "X-Frame-Options",
    "X-XSS-Protection",
    "Content-Security-Policy",
)


class TLSServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    cert_file: str = ""
    key_file: str = ""
    client_auth_type: str = "NoClientCert"
    client_ca_file: str = ""
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    cipher_suites: list[str] = []
    curve_preferences: list[str] = []
    prefer_server_cipher_suites: bool = True
    client_allowed_sans: list[str] = []

    def __post_init__(self) -> None:
        if not self.cert_file:
            raise ValueError("cert_file: missing")
        if not self.key_file:
            raise ValueError("key_file: missing")
        if self.client_auth_type not in CLIENT_AUTH:
            raise ValueError(
                f"client_auth_type: expected one of {', '.join(CLIENT_AUTH)}, "
                f"got {self.client_auth_type!r}"
            )
        if self.client_auth_type != "NoClientCert" and not self.client_ca_file:
            raise ValueError("client_ca_file: needed to verify client certificates")
        for key in ("min_version", "max_version"):
            if getattr(self, key) not in TLS_VERSIONS:
                raise ValueError(
                    f"{key}: expected one of {', '.join(TLS_VERSIONS)}, got {getattr(self, key)!r}"
                )
        if TLS_VERSIONS[self.min_version] > TLS_VERSIONS[self.max_version]:
            raise ValueError("min_version: is above max_version")


class HTTPServerConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    http2: bool = True
    headers: dict[str, str] = {}

    def __post_init__(self) -> None:
        for name in self.headers:
            if name not in ALLOWED_HEADERS:
                raise ValueError(
                    f"headers.{name}: not one of the allowed headers ({', '.join(ALLOWED_HEADERS)})"
                )


class WebConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    tls_server_config: TLSServerConfig | None = None
    http_server_config: HTTPServerConfig = msgspec.field(default_factory=HTTPServerConfig)
    basic_auth_users: dict[str, str] = {}

    def __post_init__(self) -> None:
        for user, hashed in self.basic_auth_users.items():
            if not hashed.startswith(("$2a$", "$2b$", "$2y$")):
                raise ValueError(f"basic_auth_users.{user}: expected a bcrypt hash ($2y$...)")


def load_web_config(path: str | Path) -> tuple[WebConfig, ssl.SSLContext | None]:
    """Read and check a web config file, and build its TLS context; errors name the key."""
    path = Path(path)
    try:
        data = read_yaml(path) or {}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    try:
        config = msgspec.convert(data, WebConfig, strict=True)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path}: {describe_validation_error(e, WebConfig)}") from None
    return config, _tls_context(config.tls_server_config, path.parent)


def _tls_context(tls: TLSServerConfig | None, base: Path) -> ssl.SSLContext | None:
    if tls is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[tls.min_version]
    ctx.maximum_version = TLS_VERSIONS[tls.max_version]
    cert, key = base / tls.cert_file, base / tls.key_file
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"tls_server_config.cert_file: cannot load {cert} with {key}: {e}"
        ) from None
    ctx.verify_mode = CLIENT_AUTH[tls.client_auth_type]
    if tls.client_ca_file:
        ca = base / tls.client_ca_file
        try:
            ctx.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"tls_server_config.client_ca_file: cannot load {ca}: {e}") from None
    if tls.cipher_suites:
        try:
            ctx.set_ciphers(":".join(tls.cipher_suites))
        except ssl.SSLError:
            raise ConfigError("tls_server_config.cipher_suites: none of them is usable") from None
    return ctx


class BasicAuth:
    """Checks basic-auth credentials against bcrypt hashes. Successful checks are
    remembered by a keyed digest of user and password (``known``, a microsecond on the
    event loop), since bcrypt is slow by design; only credentials not yet verified pay
    for ``check``, so a flood of wrong passwords never delays a verified scraper."""

    MAX_KNOWN = 1000

    def __init__(self, users: dict[str, str]) -> None:
        self.users = {u: h.encode() for u, h in users.items()}
        self._ok: set[bytes] = set()
        self._key = bcrypt.gensalt()
        # Checked for unknown users, at the cost of the configured hashes, so a wrong user
        # name takes as long as a wrong password.
        cost = max((int(h[4:6]) for h in self.users.values() if h[4:6].isdigit()), default=10)
        self._dummy = bcrypt.hashpw(b"kling-exporter", bcrypt.gensalt(rounds=cost))

    @property
    def enabled(self) -> bool:
        return bool(self.users)

    def _digest(self, user: str, password: str) -> bytes:
        return hmac.new(self._key, f"{user}\x00{password}".encode(), hashlib.sha256).digest()

    def known(self, user: str, password: str) -> bool:
        """Whether these credentials were verified before (cheap)."""
        return self._digest(user, password) in self._ok

    def check(self, user: str, password: str) -> bool:
        """Verify with bcrypt (slow: run it off the event loop)."""
        digest = self._digest(user, password)
        if digest in self._ok:
            return True
        hashed = self.users.get(user)
        valid = bcrypt.checkpw(password.encode(), hashed if hashed is not None else self._dummy)
        if valid and hashed is not None:
            if len(self._ok) >= self.MAX_KNOWN:
                self._ok.clear()
            self._ok.add(digest)
            return True
        return False


class FailureLimit:
    """Failed logins per client: past ``burst`` in ``window`` seconds a client is refused
    without a bcrypt check until the window ends."""

    def __init__(self, burst: int = 10, window: float = 60.0, max_clients: int = 10_000) -> None:
        self.burst, self.window, self.max_clients = burst, window, max_clients
        self._failures: dict[str, tuple[float, int]] = {}

    def blocked(self, client: str, now: float) -> bool:
        start, count = self._failures.get(client, (now, 0))
        return now - start < self.window and count >= self.burst

    def failed(self, client: str, now: float) -> None:
        start, count = self._failures.get(client, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        if len(self._failures) >= self.max_clients and client not in self._failures:
            self._failures.clear()  # bounded memory under a spread-out attack
        self._failures[client] = (start, count + 1)
