"""The OpenAPI 3.1 document of the gater, generated from the route table.

Parameters, request bodies and response bodies use the schemas the gater validates with
(:mod:`modulars.gater.schemas`). Errors are XML (``application/xml``, see
:mod:`modulars.gater.errors`). Every route but the public ones needs the ``GFSP1-ED25519``
Authorization header described in :mod:`node.auth` (declared as an ``apiKey`` scheme: OpenAPI
has no way to describe a signature).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from node.auth import SCHEME

if TYPE_CHECKING:
    from modulars.gater.app import RouteSpec

TITLE = "gfsp gater"
VERSION = "1.0.0"
SECURITY_NAME = "gfsp1Ed25519"

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "xml": {"name": "Error"},
    "required": ["Code", "Message", "RequestId"],
    "properties": {"Code": {"type": "string"}, "Message": {"type": "string"},
                   "RequestId": {"type": "string"}},
}
REQUEST_ID_HEADER = {"x-gfsp-request-id": {"description": "Request id (also in errors)",
                                           "schema": {"type": "string"}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "headers": REQUEST_ID_HEADER,
            "content": {"application/xml": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _path(spec_path: str) -> str:
    """Starlette's ``{object:path}`` is OpenAPI's ``{object}``."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", spec_path)


def _operation(spec: RouteSpec) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": spec.operation_id,
        "summary": spec.summary,
        "parameters": [{"name": p.name, "in": p.location, "required": p.required,
                        "description": p.description, "schema": p.schema}
                       for p in spec.params],
        "responses": {
            "200": {"description": "OK", "headers": REQUEST_ID_HEADER,
                    "content": {spec.response_type: {"schema": spec.response_schema}}},
            "400": _error("Invalid request (InvalidArgument, MalformedJSON, "
                          "ContentSha256Mismatch, ...)"),
            "404": _error("No such route, bucket or object"),
            "413": _error("EntityTooLarge"),
            "503": _error("SlowDown / ServiceUnavailable, with Retry-After"),
        },
        "security": [] if spec.public else [{SECURITY_NAME: []}],
    }
    if not spec.public:
        op["responses"]["401"] = _error("MissingAuthentication, MalformedAuthorization")
        op["responses"]["403"] = _error("Signature refused, or AccessDenied")
    if spec.request_schema is not None:
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": spec.request_schema}}}
    return op


def openapi_document(routes: Iterable[RouteSpec], *, server_url: str | None = None
                     ) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for spec in routes:
        paths.setdefault(_path(spec.path), {})[spec.method.lower()] = _operation(spec)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": TITLE, "version": VERSION,
                 "description": "HTTP front door of a gfsp storage provider. Bodies and "
                                "responses are JSON, bytes as lowercase hex; errors are "
                                "S3-style XML."},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {SECURITY_NAME: {
                "type": "apiKey", "in": "header", "name": "Authorization",
                "description": f"{SCHEME} signature over the canonical request, with the "
                               "x-gfsp-content-sha256 header (see node/auth.py)"}},
        },
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc
