"""The JSON schemas of the gater's requests and responses, and the validator of requests.

The same dicts go into the OpenAPI document (:mod:`modulars.gater.openapi`) and check what
arrives (:func:`validate`), so the document cannot drift from what the gater accepts. The
validator knows the subset used here: ``object`` (properties, required, additionalProperties
false), ``string`` (minLength, maxLength, pattern), ``integer`` (minimum, maximum; never a
bool), ``array`` (items, minItems, maxItems). Every string must also be encodable as UTF-8 (no
lone surrogates). A failure is a 400 ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import re
from typing import Any

from node.chain_msgs import BUCKET_PATTERN, MAX_INT, MAX_OBJECT_NAME, MAX_SHARDS
from node.errors import ServiceError

HEX32_PATTERN = r"^[0-9a-f]{64}$"
ADDRESS_PATTERN = r"^0x[0-9a-f]{40}$"
MAX_CONTENT_TYPE = 128
MAX_QUERY_STRING = 1024
MAX_LIMIT = 100_000

BUCKET: dict[str, Any] = {"type": "string", "pattern": BUCKET_PATTERN,
                          "description": "3-63 of a-z 0-9 . - ; starts and ends alphanumeric; "
                                         "no '..', '.-', '-.'; not an IPv4 address"}
OBJECT_NAME: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": MAX_OBJECT_NAME,
                               "pattern": r"^[^\u0000-\u001f\u007f]+$",
                               "description": "1-1024 characters, no control characters"}
ADDRESS: dict[str, Any] = {"type": "string", "pattern": ADDRESS_PATTERN}
HEX: dict[str, Any] = {"type": "string", "pattern": r"^([0-9a-f]{2})*$"}

CREATE_BUCKET_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["bucket"], "additionalProperties": False,
    "properties": {"bucket": BUCKET},
}
CREATE_OBJECT_REQUEST: dict[str, Any] = {
    "type": "object", "required": ["bucket", "object", "size", "checksums"],
    "additionalProperties": False,
    "properties": {
        "bucket": BUCKET,
        "object": OBJECT_NAME,
        "size": {"type": "integer", "minimum": 0, "maximum": MAX_INT},
        "content_type": {"type": "string", "maxLength": MAX_CONTENT_TYPE,
                         "pattern": r"^[\u0020-\u007e]*$",
                         "default": "application/octet-stream"},
        "checksums": {"type": "array", "minItems": 1, "maxItems": 1 + MAX_SHARDS,
                      "items": {"type": "string", "pattern": HEX32_PATTERN},
                      "description": "hex sha256: the integrity hash, then one per EC piece"},
    },
}

APPROVAL_RESPONSE: dict[str, Any] = {
    "type": "object", "required": ["approval", "expiry_height"],
    "properties": {
        "approval": {**HEX, "description": "msgpack of the signed approval map (node.chain_msgs)"},
        "expiry_height": {"type": "integer"},
    },
}
BUCKET_META: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                   "owner": ADDRESS, "primary_sp": ADDRESS,
                   "create_height": {"type": "integer"}},
}
OBJECT_META: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "bucket": {"type": "string"},
                   "name": {"type": "string"}, "owner": ADDRESS, "size": {"type": "integer"},
                   "content_type": {"type": "string"},
                   "checksums": {"type": "array", "items": HEX},
                   "status": {"type": "string", "enum": ["CREATED", "SEALED"]},
                   "create_height": {"type": "integer"},
                   "seal_height": {"type": ["integer", "null"]},
                   "secondaries": {"type": "array", "items": ADDRESS},
                   "secondary_sigs": {"type": "array", "items": HEX}},
}
OBJECT_LIST: dict[str, Any] = {
    "type": "object", "required": ["objects", "next_start_after"],
    "properties": {"objects": {"type": "array", "items": OBJECT_META},
                   "next_start_after": {"type": ["string", "null"]}},
}
BUCKET_LIST: dict[str, Any] = {
    "type": "object", "required": ["buckets"],
    "properties": {"buckets": {"type": "array", "items": BUCKET_META}},
}
UPLOAD_PROGRESS: dict[str, Any] = {
    "type": "object",
    "properties": {"object_id": {"type": "integer"}, "state": {"type": "string"},
                   "segments_done": {"type": "integer"}, "bytes_done": {"type": "integer"},
                   "error": {"type": "string"},
                   "update_time": {"type": ["number", "null"]}},
}
STATUS: dict[str, Any] = {
    "type": "object", "required": ["node", "operator", "modulars", "height"],
    "properties": {"node": {"type": "string"}, "operator": ADDRESS,
                   "modulars": {"type": "array", "items": {"type": "string"}},
                   "height": {"type": ["integer", "null"]},
                   "endpoint": {"type": ["string", "null"]}},
}
QUERY_PREFIX: dict[str, Any] = {"type": "string", "maxLength": MAX_QUERY_STRING}
QUERY_LIMIT: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_LIMIT}


def invalid(field: str, reason: str) -> ServiceError:
    return ServiceError("InvalidArgument", f"{field}: {reason}", 400)


_compiled: dict[str, re.Pattern[str]] = {}


def _pattern(p: str) -> re.Pattern[str]:
    if p not in _compiled:
        _compiled[p] = re.compile(p)
    return _compiled[p]


def validate(value: Any, schema: dict[str, Any], field: str = "body") -> Any:
    """Return ``value`` (with object defaults filled in) or raise InvalidArgument (400)."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise invalid(field, "must be a JSON object")
        props: dict[str, Any] = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            extra = [k for k in value if k not in props]
            if extra:
                raise invalid(field, f"unknown field {str(extra[0])[:64]!r}")
        for name in schema.get("required", ()):
            if name not in value:
                raise invalid(field, f"missing field {name!r}")
        out = {}
        for name, sub in props.items():
            if name in value:
                out[name] = validate(value[name], sub, f"{field}.{name}")
            elif "default" in sub:
                out[name] = sub["default"]
        return out
    if kind == "string":
        if not isinstance(value, str):
            raise invalid(field, "must be a string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(field, "is not valid Unicode") from None
        if len(value) < schema.get("minLength", 0):
            raise invalid(field, "is too short")
        if len(value) > schema.get("maxLength", len(value)):
            raise invalid(field, f"is longer than {schema['maxLength']} characters")
        if "pattern" in schema and not _pattern(schema["pattern"]).fullmatch(value):
            raise invalid(field, "has an invalid format")
        return value
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(field, "must be an integer")
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            raise invalid(field, "is out of range")
        return value
    if kind == "array":
        if not isinstance(value, list):
            raise invalid(field, "must be an array")
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            raise invalid(field, "has the wrong number of items")
        return [validate(v, schema["items"], f"{field}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"the validator does not know schema type {kind!r}")


def check_bucket(name: str) -> str:
    """A bucket name from a path: 400 InvalidBucketName unless it is one the chain accepts."""
    if not _pattern(BUCKET_PATTERN).fullmatch(name):
        raise ServiceError("InvalidBucketName", f"invalid bucket name {name[:80]!r}", 400)
    return name


def check_object(name: str) -> str:
    return validate(name, OBJECT_NAME, "object")


def query_string(value: str | None, field: str) -> str:
    if value is None:
        return ""
    return validate(value, QUERY_PREFIX, field)


def query_int(value: str | None, field: str, schema: dict[str, Any]) -> int | None:
    if value is None or value == "":
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 12:
        raise invalid(field, "must be a non-negative integer")
    return validate(int(value), schema, field)
