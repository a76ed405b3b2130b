"""``gfsp``: the storage user's command line, on the client library (:mod:`testnet.client`).

Usage (the options before or after the command)::

    gfsp [--testnet D] [--chain URL] [--endpoint URL] [--key FILE] [--timeout S]
         [--progress | --no-progress] [-q] COMMAND ...

    gfsp account new                 create the account key (0600) and print its address
    gfsp account show                print the account's address
    gfsp sps [--json]                the SPs on the chain
    gfsp mb BUCKET [--primary OPERATOR|INDEX]      make a bucket (default primary: sp0)
    gfsp rb BUCKET                   remove an empty bucket
    gfsp put FILE BUCKET[/OBJECT] [--no-wait] [--content-type T] [--seal-timeout S]
    gfsp get BUCKET/OBJECT [OUT|-] [--range A-B]
    gfsp ls [BUCKET[/PREFIX]] [--json]
    gfsp head BUCKET/OBJECT [--json]
    gfsp rm BUCKET/OBJECT

``BUCKET/OBJECT`` may be written ``gfsp://BUCKET/OBJECT``. ``put FILE BUCKET`` (or
``BUCKET/dir/``) names the object after the file.

Where things are: the testnet folder D (``--testnet``, default ``./testnet-data``) holds the
manifest ``D/testnet.toml`` (the chain endpoint, every SP) and the account key
``D/account.key``. ``--chain URL`` replaces the manifest's chain (then no manifest is needed),
``--key FILE`` the key, and ``--endpoint URL`` the SP endpoint every SP request goes to
(instead of the bucket's primary SP as the chain names it).

``put`` hashes the file (one segment at a time), asks the bucket's primary SP to approve the
object, creates it on the chain, streams the file to the SP and waits until the chain says the
object is sealed (unless ``--no-wait``). Running it again after a failure resumes: an object
already created with the same content is uploaded again, not created again. ``get`` streams
the object to OUT through a temporary file renamed at the end (a failed get leaves no file),
and checks a whole object against its integrity hash on the chain.

Progress lines go to stderr when stdout is a terminal (``--progress`` / ``--no-progress``
force it). Exit codes: 0 ok, 1 an operation failed (refused by an SP or the chain,
unreachable, timed out), 2 bad usage (arguments, names, a missing file or key). Errors are
one line, ``gfsp: <what>: <reason>``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import mimetypes
import os
import random
import re
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import trio

from node.chain import ChainUnavailable
from node.chain_msgs import BUCKET_PATTERN, MAX_OBJECT_NAME, ChainError
from node.crypto import PrivateKey, is_address, read_key_file, write_key_file
from node.ec import integrity_hash
from node.errors import GfspError, KeyFileError, unwrap
from testnet.client import GfspClient, SPError, SPUnavailable
from testnet.manifest import Manifest, ManifestError, load_manifest

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM
DEFAULT_DIR = Path("testnet-data")
KEY_NAME = "account.key"
DEFAULT_TIMEOUT = 30.0
DEFAULT_SEAL_TIMEOUT = 300.0
WRITE_BLOCK = 1 << 20
SCHEME = "gfsp://"
#: The chain's bucket names (node.chain_msgs.BUCKET_PATTERN).
BUCKET_RE = re.compile(BUCKET_PATTERN)
#: Names the chain or the gater's path-style routes cannot serve.
RESERVED_BUCKETS = frozenset({"by-id", "gfsp"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UsageError(Exception):
    """Bad usage: exit 2 with this one line."""


class Failure(Exception):
    """An operation failed: exit 1 with this one line."""


# --- names --------------------------------------------------------------------------------------


def check_bucket(name: str) -> str:
    if not BUCKET_RE.fullmatch(name):
        raise UsageError(f"invalid bucket name {name!r}: 3-63 of a-z 0-9 . - , starting and "
                         "ending with a letter or digit, no '..' '.-' '-.', not an IP address")
    if name in RESERVED_BUCKETS:
        raise UsageError(f"bucket name {name!r} is reserved")
    return name


def check_object(name: str) -> str:
    if not name:
        raise UsageError("empty object name")
    if len(name) > MAX_OBJECT_NAME:
        raise UsageError(f"object name longer than {MAX_OBJECT_NAME} characters")
    if _CONTROL.search(name):
        raise UsageError(f"object name {name!r} has control characters")
    return name


def parse_target(text: str, *, default_name: str | None = None,
                 need_object: bool = True) -> tuple[str, str]:
    """``[gfsp://]BUCKET/OBJECT`` as (bucket, object). With ``default_name``, ``BUCKET`` and
    ``BUCKET/dir/`` name ``default_name`` (in dir/); without ``need_object`` the object part
    may be empty (a bucket or a prefix)."""
    raw = text.removeprefix(SCHEME)
    bucket, _, name = raw.partition("/")
    check_bucket(bucket)
    if default_name is not None and (not name or name.endswith("/")):
        name += default_name
    if not name and need_object:
        raise UsageError(f"{text!r}: give BUCKET/OBJECT")
    if name:
        check_object(name)
    return bucket, name


def parse_range(text: str | None) -> tuple[int, int | None] | None:
    """``A-B`` (inclusive) or ``A-`` (to the end)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+)-(\d*)", text.strip())
    if not m:
        raise UsageError(f"bad --range {text!r}: give A-B (inclusive byte offsets) or A-")
    low, high = int(m[1]), (int(m[2]) if m[2] else None)
    if high is not None and high < low:
        raise UsageError(f"bad --range {text!r}: the end is before the start")
    return low, high


# --- settings -----------------------------------------------------------------------------------


@dataclass
class Settings:
    testnet: Path
    manifest: Manifest | None
    chain: str | None
    endpoint: str | None
    key_path: Path
    timeout: float
    progress: bool | None
    quiet: bool
    explicit_testnet: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        testnet = getattr(args, "testnet", None)
        timeout = getattr(args, "timeout", None) or DEFAULT_TIMEOUT
        root = Path(testnet) if testnet is not None else DEFAULT_DIR
        key = getattr(args, "key", None)
        return cls(testnet=root, manifest=None, chain=getattr(args, "chain", None),
                   endpoint=getattr(args, "endpoint", None),
                   key_path=Path(key) if key else root / KEY_NAME, timeout=timeout,
                   progress=getattr(args, "progress", None), quiet=getattr(args, "quiet", False),
                   explicit_testnet=testnet is not None)

    def flag(self) -> str:
        """The options to repeat in a hint (``gfsp{flag} account new``)."""
        out = f" --testnet {self.testnet}" if self.explicit_testnet else ""
        return out + (f" --key {self.key_path}" if self.key_path != self.testnet / KEY_NAME
                      else "")

    def load_manifest(self, *, required: bool) -> Manifest | None:
        """The testnet's manifest; with ``required``, a usage error when there is none.
        With ``--chain`` and no ``--testnet``, the default folder's manifest (likely another
        chain's) is not used."""
        if self.chain and not self.explicit_testnet:
            return None
        if self.manifest is None:
            try:
                self.manifest = load_manifest(self.testnet)
            except ManifestError as exc:
                if required:
                    if self.explicit_testnet:
                        raise UsageError(str(exc)) from None
                    raise UsageError(f"no testnet at ./{self.testnet} (give --testnet D or "
                                     "--chain URL)") from None
        return self.manifest

    def chain_endpoint(self) -> str:
        if self.chain:
            return self.chain
        manifest = self.load_manifest(required=True)
        assert manifest is not None
        return manifest.chain.endpoint

    def key(self) -> PrivateKey:
        if not self.key_path.exists():
            raise UsageError(f"no account key at {self.key_path}: create one with "
                             f"'gfsp{self.flag()} account new'")
        try:
            return read_key_file(self.key_path)
        except KeyFileError as exc:
            raise UsageError(str(exc)) from None

    def show_progress(self, *, data_on_stdout: bool = False) -> bool:
        if self.quiet:
            return False
        if self.progress is not None:
            return self.progress
        try:
            return sys.stderr.isatty() and (data_on_stdout or sys.stdout.isatty())
        except (AttributeError, ValueError):
            return False

    def say(self, *parts: object) -> None:
        if not self.quiet:
            print(*parts, flush=True)

    def sp_name(self, operator: str) -> str:
        """``sp<i>`` of the manifest for an operator address, else the address."""
        if self.manifest is not None:
            for n in self.manifest.nodes:
                if n.operator == operator:
                    return n.name
        return operator


class CliClient(GfspClient):
    """The client, sending every SP request to ``--endpoint`` when it is given."""

    def __init__(self, key: PrivateKey, *, chain: str, endpoint: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(key, chain=chain, timeout=timeout)
        self.endpoint_override = endpoint.rstrip("/") if endpoint else None

    async def sp_endpoint(self, operator: str) -> str:
        if self.endpoint_override is not None:
            return self.endpoint_override
        return await super().sp_endpoint(operator)


def open_client(s: Settings, key: PrivateKey | None = None) -> CliClient:
    """A client of the chain (and SPs); without a key (chain queries only) a throwaway one."""
    return CliClient(key or PrivateKey.generate(), chain=s.chain_endpoint(),
                     endpoint=s.endpoint, timeout=s.timeout)


# --- progress -----------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """One self-rewriting line on stderr (``label [####....]  42%  2.1/5.0 MiB  9.8 MiB/s``),
    at most ten redraws a second; does nothing when disabled."""

    WIDTH = 24

    def __init__(self, enabled: bool, stream: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.label = ""
        self.total: int | None = None
        self.done = 0
        self.started = clock()
        self._drawn_at = 0.0
        self._width = 0
        self._open = False

    def start(self, label: str, total: int | None) -> None:
        self.finish()
        self.label, self.total, self.done = label, total, 0
        self.started = self.clock()
        self._draw(force=True)

    def advance(self, n: int) -> None:
        self.done += n
        self._draw()

    def tick(self, note: str = "") -> None:
        self._draw(note=note)

    def finish(self) -> None:
        if self.enabled and self._open:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
        self._open = False

    def _draw(self, *, force: bool = False, note: str = "") -> None:
        if not self.enabled:
            return
        now = self.clock()
        if not force and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        elapsed = max(now - self.started, 1e-6)
        if self.total is None:  # no size: elapsed time only
            line = f"{self.label}  {elapsed:5.1f} s {note}".rstrip()
        else:
            frac = 1.0 if self.total == 0 else min(self.done / self.total, 1.0)
            fill = int(frac * self.WIDTH)
            line = (f"{self.label} [{'#' * fill}{'.' * (self.WIDTH - fill)}] {frac:4.0%}  "
                    f"{human(self.done)}/{human(self.total)}  {human(self.done / elapsed)}/s")
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._open = True


# --- commands -----------------------------------------------------------------------------------


def cmd_account(args: argparse.Namespace, s: Settings) -> int:
    if args.action == "new":
        key = PrivateKey.generate()
        try:
            write_key_file(s.key_path, key)
        except KeyFileError as exc:
            raise UsageError(str(exc)) from None
        print(key.address)
        s.say(f"(key written to {s.key_path}, mode 0600)")
    else:
        print(s.key().address)
    return EXIT_OK


async def cmd_sps(args: argparse.Namespace, s: Settings) -> int:
    s.load_manifest(required=False)
    async with open_client(s) as c:
        sps = sorted(await c.chain.list_sps(), key=lambda sp: (s.sp_name(sp.operator),
                                                               sp.operator))
    if args.json:
        print(json.dumps([sp.to_json() for sp in sps], indent=1))
        return EXIT_OK
    rows = [[s.sp_name(sp.operator) if s.sp_name(sp.operator) != sp.operator else "-",
             sp.status, sp.endpoint, sp.operator, sp.peer_id] for sp in sps]
    print(table(["name", "status", "endpoint", "operator", "peer id"], rows))
    return EXIT_OK


async def pick_primary(args: argparse.Namespace, s: Settings, c: CliClient) -> str:
    manifest = s.load_manifest(required=False)
    choice = args.primary
    if choice is not None:
        index = choice.removeprefix("sp")
        if index.isascii() and index.isdigit():  # not "²": isdigit() alone takes it
            if manifest is None:
                raise UsageError(f"--primary {choice}: an SP index needs a testnet manifest "
                                 "(give --testnet D, or the SP's operator address)")
            try:
                return manifest.node(int(index)).operator
            except ManifestError as exc:
                raise UsageError(str(exc)) from None
        if not is_address(choice):
            raise UsageError(f"--primary {choice!r}: give an operator address (0x...) or an "
                             "SP index")
        return choice
    if s.endpoint:
        for sp in await c.chain.list_sps():
            if sp.endpoint.rstrip("/") == s.endpoint.rstrip("/"):
                return sp.operator
        raise UsageError(f"no SP on the chain has the endpoint {s.endpoint}; give --primary")
    if manifest is not None and manifest.nodes:
        return manifest.nodes[0].operator
    in_service = [sp for sp in await c.chain.list_sps() if sp.in_service]
    if not in_service:
        raise Failure("no SP in service on the chain")
    return random.choice(in_service).operator


async def cmd_mb(args: argparse.Namespace, s: Settings) -> int:
    bucket = check_bucket(args.bucket.removeprefix(SCHEME).rstrip("/"))
    key = s.key()
    async with open_client(s, key) as c:
        primary = await pick_primary(args, s, c)
        created = await c.create_bucket(bucket, primary_sp=primary)
    s.say(f"created bucket {created.name} (id {created.id}, primary SP "
          f"{s.sp_name(created.primary_sp)})")
    return EXIT_OK


async def cmd_rb(args: argparse.Namespace, s: Settings) -> int:
    bucket = check_bucket(args.bucket.removeprefix(SCHEME).rstrip("/"))
    key = s.key()
    async with open_client(s, key) as c:
        await c.delete_bucket(bucket)
    s.say(f"removed bucket {bucket}")
    return EXIT_OK


async def require_bucket(c: CliClient, bucket: str) -> None:
    if await c.chain.get_bucket(bucket) is None:
        raise ChainError("BUCKET_NOT_FOUND", f"no bucket {bucket!r} on the chain "
                         f"(make it with 'gfsp mb {bucket}')")


def prepare_put(args: argparse.Namespace, s: Settings) -> None:
    """Check what put needs locally (before any request): the file, the names, the key."""
    source = Path(args.file)
    args.names = parse_target(args.target, default_name=source.name)
    if not source.exists():
        raise UsageError(f"{source}: no such file")
    if not source.is_file():
        raise UsageError(f"{source}: not a regular file")
    if not os.access(source, os.R_OK):
        raise UsageError(f"{source}: permission denied")
    args.key_ = s.key()


async def cmd_put(args: argparse.Namespace, s: Settings) -> int:
    source = Path(args.file)
    bucket, name = args.names
    content_type = (args.content_type or mimetypes.guess_type(source.name)[0]
                    or "application/octet-stream")
    key = args.key_
    s.load_manifest(required=False)
    bar = Progress(s.show_progress())
    target = f"{SCHEME}{bucket}/{name}"
    async with open_client(s, key) as c:
        await require_bucket(c, bucket)  # before hashing what may be a big file
        try:
            bar.start("hashing  ", (await trio.Path(source).stat()).st_size)
            size, checksums = await c.file_checksums(source, progress=bar.advance)
            bar.finish()
            existing = await c.chain.get_object(bucket, name)
            if existing is None:
                await c.create_object(bucket, name, size=size, checksums=checksums,
                                      content_type=content_type)
            elif existing.size != size or list(existing.checksums) != checksums:
                raise ChainError("OBJECT_EXISTS", f"{target} already exists with other "
                                 "content (remove it first: gfsp rm)")
            elif existing.sealed:
                s.say(f"{target} is already stored and sealed ({size} bytes)")
                return EXIT_OK
            # else: created by an earlier put with this content: upload it again
            bar.start("uploading", size)
            await c.put_file(bucket, name, source, size=size, progress=bar.advance)
            bar.finish()
            if args.no_wait:
                s.say(f"uploaded {source} to {target} ({size} bytes); sealing continues on "
                      f"the SPs ('gfsp head {bucket}/{name}' shows its status)")
                return EXIT_OK
            bar.start("sealing  ", None)
            obj = await wait_sealed(c, bucket, name, args.seal_timeout, bar)
            bar.finish()
        finally:
            bar.finish()
    s.say(f"put {source} -> {target}: {size} bytes, sealed (object id {obj.id}, "
          f"{len(obj.secondaries)} secondary SPs)")
    return EXIT_OK


#: Seconds between two questions to the primary about a put's seal (its upload progress)
ASK_PRIMARY_EVERY = 2.0


async def wait_sealed(c: CliClient, bucket: str, name: str, timeout: float,
                      bar: Progress, *, poll: float = 0.25,
                      ask_every: float = ASK_PRIMARY_EVERY) -> Any:
    """The object once the chain says it is sealed. Every ``ask_every`` seconds the primary
    is asked how its replication goes: one it gave up on (state FAILED, its retries spent)
    ends the wait at once with its error, rather than at ``timeout``; a primary that does
    not answer is named on the progress line and in the timeout's message."""
    silent = ""  # why the primary did not answer its last question ("" when it did)
    next_ask = trio.current_time() + ask_every
    try:
        with trio.fail_after(timeout):
            while True:
                obj = await c.chain.get_object(bucket, name)
                if obj is None:
                    raise ChainError("OBJECT_NOT_FOUND",
                                     f"{bucket}/{name} disappeared from the chain while sealing")
                if obj.sealed:
                    return obj
                if trio.current_time() >= next_ask:
                    silent = await _ask_primary(c, bucket, name, ask_every)
                    next_ask = trio.current_time() + ask_every
                bar.tick(f"(primary SP: {silent})" if silent else "")
                await trio.sleep(poll)
    except trio.TooSlowError:
        why = f"; the primary SP does not answer: {silent}" if silent else ""
        raise Failure(f"uploaded, but not sealed within {timeout:g} s{why} (see 'gfsp head "
                      f"{bucket}/{name}' later, or wait longer with --seal-timeout)") from None


async def _ask_primary(c: CliClient, bucket: str, name: str, within: float) -> str:
    """Ask the primary for the upload's progress: raise :class:`Failure` if it gave up; else
    "" if it answered, or why it did not."""
    with trio.move_on_after(within):
        try:
            progress = await c.upload_progress(bucket, name)
        except (SPError, SPUnavailable) as exc:
            return str(exc)
        if isinstance(progress, dict) and progress.get("state") == "FAILED":
            raise Failure(f"uploaded, but the primary SP gave up sealing {bucket}/{name}: "
                          f"{progress.get('error') or 'no reason given'} ('gfsp put' again "
                          "uploads it again)")
        return ""
    return f"no answer within {within:g} s"


class SegmentVerifier:
    """The object's primary integrity hash from its bytes as they stream by: SHA-256 per
    segment, then SHA-256 over those (as :class:`node.ec.ChecksumBuilder` computes it)."""

    def __init__(self, segment_size: int) -> None:
        self.segment_size = segment_size
        self.hashes: list[bytes] = []
        self._h = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), self.segment_size - self._filled)
            self._h.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.segment_size:
                self.hashes.append(self._h.digest())
                self._h, self._filled = hashlib.sha256(), 0

    def result(self) -> bytes:
        tail = [self._h.digest()] if self._filled else []
        return integrity_hash([*self.hashes, *tail])


def output_path(out: str | None, name: str) -> Path:
    """Where ``get`` writes: OUT, or the object's last name part (in OUT when it is a folder);
    a symbolic link is followed (its target gets the data, the link stays)."""
    base = PurePosixPath(name).name
    path = Path(out) if out is not None else None
    if path is None or path.is_dir():
        if base in ("", ".", ".."):
            raise UsageError(f"the object name {name!r} gives no file name: name the output "
                             "file (gfsp get BUCKET/OBJECT OUT)")
        path = Path(base) if path is None else path / base
    if path.is_symlink():
        path = path.resolve()
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such folder")
    return path


def prepare_get(args: argparse.Namespace, s: Settings) -> None:
    if args.out == "-" and sys.stdout is None:  # started with stdout closed (>&-)
        raise UsageError("standard output is closed: give an output file")
    args.names = parse_target(args.target)
    args.byte_range = parse_range(args.range)
    args.out_path = None if args.out == "-" else output_path(args.out, args.names[1])
    args.key_ = s.key()


async def cmd_get(args: argparse.Namespace, s: Settings) -> int:
    bucket, name = args.names
    byte_range = args.byte_range
    to_stdout = args.out == "-"
    out = args.out_path
    key = args.key_
    bar = Progress(s.show_progress(data_on_stdout=to_stdout))
    async with open_client(s, key) as c:
        await require_bucket(c, bucket)
        obj = await c.chain.get_object(bucket, name)
        if obj is None:
            raise ChainError("OBJECT_NOT_FOUND", f"no object {name!r} in bucket {bucket!r}")
        if byte_range is None:
            expected = obj.size
            verifier: SegmentVerifier | None = SegmentVerifier(
                (await c.chain.params()).segment_size)
        else:
            low, high = byte_range
            last = obj.size - 1 if high is None else min(high, obj.size - 1)
            expected = max(last - low + 1, 0)
            verifier = None
        try:
            bar.start("downloading", expected)
            if to_stdout:
                sys.stdout.flush()
                out_raw = getattr(sys.stdout.buffer, "raw", sys.stdout.buffer)
                got = await download(c, bucket, name, byte_range, StreamSink(out_raw), bar,
                                     verifier)
            else:
                assert out is not None
                got = await download_to_file(c, bucket, name, byte_range, out, bar, verifier,
                                             expected, obj.checksums[0])
        finally:
            bar.finish()
    if to_stdout:
        check_download(got, expected, verifier, obj.checksums[0])
    else:
        s.say(f"got {SCHEME}{bucket}/{name} -> {out}: {got} bytes"
              + (", integrity checked" if verifier is not None else ""))
    return EXIT_OK


def check_download(got: int, expected: int, verifier: SegmentVerifier | None,
                   integrity: bytes) -> None:
    if got != expected:
        raise Failure(f"the SP sent {got} bytes, expected {expected}")
    if verifier is not None and verifier.result() != integrity:
        raise Failure("the data does not match the object's integrity hash on the chain")


class StreamSink:
    """Writes to a pipe, FIFO or device (an unbuffered file: no lock that a thread left
    blocked would hold at exit) in a worker thread that a cancel (SIGTERM, Ctrl-C) leaves
    behind: a reader that does not read holds that thread, not the command."""

    def __init__(self, raw: io.RawIOBase) -> None:
        self.raw = raw

    def _write_all(self, data: bytes) -> None:
        with memoryview(data) as view:
            while view:
                n = self.raw.write(view)
                if not n:  # a non-blocking output that is full
                    raise BlockingIOError("the output took no bytes")
                view = view[n:]

    async def write(self, data: bytes) -> None:
        await trio.to_thread.run_sync(self._write_all, data, abandon_on_cancel=True)

    async def flush(self) -> None:
        """Nothing is buffered here."""


async def download(c: CliClient, bucket: str, name: str,
                   byte_range: tuple[int, int | None] | None, sink: Any, bar: Progress,
                   verifier: SegmentVerifier | None) -> int:
    """Stream the object into ``sink`` (a trio async file), written in blocks of up to
    :data:`WRITE_BLOCK`; the byte count."""
    got = 0
    block = bytearray()
    async with contextlib.aclosing(c.get_object(bucket, name, byte_range=byte_range)) as chunks:
        async for chunk in chunks:
            block += chunk
            got += len(chunk)
            if verifier is not None:
                verifier.update(chunk)
            bar.advance(len(chunk))
            if len(block) >= WRITE_BLOCK:
                await sink.write(bytes(block))
                block.clear()
    if block:
        await sink.write(bytes(block))
    await sink.flush()
    return got


async def download_to_file(c: CliClient, bucket: str, name: str,
                           byte_range: tuple[int, int | None] | None, out: Path, bar: Progress,
                           verifier: SegmentVerifier | None, expected: int,
                           integrity: bytes) -> int:
    """Download into a temporary file beside ``out``, checked, then renamed to ``out``; into
    ``out`` itself when it exists and is no regular file (a device such as /dev/null, a
    FIFO): those are written, never replaced."""
    target = trio.Path(out)
    if await target.exists() and not await target.is_file():
        # opening a FIFO waits for its reader: in a thread a cancel (SIGTERM) may leave
        raw = await trio.to_thread.run_sync(partial(open, out, "wb", buffering=0),
                                            abandon_on_cancel=True)
        try:
            got = await download(c, bucket, name, byte_range, StreamSink(raw), bar, verifier)
        finally:
            raw.close()
        check_download(got, expected, verifier, integrity)
        return got
    tmp = trio.Path(out.with_name(f".{out.name}.{secrets.token_hex(4)}.gfsp-part"))
    try:
        f = await trio.open_file(tmp, "xb")
        async with f:
            got = await download(c, bucket, name, byte_range, f, bar, verifier)
            await trio.to_thread.run_sync(os.fsync, f.fileno())
        check_download(got, expected, verifier, integrity)
        await tmp.replace(out)
        return got
    finally:
        with trio.CancelScope(shield=True):  # also when cancelled (SIGTERM)
            await tmp.unlink(missing_ok=True)


async def cmd_ls(args: argparse.Namespace, s: Settings) -> int:
    s.load_manifest(required=False)
    if args.target is None:
        key = s.key()
        async with open_client(s, key) as c:
            buckets = await c.chain.list_buckets(key.address)
        if args.json:
            print(json.dumps([dataclasses.asdict(b) for b in buckets], indent=1))
        else:
            for b in buckets:
                print(f"{b.name}  (id {b.id}, primary {s.sp_name(b.primary_sp)})")
        return EXIT_OK
    bucket, prefix = parse_target(args.target, need_object=False)
    key = s.key()
    objects: list[dict[str, Any]] = []
    async with open_client(s, key) as c:
        start_after = ""
        while True:
            page = await c.list_objects(bucket, prefix=prefix, start_after=start_after)
            if args.json:
                objects.extend(page["objects"])
            else:
                for o in page["objects"]:
                    print(f"{o['status']:<8}{o['size']:>14}  {o['name']}", flush=True)
            start_after = page.get("next_start_after")
            if not start_after:
                break
    if args.json:
        print(json.dumps(objects, indent=1))
    return EXIT_OK


async def cmd_head(args: argparse.Namespace, s: Settings) -> int:
    bucket, name = parse_target(args.target)
    key = s.key()
    s.load_manifest(required=False)
    async with open_client(s, key) as c:
        meta = await c.object_meta(bucket, name)
        progress = None
        if meta.get("status") != "SEALED":
            with contextlib.suppress(SPError, SPUnavailable):
                progress = await c.upload_progress(bucket, name)
    if args.json:
        print(json.dumps(meta if progress is None else {**meta, "upload": progress}, indent=1))
        return EXIT_OK
    checksums = meta.get("checksums") or []
    rows = [("object", f"{SCHEME}{meta.get('bucket')}/{meta.get('name')}"),
            ("id", meta.get("id")), ("size", meta.get("size")),
            ("content type", meta.get("content_type")), ("status", meta.get("status")),
            ("owner", meta.get("owner")), ("created at height", meta.get("create_height")),
            ("sealed at height", meta.get("seal_height")),
            ("integrity hash", checksums[0] if checksums else None),
            ("secondary SPs", ", ".join(s.sp_name(op) for op in meta.get("secondaries") or [])
             or "-")]
    if progress is not None:
        rows.append(("upload", f"{progress.get('state')}, {progress.get('bytes_done')} bytes"
                     + (f", error: {progress['error']}" if progress.get("error") else "")))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 1}} {'-' if v is None else v}")
    return EXIT_OK


async def cmd_rm(args: argparse.Namespace, s: Settings) -> int:
    bucket, name = parse_target(args.target)
    key = s.key()
    async with open_client(s, key) as c:
        await c.delete_object(bucket, name)
    s.say(f"removed {SCHEME}{bucket}/{name}")
    return EXIT_OK


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


# --- errors -------------------------------------------------------------------------------------


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException, s: Settings | None) -> tuple[int, str]:
    """(exit code, reason) of an exception: one line, no traceback."""
    chain = f" at {s.chain or (s.manifest.chain.endpoint if s.manifest else '?')}" if s else ""
    if isinstance(exc, UsageError | ManifestError | KeyFileError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, Failure):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, SPError):
        msg = f"{exc.code}: {exc.message}" if exc.message else exc.code
        return EXIT_FAILED, f"{msg} (HTTP {exc.status})"
    if isinstance(exc, SPUnavailable):
        return EXIT_FAILED, f"SP unreachable: {exc}"
    if isinstance(exc, ChainUnavailable):
        return EXIT_FAILED, f"chain unreachable{chain}: {exc.reason}"
    if isinstance(exc, ChainError):
        return EXIT_FAILED, f"{exc.code}: {exc.reason}"
    if isinstance(exc, trio.TooSlowError):
        return EXIT_FAILED, "timed out"
    if isinstance(exc, OSError):
        if exc.strerror and exc.filename:
            return EXIT_FAILED, f"{exc.filename}: {exc.strerror}"
        return EXIT_FAILED, str(exc) or type(exc).__name__
    if isinstance(exc, GfspError):
        return EXIT_FAILED, str(exc)
    return EXIT_FAILED, f"unexpected {type(exc).__name__}: {exc}"


def what(args: argparse.Namespace) -> str:
    """``put demo/a.txt``: the command and its target, for the error line."""
    cmd = args.command
    if cmd == "account":
        return f"account {args.action}"
    for attr in ("target", "bucket"):
        value = getattr(args, attr, None)
        if value:  # control characters shown escaped: the error stays one line
            return f"{cmd} " + _CONTROL.sub(lambda m: repr(m.group())[1:-1], value)
    return cmd


# --- command line -------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (and exit code 2 from :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        sub = self.prog.removeprefix("gfsp").strip()
        raise UsageError(f"{sub + ': ' if sub else ''}{message} (see '{self.prog} --help')")


def positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _common_options(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # given before or after the command; unset ones are filled in later
    p.add_argument("--testnet", metavar="D", default=S,
                   help=f"testnet folder: its testnet.toml and {KEY_NAME} (default ./testnet-data)")
    p.add_argument("--chain", metavar="URL", default=S, help="chain endpoint (default: the "
                   "testnet's)")
    p.add_argument("--endpoint", metavar="URL", default=S,
                   help="send every SP request here (default: the bucket's primary SP)")
    p.add_argument("--key", metavar="FILE", default=S, help=f"account key (default D/{KEY_NAME})")
    p.add_argument("--timeout", metavar="S", type=positive, default=S,
                   help=f"seconds per request (default {DEFAULT_TIMEOUT:g})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", dest="progress", action="store_const", const=True, default=S,
                   help="progress lines on stderr even when stdout is not a terminal")
    g.add_argument("--no-progress", dest="progress", action="store_const", const=False,
                   default=S, help="no progress lines")
    p.add_argument("-q", "--quiet", action="store_true", default=S,
                   help="no progress, no messages (errors and data only)")


def build_parser() -> Parser:
    parser = Parser(prog="gfsp", description="Store objects on gfsp storage providers.",
                    epilog="Exit codes: 0 ok, 1 an operation failed, 2 bad usage.")
    _common_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text)
        _common_options(p)
        return p

    p = add("account", "create or show the account key")
    p.add_argument("action", choices=["new", "show"])
    p = add("sps", "list the SPs on the chain")
    p.add_argument("--json", action="store_true")
    p = add("mb", "make a bucket")
    p.add_argument("bucket", metavar="BUCKET")
    p.add_argument("--primary", metavar="OPERATOR|INDEX",
                   help="the primary SP: an operator address or the testnet's SP index "
                        "(default: the SP of --endpoint, else the testnet's sp0, else, with "
                        "--chain alone, a random SP in service)")
    p = add("rb", "remove an empty bucket")
    p.add_argument("bucket", metavar="BUCKET")
    p = add("put", "upload a file: approve, create on chain, upload, wait until sealed")
    p.add_argument("file", metavar="FILE")
    p.add_argument("target", metavar="BUCKET[/OBJECT]")
    p.add_argument("--no-wait", action="store_true", help="return once uploaded, not sealed")
    p.add_argument("--content-type", metavar="TYPE", help="default: guessed from the name")
    p.add_argument("--seal-timeout", metavar="S", type=positive, default=DEFAULT_SEAL_TIMEOUT,
                   help="seconds to wait until sealed (default %(default)g)")
    p = add("get", "download an object (to OUT, default its base name here; - for stdout)")
    p.add_argument("target", metavar="BUCKET/OBJECT")
    p.add_argument("out", metavar="OUT", nargs="?")
    p.add_argument("--range", metavar="A-B", help="inclusive byte range (A- to the end)")
    p = add("ls", "list your buckets, or a bucket's objects")
    p.add_argument("target", metavar="BUCKET[/PREFIX]", nargs="?")
    p.add_argument("--json", action="store_true")
    p = add("head", "an object's metadata")
    p.add_argument("target", metavar="BUCKET/OBJECT")
    p.add_argument("--json", action="store_true")
    p = add("rm", "remove an object")
    p.add_argument("target", metavar="BUCKET/OBJECT")
    return parser


PREPARE: dict[str, Any] = {"put": prepare_put, "get": prepare_get}
COMMANDS: dict[str, Any] = {"sps": cmd_sps, "mb": cmd_mb, "rb": cmd_rb, "put": cmd_put,
                            "get": cmd_get, "ls": cmd_ls, "head": cmd_head, "rm": cmd_rm}


EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class OutputClosed(Exception):
    """The reader of stdout went away (``gfsp get x - | head``): the reader's choice."""


@contextlib.contextmanager
def _no_sigpipe_noise() -> Iterator[None]:
    """A closed stdout ends the command quietly (exit 141, as a program killed by SIGPIPE):
    no message, and no second error when Python flushes stdout at exit."""
    try:
        yield
    except (BrokenPipeError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and not isinstance(unwrap(exc), BrokenPipeError):
            raise
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        raise OutputClosed() from None


class Terminated(Exception):
    """SIGTERM came: the command was cancelled (and cleaned up after itself)."""


async def _until_sigterm(command: Callable[[argparse.Namespace, Settings], Awaitable[int]],
                         args: argparse.Namespace, s: Settings) -> int:
    """Run ``command``; SIGTERM (``timeout``, systemd, kill) cancels it, as Ctrl-C interrupts
    it, so that its cleanup runs (a get leaves no partial file), then :class:`Terminated`."""
    result: list[int] = []
    async with trio.open_nursery() as nursery:
        async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                task_status.started()
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        await nursery.start(watch)
        result.append(await command(args, s))
        nursery.cancel_scope.cancel()
    if not result:
        raise Terminated()
    return result[0]


def main(argv: list[str] | None = None) -> int:
    s: Settings | None = None
    label = "gfsp"
    try:
        args = build_parser().parse_args(argv)
        label = what(args)
        s = Settings.from_args(args)
        with _no_sigpipe_noise():
            if args.command == "account":
                return cmd_account(args, s)
            s.chain_endpoint()  # a usage error first when there is no testnet or chain
            if args.command in PREPARE:
                PREPARE[args.command](args, s)
            return trio.run(_until_sigterm, COMMANDS[args.command], args, s)
    except Terminated:
        print(f"gfsp: {label}: terminated", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except OutputClosed:
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return _report(label, KeyboardInterrupt(), s)
    except BaseExceptionGroup as group:  # a nursery's: report the error it stands for
        return _report(label, unwrap(group), s)
    except Exception as exc:  # noqa: BLE001 - every error is one line, never a traceback
        return _report(label, exc, s)


def _report(label: str, exc: BaseException, s: Settings | None) -> int:
    if isinstance(exc, KeyboardInterrupt):
        print(f"gfsp: {label}: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if os.environ.get("GFSP_DEBUG"):
        raise exc
    code, reason = describe(exc, s)
    prefix = "gfsp: " if label == "gfsp" else f"gfsp: {label}: "  # "gfsp": a parse error
    print(one_line(prefix + reason), file=sys.stderr, flush=True)
    return code

if __name__ == "__main__":
    sys.exit(main())
