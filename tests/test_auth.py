"""Tests of node/auth.py: canonical request vectors, sign/verify, every AuthError, replay cache."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import auth
from node.auth import (
    UNSIGNED_PAYLOAD,
    AuthError,
    ReplayCache,
    canonical_query,
    canonical_request,
    parse_authorization,
    parse_query,
    payload_sha256,
    quote_path,
    sign_request,
    verify_request,
)
from node.crypto import PrivateKey
from node.errors import ServiceError, ServiceUnavailable

KEY = PrivateKey(bytes(range(32)))
OTHER = PrivateKey(bytes(range(1, 33)))
NOW = 1_700_000_000
WEEK = 7 * 86400
BODY = b'{"bucket":"abc"}'
HOST = "127.0.0.1:9033"
PATH = "/gfsp/v1/approvals/create-bucket"
QUERY = [("b", "2"), ("a", "x y"), ("a", "1")]


def signed(key: PrivateKey = KEY, *, method: str = "POST", path: str = PATH,
           query: list[tuple[str, str]] | None = None, body: bytes | None = BODY,
           expiry: int = NOW + 300, nonce: bytes = bytes(16),
           extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"Host": HOST, "Content-Type": "application/json", **(extra or {})}
    added = sign_request(key, method, path, QUERY if query is None else query, headers,
                         None if body is None else payload_sha256(body), expiry, nonce)
    return {**headers, **added}


def check(headers: dict[str, str], *, method: str = "POST", path: str = PATH,
          query: list[tuple[str, str]] | None = None, now: float = NOW,
          replay: ReplayCache | None = None) -> auth.VerifiedRequest:
    return verify_request(method=method, raw_path=path, query=QUERY if query is None else query,
                          headers=headers, now=now, max_age=WEEK, replay=replay)


def code_of(excinfo: pytest.ExceptionInfo[AuthError]) -> tuple[str, int]:
    return excinfo.value.code, excinfo.value.status


# --- vectors --------------------------------------------------------------------------------


def test_canonical_request_vector() -> None:
    text = canonical_request(
        method="post", raw_path="/gfsp/v1/objects/b/a%20b",
        query=[("k", "v/w"), ("é", "~"), ("a", "")],
        headers={"host": " h:1 ", "x-gfsp-content-sha256": UNSIGNED_PAYLOAD},
        signed_headers=["host", "x-gfsp-content-sha256"], payload_hash=UNSIGNED_PAYLOAD,
        expiry=5, nonce=bytes(16), account="0x" + "ab" * 20)
    assert text == "\n".join([
        "GFSP1-ED25519",
        "POST",
        "/gfsp/v1/objects/b/a%20b",
        "%C3%A9=~&a=&k=v%2Fw",
        "host:h:1",
        "x-gfsp-content-sha256:UNSIGNED-PAYLOAD",
        "host;x-gfsp-content-sha256",
        "UNSIGNED-PAYLOAD",
        "5",
        "00000000000000000000000000000000",
        "0xabababababababababababababababababababab",
    ])


def test_signed_headers_vector() -> None:
    """A fixed key, request and nonce give fixed headers (ed25519 is deterministic)."""
    h = sign_request(KEY, "POST", PATH, QUERY,
                     {"Host": HOST, "Content-Type": "application/json", "User-Agent": "x"},
                     payload_sha256(BODY), NOW, bytes(16))
    assert h["x-gfsp-content-sha256"] == hashlib.sha256(BODY).hexdigest()
    assert h["authorization"] == (
        "GFSP1-ED25519 Account=0xbf2bcab73da651358839e9b77481b2eab107708c,"
        "PubKey=03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8,"
        "Expiry=1700000000,Nonce=00000000000000000000000000000000,"
        "SignedHeaders=content-type;host;x-gfsp-content-sha256,"
        "Signature=0605cc9174fa1cd95f7fd977ccec150d16530e37c082010483168b1231c013d9"
        "43f6d7310bc0a871caedad7ce911b23da40a97d7f84aeec6d7720df2bb54ef0f")


def test_canonical_query_sorts_encoded_pairs() -> None:
    assert canonical_query([("b", "1"), ("a", "2"), ("a", "1"), ("a b", "+")]) == \
        "a=1&a=2&a%20b=%2B&b=1"
    assert canonical_query([]) == ""
    assert parse_query(b"a=x+y&b=%2B&c") == [("a", "x y"), ("b", "+"), ("c", "")]
    assert quote_path("/gfsp/v1/objects/b/dir/a b%é") == "/gfsp/v1/objects/b/dir/a%20b%25%C3%A9"
    assert quote_path("/o/b/./x/../..a/.") == "/o/b/%2E/x/%2E%2E/..a/%2E"


# --- round trips ----------------------------------------------------------------------------


def test_round_trip() -> None:
    v = check(signed())
    assert v.account == KEY.address
    assert v.pubkey == KEY.public_key
    assert v.expiry == NOW + 300
    assert v.payload_sha256 == payload_sha256(BODY)


def test_round_trip_unsigned_payload_and_header_case() -> None:
    headers = signed(body=None, method="GET", path="/p", query=[])
    v = check({k.upper(): f"  {v} " for k, v in headers.items()}, method="get", path="/p",
              query=[])
    assert v.payload_sha256 is None


@settings(max_examples=60, deadline=None)
@given(path=st.text(min_size=1, max_size=30), query=st.lists(
    st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=5))
def test_round_trip_any_path_and_query(path: str, query: list[tuple[str, str]]) -> None:
    raw = quote_path("/" + path)
    headers = signed(path=raw, query=query)
    # The server sees the query as it parses it from the wire: the order may change.
    assert check(headers, path=raw, query=list(reversed(query))).account == KEY.address


def test_verify_records_nonce_in_replay_cache() -> None:
    cache = ReplayCache()
    check(signed(), replay=cache)
    assert (KEY.address, bytes(16)) in cache


# --- every refusal --------------------------------------------------------------------------


def test_missing_authentication() -> None:
    headers = signed()
    del headers["authorization"]
    with pytest.raises(AuthError) as e:
        check(headers)
    assert code_of(e) == ("MissingAuthentication", 401)
    assert isinstance(e.value, ServiceError)


@pytest.mark.parametrize("mutate", [
    lambda a: a.replace("GFSP1-ED25519", "AWS4-HMAC-SHA256"),
    lambda a: a.replace("Account=", "Acount="),
    lambda a: a + ",Nonce=00000000000000000000000000000000",
    lambda a: a.replace("PubKey=03a1", "PubKey=03A1"),
    lambda a: a.replace("Expiry=", "Expiry=-"),
    lambda a: a.replace("Nonce=0000", "Nonce=00"),
    lambda a: a.replace("Signature=", "Signature=zz"),
    lambda a: a.replace("SignedHeaders=content-type;host;", "SignedHeaders=host;content-type;"),
    lambda a: a.replace("host;", ""),
    lambda a: a.replace(";x-gfsp-content-sha256", ""),
    lambda a: a.replace("Account=0x", "Account="),
    lambda a: a.split(",")[0],
    lambda a: "GFSP1-ED25519",
    lambda a: "",
    lambda a: a + "," + "x" * 3000,
])
def test_malformed_authorization(mutate: object) -> None:
    headers = signed()
    headers["authorization"] = mutate(headers["authorization"])  # type: ignore[operator]
    with pytest.raises(AuthError) as e:
        check(headers)
    assert code_of(e) == ("MalformedAuthorization", 401)


def test_malformed_when_signed_header_missing_or_gfsp_header_unsigned() -> None:
    headers = signed()
    del headers["Content-Type"]
    with pytest.raises(AuthError) as e:
        check(headers)
    assert code_of(e) == ("MalformedAuthorization", 401)
    headers = signed()
    headers["x-gfsp-extra"] = "1"
    with pytest.raises(AuthError) as e:
        check(headers)
    assert code_of(e) == ("MalformedAuthorization", 401)
    headers = signed()
    headers["x-gfsp-content-sha256"] = "ABC"
    with pytest.raises(AuthError) as e:
        check(headers)
    assert code_of(e) == ("MalformedAuthorization", 401)


def test_expired_and_too_far() -> None:
    with pytest.raises(AuthError) as e:
        check(signed(expiry=NOW - 1))
    assert code_of(e) == ("ExpiredRequest", 403)
    check(signed(expiry=NOW))  # valid up to and including the expiry second
    check(signed(expiry=NOW + WEEK))
    with pytest.raises(AuthError) as e:
        check(signed(expiry=NOW + WEEK + 1))
    assert code_of(e) == ("ExpiryTooFar", 403)


def _swap_pubkey(headers: dict[str, str], key: PrivateKey) -> None:
    headers["authorization"] = headers["authorization"].replace(
        KEY.public_key.hex(), key.public_key.hex())


def test_wrong_key_signature_does_not_match() -> None:
    """Signed by OTHER but naming KEY's account and key: the signature fails."""
    theirs = signed(OTHER)
    mine = signed()
    sig = theirs["authorization"].rsplit("Signature=", 1)[1]
    mine["authorization"] = mine["authorization"].rsplit("Signature=", 1)[0] + "Signature=" + sig
    with pytest.raises(AuthError) as e:
        check(mine)
    assert code_of(e) == ("SignatureDoesNotMatch", 403)


def test_wrong_account() -> None:
    headers = signed()
    _swap_pubkey(headers, OTHER)  # Account stays KEY's address
    with pytest.raises(AuthError) as e:
        check(headers)
    assert code_of(e) == ("AccountMismatch", 403)


@pytest.mark.parametrize("tamper", ["method", "path", "query", "header", "body-hash", "expiry"])
def test_tampering_breaks_the_signature(tamper: str) -> None:
    headers = signed()
    kwargs: dict[str, object] = {}
    if tamper == "method":
        kwargs["method"] = "PUT"
    elif tamper == "path":
        kwargs["path"] = PATH + "x"
    elif tamper == "query":
        kwargs["query"] = [*QUERY, ("c", "3")]
    elif tamper == "header":
        headers["Content-Type"] = "text/plain"
    elif tamper == "body-hash":
        headers["x-gfsp-content-sha256"] = payload_sha256(b"other")
    elif tamper == "expiry":
        headers["authorization"] = headers["authorization"].replace(
            f"Expiry={NOW + 300}", f"Expiry={NOW + 301}")
    with pytest.raises(AuthError) as e:
        check(headers, **kwargs)  # type: ignore[arg-type]
    assert code_of(e) == ("SignatureDoesNotMatch", 403)


def test_replayed() -> None:
    cache = ReplayCache()
    check(signed(), replay=cache)
    with pytest.raises(AuthError) as e:
        check(signed(), replay=cache)
    assert code_of(e) == ("ReplayedRequest", 403)
    check(signed(nonce=b"\x01" * 16), replay=cache)  # another nonce is fine
    check(signed(OTHER), replay=cache)  # the same nonce from another account is fine


def test_content_sha256_mismatch_code() -> None:
    err = AuthError("ContentSha256Mismatch", "x")
    assert (err.code, err.status) == ("ContentSha256Mismatch", 400)
    assert set(auth.CODES) >= {
        "MissingAuthentication", "MalformedAuthorization", "ExpiredRequest", "ExpiryTooFar",
        "SignatureDoesNotMatch", "AccountMismatch", "ReplayedRequest", "ContentSha256Mismatch"}


def test_sign_request_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sign_request(KEY, "GET", "/", [], {}, None, NOW, bytes(16))  # no host
    with pytest.raises(ValueError):
        sign_request(KEY, "GET", "/", [], {"host": "h"}, None, NOW, bytes(8))
    with pytest.raises(ValueError):
        sign_request(KEY, "GET", "/", [], {"host": "h"}, "ABC", NOW, bytes(16))
    with pytest.raises(ValueError):
        sign_request(KEY, "GET", "/", [], {"host": "h\nx: y"}, None, NOW, bytes(16))


def test_parse_authorization_accepts_spaces_and_any_field_order() -> None:
    a = signed()["authorization"]
    scheme, rest = a.split(" ", 1)
    fields = rest.split(",")
    reordered = f"{scheme} " + " , ".join(reversed(fields))
    assert parse_authorization(reordered) == parse_authorization(a)


# --- replay cache ---------------------------------------------------------------------------


def test_replay_cache_forgets_expired_pairs() -> None:
    cache = ReplayCache()
    cache.check_and_add("a", b"1", expiry=100, now=50)
    with pytest.raises(AuthError):
        cache.check_and_add("a", b"1", expiry=100, now=100)
    cache.check_and_add("a", b"1", expiry=200, now=101)  # expired, so forgotten
    assert len(cache) == 1


def test_replay_cache_evicts_the_largest_accounts_earliest_pairs_when_full() -> None:
    cache = ReplayCache(max_entries=4)
    cache.check_and_add("a", b"late", expiry=300, now=0)
    cache.check_and_add("a", b"early", expiry=100, now=0)
    cache.check_and_add("a", b"mid", expiry=200, now=0)
    cache.check_and_add("b", b"one", expiry=50, now=0)
    cache.check_and_add("c", b"new", expiry=250, now=0)
    # "a" holds the most: its two earliest pairs go (the first gave it a floor, which takes a
    # record), and "b" keeps its pair although it expires first
    assert (len(cache), cache.floors, cache.evicted) == (3, 1, 2)
    assert cache.floor_of("a") == 200 and cache.floor_of("b") is None
    for gone in (b"early", b"mid"):
        assert ("a", gone) not in cache
    for kept in (("a", b"late"), ("b", b"one"), ("c", b"new")):
        assert kept in cache
    with pytest.raises(ValueError):
        ReplayCache(max_entries=0)
    with pytest.raises(ValueError):
        ReplayCache(max_per_account=0)


def test_a_full_replay_cache_never_lets_a_replay_through() -> None:
    """Found in review: the evicted pair could be replayed until its expiry. Now the evicted
    pair's account refuses what expires at or before it (503, retry) until then; other
    accounts are not affected."""
    cache = ReplayCache(max_entries=4)
    cache.check_and_add("a", b"early", expiry=100, now=0)
    cache.check_and_add("a", b"mid", expiry=200, now=0)
    cache.check_and_add("a", b"late", expiry=300, now=0)
    cache.check_and_add("b", b"new", expiry=250, now=0)  # full
    cache.check_and_add("c", b"x", expiry=90, now=0)  # evicts "early" and "mid": floor 200
    assert cache.floor_of("a") == 200
    with pytest.raises(ServiceError) as info:
        cache.check_and_add("a", b"early", expiry=100, now=10)  # its replay
    assert (info.value.code, info.value.status) == ("SlowDown", 503)
    with pytest.raises(ServiceError, match="replay"):
        cache.check("a", b"mid", expiry=200, now=10)
    with pytest.raises(AuthError):  # kept: a plain replay
        cache.check("a", b"late", expiry=300, now=10)
    cache.check("a", b"later", expiry=201, now=10)  # expiring later: fine
    cache.check("d", b"short", expiry=20, now=10)  # another account: fine
    cache.check_and_add("d", b"short", expiry=20, now=10)  # evicts "late" of "a": floor 300
    assert ("a", b"late") not in cache and cache.floor_of("a") == 300
    with pytest.raises(ServiceError, match="replay"):
        cache.check("a", b"late", expiry=300, now=20)
    cache.check_and_add("a", b"again", expiry=400, now=300.5)  # "a"'s floor has passed
    assert cache.floor_of("a") is None


def test_a_flood_of_accounts_cannot_get_honest_requests_refused() -> None:
    """Found in review: fresh keys each sending a burst of requests expiring as late as
    allowed filled the cache; it then evicted pairs still valid for days and refused every
    request expiring before them, every honest client's included, for days."""
    cache = ReplayCache(max_entries=1000, max_per_account=50)
    honest = KEY.address
    few = [f"0x{n:040x}" for n in range(30)]  # could hold 1500 pairs
    fresh = (f"0x{n:040x}" for n in itertools.count(1000))
    refused = 0
    nonces = itertools.count()

    def flood(accounts: list[str], now: int) -> None:
        nonlocal refused
        for attacker in accounts:  # each a burst expiring 15 minutes ahead
            for _ in range(50):
                try:
                    cache.check_and_add(attacker, next(nonces).to_bytes(16, "big"), now + 900,
                                        now)
                except ServiceError:  # its own cap or floor
                    refused += 1

    for step in range(200):
        now = NOW + 30 * step
        if step < 100:  # a few accounts: they give up their own pairs, never the client's
            flood(few, now)
        else:  # fresh accounts: the client, then holding the most, gives up its earliest
            flood([next(fresh) for _ in range(25)], now)
        # the client library's requests (300 s expiries): never refused
        cache.check_and_add(honest, step.to_bytes(16, "big"), now + 300, now)
        assert len(cache) + cache.floors <= 1000
        if step < 100:
            assert cache.floor_of(honest) is None
            assert cache.pairs_of(honest) == min(step + 1, 11)  # its last 300 s
    assert cache.evicted > 20_000 and refused > 20_000, (cache.evicted, refused)


def test_an_account_over_its_cap_is_refused_alone() -> None:
    cache = ReplayCache(max_entries=100, max_per_account=3)
    for i in range(3):
        cache.check_and_add("a", bytes([i]), expiry=100 + i, now=0)
    with pytest.raises(ServiceError) as info:
        cache.check("a", b"more", expiry=200, now=10)
    assert (info.value.code, info.value.status) == ("SlowDown", 503)
    assert isinstance(info.value, ServiceUnavailable) and info.value.retry_after == 91
    with pytest.raises(ServiceError):
        cache.check_and_add("a", b"more", expiry=200, now=10)
    assert ("a", b"more") not in cache and cache.evicted == 0
    cache.check_and_add("b", b"more", expiry=200, now=10)  # another account: fine
    with pytest.raises(AuthError):  # a replay is still a replay
        cache.check("a", bytes([0]), expiry=100, now=10)
    cache.check_and_add("a", b"more", expiry=200, now=100.5)  # its first pair has expired


def test_when_no_account_can_give_a_pair_up_the_earliest_record_is_spilled() -> None:
    """max_entries accounts holding one record each: the earliest record is forgotten, its
    expiry raising the floor of its account's slot (here one slot, shared by all)."""
    cache = ReplayCache(max_entries=4, spill_slots=1)
    for n in range(4):
        cache.check_and_add(f"acct{n}", b"x", expiry=100 + n, now=0)
    cache.check_and_add("new", b"x", expiry=50, now=0)  # spills acct0's pair
    assert (len(cache), cache.spilled, cache.evicted) == (4, 1, 0)
    assert ("acct0", b"x") not in cache
    with pytest.raises(ServiceError) as info:
        cache.check("acct0", b"x", expiry=100, now=1)  # its replay
    assert (info.value.code, info.value.status) == ("SlowDown", 503)
    with pytest.raises(ServiceError, match="replay"):  # the slot is shared
        cache.check("other", b"y", expiry=100, now=1)
    cache.check("other", b"y", expiry=101, now=1)  # expiring later: fine
    for n in range(1, 4):
        with pytest.raises(AuthError):
            cache.check(f"acct{n}", b"x", expiry=100 + n, now=1)
    cache.check_and_add("acct0", b"x", expiry=160, now=100.5)  # the spilled one has expired


def test_a_spill_refuses_only_the_accounts_of_its_slot() -> None:
    cache = ReplayCache(max_entries=4, spill_slots=1 << 16)
    for n in range(4):
        cache.check_and_add(f"acct{n}", b"x", expiry=1000, now=0)
    cache.check_and_add("new", b"x", expiry=1000, now=0)
    assert cache.spilled == 1
    with pytest.raises(ServiceError, match="replay"):
        cache.check("acct0", b"x", expiry=1000, now=1)
    refused = 0
    for n in range(1000):
        try:
            cache.check(f"someone{n}", b"x", expiry=1000, now=1)
        except ServiceError:
            refused += 1
    assert refused <= 5  # 1000 / 65536 expected


def assert_consistent(cache: ReplayCache) -> None:
    """The cache's indexes agree with its accounts (white box)."""
    accounts = cache._accounts
    assert cache._npairs == sum(len(a.pairs) for a in accounts.values())
    assert cache._nfloors == sum(a.floor is not None for a in accounts.values())
    assert sorted(name for _, name in cache._floors) == sorted(
        name for name, a in accounts.items() if a.floor is not None)
    indexed = {name: w for w, names in cache._by_weight.items() for name in names}
    assert indexed == {name: 2 * len(a.pairs) + 3 * (a.floor is not None)
                       for name, a in accounts.items() if a.pairs or a.floor is not None}
    assert all(a.pairs or a.floor is not None for a in accounts.values())
    assert cache._top >= max(indexed.values(), default=0)


@pytest.mark.parametrize("pool_size", [120, 5000])
def test_replays_are_refused_after_heavy_churn(pool_size: int) -> None:
    """Random accounts, bursts and expiries churn a small cache: no unexpired pair it ever
    accepted is accepted again and the bounds hold; with fewer accounts than records, a
    steady client is never refused; with many more, records are spilled."""
    rng = random.Random(7)
    cache = ReplayCache(max_entries=300, max_per_account=25)
    pool = [f"0x{n:040x}" for n in range(pool_size)]
    accepted: list[tuple[str, bytes, int]] = []
    refused = 0
    replays: Counter[str] = Counter()
    for step in range(400):
        now = NOW + 10 * step
        for account in rng.sample(pool, 15):
            for _ in range(rng.randint(1, 25)):
                nonce, expiry = rng.randbytes(16), now + rng.randint(1, 900)
                try:
                    cache.check_and_add(account, nonce, expiry, now)
                except ServiceError:
                    refused += 1
                else:
                    accepted.append((account, nonce, expiry))
        if pool_size < 300:
            cache.check_and_add(KEY.address, step.to_bytes(16, "big"), now + 300, now)
        accepted = [pair for pair in accepted if pair[2] >= now]
        for account, nonce, expiry in rng.sample(accepted, min(30, len(accepted))):
            with pytest.raises(ServiceError) as info:  # ReplayedRequest, or SlowDown if evicted
                cache.check_and_add(account, nonce, expiry, now)
            replays[info.value.code] += 1
        assert len(cache) + cache.floors <= 300
        assert all(cache.pairs_of(account) <= 25 for account in pool)
        if step % 50 == 0:
            assert_consistent(cache)
    assert_consistent(cache)
    assert cache.evicted > 10_000 and refused > 10_000
    assert replays["ReplayedRequest"] > 100 and replays["SlowDown"] > 5000, replays
    assert (cache.spilled > 1000) == (pool_size > 300), cache.spilled
