"""The daemon's settings: defaults, then the TOML file, then command-line flags.

Every setting is listed, with its default, in config.example.toml. An unknown section
or key, or a value of the wrong type, is an error naming it: a typo in a config file
must not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
from dataclasses import dataclass, field

from .errors import PttError
from .keys import is_public_key

DEFAULT_PORT = 9987
DEFAULT_HTTP_PORT = 9988
DEFAULT_HUB_PORT = 9989
DEFAULT_REPLICATOR_PORT = 10237


class ConfigError(PttError):
    """A config file or flag that cannot be used."""


@dataclass
class WireConfig:
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    handshake_timeout: float = 10.0
    idle_timeout: float = 90.0  # no complete frame for this long: the connection is dead
    keepalive: float = 30.0  # ping a quiet peer this often
    frame_timeout: float = 30.0  # a frame that has begun must be complete within this
    send_timeout: float = 30.0  # a peer that reads nothing for this long is dropped
    request_timeout: float = 60.0
    max_connections: int = 256
    max_connections_per_address: int = 8
    window: int = 8  # want requests in flight per sync
    want_batch: int = 1024  # hashes per want
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0
    push_bytes: int = 65536  # blocks pushed with a new head, at most this many bytes


@dataclass
class GatewayConfig:
    http: str = f"0.0.0.0:{DEFAULT_HTTP_PORT}"  # the HTTP API (gateway mode)
    key_file: str = ""  # seals hosted users' secret keys; default <data-dir>/gateway.key
    passphrase_env: str = "PTTD_GATEWAY_PASSPHRASE"  # if set in the environment: the key comes from it
    registration: bool = False  # POST /register open to anyone
    test_login: bool = False  # POST /test-login: log in by a bare id (development only)
    token_ttl: float = 900.0  # seconds an access token is valid (renewed with POST /refresh)
    refresh_ttl: float = 30 * 86400.0  # seconds a login session (its refresh token) lasts
    cors_origins: list[str] = field(default_factory=lambda: ["*"])
    http_max_connections: int = 1024  # open HTTP connections at most (one more is answered 503)
    http_max_per_address: int = 256  # of them from one client address (0: no limit; behind a proxy, raise it)
    max_body: int = 1 << 20  # bytes of one request body
    max_file: int = 16 << 20  # bytes of one file attached to a message (POST /files)
    bodies_in_memory: int = 256 << 20  # bytes of request bodies held at once, all requests together (503 past it)
    hub_url: str = ""  # the hub's HTTP address the web client shows topics from, e.g. http://hub.example:9989
    group_max: int = 256  # writes of many users sharing one store transaction
    writer: str = "process"  # where writes are built: "process" (a second core) or "thread"
    user_cache: int = 4096  # hosted users kept decoded in memory
    event_retention: int = 100_000  # live-stream events kept for Last-Event-ID
    replicators: list[str] = field(default_factory=list)  # wire addresses: asked to pin users' friends
    login_window: float = 300.0  # seconds over which failed logins are counted
    login_failures_per_account: int = 5  # more within the window: 429 for that account
    login_failures_per_address: int = 20  # more within the window: 429 for that client address
    key_accounts_per_address: int = 10  # new key-login users from one address within login_window


@dataclass
class HubConfig:
    http: str = f"0.0.0.0:{DEFAULT_HUB_PORT}"  # the hub's HTTP API (hub mode)
    name: str = "pttd hub"
    description: str = ""
    join_token: str = ""  # if set, POST /join must carry it
    moderators: list[str] = field(default_factory=list)  # repository keys whose moderation the view applies
    blocked: list[str] = field(default_factory=list)  # repository keys refused (and dropped if joined)
    max_repos: int = 10_000
    max_topics_per_repo: int = 100
    max_messages_per_repo: int = 10_000
    max_message_bytes: int = 16_384
    stream_history: int = 10_000  # deltas kept in memory for Last-Event-ID


@dataclass
class ReplicatorConfig:
    http: str = f"0.0.0.0:{DEFAULT_REPLICATOR_PORT}"  # POST /load of the old API (replicator mode)
    pins: list[str] = field(default_factory=list)  # repository keys always kept, besides those pinned later
    max_repos: int = 10_000  # pinned repositories at most
    max_bytes: int = 0  # a pin is refused once the store is this large (0: no limit)
    pinners: list[str] = field(default_factory=list)  # node keys that may pin over the wire ([]: any peer)
    load_token: str = ""  # if set, POST /load must carry it as "token"


OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass
class OidcProvider:
    """One ``[[oidc]]`` table of the config."""

    name: str = ""  # shown on the login button
    issuer: str = ""  # the token's iss, exactly; names the accounts (issuer + subject)
    issuer_aliases: list[str] = field(default_factory=list)  # other spellings of iss (Google: accounts.google.com)
    client_id: str = ""  # the audience the token must be for
    jwks: str = ""  # the provider's keys: an https:// (or http://) URL, or a file path
    authorization_endpoint: str = ""  # where the web client sends the browser to log in
    allowed_domains: list[str] = field(default_factory=list)  # email domains allowed ([]: any)
    algorithms: list[str] = field(default_factory=lambda: ["RS256", "ES256"])
    leeway: float = 60.0  # seconds of clock skew allowed for exp, nbf, iat
    jwks_max_age: float = 3600.0  # seconds the keys are cached before a fetch
    jwks_min_refresh: float = 30.0  # seconds at least between two fetches

    def check(self, where: str) -> None:
        for name in ("name", "issuer", "client_id", "jwks"):
            if not getattr(self, name):
                raise ConfigError(f"{where}: [[oidc]] {self.name or '?'}: {name} is required")
        bad = [a for a in self.algorithms if a not in OIDC_ALGORITHMS]
        if bad or not self.algorithms:
            raise ConfigError(
                f"{where}: [[oidc]] {self.name}: algorithms {bad or '[]'} not accepted "
                f"(asymmetric ones only: {', '.join(sorted(OIDC_ALGORITHMS))})"
            )
        if self.jwks.startswith("http://"):
            host = self.jwks[len("http://") :].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise ConfigError(
                    f"{where}: [[oidc]] {self.name}: jwks over plain http:// only from this machine "
                    "(anyone on the way could put their keys in): use https://"
                )
        if self.leeway < 0 or self.leeway > 600 or self.jwks_max_age <= 0 or self.jwks_min_refresh < 0:
            raise ConfigError(f"{where}: [[oidc]] {self.name}: leeway must be 0-600 s, jwks_max_age positive")

    @property
    def issuers(self) -> set[str]:
        return {self.issuer, *self.issuer_aliases}


@dataclass
class Config:
    data_dir: str | None = None
    mode: str = "node"
    control: str | None = None  # default: <data-dir>/control.sock
    synchronous: str = "FULL"
    # bytes per SQLite page of a new data directory (0: by mode, 4096 for a gateway's
    # many small commits, 65536 otherwise, which stores large values faster)
    page_size: int = 0
    log_level: str = "INFO"
    peers: list[str] = field(default_factory=list)
    hubs: list[str] = field(default_factory=list)  # hubs' wire addresses: rendezvous and announcements
    wire: WireConfig = field(default_factory=WireConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    replicator: ReplicatorConfig = field(default_factory=ReplicatorConfig)
    oidc: list[OidcProvider] = field(default_factory=list)  # [[oidc]] tables: OpenID Connect providers


# section -> {key: (object path, type)}
_LAYOUT: dict[str, dict[str, tuple[str, type]]] = {
    "daemon": {
        "data_dir": ("data_dir", str),
        "mode": ("mode", str),
        "control": ("control", str),
        "log_level": ("log_level", str),
    },
    "store": {"synchronous": ("synchronous", str), "page_size": ("page_size", int)},
    "peers": {"static": ("peers", list), "hubs": ("hubs", list)},
    "wire": {},
    "gateway": {},
    "hub": {},
    "replicator": {},
}
for _f in dataclasses.fields(WireConfig):
    _LAYOUT["wire"][_f.name] = ("wire." + _f.name, type(getattr(WireConfig(), _f.name)))
for _f in dataclasses.fields(GatewayConfig):
    _LAYOUT["gateway"][_f.name] = ("gateway." + _f.name, type(getattr(GatewayConfig(), _f.name)))
for _f in dataclasses.fields(HubConfig):
    _LAYOUT["hub"][_f.name] = ("hub." + _f.name, type(getattr(HubConfig(), _f.name)))
for _f in dataclasses.fields(ReplicatorConfig):
    _LAYOUT["replicator"][_f.name] = ("replicator." + _f.name, type(getattr(ReplicatorConfig(), _f.name)))


def _set(cfg: Config, dotted: str, value) -> None:
    obj = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def load(path: str | None) -> Config:
    cfg = Config()
    if path is None:
        return cfg
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    for section, values in raw.items():
        if section == "oidc":
            cfg.oidc = _providers(values, path)
            continue
        layout = _LAYOUT.get(section)
        if layout is None or not isinstance(values, dict):
            raise ConfigError(f"config {path}: unknown section [{section}]")
        for key, value in values.items():
            if key not in layout:
                raise ConfigError(f"config {path}: unknown setting {key!r} in [{section}]")
            dotted, typ = layout[key]
            if typ is float and type(value) is int:
                value = float(value)
            if type(value) is not typ:
                raise ConfigError(f"config {path}: [{section}] {key} must be a {typ.__name__}, not {value!r}")
            if typ is list and not all(isinstance(x, str) for x in value):
                raise ConfigError(f"config {path}: [{section}] {key} must list strings")
            _set(cfg, dotted, value)
    validate(cfg, path)
    return cfg


def _providers(tables, path: str) -> list[OidcProvider]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"config {path}: oidc must be tables [[oidc]], one per provider")
    kinds = {f.name: type(getattr(OidcProvider(), f.name)) for f in dataclasses.fields(OidcProvider)}
    providers = []
    for t in tables:
        p = OidcProvider()
        for key, value in t.items():
            typ = kinds.get(key)
            if typ is None:
                raise ConfigError(f"config {path}: unknown setting {key!r} in [[oidc]]")
            if typ is float and type(value) is int:
                value = float(value)
            if type(value) is not typ or (typ is list and not all(isinstance(x, str) for x in value)):
                raise ConfigError(f"config {path}: [[oidc]] {key} must be a {typ.__name__}, not {value!r}")
            setattr(p, key, value)
        providers.append(p)
    return providers


def _address(where: str, setting: str, text: str, dial: bool = False) -> None:
    """``parse_address``, its error naming the setting."""
    try:
        parse_address(text, dial=dial)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {setting}: {exc}") from None


def _finite(obj, where: str, section: str = "") -> None:
    """Every number of the settings is finite: a NaN passes every ``<= 0`` check (and
    then stops the daemon where it is used), infinity overflows where it is made an int."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _finite(value, where, f.name)
        elif isinstance(value, float) and not math.isfinite(value):
            name = f"[{section}] {f.name}" if section else f.name
            raise ConfigError(f"{where}: {name} must be a finite number, not {value}")


def validate(cfg: Config, where: str = "settings") -> None:
    from .daemon import MODES

    _finite(cfg, where)
    for p in cfg.oidc:
        _finite(p, where, "[oidc]")
    if cfg.mode not in MODES:
        raise ConfigError(f"{where}: mode {cfg.mode!r} is not one of {', '.join(MODES)}")
    _address(where, "[wire] listen", cfg.wire.listen)
    for p in cfg.peers:
        _address(where, "[peers] static", p, dial=True)
    for p in cfg.hubs:
        _address(where, "[peers] hubs", p, dial=True)
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{where}: log_level {cfg.log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    if cfg.page_size not in (0, 4096, 8192, 16384, 32768, 65536):
        raise ConfigError(
            f"{where}: [store] page_size {cfg.page_size} is not 0 (by mode) or a power of two from 4096 to 65536"
        )
    if cfg.synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError(f"{where}: [store] synchronous {cfg.synchronous!r} is not one of FULL, NORMAL, EXTRA")
    w = cfg.wire
    if not 0 < w.reconnect_min <= w.reconnect_max:
        raise ConfigError(f"{where}: [wire] reconnect_min must be positive and at most reconnect_max")
    if w.push_bytes < 0:
        raise ConfigError(f"{where}: [wire] push_bytes must not be negative")
    for name in ("handshake_timeout", "idle_timeout", "keepalive", "frame_timeout", "send_timeout", "request_timeout"):
        if getattr(w, name) <= 0:
            raise ConfigError(f"{where}: [wire] {name} must be positive")
    for name in ("max_connections", "max_connections_per_address", "window", "want_batch"):
        if getattr(w, name) < 1:
            raise ConfigError(f"{where}: [wire] {name} must be at least 1")
    if w.want_batch > 4096:
        raise ConfigError(f"{where}: [wire] want_batch must be at most 4096")
    g = cfg.gateway
    _address(where, "[gateway] http", g.http)
    if g.token_ttl <= 0 or g.refresh_ttl < g.token_ttl:
        raise ConfigError(f"{where}: [gateway] token_ttl must be positive and refresh_ttl at least token_ttl")
    if g.login_window <= 0:
        raise ConfigError(f"{where}: [gateway] login_window must be positive")
    if g.writer not in ("process", "thread"):
        raise ConfigError(f"{where}: [gateway] writer {g.writer!r} is not one of process, thread")
    if g.bodies_in_memory < max(g.max_body, g.max_file):
        raise ConfigError(f"{where}: [gateway] bodies_in_memory must be at least max_body and max_file")
    if g.http_max_per_address < 0:
        raise ConfigError(f"{where}: [gateway] http_max_per_address must not be negative (0: no limit)")
    for name in (
        "http_max_connections",
        "max_body",
        "group_max",
        "user_cache",
        "event_retention",
        "login_failures_per_account",
        "login_failures_per_address",
        "key_accounts_per_address",
    ):
        if getattr(g, name) < 1:
            raise ConfigError(f"{where}: [gateway] {name} must be at least 1")
    r = cfg.replicator
    _address(where, "[replicator] http", r.http)
    if r.max_repos < 1 or r.max_bytes < 0:
        raise ConfigError(f"{where}: [replicator] max_repos must be at least 1 and max_bytes not negative")
    for name in ("pins", "pinners"):
        for k in getattr(r, name):
            if len(k) != 64 or any(c not in "0123456789abcdef" for c in k):
                raise ConfigError(f"{where}: [replicator] {name}: {k!r} is not a key (64 lowercase hex digits)")
            if not is_public_key(bytes.fromhex(k)):
                raise ConfigError(f"{where}: [replicator] {name}: {k} is not a valid Ed25519 public key")
    for a in cfg.gateway.replicators:
        _address(where, "[gateway] replicators", a, dial=True)
    names = [p.name for p in cfg.oidc]
    for p in cfg.oidc:
        p.check(where)
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: [[oidc]] provider names must differ")
    h = cfg.hub
    _address(where, "[hub] http", h.http)
    for name in ("max_repos", "max_topics_per_repo", "max_messages_per_repo", "max_message_bytes", "stream_history"):
        if getattr(h, name) < 1:
            raise ConfigError(f"{where}: [hub] {name} must be at least 1")
    for name in ("moderators", "blocked"):
        for k in getattr(h, name):
            if len(k) != 64 or any(c not in "0123456789abcdef" for c in k):
                raise ConfigError(f"{where}: [hub] {name}: {k!r} is not a repository key (64 lowercase hex digits)")


def parse_address(text: str, dial: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port). The host is an IP address
    or a name that can be looked up (IDNA: labels of 1-63 characters); the port ASCII
    digits, 0-65535, and not 0 for an address to ``dial`` (0 is for listening: any free
    port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"address {text!r} is not HOST:PORT")
    if host.startswith("[") or host.endswith("]"):  # both, around an IPv6 address
        try:
            if not (host.startswith("[") and host.endswith("]")):
                raise ValueError
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ConfigError(f"address {text!r}: the part in brackets is not an IPv6 address") from None
    else:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            try:  # what the resolver would be asked: refused here, not when dialing
                if not host.encode("idna") or any(c.isspace() or ord(c) < 32 for c in host):
                    raise UnicodeError
            except UnicodeError:
                raise ConfigError(f"address {text!r}: {host!r} is not a host name or IP address") from None
    if not (port.isascii() and port.isdigit()):
        raise ConfigError(f"address {text!r}: port {port!r} is not a number")
    n = int(port)
    if not (1 if dial else 0) <= n <= 65535:
        raise ConfigError(f"address {text!r}: port {n} is out of range")
    return host, n
