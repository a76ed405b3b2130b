"""The client library: what a storage user does against SPs and the chain.

It signs every request to an SP (:mod:`node.auth`), asks the primary SP for approvals, submits
create transactions to the chain (:mod:`node.chain_msgs`, the node's own builders), and computes
an object's checksums exactly as the SPs do (:mod:`node.ec`). The ``gfsp`` CLI sits on it.

Errors: an SP's refusal is :class:`SPError` (its S3-style code, message and HTTP status); the
chain's is :class:`~node.chain_msgs.ChainError`; an SP that cannot be reached is
:class:`SPUnavailable`.
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from node import chain_msgs as msgs
from node.auth import new_nonce, payload_sha256, quote_path, sign_request
from node.chain import ChainBucket, ChainObject, DevChainClient
from node.crypto import PrivateKey, unpack
from node.ec import ChecksumBuilder, Codec
from node.errors import GfspError
from node.tasks import StorageParams

DEFAULT_EXPIRY = 300  # seconds a signed request stays valid
READ_CHUNK = 1 << 20


class SPError(GfspError):
    """An SP refused a request (S3-style error body)."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "") -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id


class SPUnavailable(GfspError):
    """An SP could not be reached or did not answer in time."""


def parse_error(response: httpx.Response) -> SPError:
    """An S3-style XML error body as :class:`SPError` (best effort for anything else)."""
    try:
        root = ET.fromstring(response.content)
    except ET.ParseError:  # not XML: the status and the start of the body say what we know
        return SPError(response.status_code, f"HTTP{response.status_code}",
                       response.text[:200])
    return SPError(response.status_code, root.findtext("Code") or f"HTTP{response.status_code}",
                   root.findtext("Message") or "", root.findtext("RequestId") or "")


async def file_segments(path: Path, segment_size: int) -> AsyncIterator[bytes]:
    """A file's segments, read in a worker thread one segment at a time."""
    f = await trio.open_file(path, "rb")
    async with f:
        while True:
            segment = await f.read(segment_size)
            if not segment:
                return
            yield segment


async def checksums_of(segments: AsyncIterator[bytes] | Iterable[bytes],
                       params: StorageParams) -> list[bytes]:
    """The object's chain checksums, hashing and coding each segment in a worker thread."""
    builder = ChecksumBuilder(Codec(params.data_shards, params.parity_shards))
    if hasattr(segments, "__aiter__"):
        async for segment in segments:  # type: ignore[union-attr]
            await trio.to_thread.run_sync(builder.add_segment, segment)
    else:
        for segment in segments:  # type: ignore[union-attr]
            await trio.to_thread.run_sync(builder.add_segment, segment)
    return builder.result()


class GfspClient:
    """``async with GfspClient(key, chain=URL) as c:`` then ``await c.create_bucket(...)``."""

    def __init__(self, key: PrivateKey, *, chain: str, timeout: float = 30.0,
                 expiry: int = DEFAULT_EXPIRY) -> None:
        self.key = key
        self.timeout = timeout
        self.expiry = expiry
        self.chain = DevChainClient(chain, request_timeout=min(timeout, 10.0))
        self._http = httpx.AsyncClient(timeout=timeout)

    @property
    def address(self) -> str:
        return self.key.address

    async def __aenter__(self) -> GfspClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        await self.chain.aclose()

    # --- signed requests to an SP ---------------------------------------------------------

    def sign(self, method: str, url: str, *, query: Sequence[tuple[str, str]] = (),
             body: bytes | None = b"", headers: dict[str, str] | None = None
             ) -> dict[str, str]:
        """Headers that authenticate ``method url`` (``body=None``: unsigned payload)."""
        parts = urlsplit(url)
        hdrs = {"host": parts.netloc, **(headers or {})}
        hdrs.update(sign_request(
            self.key, method, parts.path, query, hdrs,
            None if body is None else payload_sha256(body),
            int(time.time()) + self.expiry, new_nonce()))
        return hdrs

    async def request(self, method: str, endpoint: str, path: str, *,
                      query: Sequence[tuple[str, str]] = (), json_body: Any = None,
                      content: bytes | None = None) -> httpx.Response:
        """One signed request; a 4xx/5xx raises :class:`SPError`."""
        url = endpoint.rstrip("/") + quote_path(path)
        body = json.dumps(json_body).encode() if json_body is not None else (content or b"")
        headers = {"content-type": "application/json"} if json_body is not None else {}
        headers = self.sign(method, url, query=query, body=body, headers=headers)
        try:
            with trio.fail_after(self.timeout):
                response = await self._http.request(method, url, params=list(query),
                                                    content=body, headers=headers)
        except trio.TooSlowError:
            raise SPUnavailable(f"{method} {url}: no answer within {self.timeout} s") from None
        except httpx.HTTPError as exc:
            raise SPUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise parse_error(response)
        return response

    async def get_json(self, endpoint: str, path: str, **kw: Any) -> Any:
        return (await self.request("GET", endpoint, path, **kw)).json()

    # --- the chain ------------------------------------------------------------------------

    async def sp_endpoint(self, operator: str) -> str:
        sp = await self.chain.get_sp(operator)
        if sp is None:
            raise msgs.ChainError("SP_NOT_FOUND", f"no SP {operator} on the chain")
        return sp.endpoint

    async def bucket_endpoint(self, bucket: str) -> str:
        """The HTTP endpoint of the bucket's primary SP."""
        info = await self.chain.get_bucket(bucket)
        if info is None:
            raise msgs.ChainError("BUCKET_NOT_FOUND", f"no bucket {bucket!r} on the chain")
        return await self.sp_endpoint(info.primary_sp)

    async def _broadcast(self, build: Any) -> dict[str, Any]:
        seq = await self.chain.account_seq(self.address)
        return await self.chain.broadcast(msgs.sign(self.key, build(seq)))

    async def create_bucket(self, bucket: str, *, primary_sp: str) -> ChainBucket:
        """Ask the primary SP's approval, then create the bucket on the chain."""
        endpoint = await self.sp_endpoint(primary_sp)
        answer = (await self.request("POST", endpoint, "/gfsp/v1/approvals/create-bucket",
                                     json_body={"bucket": bucket})).json()
        approval = unpack(bytes.fromhex(answer["approval"]))
        await self._broadcast(lambda seq: msgs.create_bucket_tx(
            pubkey=self.key.public_key, seq=seq, bucket=bucket, primary_sp=primary_sp,
            approval=approval))
        created = await self.chain.get_bucket(bucket)
        assert created is not None
        return created

    async def create_object(self, bucket: str, name: str, *, size: int,
                            checksums: Sequence[bytes],
                            content_type: str = "application/octet-stream") -> ChainObject:
        """Ask the bucket's primary SP for approval, then create the object on the chain."""
        endpoint = await self.bucket_endpoint(bucket)
        answer = (await self.request(
            "POST", endpoint, "/gfsp/v1/approvals/create-object",
            json_body={"bucket": bucket, "object": name, "size": size,
                       "content_type": content_type,
                       "checksums": [c.hex() for c in checksums]})).json()
        approval = unpack(bytes.fromhex(answer["approval"]))
        await self._broadcast(lambda seq: msgs.create_object_tx(
            pubkey=self.key.public_key, seq=seq, bucket=bucket, object=name, size=size,
            content_type=content_type, checksums=list(checksums), approval=approval))
        created = await self.chain.get_object(bucket, name)
        assert created is not None
        return created

    async def create_object_from_file(self, bucket: str, name: str, path: Path,
                                      content_type: str = "application/octet-stream"
                                      ) -> ChainObject:
        params = await self.chain.params()
        sums = await checksums_of(file_segments(path, params.segment_size), params)
        size = (await trio.Path(path).stat()).st_size
        return await self.create_object(bucket, name, size=size,
                                        checksums=sums, content_type=content_type)

    async def delete_object(self, bucket: str, name: str) -> None:
        await self._broadcast(lambda seq: msgs.delete_object_tx(
            pubkey=self.key.public_key, seq=seq, bucket=bucket, object=name))

    async def delete_bucket(self, bucket: str) -> None:
        await self._broadcast(lambda seq: msgs.delete_bucket_tx(
            pubkey=self.key.public_key, seq=seq, bucket=bucket))

    # --- metadata through the primary SP --------------------------------------------------

    async def bucket_meta(self, bucket: str) -> Any:
        return await self.get_json(await self.bucket_endpoint(bucket),
                                   f"/gfsp/v1/buckets/{bucket}")

    async def object_meta(self, bucket: str, name: str) -> Any:
        return await self.get_json(await self.bucket_endpoint(bucket),
                                   f"/gfsp/v1/objects/{bucket}/{name}")

    async def list_objects(self, bucket: str, *, prefix: str = "", start_after: str = "",
                           limit: int | None = None) -> Any:
        query = [("prefix", prefix), ("start_after", start_after)]
        if limit is not None:
            query.append(("limit", str(limit)))
        return await self.get_json(await self.bucket_endpoint(bucket),
                                   f"/gfsp/v1/buckets/{bucket}/objects", query=query)

    async def list_buckets(self, endpoint: str) -> Any:
        return await self.get_json(endpoint, f"/gfsp/v1/accounts/{self.address}/buckets")

    async def upload_progress(self, bucket: str, name: str) -> Any:
        return await self.get_json(await self.bucket_endpoint(bucket),
                                   f"/gfsp/v1/uploads/{bucket}/{name}")

    # --- data -----------------------------------------------------------------------------

    async def put_object(self, bucket: str, name: str, source: Path | bytes) -> Any:
        """Upload the payload to the bucket's primary SP, streamed from a file (or bytes).

        A file is sent with ``UNSIGNED-PAYLOAD``: the SP checks the payload against the
        object's checksums on the chain, so the body need not be read twice here.
        """
        endpoint = await self.bucket_endpoint(bucket)
        url = endpoint.rstrip("/") + quote_path(f"/{bucket}/{name}")
        if isinstance(source, bytes):
            body: Any = source
            headers = self.sign("PUT", url, body=source)
        else:
            body = _file_chunks(source)
            headers = self.sign("PUT", url, body=None)
            headers["content-length"] = str((await trio.Path(source).stat()).st_size)
        try:
            response = await self._http.put(url, content=body, headers=headers,
                                            timeout=httpx.Timeout(self.timeout, write=None))
        except httpx.HTTPError as exc:
            raise SPUnavailable(f"PUT {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise parse_error(response)
        return response.json()

    async def get_object(self, bucket: str, name: str, *,
                         byte_range: tuple[int, int | None] | None = None
                         ) -> AsyncIterator[bytes]:
        """The object's bytes (or one inclusive range), streamed."""
        endpoint = await self.bucket_endpoint(bucket)
        url = endpoint.rstrip("/") + quote_path(f"/{bucket}/{name}")
        extra = {}
        if byte_range is not None:
            low, high = byte_range
            extra["range"] = f"bytes={low}-{'' if high is None else high}"
        headers = self.sign("GET", url, body=b"", headers=extra)
        try:
            async with self._http.stream("GET", url, headers=headers) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise parse_error(response)
                async for chunk in response.aiter_bytes():
                    yield chunk
        except httpx.HTTPError as exc:
            raise SPUnavailable(f"GET {url}: {type(exc).__name__}: {exc}") from None

    async def get_object_bytes(self, bucket: str, name: str, *,
                               byte_range: tuple[int, int | None] | None = None) -> bytes:
        return b"".join([c async for c in self.get_object(bucket, name,
                                                         byte_range=byte_range)])

    async def wait_sealed(self, bucket: str, name: str, *, timeout: float = 120.0,
                          poll: float = 0.2) -> ChainObject:
        """Wait until the chain says the object is sealed (polling the chain)."""
        with trio.fail_after(timeout):
            while True:
                obj = await self.chain.get_object(bucket, name)
                if obj is not None and obj.sealed:
                    return obj
                await trio.sleep(poll)

    async def challenge(self, endpoint: str, object_id: int, segment: int, index: int
                        ) -> tuple[bytes, list[bytes], bytes]:
        """(piece, checksum list, integrity hash) from an SP's challenge route."""
        from modulars.downloader import decode_challenge

        answer = await self.get_json(endpoint,
                                     f"/gfsp/v1/challenge/{object_id}/{segment}/{index}")
        return decode_challenge(answer)

    # --- with progress callbacks (the gfsp CLI) ----------------------------------------------

    async def file_checksums(self, path: Path, *, progress: Callable[[int], object] | None = None
                             ) -> tuple[int, list[bytes]]:
        """(size, chain checksums) of a file, read one segment at a time (never whole);
        ``progress(n)`` after each segment of ``n`` bytes. The size is what was read, so the
        two agree even if the file changes meanwhile."""
        params = await self.chain.params()
        builder = ChecksumBuilder(Codec(params.data_shards, params.parity_shards))
        size = 0
        async for segment in file_segments(path, params.segment_size):
            await trio.to_thread.run_sync(builder.add_segment, segment)
            size += len(segment)
            if progress is not None:
                progress(len(segment))
        return size, builder.result()

    async def put_file(self, bucket: str, name: str, path: Path, *, size: int | None = None,
                       progress: Callable[[int], object] | None = None) -> Any:
        """:meth:`put_object` for a file, streamed, sending exactly ``size`` bytes (default:
        the file's size now); ``progress(n)`` as each chunk of ``n`` bytes is handed over."""
        endpoint = await self.bucket_endpoint(bucket)
        url = endpoint.rstrip("/") + quote_path(f"/{bucket}/{name}")
        if size is None:
            size = (await trio.Path(path).stat()).st_size
        headers = self.sign("PUT", url, body=None)
        headers["content-length"] = str(size)
        try:
            response = await self._http.put(url, content=_file_chunks_upto(path, size, progress),
                                            headers=headers,
                                            timeout=httpx.Timeout(self.timeout, write=None))
        except httpx.HTTPError as exc:
            raise SPUnavailable(f"PUT {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            raise parse_error(response)
        return response.json()


async def _file_chunks_upto(path: Path, size: int,
                            progress: Callable[[int], object] | None) -> AsyncIterator[bytes]:
    """The first ``size`` bytes of a file in chunks (OSError if it is shorter now)."""
    f = await trio.open_file(path, "rb")
    async with f:
        left = size
        while left > 0:
            chunk = await f.read(min(READ_CHUNK, left))
            if not chunk:
                raise OSError(f"{path}: file shrank while uploading ({size - left} of "
                              f"{size} bytes sent)")
            left -= len(chunk)
            if progress is not None:
                progress(len(chunk))
            yield chunk


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    f = await trio.open_file(path, "rb")
    async with f:
        while chunk := await f.read(READ_CHUNK):
            yield chunk
