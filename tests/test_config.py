"""Tests for node.config: defaults, render/parse round trip, one-line errors, sizes, paths."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from node.auth import DEFAULT_REPLAY_ENTRIES, DEFAULT_REPLAY_PER_ACCOUNT
from node.config import (
    ByteSize,
    Config,
    GiB,
    KiB,
    LimitsSection,
    LimitValues,
    MiB,
    ModularsSection,
    NodeSection,
    P2PSection,
    Seconds,
    load_config,
    parse_bytes,
    parse_config,
    render_config,
)
from node.errors import ConfigError


def test_empty_text_gives_defaults() -> None:
    assert parse_config("") == Config()


def test_render_defaults_parses_back_equal() -> None:
    text = render_config()
    assert parse_config(text) == Config()
    assert render_config(Config()) == text


def test_render_non_default_parses_back_equal() -> None:
    cfg = Config(
        node=NodeSection(name="sp-7", grace_period=Seconds(2.5), log_level="debug",
                         data_dir=Path("/var/lib/gfsp"), keys_dir=Path("secret keys")),
        modulars=ModularsSection(
            disabled=["gater", "executor"],
            implementations={"approver": "mypkg.approver:StrictApprover",
                             "metadata": "other.meta:Meta"}),
        p2p=P2PSection(bootstrap=["12D3KooWabc@/ip4/127.0.0.1/tcp/4001"], evict_after=7,
                       max_ping_frame=ByteSize(3 * KiB + 1)),
        limits=LimitsSection(
            system=LimitValues(memory=ByteSize(8 * GiB), tasks=10),
            services={"p2p": LimitValues(memory=ByteSize(64 * MiB), fds=12),
                      "uploader": LimitValues(tasks_low=0, conns_inbound=3)}),
    )
    text = render_config(cfg)
    assert "[modulars.implementations]" in text
    assert "[limits.services.p2p]" in text
    back = parse_config(text)
    assert back == cfg
    assert back.limits.services["p2p"].memory == 64 * MiB
    assert back.modulars.implementations["approver"] == "mypkg.approver:StrictApprover"
    assert back != Config()


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("[nosuch]\nx = 1\n", "nosuch", ""),
        ("[node]\ncolour = \"red\"\n", "node.colour", "'red'"),
        ("[limits.system]\nfoo = 3\n", "limits.system.foo", "3"),
        ("[p2p]\nevict_after = \"x\"\n", "p2p.evict_after", "'x'"),
        ("[p2p]\nevict_after = true\n", "p2p.evict_after", "True"),
        ("[p2p]\nevict_after = 2.5\n", "p2p.evict_after", "2.5"),
        ("[node]\nname = 5\n", "node.name", "5"),
        ("[p2p]\nping_interval = \"x\"\n", "p2p.ping_interval", "'x'"),
        ("[p2p]\nevict_after = 0\n", "p2p.evict_after", "0"),
        ("[p2p]\nevict_after = 1001\n", "p2p.evict_after", "1001"),
        ("[node]\ngrace_period = -1\n", "node.grace_period", "-1"),
        ("[node]\nlog_level = \"loud\"\n", "node.log_level", "'loud'"),
        ("[gater]\nmax_body = \"12XB\"\n", "gater.max_body", "'12XB'"),
        ("[piecestore]\nfsync = 1\n", "piecestore.fsync", "1"),
        ("[modulars]\ndisabled = \"gater\"\n", "modulars.disabled", "'gater'"),
        ("[modulars.implementations]\napprover = \"nocolon\"\n",
         "modulars.implementations.approver", "'nocolon'"),
        # found in review: these passed the config and failed later (exit 1, or a crash)
        ("[node]\ngrace_period = nan\n", "node.grace_period", "nan"),
        ("[p2p]\nping_interval = inf\n", "p2p.ping_interval", "inf"),
        ("[node]\nadmin_listen = \"0.0.0.0:9100\"\n", "node.admin_listen", "'0.0.0.0:9100'"),
        ("[node]\nadmin_listen = \"9100\"\n", "node.admin_listen", "'9100'"),
        ("[gater]\nlisten = \"nohostport\"\n", "gater.listen", "'nohostport'"),
        ("[gater]\nlisten = \"127.0.0.1:70000\"\n", "gater.listen", "'127.0.0.1:70000'"),
        ("[p2p]\nlisten = \"garbage\"\n", "p2p.listen", "'garbage'"),
        ("[p2p]\nlisten = \"/dns4/x/tcp/1\"\n", "p2p.listen", "'/dns4/x/tcp/1'"),
        ("[p2p]\nbootstrap = [\"/ip4/1.2.3.4/tcp/1\"]\n", "p2p.bootstrap", "1.2.3.4"),
        ("[p2p]\nbootstrap = [\"id@junk\"]\n", "p2p.bootstrap", "junk"),
        ("[gater]\nhosts = [\"sp.example\", \"http://sp.example\"]\n", "gater.hosts",
         "http://sp.example"),
        ("[gater]\nhosts = [\"sp.example:99999\"]\n", "gater.hosts", "sp.example:99999"),
        ("[chain]\nendpoint = \"127.0.0.1:26750\"\n", "chain.endpoint", "127.0.0.1:26750"),
        ("[node]\nname = \" \"\n", "node.name", "' '"),
    ],
)
def test_bad_config_is_one_line_naming_file_key_value(
        tmp_path: Path, text: str, key: str, value: str) -> None:
    msg = _error(tmp_path, text)
    assert key in msg, msg
    assert value in msg, msg


def test_range_messages_say_the_bound(tmp_path: Path) -> None:
    assert "at least 1" in _error(tmp_path, "[p2p]\nevict_after = 0\n")
    assert "at most 1000" in _error(tmp_path, "[p2p]\nevict_after = 1001\n")
    assert "one of" in _error(tmp_path, "[node]\nlog_level = \"loud\"\n")


def test_invalid_toml(tmp_path: Path) -> None:
    msg = _error(tmp_path, "[node\nname = \n")
    assert "TOML" in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    assert "not found" in msg


def test_parse_config_without_source_names_placeholder() -> None:
    with pytest.raises(ConfigError, match=r"^<config>: node\.name = 5: expected a string$"):
        parse_config("[node]\nname = 5\n")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("\"64MiB\"", 64 * MiB), ("\"2GB\"", 2 * 1000**3), ("1048576", 1048576),
     ("\"1.5KiB\"", 1536), ("\"10 kb\"", 10_000), ("\"0\"", 0)],
)
def test_byte_sizes(raw: str, expected: int) -> None:
    cfg = parse_config(f"[gater]\nmax_body = {raw}\n")
    assert cfg.gater.max_body == expected
    assert isinstance(cfg.gater.max_body, ByteSize)


@pytest.mark.parametrize("bad", ["12XB", "", "MiB", "-1", "1.2.3GB"])
def test_parse_bytes_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="byte size"):
        parse_bytes(bad)


def test_byte_size_range_applies_after_units(tmp_path: Path) -> None:
    msg = _error(tmp_path, "[p2p]\nmax_ping_frame = \"65KiB\"\n")
    assert "p2p.max_ping_frame" in msg and "65KiB" in msg and "at most" in msg


def test_seconds_accept_int_and_float() -> None:
    cfg = parse_config("[node]\ngrace_period = 3\n[p2p]\nping_interval = 0.25\n")
    assert cfg.node.grace_period == 3.0 and isinstance(cfg.node.grace_period, Seconds)
    assert cfg.p2p.ping_interval == 0.25


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "sp1"
    folder.mkdir()
    path = folder / "config.toml"
    path.write_text("[node]\ndata_dir = \"d\"\nkeys_dir = \"../k\"\n"
                    "[db]\npath = \"x.sqlite3\"\n[piecestore]\npath = \"p\"\n")
    cfg = load_config(path)
    assert cfg.source == path
    assert cfg.data_dir == folder / "d"
    assert cfg.keys_dir == folder / "../k"
    assert cfg.db_path == folder / "d" / "x.sqlite3"
    assert cfg.piecestore_path == folder / "d" / "p"


def test_relative_config_path_is_made_absolute(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Path("config.toml"))
    assert cfg.source == tmp_path / "config.toml"
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.db_path == tmp_path / "data" / "spdb.sqlite3"


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    path = _write(tmp_path, f"[node]\ndata_dir = \"{tmp_path / 'elsewhere'}\"\n"
                            f"[db]\npath = \"{tmp_path / 'db.sqlite3'}\"\n"
                            f"[piecestore]\npath = \"{tmp_path / 'pieces'}\"\n")
    cfg = load_config(path)
    assert cfg.data_dir == tmp_path / "elsewhere"
    assert cfg.db_path == tmp_path / "db.sqlite3"
    assert cfg.piecestore_path == tmp_path / "pieces"


def test_source_does_not_affect_equality(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))
    assert cfg == Config()
    assert dataclasses.replace(cfg, source=None) == cfg


def test_per_service_limits_parse() -> None:
    cfg = parse_config("[limits.services.p2p]\nmemory = \"1MiB\"\ntasks = 4\n")
    p2p = cfg.limits.services["p2p"]
    assert p2p.memory == MiB and p2p.tasks == 4
    assert p2p.fds == LimitValues().fds


def test_gater_replay_defaults_and_bounds(tmp_path: Path) -> None:
    """Found in review: requests could be signed to expire 7 days ahead by default, which let a
    flood of them fill the replay cache for days. The defaults now match node.auth's and the
    client's 300 s signatures fit well within them."""
    gater = Config().gater
    assert gater.max_signature_age == 900
    assert (gater.replay_entries, gater.replay_per_account) == (
        DEFAULT_REPLAY_ENTRIES, DEFAULT_REPLAY_PER_ACCOUNT)
    # an account at the default rate limit signing 300 s expiries stays under its cap
    assert gater.rate_limit * 300 + gater.rate_burst < gater.replay_per_account
    cfg = parse_config("[gater]\nreplay_entries = 5000\nreplay_per_account = 40\n")
    assert (cfg.gater.replay_entries, cfg.gater.replay_per_account) == (5000, 40)
    assert "at least 1" in _error(tmp_path, "[gater]\nreplay_per_account = 0\n")
    assert "gater.replay_entries" in _error(tmp_path, "[gater]\nreplay_entries = 1\n")
