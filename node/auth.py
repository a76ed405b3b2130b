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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from node.crypto import PrivateKey, address_of, is_address, verify
from node.errors import ServiceError, SignatureError

__all__ = [
    "AUTHORIZATION_HEADER",
    "CODES",
    "CONTENT_SHA256_HEADER",
    "DEFAULT_REPLAY_ENTRIES",
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

#: Bound of a :class:`ReplayCache` unless told otherwise (about 200 bytes an entry: ~20 MB).
DEFAULT_REPLAY_ENTRIES = 100_000
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
    further ahead than its ``max_signature_age``, 7 days at most; prefer minutes); ``nonce``
    16 random bytes (:func:`new_nonce`), never reused while the request could still be valid.
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


class ReplayCache:
    """The (account, nonce) pairs of accepted requests, each kept until its request expires.

    Bounded: at most ``max_entries`` pairs (default :data:`DEFAULT_REPLAY_ENTRIES`). When full,
    expired pairs go first, then the earliest-expiring ones; and once a pair that had not
    expired had to go, no request expiring at or before it is accepted any more (its replay
    could not be told apart), so a full cache never lets a replay through: at worst it
    refuses requests with short expiries until they are past (:class:`AuthError`
    ``ReplayCacheFull``, a 503 to retry). Not thread safe; trio tasks calling it need no lock
    (no checkpoints inside).
    """

    def __init__(self, max_entries: int = DEFAULT_REPLAY_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._expiry: dict[tuple[str, bytes], int] = {}
        self._heap: list[tuple[int, str, bytes]] = []
        self._floor = -1  # the latest expiry of a pair evicted before it expired
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: tuple[str, bytes]) -> bool:
        return key in self._expiry

    def _pop(self) -> int:
        expiry, account, nonce = heapq.heappop(self._heap)
        del self._expiry[(account, nonce)]
        return expiry

    def check(self, account: str, nonce: bytes, expiry: int, now: float) -> None:
        """Raise what :meth:`check_and_add` would, recording nothing."""
        if (account, nonce) in self._expiry:
            raise AuthError("ReplayedRequest", "this request (account, nonce) was already used")
        if expiry <= self._floor and self._floor >= now:
            raise ServiceError("SlowDown", "too many recent requests to tell this one from a "
                               "replay: retry with a later expiry, or later", 503)

    def check_and_add(self, account: str, nonce: bytes, expiry: int, now: float) -> None:
        """Record the pair; :class:`AuthError` ReplayedRequest if it is already recorded."""
        while self._heap and self._heap[0][0] < now:
            self._pop()
        self.check(account, nonce, expiry, now)
        while len(self._expiry) >= self.max_entries:
            self._floor = max(self._floor, self._pop())
            self.evicted += 1
        self._expiry[(account, nonce)] = expiry
        heapq.heappush(self._heap, (expiry, account, nonce))
