"""
Live run traces: the ``runs.trace.event`` subscribers of each run.

Recording never waits for a subscriber: each has a backlog used only
while its connection's output is backed up, bounded by bytes; past it
events are dropped and the client sees a cursor gap (and re-subscribes).
A live subscription pins its connection against the idle sweep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from car_twisted.outbox import Outbox
from car_twisted.rpc.envelope import encode_notification
from car_twisted.runs.model import RunMeta, RunRecord

if TYPE_CHECKING:
    from car_twisted.session import ClientSession
    from car_twisted.stats import DaemonStats

__all__ = ["Subscriber", "TraceSubscriptions", "SUBSCRIBER_BACKLOG_BYTES", "MAX_SUBSCRIPTIONS_PER_SESSION"]

# Events held for one subscriber while its socket is backed up: enough for
# a whole 256-turn batch of ordinary turns, so a reader that keeps up loses
# nothing; past it events are dropped and the client sees a cursor gap.
SUBSCRIBER_BACKLOG_BYTES = 2 * 1024 * 1024
MAX_SUBSCRIPTIONS_PER_SESSION = 64


class Subscriber(Outbox):
    """One (connection, run) subscription: an outbox that drops (the client sees a cursor gap) past its bound."""

    def __init__(self, session: ClientSession, run_id: str, stats: DaemonStats | None = None) -> None:
        super().__init__(session.channel, SUBSCRIBER_BACKLOG_BYTES, stats=stats)
        self.session = session
        self.run_id = run_id


class TraceSubscriptions:
    """Every live subscription, by run and connection."""

    def __init__(self, stats: DaemonStats | None = None) -> None:
        self.stats = stats
        self._by_run: dict[str, dict[str, Subscriber]] = {}

    def is_empty(self) -> bool:
        return not self._by_run

    def get(self, run_id: str, client_id: str) -> Subscriber | None:
        return self._by_run.get(run_id, {}).get(client_id)

    def count(self, session: ClientSession) -> int:
        """How many runs C{session} is subscribed to."""
        return sum(1 for subs in self._by_run.values() if session.client_id in subs)

    def add(self, session: ClientSession, run_id: str) -> None:
        """Subscribe (again: a re-subscribe after a gap starts a fresh backlog)."""
        subs = self._by_run.setdefault(run_id, {})
        if session.client_id not in subs:
            session.activity.pin()
        subs[session.client_id] = Subscriber(session, run_id, self.stats)

    def remove(self, session: ClientSession, run_id: str) -> bool:
        subs = self._by_run.get(run_id, {})
        removed = subs.pop(session.client_id, None) is not None
        if removed:
            session.activity.unpin()
            if not subs:
                del self._by_run[run_id]
        return removed

    def fan_out(self, meta: RunMeta, record: RunRecord, cursor: int) -> None:
        """One event to every subscriber of C{meta}'s run."""
        subs = self._by_run.get(meta.run_id)
        if not subs:
            return
        frame = encode_notification(
            "runs.trace.event",
            {"run_id": meta.run_id, "agent_id": meta.agent_id, "record": record, "cursor": cursor, "status": meta.status},
        )
        for sub in list(subs.values()):
            sub.push(frame)

    def drain(self, session: ClientSession) -> None:
        """C{session}'s output drained: flush its backlogs."""
        for subs in self._by_run.values():
            sub = subs.get(session.client_id)
            if sub is not None:
                sub.drain()

    def drop_session(self, session: ClientSession) -> None:
        """C{session} is gone: forget its subscriptions."""
        for run_id in list(self._by_run):
            subs = self._by_run[run_id]
            subs.pop(session.client_id, None)
            if not subs:
                del self._by_run[run_id]
