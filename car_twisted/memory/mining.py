"""
Trajectory mining for ``proactive.maintain``: recent events of an agent's
work turned into facts, deterministically, with ids derived from what each
fact is about.

An event is a dict; these are understood (other keys are ignored):

- ``{"kind": "action_failed", "tool": str, "error"?: str, "action_id"?,
  "attempts"?}``, and a run's turn ``{"kind": "turn", "tool": str,
  "status": "failed", "error"?: str, "action_id"?}``: a ``procedural``
  fact that the tool failed with that error, one per (tool, error with
  digits folded to ``#`` and case folded);
- ``{"kind": "turn", "tool": str, "status": "rejected", "error"?: str}``
  (a proposal's action refused, ``policy_rejected`` or not): a
  ``knowledge`` fact that the tool was refused with that reason, one per
  (tool, reason);
- ``{"kind": "action_retried", "tool": str, "attempts": int >= 2}``: a
  ``procedural`` fact that the tool needed retries, one per tool (an
  ``action_retried`` with fewer attempts yields nothing);
- any other ``{"kind": "turn", "role"?: "user", "text" | "prompt": str}``:
  one ``knowledge`` fact per sentence that states a requirement
  (``REQUIREMENT``: must, never, always, required, avoid, do not, ...), one
  per sentence text; turns of another role, or without text, yield nothing.

Anything else (not a dict, another kind, a failure or refusal without a
tool) is not understood and counted as ignored.  A fact's id is ``fact-mem-`` and the
first 16 hex digits of a SHA-256 of the kind of lesson and its key above,
so the same lesson mined twice is the same fact.

The trigger summarises the window for ``proactive.intervene``:
``tool_error`` (the last event is a failure), ``repeated_failures`` (the
most distinct failures of one tool: events that share an ``action_id``
count once, so a failure seen both as an action and as its run turn is not
counted twice), and the ``tool`` and ``error`` of the last failure.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence

import attrs

from car_twisted.json_value import JsonValue

__all__ = ["REQUIREMENT", "Mined", "mine", "trigger"]

REQUIREMENT = re.compile(r"\b(must|never|always|require[sd]?|required|mandatory|avoid|don't|do not|should not|shouldn't)\b", re.I)
MAX_TEXT_CHARS = 4000
MAX_ERROR_CHARS = 300
MAX_SENTENCE_CHARS = 500

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_DIGITS = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")


@attrs.frozen
class Mined:
    """One fact to save."""

    fact_id: str
    subject: str
    body: str
    kind: str
    tags: tuple[str, ...]
    metadata: dict[str, JsonValue]


def _fact_id(*parts: str) -> str:
    digest = hashlib.sha256("\0".join(parts).encode("utf-8", "surrogatepass")).hexdigest()
    return f"fact-mem-{digest[:16]}"


def _clean(value: object, limit: int) -> str:
    if not isinstance(value, str):
        return ""
    return _SPACE.sub(" ", value[: limit * 4]).strip()[:limit]


def _is_failure(event: Mapping[str, JsonValue]) -> bool:
    kind = event.get("kind")
    return kind == "action_failed" or (kind == "turn" and event.get("status") == "failed")


def _tool(event: Mapping[str, JsonValue]) -> str:
    tool = event.get("tool")
    return tool[:256] if isinstance(tool, str) else ""


def _provenance(event: Mapping[str, JsonValue], **more: JsonValue) -> dict[str, JsonValue]:
    meta: dict[str, JsonValue] = {"event": event.get("kind"), **more}
    for name in ("action_id", "proposal_id", "run_id"):
        value = event.get(name)
        if isinstance(value, str) and len(value) <= 256:
            meta[name] = value
    return meta


def _failure(event: Mapping[str, JsonValue], tool: str) -> Mined:
    error = _clean(event.get("error"), MAX_ERROR_CHARS) or "an unknown error"
    folded = _DIGITS.sub("#", error.casefold())
    return Mined(
        _fact_id("failure", tool, folded),
        f"{tool} failure",
        f"{tool} failed with: {error}. Check its inputs and preconditions before calling it again.",
        "procedural",
        ("tool-failure", tool),
        _provenance(event, tool=tool),
    )


def _rejection(event: Mapping[str, JsonValue], tool: str) -> Mined:
    reason = _clean(event.get("error"), MAX_ERROR_CHARS) or "no reason given"
    folded = _DIGITS.sub("#", reason.casefold())
    return Mined(
        _fact_id("rejection", tool, folded),
        f"{tool} refused",
        f"Calls to {tool} were refused: {reason}. Do not propose it again without changing what was refused.",
        "knowledge",
        ("tool-refused", tool),
        _provenance(event, tool=tool),
    )


def _requirements(event: Mapping[str, JsonValue]) -> list[Mined]:
    text = event.get("text", event.get("prompt"))
    if not isinstance(text, str) or event.get("role", "user") != "user":
        return []
    mined = []
    for match in _SENTENCE.finditer(text[:MAX_TEXT_CHARS]):
        sentence = _clean(match.group(), MAX_SENTENCE_CHARS)
        if sentence and REQUIREMENT.search(sentence):
            mined.append(
                Mined(
                    _fact_id("requirement", sentence.casefold()),
                    "User requirement",
                    sentence,
                    "knowledge",
                    ("requirement",),
                    _provenance(event),
                )
            )
    return mined


def mine(event: Mapping[str, JsonValue]) -> list[Mined] | None:
    """The facts one event yields; None when it is not an event understood here."""
    kind, tool = event.get("kind"), _tool(event)
    if _is_failure(event):
        return [_failure(event, tool)] if tool else None
    if kind == "turn" and event.get("status") == "rejected":
        return [_rejection(event, tool)] if tool else None
    if kind == "action_retried":
        attempts = event.get("attempts")
        if not tool:
            return None
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 2:
            return []
        return [
            Mined(
                _fact_id("retries", tool),
                f"{tool} retries",
                f"{tool} needed {attempts} attempts before it succeeded: expect transient failures and retry it.",
                "procedural",
                ("tool-retry", tool),
                _provenance(event, tool=tool, attempts=attempts),
            )
        ]
    if kind == "turn":
        return _requirements(event)
    return None


def trigger(events: Sequence[Mapping[str, JsonValue]]) -> dict[str, JsonValue]:
    """The window's trigger (see the module docstring)."""
    failures: dict[str, set[object]] = {}
    last: Mapping[str, JsonValue] | None = None
    for position, event in enumerate(events):
        tool = _tool(event)
        if _is_failure(event) and tool:
            action = event.get("action_id")
            failures.setdefault(tool, set()).add(action if isinstance(action, str) else position)
            last = event
    out: dict[str, JsonValue] = {
        "tool_error": bool(events) and _is_failure(events[-1]),
        "repeated_failures": max((len(seen) for seen in failures.values()), default=0),
    }
    if last is not None:
        out["tool"] = _tool(last)
        error = _clean(last.get("error"), MAX_ERROR_CHARS)
        if error:
            out["error"] = error
    return out
