"""
Finding A2UI messages inside A2A payloads, for ``a2ui.ingest``.

An A2A peer returns A2UI as ``data`` parts (the A2UI A2A extension: a
DataPart with ``metadata.mimeType`` ``application/json+a2ui`` whose
``data`` is a list of messages; a single message is common too).
``find_envelopes`` walks a payload along the members A2A uses and collects
every A2UI message it meets, in document order:

- a direct message: an object with one of ``createSurface``,
  ``updateComponents``, ``updateDataModel``, ``deleteSurface`` (taken as
  found, not looked into; ``SurfaceStore.apply`` judges it);
- wrappers: ``{a2ui: ...}``, ``{envelope: ...}``, ``{messages: [...]}``;
- A2A shapes: a Message's ``parts`` (``{kind: "data", data}``, v1.0's
  ``{data}``), a Part's ``data``, a Task (``{id, contextId, status:
  {message}, artifacts, history}``; history first, then the current status
  message, then the artifacts), an Artifact's ``parts``, streaming events
  (``artifact``, ``statusUpdate``, ``artifactUpdate``), v1.0's
  ``{task}`` / ``{message}`` send results, a JSON-RPC ``{result}``, and
  arrays of any of these.

Other members are not walked (text and file parts, metadata, error
objects): a message nested anywhere else is not found.  A Message met
twice (same ``messageId``, as when a Task's status message is also in its
history) is read once.

Owner hints: ``taskId`` and ``contextId`` members, and a Task's own ``id``,
seen on the way down; each envelope carries the nearest ones above it.
Hints that are not non-empty strings of at most ``MAX_HINT_CHARS`` are
ignored.

Bounds: at most ``max_envelopes`` messages and ``max_depth`` levels of
nesting along the walked members; passing either raises ``A2uiError``
``limit_exceeded`` (``maxIngestEnvelopes`` / ``maxIngestDepth``).  Nothing
else raises, whatever the payload.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from car_twisted.a2ui.store import MESSAGE_KINDS, A2uiError, SurfaceOwner

__all__ = ["MAX_HINT_CHARS", "FoundEnvelope", "IngestFound", "find_envelopes"]

#: The longest ``taskId`` / ``contextId`` / Task ``id`` taken as a hint.
MAX_HINT_CHARS = 512

#: Members walked, in this order.
_WALKED = (
    "result", "task", "history", "status", "message", "statusUpdate", "parts", "data",
    "a2ui", "envelope", "messages", "artifacts", "artifact", "artifactUpdate",
)
_TASK_MEMBERS = ("status", "artifacts", "history")


def _owner(task_id: str | None, context_id: str | None, endpoint: str | None) -> SurfaceOwner | None:
    if task_id is None and context_id is None and endpoint is None:
        return None
    return SurfaceOwner("a2a", task_id=task_id, context_id=context_id, endpoint=endpoint)


@attrs.frozen
class FoundEnvelope:
    """
    One A2UI message as found (not yet validated), with the nearest A2A
    task and context ids above it.
    """

    envelope: Mapping[str, object]
    task_id: str | None = None
    context_id: str | None = None

    def owner_hint(self, endpoint: str | None = None) -> SurfaceOwner | None:
        """An ``a2a`` owner from the hints (and C{endpoint}); None if there is nothing to route by."""
        return _owner(self.task_id, self.context_id, endpoint)


@attrs.frozen
class IngestFound:
    """
    What ``find_envelopes`` found: the messages in order, and the first
    task and context ids seen anywhere in the payload.
    """

    envelopes: tuple[FoundEnvelope, ...] = ()
    task_id: str | None = None
    context_id: str | None = None

    def owner_hint(self, endpoint: str | None = None) -> SurfaceOwner | None:
        return _owner(self.task_id, self.context_id, endpoint)


def _hint(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_HINT_CHARS:
        return value
    return None


def _is_task(node: Mapping[object, object]) -> bool:
    if "jsonrpc" in node:
        return False
    return node.get("kind") == "task" or any(member in node for member in _TASK_MEMBERS)


class _Finder:
    def __init__(self, max_envelopes: int, max_depth: int) -> None:
        self.max_envelopes = max_envelopes
        self.max_depth = max_depth
        self.found: list[FoundEnvelope] = []
        self.task_id: str | None = None
        self.context_id: str | None = None
        self.seen_messages: set[str] = set()

    def visit(self, node: object, depth: int, task_id: str | None, context_id: str | None) -> None:
        if not isinstance(node, (dict, list)):
            return
        if depth > self.max_depth:
            raise A2uiError(
                "limit_exceeded", f"A2UI limit exceeded: the payload nests more than {self.max_depth} levels deep",
                limit="maxIngestDepth", max=self.max_depth,
            )
        if isinstance(node, list):
            for item in node:
                self.visit(item, depth + 1, task_id, context_id)
            return
        if any(kind in node for kind in MESSAGE_KINDS):
            if len(self.found) >= self.max_envelopes:
                raise A2uiError(
                    "limit_exceeded", f"A2UI limit exceeded: more than {self.max_envelopes} A2UI messages in one payload",
                    limit="maxIngestEnvelopes", max=self.max_envelopes,
                )
            self.found.append(FoundEnvelope(node, task_id, context_id))
            return
        message_id = node.get("messageId")
        if isinstance(message_id, str) and "parts" in node:
            if message_id in self.seen_messages:
                return
            self.seen_messages.add(message_id)
        task_id, context_id = self._hints(node, task_id, context_id)
        for member in _WALKED:
            if member in node:
                self.visit(node[member], depth + 1, task_id, context_id)

    def _hints(self, node: dict[object, object], task_id: str | None, context_id: str | None) -> tuple[str | None, str | None]:
        own_task = _hint(node.get("taskId"))
        if own_task is None and _is_task(node):
            own_task = _hint(node.get("id"))
        own_context = _hint(node.get("contextId"))
        if own_task is not None:
            task_id = own_task
            self.task_id = self.task_id or own_task
        if own_context is not None:
            context_id = own_context
            self.context_id = self.context_id or own_context
        return task_id, context_id


def find_envelopes(payload: object, max_envelopes: int = 64, max_depth: int = 32) -> IngestFound:
    """
    The A2UI messages in an A2A-shaped C{payload}, in order, with owner
    hints (see the module docstring for the shapes and bounds).
    """
    finder = _Finder(max_envelopes, max_depth)
    finder.visit(payload, 0, None, None)
    return IngestFound(tuple(finder.found), finder.task_id, finder.context_id)
