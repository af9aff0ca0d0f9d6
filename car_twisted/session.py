"""
``ClientSession``: everything the daemon knows about one connection.

Mutable by design (auth state, negotiated protocol, bindings change over
the connection's life); created by ``ServerState.open_session`` and closed
exactly once by ``ServerState.close_session``, which runs the registered
cleanups in reverse order.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted.interfaces import IClientSession
from car_twisted.ws.channel import WsChannel

__all__ = ["ClientSession", "ROLE_HOST"]

ROLE_HOST = "host"

_log = Logger()


@implementer(IClientSession)
@attrs.define(eq=False)
class ClientSession:
    """
    @ivar role: ``"host"`` after a host-token auth, else None.
    @ivar operator: True once the connection presented the daemon token
        (or the daemon runs with auth off).
    @ivar agent_id: the supervised agent this connection is bound to.
    @ivar protocol_version: set by ``server.handshake``; None until then.
    @ivar in_flight: requests answered asynchronously and not yet done.
    @ivar binary_handler: receives binary frames (voice streams).
    """

    client_id: str
    channel: WsChannel
    state: Any = attrs.field(repr=False)
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
    binary_handler: Callable[["ClientSession", bytes], None] | None = None
    # Idle tracking: the protocol sets ``active`` on every frame; the
    # state's sweep turns it into ``last_active``.  ``pins`` > 0 (a live
    # subscription, say) keeps an idle connection open.
    active: bool = True
    last_active: float = 0.0
    pins: int = 0
    # Output back-pressure: True while the transport's buffer is full;
    # ``resume_hooks`` run when it drains (run-trace subscribers flush).
    write_paused: bool = False
    resume_hooks: list[Callable[[], Any]] = attrs.field(factory=list, repr=False)
    current_run: str | None = None
    _runs_hooked: bool = attrs.field(default=False, repr=False)
    closed: bool = False
    _cleanups: list[Callable[[], Any]] = attrs.field(factory=list, repr=False)
    _runtime: Any = attrs.field(default=None, repr=False)
    _components: dict[Any, Any] = attrs.field(factory=dict, repr=False)

    @property
    def runtime(self) -> Any:
        """Tools, policies and state of this connection, made on first use."""
        if self._runtime is None:
            self._runtime = self.state.new_runtime()
            self.on_close(self._runtime.close)
        return self._runtime

    def holds_client_state(self) -> bool:
        """
        True while the connection holds anything its client registered
        (tools, policies, policy sessions, state) or a pin (an open run, a
        subscription): a reconnect would silently lose it.
        """
        return self.pins > 0 or (self._runtime is not None and self._runtime.holds_anything())

    def component(self, iface: Any) -> Any:
        """This session's C{iface} component, adapted once and kept."""
        found = self._components.get(iface)
        if found is None:
            found = self._components[iface] = self.state.component(self, iface)
        return found

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

    def disconnect(self, code: int, reason: str) -> None:
        """Close this connection (a Close frame, then drop)."""
        self.channel.sink.close(code, reason)

    def pin(self) -> None:
        """Keep this connection open while idle (until ``unpin``)."""
        self.pins += 1

    def unpin(self) -> None:
        self.pins = max(0, self.pins - 1)

    def reapable(self) -> bool:
        """
        Idle-closable: a bare connection, holding nothing a reconnect would
        lose (the client replays nothing), nothing in flight, not an agent.
        """
        return (
            self.authenticated
            and self.in_flight == 0
            and self.agent_id is None
            and self.channel.pending_count() == 0
            and not self.holds_client_state()
        )

    def on_close(self, cleanup: Callable[[], Any]) -> None:
        """Run C{cleanup} once when the connection goes (now, if gone)."""
        if self.closed:
            _run_cleanup(self, cleanup)
        else:
            self._cleanups.append(cleanup)

    def run_cleanups(self) -> None:
        """Called once by the state on disconnect."""
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in reversed(cleanups):
            _run_cleanup(self, cleanup)


def _run_cleanup(session: ClientSession, cleanup: Callable[[], Any]) -> None:
    try:
        cleanup()
    except Exception:
        _log.failure(
            "cleanup {cleanup!r} failed for client {client_id}",
            cleanup=cleanup,
            client_id=session.client_id,
        )
