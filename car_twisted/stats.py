"""
``DaemonStats``: the daemon's own counters, kept as plain numbers on the
hot path and read only when someone asks (``/metrics``, the dashboard).

Per JSON-RPC method: requests answered by outcome (``ok`` or the error
code) and a latency histogram (seconds from the request's arrival to its
reply being ready); requests waiting on a handler now; tool callbacks that
timed out; run turns appended; agent restarts; fan-out frames dropped for
subscribers that did not read.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["DaemonStats", "LATENCY_BUCKETS", "MethodStats"]

#: Histogram upper bounds in seconds (the last bucket is +Inf).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_OTHER = "(unknown method)"


class MethodStats:
    __slots__ = ("outcomes", "buckets", "total_seconds", "count")

    def __init__(self) -> None:
        self.outcomes: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total_seconds = 0.0
        self.count = 0


class DaemonStats:
    def __init__(self) -> None:
        self.methods: dict[str, MethodStats] = {}
        self.in_flight = 0
        self.callback_timeouts = 0
        self.run_turns = 0
        self.agent_restarts = 0
        self.subscriber_drops = 0

    def request(self, method: str | None, outcome: str, seconds: float) -> None:
        """One request answered: C{outcome} is ``ok`` or the error code as text."""
        stats = self.methods.get(method or _OTHER)
        if stats is None:
            stats = self.methods[method or _OTHER] = MethodStats()
        stats.outcomes[outcome] = stats.outcomes.get(outcome, 0) + 1
        stats.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        stats.total_seconds += seconds
        stats.count += 1

    def totals(self) -> tuple[int, int]:
        """All requests answered, and how many of them were errors."""
        count = errors = 0
        for stats in self.methods.values():
            count += stats.count
            errors += stats.count - stats.outcomes.get("ok", 0)
        return count, errors
