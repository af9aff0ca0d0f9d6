"""
``ApprovalGate``: which JSON-RPC calls wait for a person's approval.

A gated call parks: the daemon raises a system approval (``action:
"ws.method:<method>"``, a truncated preview of the params), broadcasts
``approval.requested`` to host subscribers, and runs the handler only
once some authenticated connection approves it with
``host.resolve_approval``; a denial or the timeout answers ``-32003`` and
leaves the connection open.

A call is gated when its method is in C{methods} (any method, built-in or
an embedder's), or when its ``MethodSpec.approval`` rule says so for these
params: the daemon's own rule gates ``agents.start`` / ``agents.restart``
of an agent whose command, arguments, environment or working directory
changed since it last ran in this daemon.  C{enabled=False}
(``twist car --no-approvals``, ``CAR_NO_APPROVALS=1``) turns both off.
"""

from __future__ import annotations

import attrs

from car_twisted.json_value import JsonValue
from car_twisted.rpc.envelope import dumps

__all__ = ["ApprovalGate", "DEFAULT_APPROVAL_TIMEOUT_SECS", "PREVIEW_CHARS", "params_preview"]

DEFAULT_APPROVAL_TIMEOUT_SECS = 60.0
PREVIEW_CHARS = 512


def _method_names(names: object) -> frozenset[str]:
    if isinstance(names, str):
        return frozenset({names})
    return frozenset(str(n) for n in names)  # type: ignore[attr-defined]


@attrs.frozen
class ApprovalGate:
    """
    @ivar methods: methods that always wait for approval.
    @ivar timeout: seconds a gated call waits before it is refused.
    @ivar enabled: off turns every gate off, rules included.
    """

    methods: frozenset[str] = attrs.field(factory=frozenset, converter=_method_names)
    timeout: float = DEFAULT_APPROVAL_TIMEOUT_SECS
    enabled: bool = True


def params_preview(params: JsonValue) -> str:
    """The params as JSON, cut to ``PREVIEW_CHARS`` characters (for the approval row)."""
    try:
        text = dumps(params).decode()
    except (TypeError, ValueError):
        text = repr(params)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "…"
