"""The typed error tree of gfsp (httpcore-style: small, foreign errors mapped at the boundary).

Every error the node raises on purpose derives from :class:`GfspError`. Third-party exceptions
(sqlite3, libp2p, OS errors) are caught where the library is used and re-raised as one of these,
so callers never have to know which library sits underneath.
"""

from __future__ import annotations


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
        super().__init__(f"modular {name!r} failed to start: {type(cause).__name__}: {cause}")
        self.name = name
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
