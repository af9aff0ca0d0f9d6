"""
The A2UI surface store behind ``a2ui.apply`` / ``get`` / ``surfaces`` / ``reap``.

``SurfaceStore.apply`` takes one A2UI v0.9 server-to-client message --
``createSurface``, ``updateComponents``, ``updateDataModel`` or
``deleteSurface``, optionally with ``"version": "v0.9"`` / ``"v0.9.1"``,
bare or wrapped as ``{envelope: message}`` -- checks all of it against the
catalog and the limits, and only then replaces the surface: a message that
fails leaves every surface as it was.  Errors are ``A2uiError`` (``-32602``)
whose ``data.reason`` is one of ``REASONS``.

Semantics, where the spec leaves a choice:

- A message carries exactly one of the four message keys and nothing but
  ``version`` beside it (the schema's ``additionalProperties: false``);
  unknown members inside the message body are ignored and not stored.
- ``updateComponents`` upserts by ``id``; one message may not repeat an id.
  Components are a flat list, so a reference may name a component later in
  the same message or one stored by an earlier message, but every
  reference must resolve once the message is applied (``dangling_reference``);
  this store does not keep the half-built trees that progressive rendering
  tolerates.  No component may contain itself (``cycle``).  Depth is the
  number of components on the longest chain from the ``root`` component
  (root alone: 1); a surface without ``root`` yet has depth 0.
- ``updateDataModel``: ``path`` is a JSON Pointer (RFC 6901); missing,
  ``""`` or ``"/"`` means the whole model, which must stay an object.  With
  ``value`` the value at ``path`` is replaced or created (missing objects on
  the way are created; ``-`` or the length appends to an array); without
  ``value`` the key is removed (a missing one is no error).
- Every update refreshes ``updatedAt`` and ``expiresAt`` (``updatedAt`` +
  the TTL).  Expired surfaces stay until ``reap()`` removes them.
- An ``owner`` passed to ``apply`` is recorded on the surface (replacing
  the one before); none keeps the current owner.  Only its public part is
  stored: route credentials live elsewhere.

The ``A2uiSurface`` wire shape (``Surface.to_wire``)::

    {surfaceId, catalogId, components: [component, ...], dataModel,
     createdAt, updatedAt, expiresAt,      # RFC 3339 UTC strings
     sendDataModel: bool, theme?: object,
     owner?: {kind: "a2a" | "local", taskId?, contextId?, endpoint?, session?}}
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import orjson
from twisted.internet.interfaces import IReactorTime

from car_twisted._util import iso_utc
from car_twisted.a2ui.catalog import (
    BASIC_CATALOG_IDS,
    COMPONENTS,
    ROOT_ID,
    ReferenceShapeError,
    TreeError,
    canonical_catalog_id,
    child_references,
    root_depth,
)
from car_twisted.errors import INVALID_PARAMS, RpcError, short_repr
from car_twisted.json_value import JsonValue

__all__ = [
    "MESSAGE_KINDS", "MIME_TYPE", "REASONS", "ROOT_ID", "VERSION", "VERSIONS",
    "A2uiError", "A2uiLimits", "ApplyResult", "Surface", "SurfaceOwner", "SurfaceStore",
]

VERSION = "v0.9"
#: ``version`` values a message may carry (it may also leave it out).
VERSIONS = ("v0.9", "v0.9.1")
#: The media type of A2UI data parts (the A2A extension, "Data encoding").
MIME_TYPE = "application/json+a2ui"
MESSAGE_KINDS = ("createSurface", "updateComponents", "updateDataModel", "deleteSurface")
REASONS = (
    "invalid_message", "unsupported_catalog", "unsupported_component", "limit_exceeded",
    "unknown_surface", "surface_exists", "dangling_reference", "cycle",
)
OWNER_KINDS = ("a2a", "local")
_COMPONENT_SET = frozenset(COMPONENTS)


class A2uiError(RpcError):
    """A refused A2UI message: ``-32602`` with ``data.reason`` (and details)."""

    code = INVALID_PARAMS

    def __init__(self, reason: str, message: str, **details: JsonValue) -> None:
        super().__init__(message, data={"reason": reason, **details}, code=INVALID_PARAMS)
        self.reason = reason


def _invalid(problem: str, **details: JsonValue) -> A2uiError:
    return A2uiError("invalid_message", f"invalid A2UI message: {problem}", **details)


def _limit(limit: str, maximum: float, what: str) -> A2uiError:
    return A2uiError("limit_exceeded", f"A2UI limit exceeded: {what} (max {maximum})", limit=limit, max=maximum)


_positive = [attrs.validators.instance_of(int), attrs.validators.ge(1)]


@attrs.frozen
class A2uiLimits:
    """
    Server-side bounds, reported by ``a2ui.capabilities`` (``to_wire``
    names them; a ``limit_exceeded`` error's ``data.limit`` uses the same
    names).

    @ivar max_surfaces: surfaces held at once (256).
    @ivar max_components: components per surface, after an update (1000).
    @ivar max_depth: components on the longest chain from ``root`` (32).
    @ivar max_string_bytes: UTF-8 bytes of any string or key in a message (16 KiB).
    @ivar max_data_model_bytes: a surface's data model as compact JSON (1 MiB).
    @ivar max_envelope_bytes: one message as compact JSON (2 MiB: room
        for a whole data model and its envelope).
    @ivar max_value_depth: JSON nesting of a message, and the most tokens
        in a data-model path (64).
    @ivar surface_ttl_seconds: a surface expires this long after its last
        update (24 h).
    @ivar max_ingest_envelopes / max_ingest_depth: what ``a2ui.ingest``
        applies from one payload (64) and how deep it looks (32).
    """

    max_surfaces: int = attrs.field(default=256, validator=_positive)
    max_components: int = attrs.field(default=1000, validator=_positive)
    max_depth: int = attrs.field(default=32, validator=_positive)
    max_string_bytes: int = attrs.field(default=16 * 1024, validator=_positive)
    max_data_model_bytes: int = attrs.field(default=1024 * 1024, validator=_positive)
    max_envelope_bytes: int = attrs.field(default=2 * 1024 * 1024, validator=_positive)
    max_value_depth: int = attrs.field(default=64, validator=_positive)
    surface_ttl_seconds: float = attrs.field(default=24 * 3600.0, validator=attrs.validators.gt(0))
    max_ingest_envelopes: int = attrs.field(default=64, validator=_positive)
    max_ingest_depth: int = attrs.field(default=32, validator=_positive)

    def to_wire(self) -> dict[str, JsonValue]:
        return {
            "maxSurfaces": self.max_surfaces,
            "maxComponentsPerSurface": self.max_components,
            "maxDepth": self.max_depth,
            "maxStringBytes": self.max_string_bytes,
            "maxDataModelBytes": self.max_data_model_bytes,
            "maxEnvelopeBytes": self.max_envelope_bytes,
            "maxValueDepth": self.max_value_depth,
            "surfaceTtlSeconds": self.surface_ttl_seconds,
            "maxIngestEnvelopes": self.max_ingest_envelopes,
            "maxIngestDepth": self.max_ingest_depth,
        }


_OWNER_FIELDS = (("task_id", "taskId"), ("context_id", "contextId"), ("endpoint", "endpoint"), ("session", "session"))


@attrs.frozen
class SurfaceOwner:
    """Where a surface's actions go: an A2A task, or a local session.  Public fields only."""

    kind: str = attrs.field(validator=attrs.validators.in_(OWNER_KINDS))
    task_id: str | None = None
    context_id: str | None = None
    endpoint: str | None = None
    session: str | None = None

    def to_wire(self) -> dict[str, JsonValue]:
        wire: dict[str, JsonValue] = {"kind": self.kind}
        for attr, key in _OWNER_FIELDS:
            value = getattr(self, attr)
            if value is not None:
                wire[key] = value
        return wire

    @classmethod
    def from_wire(cls, value: object) -> SurfaceOwner:
        """Read an ``A2uiSurfaceOwner`` (``kind`` defaults to ``a2a``); raises ``invalid_message``."""
        if not isinstance(value, dict):
            raise _invalid("owner must be an object", field="owner")
        kind = value.get("kind", "a2a")
        if kind not in OWNER_KINDS:
            raise _invalid(f"owner.kind must be one of {', '.join(OWNER_KINDS)}", field="owner.kind")
        fields: dict[str, str] = {}
        for attr, key in _OWNER_FIELDS:
            item = value.get(key)
            if item is not None and not isinstance(item, str):
                raise _invalid(f"owner.{key} must be a string", field=f"owner.{key}")
            if item is not None:
                fields[attr] = item
        return cls(kind, **fields)


@attrs.frozen
class Surface:
    """One surface as committed; ``apply`` replaces it, never edits it in place."""

    surface_id: str
    catalog_id: str
    components: dict[str, dict[str, JsonValue]]  # by id, first-seen order
    data_model: dict[str, JsonValue]
    created_at: float
    updated_at: float
    expires_at: float
    owner: SurfaceOwner | None = None
    theme: dict[str, JsonValue] | None = None
    send_data_model: bool = False

    def to_wire(self) -> dict[str, JsonValue]:
        wire: dict[str, JsonValue] = {
            "surfaceId": self.surface_id,
            "catalogId": self.catalog_id,
            "components": list(self.components.values()),
            "dataModel": self.data_model,
            "createdAt": iso_utc(self.created_at),
            "updatedAt": iso_utc(self.updated_at),
            "expiresAt": iso_utc(self.expires_at),
            "sendDataModel": self.send_data_model,
        }
        if self.theme is not None:
            wire["theme"] = self.theme
        if self.owner is not None:
            wire["owner"] = self.owner.to_wire()
        return wire


@attrs.frozen
class ApplyResult:
    """What ``a2ui.apply`` answers: ``{surfaceId, deleted, surface?}``; ``kind`` is the message applied."""

    surface_id: str
    deleted: bool
    surface: Surface | None = None
    kind: str = ""

    def to_wire(self) -> dict[str, JsonValue]:
        wire: dict[str, JsonValue] = {"surfaceId": self.surface_id, "deleted": self.deleted}
        if self.surface is not None and not self.deleted:
            wire["surface"] = self.surface.to_wire()
        return wire


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _check_value(value: object, limits: A2uiLimits) -> None:
    """That C{value} is plain JSON within the string and nesting limits (no recursion)."""
    max_str = limits.max_string_bytes
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if len(node) * 4 > max_str and _utf8_len(node) > max_str:
                raise _limit("maxStringBytes", max_str, "a string is too long")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise _invalid("numbers must be finite")
        elif node is None or isinstance(node, (bool, int)):
            continue
        elif isinstance(node, (list, dict)):
            if depth > limits.max_value_depth:
                raise _limit("maxValueDepth", limits.max_value_depth, "the message nests too deeply")
            if isinstance(node, dict):
                for key in node:
                    if not isinstance(key, str):
                        raise _invalid("object keys must be strings")
                    stack.append((key, depth))
                stack.extend((item, depth + 1) for item in node.values())
            else:
                stack.extend((item, depth + 1) for item in node)
        else:
            raise _invalid(f"{type(node).__name__} is not a JSON value")


def _pointer(path: str) -> list[str]:
    if path in ("", "/"):
        return []
    if not path.startswith("/"):
        raise _invalid("updateDataModel.path must be a JSON Pointer starting with '/'", field="path")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _index(token: str, length: int, *, appending: bool) -> int | None:
    if token == "-":
        return length if appending else None
    if not token.isascii() or not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise _invalid(f"array index {short_repr(token)} in updateDataModel.path is not a number", field="path")
    index = int(token)
    return index if index < length or (appending and index == length) else None


def _edit(node: JsonValue, tokens: list[str], value: JsonValue, remove: bool) -> JsonValue:
    """C{node} with C{value} at C{tokens} (or that key removed): copies along the path, shares the rest."""
    head, rest = tokens[0], tokens[1:]
    container: Any
    key: str | int
    if node is None and not remove:
        node = {}
    if isinstance(node, dict):
        if remove and head not in node:
            return node
        container, key, child = dict(node), head, node.get(head)
    elif isinstance(node, list):
        index = _index(head, len(node), appending=not remove)
        if index is None:
            if remove:
                return node
            raise _invalid(f"array index {head} is out of range in updateDataModel.path", field="path")
        container, key = list(node), index
        if index == len(node):
            container.append(None)
        child = container[index]
    elif remove:
        return node
    else:
        raise _invalid("updateDataModel.path goes through a value that is not an object or array", field="path")
    if rest:
        container[key] = _edit(child, rest, value, remove)
    elif remove:
        del container[key]
    else:
        container[key] = value
    edited: JsonValue = container
    return edited


class SurfaceStore:
    """The daemon's A2UI surfaces, by id, in creation order."""

    def __init__(self, clock: IReactorTime, limits: A2uiLimits | None = None) -> None:
        self._clock = clock
        self.limits = limits if limits is not None else A2uiLimits()
        self._surfaces: dict[str, Surface] = {}

    def capabilities(self) -> dict[str, JsonValue]:
        return {
            "version": VERSION,
            "mimeType": MIME_TYPE,
            "catalogs": list(BASIC_CATALOG_IDS),
            "components": list(COMPONENTS),
            "limits": self.limits.to_wire(),
        }

    def get(self, surface_id: str) -> Surface | None:
        return self._surfaces.get(surface_id)

    def surfaces(self) -> list[Surface]:
        return list(self._surfaces.values())

    def delete(self, surface_id: str) -> bool:
        """Drop a surface; whether there was one."""
        return self._surfaces.pop(surface_id, None) is not None

    def reap(self) -> list[str]:
        """Remove the surfaces whose ``expiresAt`` has come; their ids."""
        now = self._clock.seconds()
        gone = [sid for sid, surface in self._surfaces.items() if surface.expires_at <= now]
        for sid in gone:
            del self._surfaces[sid]
        return gone

    def apply(self, envelope: object, owner: SurfaceOwner | None = None) -> ApplyResult:
        """Validate one message in full, then commit it; raises ``A2uiError`` having changed nothing."""
        msg = self._read(envelope)
        kind = next(k for k in MESSAGE_KINDS if k in msg)
        body = msg[kind]
        if not isinstance(body, dict):
            raise _invalid(f"{kind} must be an object")
        sid = body.get("surfaceId")
        if not isinstance(sid, str) or not sid:
            raise _invalid(f"{kind}.surfaceId must be a non-empty string", field="surfaceId")
        if owner is not None:
            for attr, key in _OWNER_FIELDS:
                value = getattr(owner, attr)
                if value is not None and _utf8_len(value) > self.limits.max_string_bytes:
                    raise _limit("maxStringBytes", self.limits.max_string_bytes, f"owner.{key} is too long")
        now = self._clock.seconds()
        current = self._surfaces.get(sid)
        if kind == "createSurface":
            surface = self._create(sid, body, owner, now)
        elif current is None:
            raise A2uiError("unknown_surface", f"no A2UI surface {short_repr(sid)}", surfaceId=sid)
        elif kind == "deleteSurface":
            del self._surfaces[sid]
            return ApplyResult(sid, True, None, kind)
        else:
            if kind == "updateComponents":
                surface = self._update_components(current, body)
            else:
                surface = attrs.evolve(current, data_model=self._update_data(current.data_model, body))
            surface = attrs.evolve(
                surface, updated_at=now, expires_at=now + self.limits.surface_ttl_seconds,
                owner=owner if owner is not None else current.owner,
            )
        self._surfaces[sid] = surface
        return ApplyResult(sid, False, surface, kind)

    def _read(self, envelope: object) -> dict[str, Any]:
        """The message, unwrapped, checked as JSON within the limits, as a private copy."""
        if isinstance(envelope, dict) and "envelope" in envelope and not any(k in envelope for k in MESSAGE_KINDS):
            envelope = envelope["envelope"]
        if not isinstance(envelope, dict):
            raise _invalid("an A2UI message must be a JSON object")
        kinds = [k for k in MESSAGE_KINDS if k in envelope]
        if len(kinds) != 1:
            raise _invalid(f"a message carries exactly one of {', '.join(MESSAGE_KINDS)}")
        extra = [str(k) for k in envelope if k not in (kinds[0], "version")]
        if extra:
            raise _invalid(f"unexpected member {short_repr(extra[0])} beside {kinds[0]}")
        if "version" in envelope and envelope["version"] not in VERSIONS:
            raise _invalid(f"version must be one of {', '.join(VERSIONS)}", field="version")
        _check_value(envelope, self.limits)
        try:
            encoded = orjson.dumps(envelope)
        except (orjson.JSONEncodeError, TypeError):
            raise _invalid("the message is not encodable as JSON") from None
        if len(encoded) > self.limits.max_envelope_bytes:
            raise _limit("maxEnvelopeBytes", self.limits.max_envelope_bytes, "the message is too large")
        copy: dict[str, Any] = orjson.loads(encoded)
        return copy

    def _create(self, sid: str, body: dict[str, Any], owner: SurfaceOwner | None, now: float) -> Surface:
        if sid in self._surfaces:
            raise A2uiError("surface_exists", f"A2UI surface {short_repr(sid)} already exists", surfaceId=sid)
        catalog = body.get("catalogId")
        if catalog is not None and not isinstance(catalog, str):
            raise _invalid("createSurface.catalogId must be a string", field="catalogId")
        canonical = canonical_catalog_id(catalog)
        if canonical is None:
            raise A2uiError(
                "unsupported_catalog", f"unsupported A2UI catalog {short_repr(catalog)}",
                catalogId=catalog, supported=list(BASIC_CATALOG_IDS),
            )
        theme = body.get("theme")
        if theme is not None and not isinstance(theme, dict):
            raise _invalid("createSurface.theme must be an object", field="theme")
        send = body.get("sendDataModel", body.get("attachDataModelToRequests", False))
        if not isinstance(send, bool):
            raise _invalid("createSurface.sendDataModel must be a boolean", field="sendDataModel")
        if len(self._surfaces) >= self.limits.max_surfaces:
            raise _limit("maxSurfaces", self.limits.max_surfaces, "too many A2UI surfaces")
        ttl = self.limits.surface_ttl_seconds
        return Surface(sid, canonical, {}, {}, now, now, now + ttl, owner, theme, send)

    def _update_components(self, current: Surface, body: dict[str, Any]) -> Surface:
        listed = body.get("components")
        if not isinstance(listed, list) or not listed:
            raise _invalid("updateComponents.components must be a non-empty array", field="components")
        max_components = self.limits.max_components
        if len(listed) > max_components:
            raise _limit("maxComponentsPerSurface", max_components, "too many components")
        batch: dict[str, dict[str, JsonValue]] = {}
        for i, comp in enumerate(listed):
            where = f"components[{i}]"
            if not isinstance(comp, dict):
                raise _invalid(f"{where} must be an object", field=where)
            cid = comp.get("id")
            if not isinstance(cid, str) or not cid:
                raise _invalid(f"{where}.id must be a non-empty string", field=f"{where}.id")
            if cid in batch:
                raise _invalid(f"component id {short_repr(cid)} appears twice", field=f"{where}.id", componentId=cid)
            ctype = comp.get("component")
            if not isinstance(ctype, str):
                raise _invalid(f"{where}.component must name a component type", field=f"{where}.component")
            if ctype not in _COMPONENT_SET:
                raise A2uiError(
                    "unsupported_component", f"unsupported A2UI component {short_repr(ctype)}",
                    component=ctype, componentId=cid,
                )
            try:
                child_references(ctype, comp)
            except ReferenceShapeError as e:
                raise _invalid(f"{where}.{e.prop}: {e.problem}", field=f"{where}.{e.prop}", componentId=cid) from None
            batch[cid] = comp
        merged = {**current.components, **batch}
        if len(merged) > max_components:
            raise _limit("maxComponentsPerSurface", max_components, "too many components")
        try:
            depth = root_depth(merged)
        except TreeError as e:
            raise A2uiError(e.reason, str(e), componentId=e.component_id, **({} if e.missing is None else {"missing": e.missing})) from None
        if depth > self.limits.max_depth:
            raise _limit("maxDepth", self.limits.max_depth, "the component tree under 'root' is too deep")
        return attrs.evolve(current, components=merged)

    def _update_data(self, model: dict[str, JsonValue], body: dict[str, Any]) -> dict[str, JsonValue]:
        path = body.get("path")
        if path is not None and not isinstance(path, str):
            raise _invalid("updateDataModel.path must be a string", field="path")
        tokens = _pointer(path) if path is not None else []
        if len(tokens) > self.limits.max_value_depth:
            raise _limit("maxValueDepth", self.limits.max_value_depth, "updateDataModel.path is too deep")
        remove = "value" not in body
        if tokens:
            new = _edit(model, tokens, body.get("value"), remove)
        else:
            new = {} if remove else body["value"]
        if not isinstance(new, dict):
            raise _invalid("the whole data model must be an object", field="value")
        size = len(orjson.dumps(new))
        if size > self.limits.max_data_model_bytes:
            raise _limit("maxDataModelBytes", self.limits.max_data_model_bytes, f"the data model would be {size} bytes")
        return new
