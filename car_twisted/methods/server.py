"""
``server.handshake``, ``capabilities.list`` and ``server.schema``.

The handshake is exact and per connection: protocol 3 (``car-runtime``
0.58.0, with ``required_capabilities``) or 2.  A repeat of the negotiated
version is idempotent; a missing, non-numeric or unsupported version, a
change of version, or a required capability this daemon lacks answers
``-32006`` and leaves the connection as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from zope.interface import implementer

from car_twisted._version import SUPPORTED_PROTOCOL_VERSIONS
from car_twisted._version import __version__ as SERVER_VERSION
from car_twisted.errors import ProtocolMismatch, short_repr
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.rpc.params import describe_params
from car_twisted.rpc.registry import MethodSpec
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["ServerMethods"]

MAX_CAPABILITIES = 256


@attrs.frozen
class HandshakeParams:
    # Whatever JSON: the checks below give -32006, not -32602, for a bad version.
    protocol_version: JsonValue = None
    client_version: str | None = attrs.field(default=None, metadata={"max_len": 256})
    required_capabilities: list[str] | None = attrs.field(
        default=None, metadata={"max_len": MAX_CAPABILITIES}
    )


def _version_number(raw: JsonValue) -> int | None:
    if type(raw) is int:
        return raw
    if type(raw) is float and raw.is_integer():
        return int(raw)
    return None


@implementer(IMethodProvider)
class ServerMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec(
                "server.handshake",
                self.handshake,
                params=HandshakeParams,
                description="Negotiate this connection's wire protocol version (3 or 2).",
            ),
            MethodSpec(
                "capabilities.list",
                self.capabilities,
                description="Protocol versions, methods and namespaces this daemon implements.",
            ),
            MethodSpec(
                "server.schema",
                self.schema,
                description="Every implemented method with its params.",
            ),
        )

    def handshake(self, session: ClientSession, p: HandshakeParams) -> dict[str, object]:
        supported = ", ".join(str(v) for v in SUPPORTED_PROTOCOL_VERSIONS)
        if p.protocol_version is None:
            raise ProtocolMismatch(
                f"protocol version mismatch: protocol_version is missing; this daemon speaks {supported}",
                data={"supported": list(SUPPORTED_PROTOCOL_VERSIONS)},
            )
        version = _version_number(p.protocol_version)
        if version is None:
            raise ProtocolMismatch(
                f"protocol version mismatch: protocol_version must be a number, got {short_repr(p.protocol_version)}",
                data={"supported": list(SUPPORTED_PROTOCOL_VERSIONS)},
            )
        if version not in SUPPORTED_PROTOCOL_VERSIONS:
            raise ProtocolMismatch(
                f"protocol version mismatch: client speaks {version}, this daemon speaks {supported}",
                data={"supported": list(SUPPORTED_PROTOCOL_VERSIONS), "requested": version},
            )
        if session.protocol_version is not None and session.protocol_version != version:
            raise ProtocolMismatch(
                f"protocol version mismatch: this connection already negotiated "
                f"{session.protocol_version}; reconnect to use {version}",
                data={"negotiated": session.protocol_version, "requested": version},
            )
        required = tuple(p.required_capabilities or ())
        # The capability names are built only when something is required.
        missing = sorted(set(required) - self.state.capability_names()) if required else []
        if missing:
            raise ProtocolMismatch(
                "protocol version mismatch: required capabilities not supported: "
                + ", ".join(missing),
                data={"missing_capabilities": missing},
            )
        session.protocol_version = version
        session.client_version = p.client_version
        session.required_capabilities = required
        return {
            "protocol_version": version,
            "server_version": SERVER_VERSION,
            "client_protocol_version": version,
        }

    def capabilities(self, session: ClientSession, params: JsonValue) -> dict[str, object]:
        names = self.state.methods.names()
        return {
            "server": "car-twisted",
            "server_version": SERVER_VERSION,
            "protocol_versions": list(SUPPORTED_PROTOCOL_VERSIONS),
            "methods": names,
            "namespaces": sorted({n.split(".", 1)[0] for n in names}),
            "auth_enabled": self.state.auth_enabled,
        }

    def schema(self, session: ClientSession, params: JsonValue) -> dict[str, object]:
        return {
            "server_version": SERVER_VERSION,
            "methods": {
                spec.name: {
                    "description": spec.description,
                    "params": describe_params(spec.params) if spec.params is not None else None,
                    "requires_auth": spec.requires_auth,
                    "requires_handshake": spec.requires_handshake,
                }
                for spec in self.state.methods
            },
        }
