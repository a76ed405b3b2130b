"""Request authentication of the gater: SigV4-like canonical requests signed with ed25519.

Shared by the gater (verifying) and the client library (signing); no HTTP-server imports.

A request names its signer's account and carries the signer's public key; the gater checks the
signature over the *canonical request* and that the account is the key's address
(:func:`node.crypto.address_of`). Nothing is accepted unverified.

Headers a client adds (:func:`sign_request` returns them)::

    x-gfsp-content-sha256: <64 lowercase hex: sha256 of the body> | UNSIGNED-PAYLOAD
    authorization: GFSP1-ED25519 Account=<0x address>,PubKey=<64 hex>,Expiry=<unix seconds>,
        Nonce=<32 hex>,SignedHeaders=<h1;h2;...>,Signature=<128 hex>

(one line; fields in any order, separated by ``,`` with optional spaces; every hex value
lowercase). ``SignedHeaders`` lists lowercase header names, sorted, without repeats; it always
contains ``host`` and ``x-gfsp-content-sha256`` and every other ``x-gfsp-*`` header the request
carries (:func:`sign_request` also signs ``content-type``, ``content-md5`` and ``range`` when
given).

The canonical request is the ``"\\n"``-join of, in order:

1. ``GFSP1-ED25519`` (the scheme, also a domain separator),
2. the method, upper case,
3. the raw path, percent-encoded exactly as sent on the request line (no query),
4. the canonical query: each ``(key, value)`` pair of the decoded query percent-encoded as
   RFC 3986 (UTF-8; every byte but ``A-Z a-z 0-9 - _ . ~`` as ``%XX`` upper case), joined
   ``key=value``, sorted by encoded key then encoded value, joined with ``&`` (empty: ``""``),
5. the canonical headers: one ``name:value`` per signed header in ``SignedHeaders`` order, name
   lower case, value with surrounding whitespace trimmed (repeated headers joined with ``,``),
   joined with ``"\\n"``,
6. ``SignedHeaders``,
7. the payload hash (the ``x-gfsp-content-sha256`` value),
8. the expiry (decimal unix seconds),
9. the nonce (32 lowercase hex),
10. the account (``0x`` + 40 lowercase hex).

The signature is ed25519 over the UTF-8 bytes of that string.

Refusals are :class:`AuthError` (a :class:`~node.errors.ServiceError`): see :data:`CODES`.
``MalformedAuthorization`` is 401, not 400: a request whose credentials cannot be parsed is an
unauthenticated request, and 401 (with ``WWW-Authenticate``) tells the client to authenticate
properly; a 400 would suggest the rest of the request is wrong. ``ExpiredRequest`` is 403: the
credentials were understood and are refused, as for a bad signature.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import secrets
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from node.crypto import PrivateKey, address_of, is_address, verify
from node.errors import ServiceError, ServiceUnavailable, SignatureError

__all__ = [
    "AUTHORIZATION_HEADER",
    "CODES",
    "CONTENT_SHA256_HEADER",
    "DEFAULT_REPLAY_ENTRIES",
    "DEFAULT_REPLAY_PER_ACCOUNT",
    "SCHEME",
    "UNSIGNED_PAYLOAD",
    "AuthError",
    "ReplayCache",
    "VerifiedRequest",
    "canonical_query",
    "canonical_request",
    "new_nonce",
    "parse_authorization",
    "parse_query",
    "payload_sha256",
    "quote_path",
    "sign_request",
    "verify_request",
]

SCHEME = "GFSP1-ED25519"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
AUTHORIZATION_HEADER = "authorization"
CONTENT_SHA256_HEADER = "x-gfsp-content-sha256"
#: Headers every signature covers.
ALWAYS_SIGNED: tuple[str, ...] = ("host", CONTENT_SHA256_HEADER)
#: Headers :func:`sign_request` signs when present (plus every ``x-gfsp-*`` header).
SIGNABLE_HEADERS: frozenset[str] = frozenset({"host", "content-type", "content-md5", "range"})
GFSP_HEADER_PREFIX = "x-gfsp-"

#: Every AuthError code and its HTTP status.
CODES: dict[str, int] = {
    "MissingAuthentication": 401,
    "MalformedAuthorization": 401,
    "ExpiredRequest": 403,
    "ExpiryTooFar": 403,
    "SignatureDoesNotMatch": 403,
    "AccountMismatch": 403,
    "ReplayedRequest": 403,
    "ContentSha256Mismatch": 400,
    "UnsignedPayloadNotAllowed": 400,
}

#: Bound of a :class:`ReplayCache` unless told otherwise (about 300 bytes an entry: ~30 MB).
DEFAULT_REPLAY_ENTRIES = 100_000
#: Live pairs one account may hold in a :class:`ReplayCache` unless told otherwise: more than a
#: client at the gater's default rate limit (50/s, burst 100) signing 300 s expiries reaches.
DEFAULT_REPLAY_PER_ACCOUNT = 20_000
#: The longest Authorization header value accepted (a well-formed one is ~400 characters).
MAX_AUTHORIZATION_LEN = 2048
NONCE_LEN = 16

_FIELDS = ("Account", "PubKey", "Expiry", "Nonce", "SignedHeaders", "Signature")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_EXPIRY = re.compile(r"[0-9]{1,12}")
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


class AuthError(ServiceError):
    """A request that failed authentication; ``code`` is one of :data:`CODES`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, CODES[code])


@dataclass(frozen=True)
class VerifiedRequest:
    """What a verified signature proves. ``payload_sha256`` is None for UNSIGNED-PAYLOAD:
    whoever reads the body must check it against a non-None value
    (``ContentSha256Mismatch``)."""

    account: str
    pubkey: bytes
    expiry: int
    nonce: bytes
    payload_sha256: str | None


@dataclass(frozen=True)
class Credentials:
    """A parsed Authorization header (not verified yet)."""

    account: str
    pubkey: bytes
    expiry: int
    nonce: bytes
    signed_headers: tuple[str, ...]
    signature: bytes


# --- canonical forms ------------------------------------------------------------------------


def _rfc3986(s: str) -> str:
    return quote(s, safe="-_.~")


def quote_path(path: str) -> str:
    """Percent-encode a decoded path for the request line (``/`` kept): what a client sends
    and signs. ``quote_path("/gfsp/v1/objects/b/a b") == "/gfsp/v1/objects/b/a%20b"``.

    Segments ``.`` and ``..`` become ``%2E`` and ``%2E%2E``, so that HTTP clients (httpx
    removes dot segments) send the path unchanged and an object named ``a/../b`` stays
    addressable."""
    return "/".join("%2E" * len(seg) if seg in (".", "..") else quote(seg, safe="-_.~")
                    for seg in path.split("/"))


def payload_sha256(body: bytes) -> str:
    """The ``x-gfsp-content-sha256`` value of a body."""
    return hashlib.sha256(body).hexdigest()


def new_nonce() -> bytes:
    """A fresh random 16-byte nonce."""
    return secrets.token_bytes(NONCE_LEN)


def parse_query(query_string: str | bytes) -> list[tuple[str, str]]:
    """Decode a raw query string into pairs (``+`` is a space; blank values kept)."""
    if isinstance(query_string, bytes):
        query_string = query_string.decode("latin-1")
    return parse_qsl(query_string, keep_blank_values=True)


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    """RFC 3986-encoded ``k=v`` pairs sorted by encoded key, then encoded value, ``&``-joined."""
    pairs = sorted((_rfc3986(k), _rfc3986(v)) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _normalize_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]
                       ) -> dict[str, str]:
    """Lower-cased names; repeated headers joined with ``,`` (values trimmed)."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        key = name.strip().lower()
        value = value.strip()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def canonical_request(*, method: str, raw_path: str, query: Iterable[tuple[str, str]],
                      headers: Mapping[str, str], signed_headers: Iterable[str],
                      payload_hash: str, expiry: int, nonce: bytes, account: str) -> str:
    """The canonical request string (see the module doc). ``headers`` has lower-case names."""
    names = list(signed_headers)
    for name in names:
        if name not in headers:
            raise KeyError(name)
    lines = [f"{name}:{headers[name].strip()}" for name in names]
    return "\n".join([
        SCHEME,
        method.upper(),
        raw_path,
        canonical_query(query),
        "\n".join(lines),
        ";".join(names),
        payload_hash,
        str(int(expiry)),
        nonce.hex(),
        account,
    ])


def _signable(name: str) -> bool:
    return name in SIGNABLE_HEADERS or name.startswith(GFSP_HEADER_PREFIX)


# --- signing (client side) ------------------------------------------------------------------


def sign_request(key: PrivateKey, method: str, url_path: str, query: Iterable[tuple[str, str]],
                 headers: Mapping[str, str], payload_sha256: str | None, expiry: int,
                 nonce: bytes) -> dict[str, str]:
    """The headers to add to a request so the gater accepts it: ``x-gfsp-content-sha256`` and
    ``authorization``.

    ``url_path`` is the path exactly as it goes on the request line (see :func:`quote_path`);
    ``query`` the decoded pairs (the client may encode them any valid way); ``headers`` the
    request's headers, which must include ``host`` exactly as sent (``"127.0.0.1:9033"``).
    ``payload_sha256`` is the body's hex sha256 (:func:`payload_sha256`; ``sha256(b"")`` for
    no body), or None for UNSIGNED-PAYLOAD (refused by routes that act on their body).
    ``expiry`` is the unix second after which the request is void (the gater refuses expiries
    further ahead than its ``max_signature_age``, 15 minutes by default; sign each request
    with the same lifetime, a few minutes, see :class:`ReplayCache`); ``nonce`` 16 random
    bytes (:func:`new_nonce`), never reused while the request could still be valid.
    Raises ValueError for arguments that could not be verified.
    """
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"nonce must have {NONCE_LEN} bytes")
    if isinstance(expiry, bool) or not isinstance(expiry, int) or not 0 <= expiry < 10**12:
        raise ValueError("expiry must be a non-negative int of unix seconds")
    if payload_sha256 is None:
        payload_sha256 = UNSIGNED_PAYLOAD
    elif not _HEX64.fullmatch(payload_sha256):
        raise ValueError("payload_sha256 must be 64 lowercase hex digits or None")
    hdrs = _normalize_headers(headers)
    for name, value in hdrs.items():
        if not _HEADER_NAME.fullmatch(name) or "\n" in value or "\r" in value:
            raise ValueError(f"header {name!r} cannot be signed")
    if "host" not in hdrs:
        raise ValueError("headers must include host")
    given = hdrs.get(CONTENT_SHA256_HEADER)
    if given is not None and given != payload_sha256:
        raise ValueError(f"headers carry a different {CONTENT_SHA256_HEADER}")
    hdrs[CONTENT_SHA256_HEADER] = payload_sha256
    signed = sorted(name for name in hdrs if _signable(name))
    account = key.address
    text = canonical_request(method=method, raw_path=url_path, query=query, headers=hdrs,
                             signed_headers=signed, payload_hash=payload_sha256, expiry=expiry,
                             nonce=nonce, account=account)
    signature = key.sign(text.encode("utf-8"))
    auth = (f"{SCHEME} Account={account},PubKey={key.public_key.hex()},Expiry={expiry},"
            f"Nonce={nonce.hex()},SignedHeaders={';'.join(signed)},Signature={signature.hex()}")
    return {CONTENT_SHA256_HEADER: payload_sha256, AUTHORIZATION_HEADER: auth}


# --- verifying (server side) ----------------------------------------------------------------


def _malformed(message: str) -> AuthError:
    return AuthError("MalformedAuthorization", message)


def parse_authorization(value: str) -> Credentials:
    """Parse an Authorization header value; :class:`AuthError` MalformedAuthorization."""
    if len(value) > MAX_AUTHORIZATION_LEN:
        raise _malformed("the Authorization header is too long")
    scheme, _, rest = value.strip().partition(" ")
    if scheme != SCHEME:
        raise _malformed(f"the Authorization scheme must be {SCHEME}")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, sep, field_value = part.strip().partition("=")
        if not sep:
            raise _malformed(f"Authorization field {name[:40]!r} has no value")
        if name not in _FIELDS:
            raise _malformed(f"unknown Authorization field {name[:40]!r}")
        if name in fields:
            raise _malformed(f"Authorization field {name} appears twice")
        fields[name] = field_value.strip()
    missing = [name for name in _FIELDS if name not in fields]
    if missing:
        raise _malformed(f"Authorization lacks {', '.join(missing)}")
    if not is_address(fields["Account"]):
        raise _malformed("Account must be 0x and 40 lowercase hex digits")
    if not _HEX64.fullmatch(fields["PubKey"]):
        raise _malformed("PubKey must be 64 lowercase hex digits")
    if not _EXPIRY.fullmatch(fields["Expiry"]):
        raise _malformed("Expiry must be unix seconds")
    if not _HEX32.fullmatch(fields["Nonce"]):
        raise _malformed("Nonce must be 32 lowercase hex digits")
    if not _HEX128.fullmatch(fields["Signature"]):
        raise _malformed("Signature must be 128 lowercase hex digits")
    signed = tuple(fields["SignedHeaders"].split(";"))
    if not all(_HEADER_NAME.fullmatch(h) for h in signed):
        raise _malformed("SignedHeaders must be lowercase header names joined with ';'")
    if list(signed) != sorted(set(signed)):
        raise _malformed("SignedHeaders must be sorted, without repeats")
    for name in ALWAYS_SIGNED:
        if name not in signed:
            raise _malformed(f"SignedHeaders must include {name}")
    return Credentials(account=fields["Account"], pubkey=bytes.fromhex(fields["PubKey"]),
                       expiry=int(fields["Expiry"]), nonce=bytes.fromhex(fields["Nonce"]),
                       signed_headers=signed, signature=bytes.fromhex(fields["Signature"]))


def verify_request(*, method: str, raw_path: str, query: Iterable[tuple[str, str]],
                   headers: Mapping[str, str] | Iterable[tuple[str, str]], now: float,
                   max_age: float, replay: ReplayCache | None = None) -> VerifiedRequest:
    """Verify a request's signature; return what it proves or raise :class:`AuthError`.

    ``raw_path`` is the path as received (percent-encoded, no query); ``query`` the decoded
    pairs (:func:`parse_query`); ``headers`` every request header; ``now`` unix seconds;
    ``max_age`` the furthest ahead an expiry may lie. Checks, in order: credentials present
    and well-formed, signed headers present, expiry (``now <= expiry <= now + max_age``), the
    account is the key's address, the signature, then (when ``replay`` is given) that the
    (account, nonce) pair is new, which records it. The body is not read here: compare it with
    ``payload_sha256`` when reading it.
    """
    hdrs = _normalize_headers(headers)
    value = hdrs.get(AUTHORIZATION_HEADER)
    if value is None:
        raise AuthError("MissingAuthentication",
                        f"this route needs a signed request ({SCHEME} Authorization header)")
    creds = parse_authorization(value)
    for name in creds.signed_headers:
        if name not in hdrs:
            raise _malformed(f"signed header {name} is missing from the request")
    for name in hdrs:
        if name.startswith(GFSP_HEADER_PREFIX) and name not in creds.signed_headers:
            raise _malformed(f"header {name} must be signed")
    content_hash = hdrs[CONTENT_SHA256_HEADER]
    if content_hash != UNSIGNED_PAYLOAD and not _HEX64.fullmatch(content_hash):
        raise _malformed(f"{CONTENT_SHA256_HEADER} must be 64 lowercase hex digits or "
                         f"{UNSIGNED_PAYLOAD}")
    if creds.expiry < now:
        raise AuthError("ExpiredRequest", f"the request expired at {creds.expiry}")
    if creds.expiry > now + max_age:
        raise AuthError("ExpiryTooFar",
                        f"the expiry may be at most {int(max_age)} seconds ahead")
    if address_of(creds.pubkey) != creds.account:
        raise AuthError("AccountMismatch", "Account is not the address of PubKey")
    text = canonical_request(method=method, raw_path=raw_path, query=query, headers=hdrs,
                             signed_headers=creds.signed_headers, payload_hash=content_hash,
                             expiry=creds.expiry, nonce=creds.nonce, account=creds.account)
    try:
        verify(creds.pubkey, text.encode("utf-8", "surrogateescape"), creds.signature)
    except (SignatureError, UnicodeEncodeError):
        raise AuthError("SignatureDoesNotMatch",
                        "the signature does not match the request") from None
    if replay is not None:
        replay.check_and_add(creds.account, creds.nonce, creds.expiry, now)
    return VerifiedRequest(account=creds.account, pubkey=creds.pubkey, expiry=creds.expiry,
                           nonce=creds.nonce,
                           payload_sha256=None if content_hash == UNSIGNED_PAYLOAD
                           else content_hash)


class _Account:
    """One account's live pairs in a :class:`ReplayCache` and its floor."""

    __slots__ = ("floor", "heap", "pairs")

    def __init__(self) -> None:
        self.pairs: dict[bytes, int] = {}  # nonce -> expiry
        self.heap: list[tuple[int, bytes]] = []  # (expiry, nonce) of ``pairs``, earliest first
        #: The latest expiry of this account's pairs evicted before they expired (None: none
        #: since the last one passed): its requests expiring at or before it are refused.
        self.floor: int | None = None


def _weight(acct: _Account) -> int:
    """Twice the records an account holds (its pairs and floor), plus one if it has a floor:
    accounts are evicted from by weight, so of two holding as many records, the one with a
    floor gives one up first (it frees a record by losing one pair, not two). 4 or more: it
    can free a record."""
    return 2 * len(acct.pairs) + (3 if acct.floor is not None else 0)


class ReplayCache:
    """The (account, nonce) pairs of accepted requests, each kept until its request expires.

    A replay is never accepted: a pair is forgotten before it expires only with a *floor*
    saying that requests of its account expiring at or before it are refused (503
    ``SlowDown``, retry with a later expiry). Floors are per account, so that one account's
    flood gets only its own requests refused:

    - an account holds at most ``max_per_account`` live pairs (default
      :data:`DEFAULT_REPLAY_PER_ACCOUNT`); past that its own requests are refused
      (503 ``SlowDown``, Retry-After when its earliest pair expires) and nobody else's;
    - the cache holds at most ``max_entries`` records (default :data:`DEFAULT_REPLAY_ENTRIES`):
      live pairs plus one floor per account. When full, an account holding the most records
      (of those, one with a floor, then the last to get there) gives up its earliest pair,
      raising its floor to that pair's expiry; one without a floor gives up two, so that a
      record is freed. A client signing every request with the same lifetime (the client
      library and the SPs sign 300 s) is not refused even then: a fresh request expires after
      the pairs it gave up, unless signed within the same second;
    - when no account can give a pair up (every account holds one record: a flood of more
      fresh accounts than ``max_entries`` within ``max_signature_age``), the earliest record
      is *spilled*: its expiry raises the floor of one of ``spill_slots`` slots (default
      ``max_entries``, 8 bytes each), shared by the accounts a keyed hash (secret per process)
      maps to it. Such a flood thus refuses the short expiries of a share of the accounts (the
      slots it covered) while it lasts, rather than every request, and never lets a replay in.

    Expired pairs and passed floors are dropped first. Not thread safe; trio tasks calling it
    need no lock (no checkpoints inside).
    """

    def __init__(self, max_entries: int = DEFAULT_REPLAY_ENTRIES,
                 max_per_account: int = DEFAULT_REPLAY_PER_ACCOUNT,
                 spill_slots: int | None = None) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if max_per_account < 1:
            raise ValueError("max_per_account must be >= 1")
        if spill_slots is not None and spill_slots < 1:
            raise ValueError("spill_slots must be >= 1")
        self.max_entries = max_entries
        self.max_per_account = max_per_account
        self.spill_slots = max_entries if spill_slots is None else spill_slots
        self._accounts: dict[str, _Account] = {}
        # every pair by expiry, to drop expired ones; an evicted pair stays until popped
        # (``_stale`` of them) or until the heap is rebuilt
        self._heap: list[tuple[int, str, bytes]] = []
        self._stale = 0
        self._floors: list[tuple[int, str]] = []  # one (floor, account) per floor, maybe raised
        self._npairs = 0
        self._nfloors = 0
        # accounts by weight (:func:`_weight`), to find one holding the most records
        self._by_weight: dict[int, dict[str, None]] = {}
        self._top = 0
        self._spill: array[int] | None = None  # made at the first spill
        self._spill_max = -1
        self._spill_key = secrets.token_bytes(16)
        self.evicted = 0
        self.spilled = 0

    def __len__(self) -> int:
        """Live pairs."""
        return self._npairs

    def __contains__(self, key: tuple[str, bytes]) -> bool:
        acct = self._accounts.get(key[0])
        return acct is not None and key[1] in acct.pairs

    @property
    def floors(self) -> int:
        """Accounts with a floor (each takes one of the ``max_entries`` records)."""
        return self._nfloors

    def floor_of(self, account: str) -> int | None:
        """The account's own floor (see the class doc), None when it has none."""
        acct = self._accounts.get(account)
        return None if acct is None else acct.floor

    def pairs_of(self, account: str) -> int:
        """The account's live pairs."""
        acct = self._accounts.get(account)
        return 0 if acct is None else len(acct.pairs)

    # --- the checks ------------------------------------------------------------------------

    def check(self, account: str, nonce: bytes, expiry: int, now: float) -> None:
        """Raise what :meth:`check_and_add` would, recording nothing (expired pairs and passed
        floors are dropped)."""
        self._prune(now)
        acct = self._accounts.get(account)
        if acct is not None:
            if nonce in acct.pairs:
                raise AuthError("ReplayedRequest",
                                "this request (account, nonce) was already used")
            if acct.floor is not None and expiry <= acct.floor:
                raise ServiceUnavailable(
                    f"too many recent requests of {account} to tell this one from a replay: "
                    f"sign it again with an expiry after {acct.floor}")
            if len(acct.pairs) >= self.max_per_account:
                raise ServiceUnavailable(
                    f"{account} has {len(acct.pairs)} signed requests that have not expired "
                    f"(at most {self.max_per_account}): slow down, or sign shorter expiries",
                    retry_after=acct.heap[0][0] - now + 1)
        if expiry <= self._spill_max and self._spill is not None:
            spilled = self._spill[self._slot(account)]
            if expiry <= spilled:
                raise ServiceUnavailable(
                    "too many accounts signed requests recently to tell this one from a "
                    f"replay: sign it again with an expiry after {spilled}, or later")

    def check_and_add(self, account: str, nonce: bytes, expiry: int, now: float) -> None:
        """Record the pair; :class:`AuthError` ReplayedRequest if it is already recorded,
        503 ``SlowDown`` (:class:`~node.errors.ServiceUnavailable`) as the class doc says."""
        self.check(account, nonce, expiry, now)
        if self._npairs + self._nfloors >= self.max_entries:
            giver = self._giver()
            if giver is not None:
                self._evict(giver)
            else:
                self._spill_earliest()
        acct = self._accounts.get(account)
        if acct is None:
            acct = self._accounts[account] = _Account()
        weight = _weight(acct)
        acct.pairs[nonce] = expiry
        heapq.heappush(acct.heap, (expiry, nonce))
        heapq.heappush(self._heap, (expiry, account, nonce))
        self._npairs += 1
        self._reweigh(account, acct, weight)

    # --- bookkeeping -----------------------------------------------------------------------

    def _giver(self) -> str | None:
        """The account to evict a pair of: of those holding the most records, one with a
        floor, the one that got there last; None when none can free a record (each holds one:
        a pair or a floor)."""
        while self._top > 0 and self._top not in self._by_weight:
            self._top -= 1
        return next(reversed(self._by_weight[self._top])) if self._top >= 4 else None

    def _reweigh(self, account: str, acct: _Account, old: int) -> None:
        """Index the account again after its weight changed from ``old``."""
        new = _weight(acct)
        if old == new:
            return
        if old:
            same = self._by_weight[old]
            del same[account]
            if not same:
                del self._by_weight[old]
        if new:
            self._by_weight.setdefault(new, {})[account] = None
            self._top = max(self._top, new)

    def _evict(self, account: str) -> None:
        """Evict the account's earliest pair (two if that gave it a floor): frees a record."""
        acct = self._accounts[account]
        for _ in range(2 if acct.floor is None else 1):
            while True:
                expiry, nonce = heapq.heappop(acct.heap)
                if acct.pairs.get(nonce) == expiry:
                    break
            weight = _weight(acct)
            del acct.pairs[nonce]
            self._npairs -= 1
            if acct.floor is None:
                acct.floor = expiry
                self._nfloors += 1
                heapq.heappush(self._floors, (expiry, account))
            else:
                acct.floor = max(acct.floor, expiry)
            self._reweigh(account, acct, weight)
            self.evicted += 1
            self._stale += 1
        if self._stale > max(1024, self._npairs):  # rebuild the heap without evicted pairs
            self._heap = [(e, name, n) for name, a in self._accounts.items()
                          for n, e in a.pairs.items()]
            heapq.heapify(self._heap)
            self._stale = 0

    def _spill_earliest(self) -> None:
        """Forget the earliest record (a pair or a floor), raising its account's slot to it."""
        heap, floors = self._heap, self._floors
        while heap:  # the earliest live pair
            expiry, account, nonce = heap[0]
            acct = self._accounts.get(account)
            if acct is not None and acct.pairs.get(nonce) == expiry:
                break
            heapq.heappop(heap)
            self._stale -= 1
        while floors:  # the earliest floor, as it is now
            floor, account = floors[0]
            current = self._accounts[account].floor
            assert current is not None  # each floor has one entry in the heap
            if current == floor:
                break
            heapq.heapreplace(floors, (current, account))
        if floors and (not heap or floors[0][0] < heap[0][0]):
            value, account = heapq.heappop(floors)
            acct = self._accounts[account]
            weight = _weight(acct)
            acct.floor = None
            self._nfloors -= 1
        else:
            value, account, nonce = heapq.heappop(heap)
            acct = self._accounts[account]
            weight = _weight(acct)
            del acct.pairs[nonce]  # its entry in acct.heap goes when it comes first there
            self._npairs -= 1
        self._reweigh(account, acct, weight)
        self._forget_if_empty(account, acct)
        if self._spill is None:
            self._spill = array("q", [-1]) * self.spill_slots
        slot = self._slot(account)
        self._spill[slot] = max(self._spill[slot], value)
        self._spill_max = max(self._spill_max, value)
        self.spilled += 1

    def _slot(self, account: str) -> int:
        digest = hashlib.blake2b(account.encode(), digest_size=8, key=self._spill_key).digest()
        return int.from_bytes(digest, "big") % self.spill_slots

    def _prune(self, now: float) -> None:
        """Drop expired pairs and passed floors (a request expiring before ``now`` is refused
        as expired anyway)."""
        heap = self._heap
        while heap and heap[0][0] < now:
            expiry, account, nonce = heapq.heappop(heap)
            acct = self._accounts.get(account)
            if acct is None or acct.pairs.get(nonce) != expiry:
                self._stale -= 1  # evicted or spilled earlier
                continue
            weight = _weight(acct)
            del acct.pairs[nonce]
            self._npairs -= 1
            self._reweigh(account, acct, weight)
            # the account's entries for pairs gone by now come before its live ones
            while acct.heap and acct.pairs.get(acct.heap[0][1]) != acct.heap[0][0]:
                heapq.heappop(acct.heap)
            self._forget_if_empty(account, acct)
        floors = self._floors
        while floors and floors[0][0] < now:
            _, account = heapq.heappop(floors)
            acct = self._accounts[account]
            assert acct.floor is not None  # each floor has one entry in the heap
            if acct.floor >= now:  # raised since: look again then
                heapq.heappush(floors, (acct.floor, account))
                continue
            weight = _weight(acct)
            acct.floor = None
            self._nfloors -= 1
            self._reweigh(account, acct, weight)
            self._forget_if_empty(account, acct)

    def _forget_if_empty(self, account: str, acct: _Account) -> None:
        if not acct.pairs and acct.floor is None:
            del self._accounts[account]
