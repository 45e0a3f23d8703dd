"""Client errors as JSON that names the field, in the shape of a failed PlacementReply.

``{"ok": false, "error": {"code": "invalid_request", "message": "...", "field": "batch"}}``:
the same ``ok``/``error`` envelope the planner answers with, so a client reads one shape
whichever side said no; ``field`` is a dotted path (``model.layers``, ``exclude_nodes[0]``)
or null when the body as a whole was wrong (not JSON, not an object).
"""

from __future__ import annotations

import difflib
import re

import msgspec

from shardplane.bus.codec import DecodeError, peek_identity
from shardplane.bus.errors import ApiServerError
from shardplane.bus.messages import PlacementRequest

_encoder = msgspec.json.Encoder()
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]*)`")


class ApiError(ApiServerError):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        echo: tuple[str | None, str | None] = (None, None),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.echo = echo  # the request's (instance_id, model), where it could be read

    def body(self) -> bytes:
        error = {"code": self.code, "message": self.message, "field": self.field}
        doc: dict[str, object] = {"ok": False, "error": error}
        instance_id, model = self.echo
        if instance_id is not None:
            doc["instance_id"] = instance_id
        if model is not None:
            doc["model"] = model
        return _encoder.encode(doc)


def field_of(message: str) -> str | None:
    """The dotted path of the field a msgspec error is about, or None for the whole body.

    msgspec says ``Expected `int`, got `str` - at `$.batch``` for a bad value and
    ``Object contains unknown field `contxt``` (with `` - at `$.model``` when nested) for a
    stray or missing key."""
    path = ""
    at = _AT.search(message)
    if at:
        path = at.group(1)
    named = _FIELD.search(message)
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    return path or None


def _choices(field: str) -> str:
    """The allowed values of a top-level enum field, from the contract's own schema."""
    schema = msgspec.json.schema(PlacementRequest)
    defs = schema.get("$defs", {})
    ref = str(schema.get("$ref", "")).rsplit("/", 1)[-1]
    prop = defs.get(ref, {}).get("properties", {}).get(field, {})
    values = prop.get("enum")
    return f"; allowed: {', '.join(map(str, values))}" if values else ""


def _suggest(name: str) -> str:
    fields = PlacementRequest.__struct_fields__
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else f"; known fields: {', '.join(fields)}"


def request_error(
    exc: msgspec.ValidationError | msgspec.DecodeError | DecodeError, raw: bytes
) -> ApiError:
    """A 400 for a PlacementRequest body that does not decode, naming the field, and the
    request's instance id and model where they can still be read."""
    if not raw.strip():
        return ApiError(
            400, "invalid_request", "empty body; expected a PlacementRequest JSON object"
        )
    echo = peek_identity(raw, "json")
    if isinstance(exc, DecodeError):  # over a limit: too large, nested too deep
        return ApiError(400, "invalid_request", str(exc), None, echo)
    if not isinstance(exc, msgspec.ValidationError):
        return ApiError(400, "invalid_request", f"the body is not valid JSON: {exc}", None, echo)
    message = str(exc)
    field = field_of(message)
    if field is not None and "unknown field" in message and "." not in field:
        message += _suggest(field)
    elif field is not None and message.startswith("Invalid enum value"):
        message += _choices(field)
    return ApiError(400, "invalid_request", f"invalid PlacementRequest: {message}", field, echo)
