"""
``ClientSession``: everything the daemon knows about one connection.

Mutable by design (auth state, negotiated protocol, bindings change over
the connection's life); created by ``ServerState.open_session`` and closed
exactly once by ``ServerState.close_session``, which runs the registered
cleanups, then closes the connection's features, newest first.  A feature
(``ISessionFeature``: the runtime's tools and state, a connection's part in
run tracing, ...) is made on first use with ``session.feature(kind, make)``
and is the only place that feature's per-connection state lives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted.interfaces import IClientSession, ISessionFeature
from car_twisted.ws.channel import WsChannel

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["Activity", "ClientSession", "ROLE_HOST"]

ROLE_HOST = "host"

_log = Logger()
F = TypeVar("F")
I = TypeVar("I")  # noqa: E741 (an interface)


@attrs.define(eq=False)
class Activity:
    """
    What the idle sweep reads: the protocol sets C{active} on every frame,
    the sweep turns it into C{last_active}; C{pins} > 0 (an open run, a
    live subscription) keeps a silent connection open.
    """

    active: bool = True
    last_active: float = 0.0
    pins: int = 0

    def pin(self) -> None:
        """Keep the connection open while idle (until ``unpin``)."""
        self.pins += 1

    def unpin(self) -> None:
        self.pins = max(0, self.pins - 1)


@implementer(IClientSession)
@attrs.define(eq=False)
class ClientSession:
    """
    Who is on the other end of one connection, and what it negotiated.
    Each feature keeps its own per-connection state as a component
    (``feature``), so a new one does not add fields here.

    @ivar role: ``"host"`` after a host-token auth, else None.
    @ivar operator: True once the connection presented the daemon token
        (or the daemon runs with auth off).
    @ivar agent_id: the supervised agent this connection is bound to.
    @ivar protocol_version: set by ``server.handshake``; None until then.
    @ivar in_flight: requests answered asynchronously and not yet done.
    """

    client_id: str
    channel: WsChannel
    state: ServerState = attrs.field(repr=False)
    authenticated: bool = False
    role: str | None = None
    operator: bool = False
    agent_id: str | None = None
    memory_namespace: str | None = None
    protocol_version: int | None = None
    client_version: str | None = None
    required_capabilities: tuple[str, ...] = ()
    auth_failures: int = 0
    in_flight: int = 0
    activity: Activity = attrs.field(factory=Activity, repr=False)
    closed: bool = False
    _cleanups: list[Callable[[], object]] = attrs.field(factory=list, repr=False)
    _features: dict[type, object] = attrs.field(factory=dict, repr=False)
    _components: dict[type, object] = attrs.field(factory=dict, repr=False)

    # -- per-connection components ---------------------------------------------

    def feature(self, kind: type[F], make: Callable[[ClientSession], F]) -> F:
        """
        This connection's C{kind} feature, made by C{make(self)} on first
        use and closed with the connection (at once if it is gone).
        """
        found = self._features.get(kind)
        if found is None:
            made = make(self)
            if not ISessionFeature.providedBy(made):
                raise TypeError(f"{kind.__name__} features must provide ISessionFeature")
            self._features[kind] = found = made
            if self.closed:
                _close_feature(self, made)
        return found  # type: ignore[return-value]  # kept under its kind, made by make

    def existing_feature(self, kind: type[F]) -> F | None:
        """C{kind}'s feature if this connection has made one, else None."""
        return self._features.get(kind)  # type: ignore[return-value]  # kept under its kind

    def component(self, iface: type[I]) -> I | None:
        """This session's C{iface} component from the daemon's adapters, adapted once and kept."""
        found = self._components.get(iface)
        if found is None:
            found = self._components[iface] = self.state.component(self, iface)
        return found  # type: ignore[return-value]  # kept under its own interface

    def holds_client_state(self) -> bool:
        """
        True while any feature holds something its client registered, or a
        pin is set (an open run, a subscription): a reconnect would
        silently lose it, since the client replays nothing.
        """
        return self.activity.pins > 0 or any(
            ISessionFeature(f).holds_client_state() for f in self._features.values()
        )

    # -- authority ---------------------------------------------------------------

    @property
    def is_host(self) -> bool:
        return self.role == ROLE_HOST

    @property
    def agent_only(self) -> bool:
        """
        Authenticated by an agent's own token and nothing else: such a
        connection acts for that agent only (no daemon token, no host).
        """
        return self.agent_id is not None and not self.operator and not self.is_host

    # -- lifecycle ---------------------------------------------------------------

    def disconnect(self, code: int, reason: str) -> None:
        """Close this connection (a Close frame, then drop)."""
        self.channel.sink.close(code, reason)

    def reapable(self) -> bool:
        """
        Idle-closable: a bare connection, holding nothing a reconnect would
        lose, nothing in flight, not an agent.
        """
        return (
            self.authenticated
            and self.in_flight == 0
            and self.agent_id is None
            and self.channel.pending_count() == 0
            and not self.holds_client_state()
        )

    def on_close(self, cleanup: Callable[[], object]) -> None:
        """Run C{cleanup} once when the connection goes (now, if gone)."""
        if self.closed:
            _run_cleanup(self, cleanup)
        else:
            self._cleanups.append(cleanup)

    def run_cleanups(self) -> None:
        """Called once by the state on disconnect: cleanups, then features, newest first."""
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in reversed(cleanups):
            _run_cleanup(self, cleanup)
        for feature in reversed(list(self._features.values())):
            _close_feature(self, feature)


def _close_feature(session: ClientSession, feature: object) -> None:
    _run_cleanup(session, ISessionFeature(feature).close)


def _run_cleanup(session: ClientSession, cleanup: Callable[[], object]) -> None:
    try:
        cleanup()
    except Exception:
        _log.failure(
            "cleanup {cleanup!r} failed for client {client_id}",
            cleanup=cleanup,
            client_id=session.client_id,
        )
