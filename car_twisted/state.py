"""
``ServerState``: one per daemon, holding every registry.

No locks: the reactor thread is the lock.  A check-then-act that spans a
Deferred must re-check after it, because pipelined requests interleave
there.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from attrs import AttrsInstance
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from car_twisted.adapters import default_registry
from car_twisted.agents.supervisor import Supervisor
from car_twisted.auth import mint_token
from car_twisted.budget import ByteBudget
from car_twisted.config import ServerStateConfig
from car_twisted.host.chat import ChatRelay
from car_twisted.host.goals import GoalStore
from car_twisted.host.registry import HostRegistry
from car_twisted.interfaces import IAgentIdentities, IMemgine, IMethodProvider, IRunStore, IWsSink
from car_twisted.json_value import JsonValue
from car_twisted.memory.scopes import MemoryScope, MemoryScopes
from car_twisted.rpc.registry import Handler, MethodRegistry, MethodSpec
from car_twisted.runs.registry import RunRegistry
from car_twisted.runs.store import JsonlRunStore
from car_twisted.session import ClientSession
from car_twisted.stats import DaemonStats
from car_twisted.voice.hub import VoiceHub
from car_twisted.ws.channel import WsChannel

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from car_twisted.rpc.registry import SpecOptions

__all__ = ["ServerState"]

I = TypeVar("I")  # noqa: E741 (an interface)


def _builtin_providers(state: ServerState) -> Iterable[IMethodProvider]:
    # Imported here: the method modules import ServerState for typing only,
    # and keeping the table assembly in one call keeps start-up explicit.
    from car_twisted.methods.a2ui import A2uiMethods
    from car_twisted.methods.agents import AgentMethods
    from car_twisted.methods.chat import ChatMethods
    from car_twisted.methods.host import HostMethods
    from car_twisted.methods.keyvalue import KeyValueMethods
    from car_twisted.methods.meeting import MeetingMethods
    from car_twisted.methods.memory import MemoryMethods
    from car_twisted.methods.policy import PolicyMethods
    from car_twisted.methods.proposal import ProposalMethods
    from car_twisted.methods.registry import RegistryMethods
    from car_twisted.methods.runs import RunMethods
    from car_twisted.methods.server import ServerMethods
    from car_twisted.methods.session import SessionMethods
    from car_twisted.methods.tools import ToolMethods
    from car_twisted.methods.voice import VoiceMethods

    voice = VoiceMethods(state)
    return (
        SessionMethods(state),
        ServerMethods(state),
        ToolMethods(state),
        PolicyMethods(state),
        KeyValueMethods(state),
        ProposalMethods(state),
        AgentMethods(state),
        RunMethods(state),
        RegistryMethods(state),
        HostMethods(state),
        ChatMethods(state),
        MemoryMethods(state),
        voice,
        MeetingMethods(state, voice),
        A2uiMethods(state),
    )


class ServerState:
    """
    @ivar config: the frozen ``ServerStateConfig``.
    @ivar clock: the reactor (or a ``Clock`` in tests) for every timer.
    @ivar methods: the JSON-RPC method table.
    @ivar components: this daemon's adapter registry.
    @ivar sessions: live sessions by client id.
    """

    _log = Logger()

    def __init__(self, config: ServerStateConfig, clock: IReactorTime) -> None:
        self.config = config
        self.clock = clock
        self.started_at = clock.seconds()
        self.auth_token: str | None = (
            (config.auth_token or mint_token()) if config.auth_enabled else None
        )
        self.host_token: str = config.host_token or mint_token()
        self.components = default_registry(config.adapters)
        self.stats = DaemonStats()
        self.agents = Supervisor(clock, config.paths.home, stop_grace=config.agent_stop_grace, stats=self.stats)
        # The supervisor knows every agent's token; an embedder may bring
        # its own identities instead.
        self.agent_identities: IAgentIdentities = config.agent_identities or self.agents
        store: IRunStore = config.run_store or JsonlRunStore(
            clock, config.paths.home / "runs", fsync=config.run_store_fsync
        )
        self.runs = RunRegistry(clock, store, config.run_complete_grace, config=config, stats=self.stats)
        self.host = HostRegistry(clock, self._host_identity, stats=self.stats)
        self.agents.on_status = self._supervised_status
        self.goals = GoalStore(clock, config.paths.home / "chat-goals.json")
        self.chats = ChatRelay(clock, self.attached_agent, self.goals, self.runs)
        self.memory = MemoryScopes(
            clock,
            config.paths.home / "memory",
            self._memory_graph,
            graph_bytes=config.memory_graph_max_bytes,
            total_bytes=config.memory_max_bytes,
        )
        self.voice = VoiceHub(self)
        self.sessions: dict[str, ClientSession] = {}
        # Every connection's state.* bytes together.
        self.state_budget = ByteBudget("daemon state", config.max_state_bytes_total)
        # Authenticated, non-agent connections (``max_connections``).
        self._counted: set[str] = set()
        self._ids = itertools.count(1)
        self.methods = MethodRegistry()
        for provider in _builtin_providers(self):
            self.methods.add_provider(provider)
        for provider in config.method_providers:
            self.methods.add_provider(provider)
        for spec in config.methods:
            self.methods.register(spec)

    def _memory_graph(self, scope: MemoryScope, budget: ByteBudget) -> IMemgine:
        """
        A scope's graph: an ``IMemoryScope`` -> ``IMemgine`` adapter in this
        daemon's registry (it may answer None to decline a scope), else
        ``config.memgine_factory``, else the embedded engine.
        """
        graph = self.component(scope, IMemgine)
        if graph is not None:
            return graph
        if self.config.memgine_factory is not None:
            return self.config.memgine_factory(scope, budget)
        # Imported on first use: numpy and scipy are not loaded by a daemon that never remembers.
        from car_twisted.memory.graph import MemoryGraph

        return MemoryGraph(self.clock, fact_limit=self.config.memory_fact_limit, budget=budget)

    def attached_agent(self, agent_id: str) -> ClientSession | None:
        """The live connection bound to C{agent_id}, if any."""
        for session in self.sessions.values():
            if session.agent_id == agent_id and session.authenticated and not session.closed:
                return session
        return None

    def _host_identity(self) -> dict[str, JsonValue]:
        return {
            "manifest_path": str(self.agents.manifest_path),
            "manifest_role": "observer" if self.agents.observer else "owner",
        }

    def __repr__(self) -> str:
        return f"<ServerState auth={self.auth_enabled} sessions={len(self.sessions)}>"

    @classmethod
    def standalone(
        cls,
        clock: IReactorTime,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> ServerState:
        """
        The daemon's defaults, from the environment (``CAR_HOME``,
        ``CAR_NO_AUTH``, ``CAR_AUTH_TOKEN``, ``CAR_HANDLER_TIMEOUT``) and
        the ``ServerStateConfig.from_environ`` keyword options (passed
        through to it; attrs checks the config fields).
        """
        env = os.environ if environ is None else environ
        return cls(ServerStateConfig.from_environ(env, **options), clock)

    @property
    def auth_enabled(self) -> bool:
        return self.auth_token is not None

    # -- methods -----------------------------------------------------------

    def register_method(
        self, name: str, handler: Handler, params: type[AttrsInstance] | None = None, **kwargs: Unpack[SpecOptions]
    ) -> MethodSpec:
        """Add (or replace) a JSON-RPC method; see ``MethodSpec``."""
        spec = MethodSpec(name=name, handler=handler, params=params, **kwargs)
        self.methods.register(spec)
        return spec

    def capability_names(self) -> set[str]:
        """What ``required_capabilities`` may name: methods and namespaces."""
        names = set(self.methods.names())
        names.update(n.split(".", 1)[0] for n in list(names) if "." in n)
        return names

    # -- components --------------------------------------------------------

    def component(self, obj: object, iface: type[I], default: I | None = None) -> I | None:
        """Adapt C{obj} to C{iface} through this daemon's own registry."""
        if iface.providedBy(obj):  # type: ignore[attr-defined]  # an interface, which mypy sees as a class
            return obj  # type: ignore[return-value]  # it provides iface
        # zope copies its lookup methods onto the registry at run time.
        adapted: I | None = self.components.queryAdapter(obj, iface, "", default)  # type: ignore[attr-defined]
        return adapted

    def multi_component(self, objects: tuple[object, ...], iface: type[I]) -> I | None:
        """The C{iface} multi-adapter of C{objects} in this daemon's registry, or None."""
        adapted: I | None = self.components.queryMultiAdapter(objects, iface, "", None)  # type: ignore[attr-defined]
        return adapted

    def _supervised_status(
        self, agent_id: str, status: str, pid: int | None, restarts: int, last_exit_code: int | None
    ) -> None:
        """A supervised agent changed status: hosts (and the dashboard) hear it as a host event."""
        self.host.emit(
            "agent.supervisor_status",
            agent_id,
            f"supervised agent {agent_id} is {status}",
            {"status": status, "pid": pid, "restarts": restarts, "last_exit_code": last_exit_code},
        )

    # -- sessions ----------------------------------------------------------

    def open_session(self, sink: IWsSink) -> ClientSession:
        """
        A session for a new connection.  Its authentication deadline and
        guest slot belong to the transport (``ws.admission``), which starts
        counting at TCP accept.
        """
        client_id = f"c{next(self._ids)}"
        channel = WsChannel(sink, self.clock)
        session = ClientSession(
            client_id=client_id, channel=channel, state=self
        )
        session.activity.last_active = self.clock.seconds()
        self.sessions[client_id] = session
        if not self.auth_enabled:
            # Auth off: every local caller is trusted as an operator.
            session.operator = True
            if not self.admit_authenticated(session, agent=False):
                session.disconnect(1013, "server busy: too many connections")
                return session
            session.authenticated = True
        return session

    def auth_failed(self, session: ClientSession) -> None:
        """
        A wrong token, or a malformed frame before auth: the
        ``max_auth_failures``-th closes the connection (after its reply).
        """
        session.auth_failures += 1
        self._log.info(
            "client {client_id} failed to authenticate ({failures} so far)",
            client_id=session.client_id,
            failures=session.auth_failures,
        )
        if session.auth_failures == self.config.max_auth_failures:
            # Answer first, then close: the reply is queued by the time
            # the caller writes it.
            self.clock.callLater(0, session.disconnect, 1008, "too many auth failures")

    def admit_authenticated(self, session: ClientSession, agent: bool) -> bool:
        """
        Count C{session} among the authenticated connections, if there is
        room (``max_connections``).  Agent-bound connections are not
        counted: there is at most one per manifest agent, and they must
        always get in.
        @return: False when the daemon is full.
        """
        if agent or session.client_id in self._counted:
            return True
        if len(self._counted) >= self.config.max_connections:
            return False
        self._counted.add(session.client_id)
        return True

    def reap_idle(self) -> int:
        """
        Close authenticated connections silent for ``idle_timeout`` with
        nothing in flight; called periodically by the factory.
        @return: how many were closed.
        """
        limit = self.config.idle_timeout
        now = self.clock.seconds()
        closed = 0
        for session in list(self.sessions.values()):
            activity = session.activity
            if activity.active:
                activity.active = False
                activity.last_active = now
            elif now - activity.last_active >= limit and session.reapable():
                self._log.debug(
                    "closing idle client {client_id}", client_id=session.client_id
                )
                session.channel.sink.close(1000, "idle timeout")
                closed += 1
        return closed

    def close_session(self, session: ClientSession) -> None:
        """Tear a session down exactly once."""
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.client_id, None)
        self._counted.discard(session.client_id)
        session.channel.close()
        session.run_cleanups()
