"""Node configuration: one TOML file per node, parsed into frozen dataclasses.

Every section is a dataclass below; every field has a default and a one-line doc (``_f``),
and optionally a range. :func:`load_config` refuses unknown keys, wrong types and out-of-range
values with a :class:`~node.errors.ConfigError` whose message is one line naming the file, the
key and the value. :func:`render_config` writes a documented config file (``gfsp-node init``).

Relative paths in the file are resolved against the folder that holds the config file.
Byte sizes accept an integer or a string with a unit (``"64MiB"``, ``"2GB"``); durations are
seconds (int or float).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from node.errors import ConfigError
from node.hostnames import parse_host

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class ByteSize(int):
    """An int that the config accepts as ``64MiB`` / ``2GB`` / ``1048576``."""


class Seconds(float):
    """A duration in seconds; int or float in the file."""


def _f(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
       choices: tuple[Any, ...] | None = None,
       check: Callable[[Any], str | None] | None = None) -> Any:
    """A config field: default, one-line doc, optional inclusive range or choices, and an
    optional ``check`` that returns why a value is bad (None when it is good)."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "check": check}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _host_port_problem(value: str, *, loopback: bool = False) -> str | None:
    """Why ``value`` is not ``HOST:PORT`` (``[v6]:PORT`` too), or not on a loopback host."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        return "expected HOST:PORT, like 127.0.0.1:9033 or [::1]:9033"
    if int(port) > 65535:
        return "the port must be 0..65535"
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if loopback and host != "localhost":
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = False
        if not ok:
            return "must be a loopback address (127.0.0.1, ::1 or localhost)"
    return None


def _hosts_problem(values: list[str]) -> str | None:
    bad = [v for v in values if not isinstance(v, str) or parse_host(v) is None]
    return f"not a host[:port]: {bad[0]!r}" if bad else None


_MULTIADDR = re.compile(r"/(ip4|ip6|dns|dns4|dns6)/[^/\s]+/tcp/[0-9]{1,5}"
                        r"(/p2p/[1-9A-HJ-NP-Za-km-z]+)?")


def _http_url_problem(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port that is no number or out of range
    except ValueError as exc:
        return f"not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "expected an http(s)://HOST:PORT URL"
    return None


def dial_multiaddr_problem(value: str) -> str | None:
    """Why ``value`` is no multiaddr a peer could dial (TCP over an IP or a DNS name)."""
    if not _MULTIADDR.fullmatch(value):
        return "expected a multiaddr like /ip4/203.0.113.7/tcp/9044 or /dns4/NAME/tcp/9044"
    return None


def _listen_multiaddr_problem(value: str) -> str | None:
    if not _MULTIADDR.fullmatch(value) or not value.startswith(("/ip4/", "/ip6/")):
        return "expected a multiaddr like /ip4/0.0.0.0/tcp/9044"
    return None


def _bootstrap_problem(entries: list[str]) -> str | None:
    for entry in entries:
        peer, at, addr = entry.partition("@")
        if at and peer.isalnum() and _MULTIADDR.fullmatch(addr):
            continue
        if not at and _MULTIADDR.fullmatch(entry) and "/p2p/" in entry:
            continue
        return (f"{entry!r} is not \"<peer id>@<multiaddr>\" nor a multiaddr ending in "
                "/p2p/<peer id>")
    return None


@dataclass(frozen=True)
class NodeSection:
    name: str = _f("sp", "A name for this node, used in logs.",
                   check=lambda v: None if v.strip() else "must not be empty")
    data_dir: Path = _f(Path("data"), "Folder for the SPDB and the piece store.")
    keys_dir: Path = _f(Path("keys"), "Folder with the role keys (0700; files 0600).")
    grace_period: Seconds = _f(Seconds(10.0), "Seconds in-flight work may finish on SIGTERM.",
                               lo=0, hi=3600)
    log_level: str = _f("info", "Log level.",
                        choices=("debug", "info", "warning", "error", "critical"))
    admin_listen: str = _f("127.0.0.1:0", "Loopback address of the admin/status route.",
                           check=lambda v: _host_port_problem(v, loopback=True))


@dataclass(frozen=True)
class ModularsSection:
    disabled: list[str] = _f([], "Modulars not to start.")
    implementations: dict[str, str] = _f(
        {}, "Other implementations by modular name: approver = \"pkg.mod:Class\".")


@dataclass(frozen=True)
class P2PSection:
    listen: str = _f("/ip4/127.0.0.1/tcp/0", "libp2p listen multiaddr.",
                     check=_listen_multiaddr_problem)
    bootstrap: list[str] = _f([], "Bootstrap peers: \"<peer id>@<multiaddr>\" or /p2p/ addrs.",
                              check=_bootstrap_problem)
    ping_interval: Seconds = _f(Seconds(5.0), "Seconds between pings to each known peer.",
                                lo=0.05, hi=3600)
    ping_timeout: Seconds = _f(Seconds(2.0), "Deadline for one ping/pong exchange.",
                               lo=0.01, hi=600)
    connect_timeout: Seconds = _f(Seconds(3.0), "Deadline for dialling a peer.", lo=0.01, hi=600)
    request_timeout: Seconds = _f(Seconds(5.0), "Deadline for one approval request/response.",
                                  lo=0.01, hi=600)
    evict_after: int = _f(3, "Missed pongs in a row before a peer is evicted.", lo=1, hi=1000)
    rtt_every: int = _f(10, "Periods after which a peer that keeps pinging us is pinged anyway "
                            "(its ping RTT measured again).", lo=1, hi=1000)
    max_clock_skew: Seconds = _f(Seconds(30.0), "Allowed difference of a message's timestamp.",
                                 lo=1, hi=3600)
    max_peers: int = _f(256, "Most peers kept in the peer table.", lo=1, hi=100_000)
    listen_retries: int = _f(20, "Tries to bind the listen address again at start (a restarted "
                                 "node may find its port not yet released).", lo=0, hi=1000)
    listen_retry_interval: Seconds = _f(Seconds(0.5), "Seconds between those tries.",
                                        lo=0.01, hi=60)
    max_concurrent_pings: int = _f(16, "Pings in flight at once, keepalives and first "
                                       "contacts each (smooths bursts).",
                                   lo=1, hi=10_000)
    max_inbound_streams: int = _f(1024, "Inbound streams negotiated or served at once; more "
                                        "are reset at once.", lo=1, hi=1_000_000)
    max_inbound_per_peer: int = _f(128, "Inbound streams one peer may have negotiated or "
                                         "served at once; more are reset at once.",
                                   lo=1, hi=1_000_000)
    exchange_sample: int = _f(4, "Peers listed in a pong to an already trusted peer (a "
                                 "new or returning one gets every trusted peer, up to 64).",
                              lo=0, hi=64)
    max_ping_frame: ByteSize = _f(ByteSize(64 * KiB), "Largest ping/pong frame (PROTOCOL.md: "
                                  "64 KiB; less only).", lo=1 * KiB, hi=64 * KiB)
    max_approval_frame: ByteSize = _f(ByteSize(256 * KiB), "Largest approval frame "
                                      "(PROTOCOL.md: 256 KiB; less only).",
                                      lo=1 * KiB, hi=256 * KiB)
    approval_timeout: Seconds = _f(Seconds(5.0), "Default quorum timeout for approvals.",
                                   lo=0.01, hi=600)
    approval_backups: int = _f(2, "Approvals asked beyond data+parity, kept as backups.",
                               lo=0, hi=64)


@dataclass(frozen=True)
class GaterSection:
    listen: str = _f("127.0.0.1:9033", "HTTP listen address (host:port).",
                     check=_host_port_problem)
    max_header_bytes: ByteSize = _f(ByteSize(16 * KiB), "Largest request head.",
                                    lo=1 * KiB, hi=1 * MiB)
    max_body: ByteSize = _f(ByteSize(64 * GiB), "Largest request body (object size cap).",
                            lo=0)
    max_json_body: ByteSize = _f(ByteSize(1 * MiB), "Largest body of a non-data request.",
                                 lo=1 * KiB, hi=64 * MiB)
    rate_limit: float = _f(50.0, "Requests per second per account (token bucket rate).",
                           lo=0.1, hi=1e6)
    rate_burst: int = _f(100, "Token bucket size per account.", lo=1, hi=1_000_000)
    max_signature_age: Seconds = _f(Seconds(900), "Furthest ahead a request's expiry may be "
                                    "(clients and SPs sign 300 s; replays are remembered "
                                    "that long).", lo=1, hi=7 * 86400)
    replay_entries: int = _f(100_000, "Signed requests remembered against replays (~300 bytes "
                                      "each); when full, the account holding the most gives "
                                      "one up.", lo=16, hi=100_000_000)
    replay_per_account: int = _f(20_000, "Unexpired signed requests one account may have "
                                         "(more: 503 SlowDown for it alone; keep above "
                                         "rate_limit x 300 + rate_burst).",
                                 lo=1, hi=100_000_000)
    drain_timeout: Seconds = _f(Seconds(10.0), "Seconds to finish requests on shutdown.",
                                lo=0, hi=3600)
    body_idle_timeout: Seconds = _f(Seconds(60.0), "Seconds a streamed request body may send "
                                    "nothing (past it: 400 RequestTimeout).", lo=0.01, hi=3600)
    json_body_timeout: Seconds = _f(Seconds(60.0), "Seconds the body of a non-data request "
                                    "may take in all (past it: 400 RequestTimeout).",
                                    lo=0.01, hi=3600)
    send_timeout: Seconds = _f(Seconds(60.0), "Seconds one write of a response may wait "
                               "for a client that does not read (past it the connection is "
                               "closed and the request lets go of what it holds).",
                               lo=0.01, hi=3600)
    max_connections: int = _f(4096, "Connections served at once (more are closed as soon "
                              "as accepted; keep under the file descriptor limit).",
                              lo=1, hi=1_000_000)
    keep_alive_timeout: Seconds = _f(Seconds(5.0), "Seconds a connection may be idle between "
                                     "requests, or take to send a request's head.",
                                     lo=0.1, hi=3600)
    hosts: list[str] = _f([], "Further host[:port] names this SP serves under (a signed request "
                          "is accepted only for the bound address, the registered endpoint or "
                          "one of these).", check=_hosts_problem)
    recv_bytes: ByteSize = _f(ByteSize(512 * KiB), "Most bytes read from a connection at once "
                              "(keep under 1 MiB, the mmap threshold of node/malloc.py).",
                              lo=4 * KiB, hi=1 * MiB)


@dataclass(frozen=True)
class LimitValues:
    memory: ByteSize = _f(ByteSize(4 * GiB), "Memory bytes.", lo=0)
    tasks: int = _f(1024, "Tasks in total.", lo=0)
    tasks_high: int = _f(512, "High-priority tasks.", lo=0)
    tasks_medium: int = _f(512, "Medium-priority tasks.", lo=0)
    tasks_low: int = _f(256, "Low-priority tasks.", lo=0)
    conns_inbound: int = _f(1024, "Inbound connections.", lo=0)
    conns_outbound: int = _f(1024, "Outbound connections.", lo=0)
    fds: int = _f(4096, "File descriptors.", lo=0)


@dataclass(frozen=True)
class LimitsSection:
    system: LimitValues = _f(LimitValues(), "Limits of the whole node.")
    service: LimitValues = _f(
        LimitValues(memory=ByteSize(2 * GiB), tasks=512, tasks_high=256, tasks_medium=256,
                    tasks_low=128, conns_inbound=512, conns_outbound=512, fds=2048),
        "Default limits of each modular.")
    services: dict[str, LimitValues] = _f({}, "Per-modular limits: [limits.services.p2p].")


@dataclass(frozen=True)
class DBSection:
    path: Path = _f(Path("spdb.sqlite3"), "SPDB file, relative to node.data_dir.")
    busy_timeout: Seconds = _f(Seconds(5.0), "SQLite busy timeout.", lo=0, hi=600)
    synchronous: str = _f("NORMAL", "SQLite synchronous mode.", choices=("NORMAL", "FULL"))


@dataclass(frozen=True)
class PieceStoreSection:
    path: Path = _f(Path("pieces"), "Piece folder, relative to node.data_dir.")
    shard_levels: int = _f(2, "Levels of hashed sub-folders.", lo=0, hi=4)
    fsync: bool = _f(True, "fsync each piece before it is renamed into place.")
    min_free_bytes: ByteSize = _f(ByteSize(1 * GiB), "Refuse new pieces below this free space.",
                                  lo=0)


@dataclass(frozen=True)
class ChainSection:
    endpoint: str = _f("http://127.0.0.1:26750", "devchain HTTP endpoint.",
                       check=_http_url_problem)
    request_timeout: Seconds = _f(Seconds(5.0), "Deadline for one chain request.",
                                  lo=0.01, hi=600)
    height_refresh_interval: Seconds = _f(Seconds(1.0), "Seconds between height refreshes.",
                                          lo=0.01, hi=600)
    registry_file: str = _f("", "A static SP registry (JSON) used instead of the chain's; "
                                "empty: ask the chain.")
    block_interval: Seconds = _f(Seconds(1.0), "Seconds per block of a static registry's height.",
                                 lo=0.01, hi=3600)


@dataclass(frozen=True)
class ApproverSection:
    bucket_approval_blocks: int = _f(100, "Blocks a bucket approval stays valid.", lo=1)
    object_approval_blocks: int = _f(100, "Blocks an object approval stays valid.", lo=1)
    replicate_approval_blocks: int = _f(100, "Blocks a replicate approval stays valid.", lo=1)
    dedup_window: Seconds = _f(Seconds(60.0), "Seconds a repeated approval ask gets the "
                               "approval already handed out (same content, not expired) "
                               "instead of a new one.", lo=0)
    max_buckets_per_account: int = _f(100, "Bucket cap per account.", lo=1)


@dataclass(frozen=True)
class AuthorizerSection:
    cache_ttl: Seconds = _f(Seconds(2.0), "Seconds chain lookups are cached.", lo=0, hi=600)


@dataclass(frozen=True)
class UploaderSection:
    max_concurrent: int = _f(64, "Uploads in flight at once.", lo=1)
    upload_timeout: Seconds = _f(Seconds(3600.0), "Deadline for one upload's body (past "
                                 "it: 400 RequestTimeout, nothing kept).", lo=1)


@dataclass(frozen=True)
class DownloaderSection:
    max_concurrent: int = _f(256, "Downloads in flight at once.", lo=1)
    degraded_read_timeout: Seconds = _f(Seconds(30.0), "Deadline to fetch EC pieces.", lo=0.1)
    object_cache_ttl: Seconds = _f(Seconds(1.0), "Seconds a sealed object read from the chain "
                                   "is reused for challenges and downloads (0: never).",
                                   lo=0, hi=60)


@dataclass(frozen=True)
class ManagerSection:
    task_timeout: Seconds = _f(Seconds(300.0), "Default seconds before a task is retried.", lo=1)
    max_retry: int = _f(10, "Default retries before a task is marked failed (each after a "
                            "backoff of 2, 4, 8, ... s, at most the task's timeout: 10 span "
                            "about 18 minutes with the default timeout).", lo=0, hi=1000)
    gc_interval: Seconds = _f(Seconds(60.0), "Seconds between GC scans.", lo=0.1)
    meta_retention: Seconds = _f(Seconds(7 * 86400.0), "Seconds done tasks and records stay.",
                                 lo=0)


@dataclass(frozen=True)
class ExecutorSection:
    workers: int = _f(8, "Concurrent background tasks.", lo=1, hi=1024)
    ask_interval: Seconds = _f(Seconds(0.5), "Seconds between asks when idle.", lo=0.01)
    seal_confirm_timeout: Seconds = _f(Seconds(120.0), "Seconds a secondary waits for a seal.",
                                       lo=1)
    secondary_timeout: Seconds = _f(Seconds(120.0), "Deadline for sending one piece to a "
                                    "secondary, or for its \"done\" (past it: that "
                                    "secondary fails over to a backup).", lo=0.1)
    segments_in_flight: int = _f(2, "Segments a replication holds at most (read, encoded and "
                                 "being sent; each costs a segment x (data + parity) / data "
                                 "of memory, from the limiter): how far the secondaries may "
                                 "drift apart.", lo=1, hi=64)
    unsealed_piece_ttl: Seconds = _f(Seconds(86400.0), "Seconds after which the zombie GC "
                                     "collects pieces held of an object still not sealed "
                                     "(no \"done\" came: a replication that never finished).",
                                     lo=1)


@dataclass(frozen=True)
class ReceiverSection:
    max_concurrent: int = _f(64, "Pieces received at once.", lo=1)
    piece_timeout: Seconds = _f(Seconds(120.0), "Deadline for one piece's body (past it: "
                                "400 RequestTimeout, nothing kept; a body trickled a byte "
                                "at a time held a receive slot for good). The primary gives "
                                "up on a piece after its executor.secondary_timeout.", lo=0.1)


@dataclass(frozen=True)
class SignerSection:
    seal_retries: int = _f(5, "Retries of a failed seal transaction.", lo=0, hi=100)


@dataclass(frozen=True)
class MetadataSection:
    max_page: int = _f(1000, "Largest page of a listing.", lo=1, hi=100_000)


@dataclass(frozen=True)
class Config:
    """The whole node configuration; ``source`` is the file it came from (None for defaults)."""

    node: NodeSection = field(default_factory=NodeSection)
    modulars: ModularsSection = field(default_factory=ModularsSection)
    p2p: P2PSection = field(default_factory=P2PSection)
    gater: GaterSection = field(default_factory=GaterSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    db: DBSection = field(default_factory=DBSection)
    piecestore: PieceStoreSection = field(default_factory=PieceStoreSection)
    chain: ChainSection = field(default_factory=ChainSection)
    approver: ApproverSection = field(default_factory=ApproverSection)
    authorizer: AuthorizerSection = field(default_factory=AuthorizerSection)
    uploader: UploaderSection = field(default_factory=UploaderSection)
    downloader: DownloaderSection = field(default_factory=DownloaderSection)
    manager: ManagerSection = field(default_factory=ManagerSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    receiver: ReceiverSection = field(default_factory=ReceiverSection)
    signer: SignerSection = field(default_factory=SignerSection)
    metadata: MetadataSection = field(default_factory=MetadataSection)
    source: Path | None = field(default=None, compare=False)

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source is not None else Path.cwd()

    def resolve(self, p: Path) -> Path:
        """``p`` made absolute against the config file's folder."""
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def data_dir(self) -> Path:
        return self.resolve(self.node.data_dir)

    @property
    def keys_dir(self) -> Path:
        return self.resolve(self.node.keys_dir)

    @property
    def db_path(self) -> Path:
        return self.db.path if self.db.path.is_absolute() else self.data_dir / self.db.path

    @property
    def piecestore_path(self) -> Path:
        p = self.piecestore.path
        return p if p.is_absolute() else self.data_dir / p


# --- parsing --------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1024 * GiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str) -> int:
    """``"64MiB"`` -> 67108864. Raises ValueError with the reason."""
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError("expected a byte size like 1048576, \"64MiB\" or \"2GB\"")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class _Bad(Exception):
    def __init__(self, key: str, value: Any, reason: str) -> None:
        super().__init__(key, value, reason)
        self.key, self.value, self.reason = key, value, reason


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(key: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _Bad(key, value, "expected a table")
        return _build(hint, value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise _Bad(key, value, "expected a list")
        items = [_convert(f"{key}[{i}]", v, item, {}) for i, v in enumerate(value)]
        check = meta.get("check")
        if check is not None and (problem := check(items)) is not None:
            raise _Bad(key, value, problem)
        return items
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise _Bad(key, value, "expected a table")
        return {k: _convert(f"{key}.{k}", v, item, {}) for k, v in value.items()}
    if origin in (types.UnionType, typing.Union):
        raise TypeError(f"unsupported config hint {hint}")
    out: Any
    if hint is ByteSize:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise _Bad(key, value, "expected a byte size like 1048576 or \"64MiB\"")
        try:
            out = ByteSize(parse_bytes(value) if isinstance(value, str) else value)
        except ValueError as exc:
            raise _Bad(key, value, str(exc)) from None
    elif hint is Seconds or hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad(key, value, "expected a number" + (" of seconds" if hint is Seconds else ""))
        if not math.isfinite(value):
            raise _Bad(key, value, "must be a finite number")
        out = hint(value)
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(key, value, "expected an integer")
        out = value
    elif hint is bool:
        if not isinstance(value, bool):
            raise _Bad(key, value, "expected true or false")
        out = value
    elif hint is str:
        if not isinstance(value, str):
            raise _Bad(key, value, "expected a string")
        out = value
    elif hint is Path:
        if not isinstance(value, str) or not value:
            raise _Bad(key, value, "expected a non-empty path string")
        out = Path(value)
    else:
        raise TypeError(f"unsupported config hint {hint}")
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if lo is not None and out < lo:
        raise _Bad(key, value, f"must be at least {lo:g}")
    if hi is not None and out > hi:
        raise _Bad(key, value, f"must be at most {hi:g}")
    if choices is not None and out not in choices:
        raise _Bad(key, value, "must be one of " + ", ".join(map(str, choices)))
    check = meta.get("check")
    if check is not None and (problem := check(out)) is not None:
        raise _Bad(key, value, problem)
    return out


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise _Bad(full, value, "unknown key")
        kwargs[key] = _convert(full, value, hints[key], fields[key].metadata)
    return cls(**kwargs)


def parse_config(text: str, *, source: Path | None = None) -> Config:
    """Parse TOML text into a :class:`Config`, raising a one-line :class:`ConfigError`."""
    where = str(source) if source is not None else "<config>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    try:
        cfg = _build(Config, raw, "")
    except _Bad as bad:
        raise ConfigError(f"{where}: {bad.key} = {_show(bad.value)}: {bad.reason}") from None
    cfg = dataclasses.replace(cfg, source=source)
    _cross_check(cfg, where)
    return cfg


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, dict) else "{...}"
    return text if len(text) <= 80 else text[:77] + "..."


def _cross_check(cfg: Config, where: str) -> None:
    for name, impl in cfg.modulars.implementations.items():
        module, _, attr = impl.partition(":")
        if not module or not attr:
            raise ConfigError(f"{where}: modulars.implementations.{name} = {impl!r}: "
                              "expected \"package.module:Class\"")


def load_config(path: Path) -> Config:
    """Read and parse a config file; every failure is a one-line :class:`ConfigError`."""
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(text, source=path)


# --- rendering a documented file ------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, ByteSize):
        return _toml_size(int(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, Path):
        return _toml_str(str(value))
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")


def _toml_size(n: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n and n % size == 0:
            return _toml_str(f"{n // size}{unit}")
    return str(n)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_table(obj: Any, name: str, out: list[str]) -> None:
    later: list[tuple[str, Any]] = []
    out.append(f"\n[{name}]")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        doc = f.metadata.get("doc", "")
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            later.append((f"{name}.{f.name}", value))
            if doc:
                out.append(f"# [{name}.{f.name}]: {doc}")
            continue
        if doc:
            out.append(f"# {doc}")
        out.append(f"{f.name} = {_toml_value(value)}")
    for sub, value in later:
        if dataclasses.is_dataclass(value):
            _render_table(value, sub, out)
        elif value and all(dataclasses.is_dataclass(v) for v in value.values()):
            for k, v in value.items():
                _render_table(v, f"{sub}.{k}", out)
        elif value:
            out.append(f"\n[{sub}]")
            out.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())


def render_config(cfg: Config | None = None) -> str:
    """A complete, commented TOML file for ``cfg`` (defaults when None); parses back equal."""
    cfg = cfg or Config()
    out = ["# gfsp node configuration. Every key is optional; shown values are the defaults",
           "# unless set by 'gfsp-node init'. Paths are relative to this file's folder."]
    for f in dataclasses.fields(cfg):
        if f.name == "source":
            continue
        _render_table(getattr(cfg, f.name), f.name, out)
    return "\n".join(out).lstrip("\n") + "\n"
