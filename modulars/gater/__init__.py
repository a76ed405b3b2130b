"""The gater modular: the HTTP front door of a node (hypercorn's trio worker + starlette).

- :mod:`.server`: the :class:`Gater` modular (serve, drain) and its hypercorn config;
- :mod:`.app`: the route table and handlers;
- :mod:`.errors`: S3-style XML errors, written in one place;
- :mod:`.ratelimit`: per-account token buckets;
- :mod:`.body`: body size limits and the signed payload hash while streaming;
- :mod:`.schemas`: request/response JSON schemas and the request validator;
- :mod:`.openapi`: the OpenAPI document of the routes.

Request signing is :mod:`node.auth` (shared with the client library).
"""

from modulars.gater.server import Gater

__all__ = ["Gater"]
