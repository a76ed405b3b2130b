"""The typed error tree of gfsp (httpcore-style: small, foreign errors mapped at the boundary).

Every error the node raises on purpose derives from :class:`GfspError`. Third-party exceptions
(sqlite3, libp2p, OS errors) are caught where the library is used and re-raised as one of these,
so callers never have to know which library sits underneath.
"""

from __future__ import annotations

import errno


class GfspError(Exception):
    """Base of every error raised by gfsp on purpose."""


class ConfigError(GfspError):
    """A config file or value is invalid; ``str(err)`` is one line naming file, key, value."""


class KeyFileError(GfspError):
    """A key file is missing, malformed, or readable by group/others."""


class SignatureError(GfspError):
    """A signed message failed verification (bad signature, wrong shape, wrong signer)."""


class NilModularError(GfspError):
    """A modular that is absent or not running was called (the seed's ErrNilModular)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"call nil module, please check again: modular {name!r} is not running")
        self.name = name


class ModularStartError(GfspError):
    """A modular failed while starting; the node exits non-zero with this message."""

    def __init__(self, name: str, cause: BaseException) -> None:
        cause = unwrap(cause) if isinstance(cause, BaseExceptionGroup) else cause
        super().__init__(f"modular {name!r} failed to start: {describe(cause)}")
        self.name = name
        self.cause = cause


def describe(exc: BaseException) -> str:
    """One line for a log or an exit message: the exception a nursery group stands for, its
    type, and for an OS error its errno name and text (``str()`` of some is empty)."""
    if isinstance(exc, BaseExceptionGroup):
        exc = unwrap(exc)
    if isinstance(exc, OSError) and exc.strerror:
        name = errno.errorcode.get(exc.errno or 0, "")
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}: [{name}] {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


class ListenFailed(GfspError):
    """A server could not listen on its configured address (in use, not ours, ...)."""

    def __init__(self, key: str, address: str, cause: BaseException) -> None:
        super().__init__(f"cannot listen on {key} = {address!r}: {describe(cause)}")
        self.cause = cause


class ResourceLimitExceeded(GfspError):
    """A reservation does not fit a scope's limit. Names the scope and the resource."""

    def __init__(self, scope: str, resource: str, requested: int, used: int, limit: int) -> None:
        super().__init__(
            f"resource limit exceeded in scope {scope!r}: {resource} "
            f"requested {requested}, in use {used}, limit {limit}"
        )
        self.scope = scope
        self.resource = resource
        self.requested = requested
        self.used = used
        self.limit = limit


class DBError(GfspError):
    """SPDB failed (sqlite3 errors are mapped to this at the boundary)."""


class TaskError(GfspError):
    """A task could not be decoded or is invalid."""


class ServiceError(GfspError):
    """A refusal meant for the user, with an S3-style ``code`` and the HTTP ``status``.

    Modulars raise it (or a subclass) from pre_/handle_ methods; the gater turns it into an
    S3-style XML error body with that status, so no modular knows about HTTP.
    """

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class AccessDenied(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__("AccessDenied", message, 403)


class NoSuchBucket(ServiceError):
    def __init__(self, bucket: str) -> None:
        super().__init__("NoSuchBucket", f"bucket {bucket!r} does not exist", 404)


class NoSuchKey(ServiceError):
    def __init__(self, bucket: str, name: str) -> None:
        super().__init__("NoSuchKey", f"object {name!r} does not exist in bucket {bucket!r}", 404)


class InvalidObjectState(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__("InvalidObjectState", message, 409)


class ServiceUnavailable(ServiceError):
    """Over a resource limit or a dependency is down: 503 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__("SlowDown", message, 503)
        self.retry_after = retry_after


class RequestTimeout(ServiceError):
    """A request body that came too slowly (S3's RequestTimeout, 400): nothing of it kept."""

    def __init__(self, message: str) -> None:
        super().__init__("RequestTimeout", message, 400)


def unwrap(group: BaseExceptionGroup) -> BaseException:
    """The exception a (nested) nursery group stands for: its first GfspError, else its first
    leaf that is not a cancellation, else the group itself."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, GfspError):
            return leaf
    for leaf in leaves:
        if type(leaf).__name__ != "Cancelled":
            return leaf
    return group
