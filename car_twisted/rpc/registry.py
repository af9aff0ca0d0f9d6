"""
The one table from JSON-RPC method names to handlers.

A handler is called as ``handler(session, params)`` where ``params`` is an
instance of the spec's ``params`` attrs class (or the raw JSON value when
the spec declares none).  It may return a JSON-ready value, a Deferred, or
be ``async def``; the dispatcher only builds a Deferred when the handler
really waits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypedDict

import attrs
from attrs import AttrsInstance
from zope.interface import implementer

from car_twisted.interfaces import IMethodProvider

if TYPE_CHECKING:
    from car_twisted.session import ClientSession

__all__ = ["MethodSpec", "MethodRegistry", "StaticMethods"]

# The second argument is an instance of the spec's ``params`` class (the
# raw JSON value when it has none): a type known only at run time, so
# handlers declaring their own params class fit here.
Handler = Callable[["ClientSession", Any], object]
# A deadline function takes the same parsed params.
DeadlineOf = Callable[[Any], float | None]
# An approval rule takes the session and the parsed params: why this call
# must wait for approval, or None.
ApprovalRule = Callable[["ClientSession", Any], str | None]


class SpecOptions(TypedDict, total=False):
    """The optional ``MethodSpec`` fields, as keywords (``ServerState.register_method``)."""

    requires_auth: bool
    requires_handshake: bool
    deadline: float | DeadlineOf | None
    description: str
    parse_at_edge: bool
    approval: ApprovalRule | None


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
    @ivar approval: a rule saying why this call must wait for a person's
        approval (the daemon's ``ApprovalGate``), or None when it need not.
    """

    name: str
    handler: Handler
    params: type[AttrsInstance] | None = None
    requires_auth: bool = True
    requires_handshake: bool = False
    deadline: float | DeadlineOf | None = None
    description: str = ""
    parse_at_edge: bool = True
    approval: ApprovalRule | None = None


def method_specs(specs: Iterable[MethodSpec]) -> tuple[MethodSpec, ...]:
    """The converter of spec fields (a plain ``tuple``, typed for attrs' checker)."""
    return tuple(specs)


@implementer(IMethodProvider)
@attrs.frozen
class StaticMethods:
    """An ``IMethodProvider`` over a fixed list of specs (for embedders)."""

    specs: tuple[MethodSpec, ...] = attrs.field(converter=method_specs)

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
