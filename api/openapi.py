"""The OpenAPI 3.1 description of the API, served at ``/api/openapi.json``.

The bus types' schemas come from msgspec, so they cannot drift from the contract; the API's
own views (a KV value flattened) are described as the bus type plus the fields the API adds.
"""

from __future__ import annotations

import functools
from typing import Any, get_args

import msgspec

from shardplane.api import openai_compat
from shardplane.api.metrics import RENDER_INTERVAL_S
from shardplane.api.state import LIST_MAX_AGE_S
from shardplane.bus.messages import (
    DeviceSample,
    ErrorCode,
    ErrorInfo,
    InstanceState,
    NodeHeartbeat,
    PlacementReply,
    PlacementRequest,
    ReleaseReply,
)

Schema = dict[str, Any]

# Codes only the API's own answers carry (a path or method that does not exist); every other
# error code is a bus ErrorCode, so each answer to POST /api/placements decodes as a
# PlacementReply whichever side said no.
API_ONLY_CODES = ("not_found", "method_not_allowed")
ERROR_CODES: tuple[str, ...] = (*get_args(ErrorCode), *API_ONLY_CODES)

LIST_STALENESS = (
    f"While the fleet changes, a list is rebuilt at most every {LIST_MAX_AGE_S:g} s, so it "
    f"shows the cluster state as of at most {LIST_MAX_AGE_S:g} s ago (`revision` says which); "
    "/api/events carries every change as it happens."
)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERROR = _json(_ref("ApiError"), "error; `error.field` names the offending field")


def _get(
    summary: str,
    schema: Schema,
    *,
    params: list[Schema] | None = None,
    errors: tuple[int, ...] = (400,),
    description: str | None = None,
) -> Schema:
    op: Schema = {"summary": summary, "responses": {"200": _json(schema, "OK")}}
    if description:
        op["description"] = description
    for status in errors:
        op["responses"][str(status)] = ERROR
    if params:
        op["parameters"] = params
    return {"get": op}


def _param(
    name: str, where: str, description: str, required: bool = False, enum: list[str] | None = None
) -> Schema:
    schema: Schema = {"type": "string"}
    if enum:
        schema["enum"] = enum
    return {
        "name": name,
        "in": where,
        "required": required,
        "description": description,
        "schema": schema,
    }


def _list(name: str, item: Schema) -> Schema:
    return {
        "type": "object",
        "required": ["count", "revision", name],
        "properties": {
            "count": {"type": "integer"},
            "revision": {"type": "integer", "description": "newest KV revision in the cache"},
            name: {"type": "array", "items": item},
        },
    }


LIVENESS: Schema = {
    "id": {"type": "string"},
    "status": {"enum": ["online", "offline"]},
    "online": {"type": "boolean"},
    "last_seen": {"type": "number", "description": "unix time of the newest sample"},
    "offline_reason": {"type": ["string", "null"]},
    "revision": {"type": "integer", "description": "KV revision of this entry"},
}


# Each device also carries these (the original design's names), so a client written against
# that design works unchanged; `temperature_c` is DeviceSample's own field.
DEVICE_DESIGN_NAMES: Schema = {
    "device_id": {"type": "string", "description": "`<node>/<index>`, the same as `id`"},
    "node_id": {"type": "string", "description": "the node, the same as `node`"},
    "memory_used_mb": {
        "type": ["integer", "null"],
        "description": "`memory_used_bytes` in whole MiB (2^20 bytes, as nvidia-smi counts)",
    },
    "memory_total_mb": {
        "type": ["integer", "null"],
        "description": "`memory_total_bytes` in whole MiB",
    },
    "utilization_percent": {
        "type": ["number", "null"],
        "description": "GPU utilisation, %: the same as `utilization_gpu_pct`",
    },
}


def _components() -> Schema:
    _, bus = msgspec.json.schema_components(
        [
            DeviceSample,
            NodeHeartbeat,
            InstanceState,
            PlacementRequest,
            PlacementReply,
            ReleaseReply,
            ErrorInfo,
        ],
        ref_template="#/components/schemas/{name}",
    )
    schemas: Schema = dict(bus)
    schemas["DeviceView"] = {
        "description": "a DeviceSample flattened, plus liveness (`id` is `<node>/<index>`) and "
        "the names the original API design used for some figures",
        "allOf": [
            _ref("DeviceSample"),
            {
                "type": "object",
                "required": [*LIVENESS, *DEVICE_DESIGN_NAMES, "temperature_c"],
                "properties": {**LIVENESS, **DEVICE_DESIGN_NAMES},
            },
        ],
    }
    schemas["NodeView"] = {
        "description": "a NodeHeartbeat flattened, plus liveness and sums over its devices",
        "allOf": [
            _ref("NodeHeartbeat"),
            {
                "type": "object",
                "properties": {
                    **LIVENESS,
                    "heartbeat": {
                        "type": "boolean",
                        "description": "false: devices seen, no heartbeat yet",
                    },
                    "devices": {"type": "array", "items": {"type": "string"}},
                    "devices_online": {"type": "integer"},
                    "memory_total_bytes": {"type": "integer"},
                    "memory_used_bytes": {"type": "integer"},
                    "memory_free_bytes": {"type": "integer"},
                    "power_w": {"type": "number"},
                },
            },
        ],
    }
    schemas["PlacementView"] = {
        "description": "an InstanceState (the newest generation, each stage's status)",
        "allOf": [
            _ref("InstanceState"),
            {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "layers_total": {"type": "integer"},
                    "devices": {"type": "array", "items": {"type": ["string", "null"]}},
                    "revision": {"type": "integer"},
                },
            },
        ],
    }
    schemas["Link"] = {
        "type": "object",
        "properties": {
            "kind": {"enum": ["nvlink", "pcie", "network"]},
            "a": {"type": "string", "description": "device id (nvlink, pcie) or node id (network)"},
            "b": {"type": "string"},
            "node": {"type": ["string", "null"], "description": "the host, for same-host links"},
            "links": {"type": "integer", "description": "lanes (nvlink)"},
            "gbit_s": {"type": ["number", "null"], "description": "speed, Gbit/s"},
            "gbytes_s": {"type": ["number", "null"], "description": "the same speed, GB/s"},
            "latency_ms": {"type": ["number", "null"]},
            "peer_known": {
                "type": "boolean",
                "description": "network: the peer node is in the state",
            },
        },
    }
    schemas["Topology"] = {
        "type": "object",
        "properties": {
            "nodes": {"type": "array", "items": {"type": "object"}},
            "devices": {"type": "array", "items": {"type": "object"}},
            "links": {"type": "array", "items": _ref("Link")},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "revision": {"type": "integer"},
        },
    }
    schemas["History"] = {
        "type": "object",
        "properties": {
            "points": {"type": "integer", "description": "ring size per device"},
            "devices": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "description": "oldest first: t (unix s), util (%), mem_used (bytes), temp (C), power (W)",
                    "additionalProperties": {
                        "type": "array",
                        "items": {"type": ["number", "null"]},
                    },
                },
            },
        },
    }
    schemas["ApiError"] = {
        "type": "object",
        "required": ["ok", "error"],
        "properties": {
            "ok": {"const": False},
            "error": {
                "type": "object",
                "properties": {
                    "code": {
                        "enum": list(ERROR_CODES),
                        "description": "a bus ErrorCode (as the planner answers) or, for a "
                        "path or method that does not exist, not_found / method_not_allowed",
                    },
                    "message": {"type": "string"},
                    "field": {"type": ["string", "null"]},
                },
            },
        },
    }
    return schemas


def document() -> Schema:
    # The status follows `error.code` alone (api.server.ERROR_STATUS), never the planner's
    # Nats-Service-Error-Code header (503/507 there), so a 503 here always means no planner.
    failed = _ref("PlacementReply")
    place_responses: Schema = {
        "200": _json(_ref("PlacementReply"), "placed (the planner's reply as is)"),
        "400": _json(
            {"oneOf": [_ref("ApiError"), failed]},
            "invalid_request: the body failed validation here (`error.field` names the field) "
            "or at the planner",
        ),
        "404": _json(
            failed,
            "unknown_model: the planner does not know the model (not_found answers only a "
            "release, DELETE /api/placements/{id})",
        ),
        "409": _json(
            failed,
            "no_devices, insufficient_memory or conflict: the request is valid but the fleet's "
            "current state cannot take it (it may fit later, or with other options)",
        ),
        "413": _json(_ref("ApiError"), "invalid_request: the body is over 1 MiB"),
        "500": _json(failed, "internal: the planner failed on this request"),
        "502": _json(_ref("ApiError"), "internal: the planner's reply is not a PlacementReply"),
        "503": _json(
            _ref("ApiError"),
            "unavailable: no planner answers placement.request (or the API has no NATS "
            "connection); nothing was planned, retry later",
        ),
        "504": _json(
            {"oneOf": [_ref("ApiError"), failed]},
            "timeout: the planner did not answer in time, or gave up itself",
        ),
    }
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "shardplane status API",
            "version": "1",
            "description": "The cluster state (devices, nodes, placements) from the cluster_state "
            "KV bucket, live events, Prometheus metrics, and placement requests to the planner.",
        },
        "paths": {
            "/api/gpu/devices": _get(
                "every device with its newest figures and liveness",
                _list("devices", _ref("DeviceView")),
                description=LIST_STALENESS,
                params=[
                    _param("node", "query", "only this node's devices"),
                    _param(
                        "status",
                        "query",
                        "only online or offline devices",
                        enum=["online", "offline"],
                    ),
                ],
            ),
            "/api/gpu/devices/{node}/{index}": _get(
                "one device",
                _ref("DeviceView"),
                params=[
                    _param("node", "path", "node id", True),
                    _param("index", "path", "device index", True),
                ],
                errors=(400, 404),
            ),
            "/api/gpu/history": _get(
                "the last minutes of each device's figures, for charts",
                _ref("History"),
                params=[
                    _param("device", "query", "one device, `<node>/<index>`"),
                    _param(
                        "node", "query", "one node's devices (a filter is needed above 512 devices)"
                    ),
                ],
                errors=(400, 404),
            ),
            "/api/gpu/topology": _get(
                "nodes, devices and links (NVLink pairs, same-host PCIe, network)",
                _ref("Topology"),
                description=LIST_STALENESS,
            ),
            "/api/nodes": _get(
                "every node with its devices",
                _list("nodes", _ref("NodeView")),
                description=LIST_STALENESS,
            ),
            "/api/placements": {
                **_get(
                    "every placed instance",
                    _list("placements", _ref("PlacementView")),
                    description=LIST_STALENESS,
                ),
                "post": {
                    "summary": "place a model: the body is forwarded over placement.request",
                    "description": "Every error answer has the PlacementReply envelope "
                    "`{ok: false, error: {code, message}}` (plus `field` when the API rejected it), "
                    "and its status follows `error.code`: invalid_request 400 (413 for a body over "
                    "1 MiB), unknown_model 404, no_devices / insufficient_memory / conflict 409, "
                    "internal 500 (502 when the planner's reply is malformed), unavailable 503, "
                    "timeout 504.",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("PlacementRequest")}},
                    },
                    "responses": place_responses,
                },
            },
            "/api/placements/{id}": {
                **_get(
                    "one placed instance",
                    _ref("PlacementView"),
                    params=[_param("id", "path", "instance id", True)],
                    errors=(400, 404),
                ),
                "delete": {
                    "summary": "release an instance over placement.release (idempotent): "
                    "workers unload, the ledger frees its memory, the instance reads `released`",
                    "parameters": [_param("id", "path", "instance id", True)],
                    "responses": {
                        "200": _json(
                            _ref("ReleaseReply"),
                            "released (`already`: it was released before, nothing changed)",
                        ),
                        "400": ERROR,
                        "404": _json(_ref("ReleaseReply"), "not_found: the ledger has no such id"),
                        "500": _json(_ref("ReleaseReply"), "internal: the planner failed"),
                        "503": ERROR,
                        "504": ERROR,
                    },
                },
            },
            "/api/events": {
                "get": {
                    "summary": "server-sent events: `hello`, then one `device`/`node`/`instance` "
                    "event per KV change ({kind, op: put|delete, key, id, revision, value}), "
                    "`resync` when the client must reload the lists",
                    "parameters": [
                        _param("kinds", "query", "comma-separated subset of device,node,instance")
                    ],
                    "responses": {
                        "200": {
                            "description": "an event stream",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}},
                        },
                        "400": ERROR,
                    },
                }
            },
            "/healthz": _get("the process is alive", {"type": "object"}, errors=()),
            "/readyz": {
                "get": {
                    "summary": "NATS connected, the KV readable, the cache loaded",
                    "responses": {
                        "200": _json({"type": "object"}, "ready"),
                        "503": _json({"type": "object"}, "not ready; `problems` says why"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus text format: NVIDIA GPUs under dcgm-exporter's names "
                    "and labels (gpu, UUID, pci_bus_id, device, modelName, hostname, "
                    "DCGM_FI_DRIVER_VERSION), AMD GPUs under AMD device-metrics-exporter's "
                    "(gpu_gfx_activity, ...; gpu_id, gpu_uuid, card_model, hostname, "
                    "driver_version), and shardplane_* families (labels node, device_id, "
                    "instance_id; seconds and bytes) for liveness, placements and stages",
                    "description": "An offline device has only shardplane_device_up (0). The host "
                    "label is `hostname` (`Hostname`, a released dcgm-exporter's spelling, with "
                    "SHARDPLANE_METRICS_HOSTNAME_LABEL=Hostname). "
                    "Served from a text rendered in the background at most every "
                    f"{RENDER_INTERVAL_S:g} s while something scrapes (gzip when asked), so the "
                    f"figures are at most {RENDER_INTERVAL_S:g} s plus one render (well under a "
                    "second at 8,000 devices) older than the cluster state.",
                    "responses": {"200": {"description": "OK", "content": text}},
                }
            },
            "/api/openapi.json": _get("this document", {"type": "object"}, errors=()),
            **openai_compat.openapi_parts()[0],
        },
        "components": {"schemas": {**_components(), **openai_compat.openapi_parts()[1]}},
    }


@functools.cache
def document_bytes() -> bytes:
    return msgspec.json.encode(document())
