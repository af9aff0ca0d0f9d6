"""
``agents.chat`` / ``agents.chat.cancel`` / ``agents.chat.approve``, the
agents' ``agent.chat.event`` notifications, and ``goal.*``.

See ``car_twisted.host.chat`` for the relay and ``car_twisted.host.goals``
for standing goals.  ``goal.suggest`` needs model inference and answers
``-32601`` saying so (``rpc/scope.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from car_twisted.errors import InvalidParams
from car_twisted.host.goals import clamp_iterations
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.rpc.registry import MethodSpec
from car_twisted.session import ClientSession

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["ChatMethods", "IMAGE_MEDIA_TYPES", "MAX_ATTACHMENTS"]

IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
MAX_ATTACHMENTS = 16
_ID = {"max_len": 256}
_CHECK_CHARS = 4096


@attrs.frozen
class ChatParams:
    agent_id: str = attrs.field(metadata={"max_len": 128})
    prompt: str = attrs.field(metadata={"max_len": 1024 * 1024})
    session_id: str | None = attrs.field(default=None, metadata=_ID)
    stream: bool = True
    voice_input: bool = False
    model: str | None = attrs.field(default=None, metadata=_ID)
    attachments: list[JsonValue] | None = attrs.field(default=None, metadata={"max_len": MAX_ATTACHMENTS})
    goal: dict[str, JsonValue] | None = None
    context: JsonValue = None


@attrs.frozen
class SessionIdParams:
    session_id: str = attrs.field(metadata=_ID)


@attrs.frozen
class ApproveParams:
    session_id: str = attrs.field(metadata=_ID)
    approval_id: str = attrs.field(metadata=_ID)
    decision: JsonValue = None


@attrs.frozen
class GoalSetParams:
    session_id: str = attrs.field(metadata=_ID)
    goal: dict[str, JsonValue] | None = None
    check: str | None = attrs.field(default=None, metadata={"max_len": _CHECK_CHARS})
    max_iterations: int | None = None


@attrs.frozen
class GoalQueryParams:
    session_id: str | None = attrs.field(default=None, metadata=_ID)


def _attachment(raw: JsonValue, field: str) -> None:
    if not isinstance(raw, dict):
        raise InvalidParams(field, "expected an image content block object")
    kind = raw.get("type")
    if kind == "image_base64":
        if not isinstance(raw.get("data"), str) or not raw["data"]:
            raise InvalidParams(f"{field}.data", "expected base64 image data")
        if raw.get("media_type") not in IMAGE_MEDIA_TYPES:
            raise InvalidParams(f"{field}.media_type", "expected one of " + ", ".join(sorted(IMAGE_MEDIA_TYPES)))
    elif kind == "image_url":
        url = raw.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 8192:
            raise InvalidParams(f"{field}.url", "expected an http(s) URL")
    else:
        raise InvalidParams(f"{field}.type", "expected image_base64 or image_url")


def _goal(raw: dict[str, JsonValue], field: str) -> dict[str, JsonValue]:
    check = raw.get("check")
    if not isinstance(check, str) or not check.strip() or len(check) > _CHECK_CHARS:
        raise InvalidParams(f"{field}.check", f"expected a non-empty command of at most {_CHECK_CHARS} characters")
    iterations = raw.get("max_iterations")
    if iterations is not None and not isinstance(iterations, int):
        raise InvalidParams(f"{field}.max_iterations", "expected an integer")
    return {"check": check.strip(), "max_iterations": clamp_iterations(iterations)}


@implementer(IMethodProvider)
class ChatMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def methods(self) -> Iterable[MethodSpec]:
        return (
            MethodSpec("agents.chat", self.chat, params=ChatParams,
                       description="Chat with an attached agent; answers {accepted, session_id}, the reply streams as agents.chat.event."),
            MethodSpec("agent.chat.event", self.chat_event,
                       description="From an agent: one event of a chat it was asked (a notification)."),
            MethodSpec("agents.chat.cancel", self.cancel, params=SessionIdParams,
                       description="End a chat; the agent gets agent.chat.cancel."),
            MethodSpec("agents.chat.approve", self.approve, params=ApproveParams,
                       description="Resolve an approval_pending the agent raised in a chat; relays its {resolved}."),
            MethodSpec("goal.set", self.goal_set, params=GoalSetParams, description="A standing completion goal for a chat session."),
            MethodSpec("goal.status", self.goal_status, params=GoalQueryParams, description="One session's standing goal, or all of them."),
            MethodSpec("goal.clear", self.goal_clear, params=GoalQueryParams, description="Remove one standing goal, or all of them."),
        )

    # -- chat ----------------------------------------------------------------------------

    def chat(self, session: ClientSession, p: ChatParams) -> Deferred[dict[str, JsonValue]]:
        if not p.prompt:
            raise InvalidParams("prompt", "must not be empty")
        forward: dict[str, JsonValue] = {}
        if p.model:
            forward["model"] = p.model
        if p.attachments:
            for i, item in enumerate(p.attachments):
                _attachment(item, f"attachments[{i}]")
            forward["attachments"] = p.attachments
        if p.goal is not None:
            if p.attachments:
                raise InvalidParams("goal", "cannot be combined with attachments")
            forward["goal"] = _goal(p.goal, "goal")
        if p.context is not None:
            forward["context"] = p.context
        return self.state.chats.start(session, p.agent_id, p.prompt, p.session_id, forward)

    def chat_event(self, session: ClientSession, params: JsonValue) -> None:
        if isinstance(params, dict):
            self.state.chats.agent_event(session, params)

    def cancel(self, session: ClientSession, p: SessionIdParams) -> dict[str, JsonValue]:
        return self.state.chats.cancel(session, p.session_id)

    def approve(self, session: ClientSession, p: ApproveParams) -> Deferred[dict[str, JsonValue]]:
        return self.state.chats.approve(session, p.session_id, p.approval_id, p.decision)

    # -- goals -------------------------------------------------------------------------------

    def goal_set(self, session: ClientSession, p: GoalSetParams) -> dict[str, JsonValue]:
        if p.goal is not None:
            contract = _goal(p.goal, "goal")
        else:
            contract = _goal({"check": p.check, "max_iterations": p.max_iterations}, "goal")
        check, iterations = contract["check"], contract["max_iterations"]
        assert isinstance(check, str) and isinstance(iterations, int)
        goal = self.state.goals.set(p.session_id, check, iterations)
        return {"set": True, "goal": goal.to_wire()}

    def goal_status(self, session: ClientSession, p: GoalQueryParams) -> dict[str, JsonValue]:
        goals = self.state.goals
        if p.session_id is not None:
            goal = goals.get(p.session_id)
            return {"session_id": p.session_id, "goal": goal.to_wire() if goal is not None else None}
        return {"goals": [g.to_wire() for g in goals.every()]}

    def goal_clear(self, session: ClientSession, p: GoalQueryParams) -> dict[str, JsonValue]:
        count = self.state.goals.clear(p.session_id)
        if p.session_id is not None:
            return {"cleared": count == 1, "session_id": p.session_id}
        return {"cleared": count}
