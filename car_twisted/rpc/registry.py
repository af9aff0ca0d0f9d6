"""
The one table from JSON-RPC method names to handlers.

A handler is called as ``handler(session, params)`` where ``params`` is an
instance of the spec's ``params`` attrs class (or the raw JSON value when
the spec declares none).  It may return a JSON-ready value, a Deferred, or
be ``async def``; the dispatcher only builds a Deferred when the handler
really waits.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import attrs
from zope.interface import implementer

from car_twisted.interfaces import IMethodProvider

__all__ = ["MethodSpec", "MethodRegistry", "StaticMethods"]

Handler = Callable[[Any, Any], Any]


@attrs.frozen
class MethodSpec:
    """
    One JSON-RPC method.

    @ivar requires_auth: refused with ``-32001`` on an unauthenticated
        connection when auth is on (only ``session.auth`` sets this False).
    @ivar requires_handshake: refused with ``-32005`` until the connection
        has negotiated a protocol version.
    @ivar deadline: seconds, or a callable of the parsed params returning
        seconds (or None for the daemon default); overrides
        ``CAR_HANDLER_TIMEOUT`` for this method.
    @ivar parse_at_edge: the dispatcher parses ``params`` into the params
        class before the handler runs; False hands the handler the raw
        value (it parses itself, e.g. to count a malformed call) while
        ``server.schema`` still describes the class.
    """

    name: str
    handler: Handler
    params: type | None = None
    requires_auth: bool = True
    requires_handshake: bool = False
    deadline: float | Callable[[Any], float | None] | None = None
    description: str = ""
    parse_at_edge: bool = True


@implementer(IMethodProvider)
@attrs.frozen
class StaticMethods:
    """An ``IMethodProvider`` over a fixed list of specs (for embedders)."""

    specs: tuple[MethodSpec, ...] = attrs.field(converter=tuple)

    def methods(self) -> Iterable[MethodSpec]:
        return self.specs


class MethodRegistry:
    """Name to ``MethodSpec``; later registrations replace earlier ones."""

    def __init__(self) -> None:
        self._specs: dict[str, MethodSpec] = {}

    def register(self, spec: MethodSpec) -> None:
        self._specs[spec.name] = spec

    def add_provider(self, provider: IMethodProvider) -> None:
        for spec in IMethodProvider(provider).methods():
            self.register(spec)

    def get(self, name: str) -> MethodSpec | None:
        return self._specs.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[MethodSpec]:
        return iter(sorted(self._specs.values(), key=lambda s: s.name))

    def names(self) -> list[str]:
        return sorted(self._specs)
