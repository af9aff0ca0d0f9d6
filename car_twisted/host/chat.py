"""
The chat relay: ``agents.chat`` between a host connection and an attached
agent's connection, and the seed's ``ChatSession`` bookkeeping.

``agents.chat`` registers the chat *before* it reverse-calls ``agent.chat``
on the agent's connection (the agent's events may arrive before its ack),
answers ``{accepted, session_id}`` once the agent acks, and rewrites each
``agent.chat.event`` the agent sends into an ``agents.chat.event`` for the
host that started it, in order.  A terminal ``done`` / ``error`` ends the
chat; so do ``agents.chat.cancel`` (the agent gets ``agent.chat.cancel``),
the agent's disconnect (the host gets a terminal ``error``) and the host's
(the agent gets ``agent.chat.cancel``).  A finished chat is recorded as a
turn of the agent's current run when it has one.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted._util import iso_utc
from car_twisted.errors import CallbackTimeout, ChannelClosed, ClientRpcError, Forbidden, RpcError
from car_twisted.interfaces import ISessionFeature
from car_twisted.json_value import JsonValue

if TYPE_CHECKING:
    from car_twisted.host.goals import GoalStore
    from car_twisted.runs.registry import RunRegistry
    from car_twisted.session import ClientSession

__all__ = [
    "ChatSession",
    "ChatRelay",
    "ChatConnection",
    "CHAT_ACK_TIMEOUT_SECS",
    "CHAT_APPROVE_TIMEOUT_SECS",
    "MAX_CHATS",
    "MAX_CHATS_PER_HOST",
]

CHAT_ACK_TIMEOUT_SECS = 10.0
CHAT_APPROVE_TIMEOUT_SECS = 30.0
MAX_CHATS = 1024
MAX_CHATS_PER_HOST = 64
TERMINAL_KINDS = frozenset({"done", "error"})
# Text kept for the run turn a chat becomes (the turn's own bound applies too).
_MAX_TRANSCRIPT_CHARS = 64 * 1024


@attrs.define(eq=False)
class ChatSession:
    """One ``agents.chat`` turn in flight, from the host's call to its terminal event."""

    session_id: str
    agent_id: str
    host: ClientSession
    agent: ClientSession
    prompt: str
    started_at: str
    transcript: list[str] = attrs.field(factory=list)
    transcript_chars: int = 0
    events: int = 0

    def keep(self, delta: str) -> None:
        room = _MAX_TRANSCRIPT_CHARS - self.transcript_chars
        if room > 0:
            self.transcript.append(delta[:room])
            self.transcript_chars += min(room, len(delta))


@implementer(ISessionFeature)
class ChatConnection:
    """A connection's part in chats (as host or as agent): closing it ends them."""

    def __init__(self, relay: ChatRelay, session: ClientSession) -> None:
        self.relay = relay
        self.session = session

    def holds_client_state(self) -> bool:
        return self.relay.involves(self.session)

    def close(self) -> None:
        self.relay.session_closed(self.session)


class ChatRelay:
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        find_agent: Callable[[str], ClientSession | None],
        goals: GoalStore,
        runs: RunRegistry,
        ack_timeout: float = CHAT_ACK_TIMEOUT_SECS,
        approve_timeout: float = CHAT_APPROVE_TIMEOUT_SECS,
    ) -> None:
        self.clock = clock
        self.find_agent = find_agent
        self.goals = goals
        self.runs = runs
        self.ack_timeout = ack_timeout
        self.approve_timeout = approve_timeout
        self.chats: dict[str, ChatSession] = {}

    def _connection(self, session: ClientSession) -> ChatConnection:
        return session.feature(ChatConnection, lambda s: ChatConnection(self, s))

    def involves(self, session: ClientSession) -> bool:
        return any(c.host is session or c.agent is session for c in self.chats.values())

    # -- agents.chat ---------------------------------------------------------------------

    def start(
        self,
        host: ClientSession,
        agent_id: str,
        prompt: str,
        session_id: str | None,
        forward: dict[str, JsonValue],
    ) -> Deferred[dict[str, JsonValue]]:
        """
        Reverse-call ``agent.chat`` on C{agent_id}'s connection; fires with
        the ack once the agent accepts.  C{forward} holds the optional
        fields passed on to the agent (model, attachments, goal, context).
        """
        agent = self.find_agent(agent_id)
        if agent is None:
            raise RpcError(
                f"agent '{agent_id}' is not attached: it must be running and authenticated with its own token",
                data={"reason": "agent_not_attached", "agent_id": agent_id},
            )
        session_id = session_id or f"chat-{uuid.uuid4().hex[:16]}"
        if session_id in self.chats:
            raise RpcError(f"chat session '{session_id}' is already in progress", data={"session_id": session_id})
        if len(self.chats) >= MAX_CHATS or sum(1 for c in self.chats.values() if c.host is host) >= MAX_CHATS_PER_HOST:
            raise RpcError(
                f"too many chats in progress (at most {MAX_CHATS_PER_HOST} per connection, {MAX_CHATS} in all)",
                data={"reason": "chats", "limit": MAX_CHATS_PER_HOST},
            )
        goal = forward.get("goal")
        if goal is None:
            standing = self.goals.get(session_id)
            if standing is not None:
                forward = {**forward, "goal": standing.contract()}
        chat = ChatSession(session_id, agent_id, host, agent, prompt, iso_utc(self.clock.seconds()))
        # Registered before the call: the agent may stream before it acks.
        self.chats[session_id] = chat
        self._connection(host)
        self._connection(agent)
        params: dict[str, JsonValue] = {"session_id": session_id, "prompt": prompt, **forward}
        pending = agent.channel.request("agent.chat", params, timeout=self.ack_timeout)

        def accepted(_: object) -> dict[str, JsonValue]:
            return {"accepted": True, "session_id": session_id}

        def refused(failure: Failure) -> Failure:
            if self.chats.get(session_id) is chat:
                del self.chats[session_id]
            exc = failure.value
            if isinstance(exc, ClientRpcError):
                why = exc.message
            elif isinstance(exc, CallbackTimeout):
                why = f"no answer within {self.ack_timeout:g}s"
            elif isinstance(exc, ChannelClosed):
                why = "its connection closed"
            else:
                return failure
            return Failure(RpcError(f"agent '{agent_id}' did not accept the chat: {why}", data={"session_id": session_id}))

        return pending.addCallbacks(accepted, refused)

    # -- agent.chat.event --------------------------------------------------------------------

    def agent_event(self, agent: ClientSession, event: dict[str, JsonValue]) -> None:
        """An ``agent.chat.event`` from an agent: on to the host that started the chat."""
        session_id = event.get("session_id")
        kind = event.get("kind")
        chat = self.chats.get(session_id) if isinstance(session_id, str) else None
        if chat is None or chat.agent is not agent or not isinstance(kind, str):
            self._log.debug(
                "chat event for no chat of this connection ({client_id}, {session_id})",
                client_id=agent.client_id,
                session_id=str(session_id)[:128],
            )
            return
        chat.events += 1
        delta = event.get("delta")
        if kind == "token" and isinstance(delta, str):
            chat.keep(delta)
        out: dict[str, JsonValue] = {**event, "session_id": chat.session_id, "agent_id": chat.agent_id, "kind": kind}
        chat.host.channel.notify("agents.chat.event", out)
        self.goals.observe(chat.session_id, kind, event)
        if kind in TERMINAL_KINDS:
            self._end(chat, "succeeded" if kind == "done" else "failed", event)

    # -- agents.chat.cancel / approve ----------------------------------------------------------

    def _may_steer(self, caller: ClientSession, chat: ChatSession, what: str) -> None:
        if caller is chat.host or caller.is_host:
            return
        raise Forbidden(f"{what}: only the connection that started the chat, or the host role, may do this")

    def cancel(self, caller: ClientSession, session_id: str) -> dict[str, JsonValue]:
        chat = self.chats.get(session_id)
        if chat is None:
            return {"cancelled": False, "session_id": session_id}
        self._may_steer(caller, chat, "agents.chat.cancel")
        del self.chats[session_id]
        chat.agent.channel.notify("agent.chat.cancel", {"session_id": session_id})
        self.goals.observe(session_id, "error", {"message": "cancelled"})
        return {"cancelled": True, "session_id": session_id}

    def approve(self, caller: ClientSession, session_id: str, approval_id: str, decision: JsonValue) -> Deferred[dict[str, JsonValue]]:
        chat = self.chats.get(session_id)
        if chat is None:
            raise RpcError(f"no chat session '{session_id}' is in progress", data={"session_id": session_id})
        self._may_steer(caller, chat, "agents.chat.approve")
        params: dict[str, JsonValue] = {"session_id": session_id, "approval_id": approval_id, "decision": decision}
        pending = chat.agent.channel.request("agent.chat.approve", params, timeout=self.approve_timeout)

        def relayed(result: object) -> dict[str, JsonValue]:
            resolved = isinstance(result, dict) and result.get("resolved") is True
            return {"resolved": resolved, "session_id": session_id}

        def failed(failure: Failure) -> Failure:
            exc = failure.value
            if isinstance(exc, (ClientRpcError, CallbackTimeout, ChannelClosed)):
                why = exc.message if isinstance(exc, ClientRpcError) else str(exc)
                return Failure(RpcError(f"agent '{chat.agent_id}' did not resolve the approval: {why}", data={"session_id": session_id}))
            return failure

        return pending.addCallbacks(relayed, failed)

    # -- endings -------------------------------------------------------------------------------

    def session_closed(self, session: ClientSession) -> None:
        for chat in [c for c in self.chats.values() if c.host is session or c.agent is session]:
            del self.chats[chat.session_id]
            if chat.agent is session:
                event: dict[str, JsonValue] = {
                    "session_id": chat.session_id,
                    "agent_id": chat.agent_id,
                    "kind": "error",
                    "message": "the agent disconnected",
                }
                chat.host.channel.notify("agents.chat.event", event)
                self.goals.observe(chat.session_id, "error", event)
                self._record(chat, "failed")
            else:
                chat.agent.channel.notify("agent.chat.cancel", {"session_id": chat.session_id})

    def _end(self, chat: ChatSession, status: str, event: dict[str, JsonValue]) -> None:
        if self.chats.get(chat.session_id) is chat:
            del self.chats[chat.session_id]
        self._record(chat, status)

    def _record(self, chat: ChatSession, status: str) -> None:
        """The chat as one turn of the agent's current run, if it has one."""
        run_id = self.runs.current_run(chat.agent)
        if run_id is None:
            return
        turn: dict[str, JsonValue] = {
            "kind": "chat",
            "tool": "agents.chat",
            "session_id": chat.session_id,
            "prompt": chat.prompt,
            "output": "".join(chat.transcript),
            "status": status,
            "started_at": chat.started_at,
        }
        d = ensureDeferred(self.runs.record(chat.agent, run_id, [turn]))
        d.addErrback(lambda f: self._log.failure("recording chat {session_id} failed", failure=f, session_id=chat.session_id))
