"""
The run store's retention index: which runs the store holds, how many
bytes each takes and which have ended.

``StoreRetention`` builds it once from the store's ``inventory()`` (at the
first ``runs.start``) and the registry keeps it current (a run added at
``runs.start``, bytes added as its appends land, removed when pruned), so
enforcing the policy never rescans the disk.  Everything here runs on the reactor thread: a pruning is decided
and booked in one synchronous step, then the deletes go to the store
(whose file I/O runs in the thread pool).

The policy: when a run ends, the oldest ended runs (by start time) go until
its agent keeps at most ``run_retention_per_agent`` ended runs, the store
at most ``run_retention_total``, and the store's bytes are within
``run_store_max_bytes`` (pruning then goes down to 90 % of it).  Live runs
are never pruned; a run left ``in_progress`` by an earlier daemon life
counts as ended.  The index holds the ended runs the limits allow plus the
live ones, which the open-run caps bound.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

import attrs
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted.errors import RpcError
from car_twisted.interfaces import IRunStore
from car_twisted.runs.model import StoredRun

if TYPE_CHECKING:
    from car_twisted.config import ServerStateConfig

__all__ = ["RunLimits", "RetentionIndex", "IndexedRun", "StoreRetention", "limit_error"]

# Pruning for bytes goes below the quota, so that every run ending near a
# full store does not prune one run at a time.
_BYTES_FLOOR = 0.9


def limit_error(message: str, reason: str, limit: int) -> RpcError:
    """The error of a refused runs.* write: C{data} names the bound and its value."""
    return RpcError(message, data={"reason": reason, "limit": limit})


@attrs.frozen
class RunLimits:
    """The runs.* bounds from ``ServerStateConfig``."""

    open_per_agent: int
    open_per_connection: int
    max_bytes: int
    per_agent: int
    total: int

    @classmethod
    def from_config(cls, config: ServerStateConfig | None) -> RunLimits:
        """The bounds of C{config}, or the defaults when it is None."""
        from car_twisted.config import ServerStateConfig

        defaults = attrs.fields_dict(ServerStateConfig)

        def pick(name: str) -> int:
            # Each of these fields is an int with an int default.
            return int(getattr(config, name) if config is not None else cast(int, defaults[name].default))

        return cls(
            open_per_agent=pick("max_open_runs_per_agent"),
            open_per_connection=pick("max_open_runs_per_connection"),
            max_bytes=pick("run_store_max_bytes"),
            per_agent=pick("run_retention_per_agent"),
            total=pick("run_retention_total"),
        )


@attrs.define(eq=False)
class IndexedRun:
    """One run in the index; ``ended`` is False only while it is live."""

    agent_id: str
    run_id: str
    log_bytes: int = 0
    summary_bytes: int = 0
    ended: bool = False

    @property
    def bytes(self) -> int:
        return self.log_bytes + self.summary_bytes


class RetentionIndex:
    """
    The runs the store holds, oldest start first (inventoried runs sorted,
    runs started since appended: they are the newest), with running totals
    of ended runs (per agent and in all) and bytes.
    """

    def __init__(self, limits: RunLimits, stored: Iterable[StoredRun] = ()) -> None:
        self.limits = limits
        self.bytes = 0
        self.ended = 0
        self._all: collections.OrderedDict[tuple[str, str], IndexedRun] = collections.OrderedDict()
        self._by_agent: dict[str, collections.OrderedDict[tuple[str, str], IndexedRun]] = {}
        self._ended_by_agent: dict[str, int] = {}
        for run in sorted(stored, key=lambda r: (r.started, r.agent_id, r.run_id)):
            # Whatever its summary says, a run from an earlier daemon life
            # has nobody left to end it: it is prunable.
            self._insert(IndexedRun(run.agent_id, run.run_id, log_bytes=max(0, run.bytes), ended=True))

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._all

    def agents(self) -> list[str]:
        return list(self._by_agent)

    def ended_count(self, agent_id: str) -> int:
        return self._ended_by_agent.get(agent_id, 0)

    # -- bookkeeping -------------------------------------------------------------------

    def add(self, agent_id: str, run_id: str) -> None:
        """A run started now: live, and the newest."""
        self.remove(agent_id, run_id)
        self._insert(IndexedRun(agent_id, run_id))

    def grow(self, agent_id: str, run_id: str, written: int) -> None:
        """An append of C{written} bytes landed (a pruned run is ignored)."""
        run = self._all.get((agent_id, run_id))
        if run is not None:
            run.log_bytes += written
            self.bytes += written

    def set_summary(self, agent_id: str, run_id: str, size: int) -> None:
        """The run's summary was replaced by one of C{size} bytes."""
        run = self._all.get((agent_id, run_id))
        if run is not None:
            self.bytes += size - run.summary_bytes
            run.summary_bytes = size

    def end(self, agent_id: str, run_id: str) -> None:
        """The run turned terminal: from now on it may be pruned."""
        run = self._all.get((agent_id, run_id))
        if run is not None and not run.ended:
            run.ended = True
            self._count_ended(run, +1)

    def remove(self, agent_id: str, run_id: str) -> IndexedRun | None:
        key = (agent_id, run_id)
        run = self._all.pop(key, None)
        if run is None:
            return None
        mine = self._by_agent[agent_id]
        del mine[key]
        if not mine:
            del self._by_agent[agent_id]
        if run.ended:
            self._count_ended(run, -1)
        self.bytes -= run.bytes
        return run

    def over_bytes(self) -> bool:
        return self.bytes > self.limits.max_bytes

    # -- the policy ------------------------------------------------------------------------

    def prune(self, agents: Iterable[str] = ()) -> list[IndexedRun]:
        """
        Take the oldest ended runs out of the index until C{agents} are
        within the per-agent limit and the store within the total and the
        byte quota (down to 90 % of it).
        @return: the runs taken out, for the caller to delete.
        """
        victims: list[IndexedRun] = []
        for agent_id in agents:
            while self.ended_count(agent_id) > self.limits.per_agent:
                victims.append(self._take_oldest(self._by_agent[agent_id]))
        while self.ended > self.limits.total:
            victims.append(self._take_oldest(self._all))
        if self.over_bytes():
            floor = int(self.limits.max_bytes * _BYTES_FLOOR)
            while self.bytes > floor and self.ended:
                victims.append(self._take_oldest(self._all))
        return victims

    def _take_oldest(self, runs: collections.OrderedDict[tuple[str, str], IndexedRun]) -> IndexedRun:
        # Only called with an ended run among C{runs}; live runs are
        # skipped, and there are few of them (the open-run caps).
        oldest = next(run for run in runs.values() if run.ended)
        self.remove(oldest.agent_id, oldest.run_id)
        return oldest

    # -- internals ------------------------------------------------------------------------------

    def _insert(self, run: IndexedRun) -> None:
        key = (run.agent_id, run.run_id)
        self._all[key] = run
        self._by_agent.setdefault(run.agent_id, collections.OrderedDict())[key] = run
        if run.ended:
            self._count_ended(run, +1)
        self.bytes += run.bytes

    def _count_ended(self, run: IndexedRun, delta: int) -> None:
        self.ended += delta
        left = self._ended_by_agent.get(run.agent_id, 0) + delta
        if left:
            self._ended_by_agent[run.agent_id] = left
        else:
            self._ended_by_agent.pop(run.agent_id, None)


class StoreRetention:
    """
    The retention policy applied to one ``IRunStore``: its index, read from
    the store's inventory once, and the deletes that pruning asks for.
    Every method but ``ready`` is synchronous; before ``ready`` has fired
    they do nothing (no run can have started yet).
    """

    _log = Logger()

    def __init__(self, store: IRunStore, limits: RunLimits, on_pruned: Callable[[str, str], None]) -> None:
        self.store = store
        self.limits = limits
        self.on_pruned = on_pruned
        self.index: RetentionIndex | None = None
        self._waiters: list[Deferred[RetentionIndex]] = []

    def ready(self) -> Deferred[RetentionIndex]:
        """Fires once the index is built (with it), or fails if the store could not be read."""
        if self.index is not None:
            return succeed(self.index)
        d: Deferred[RetentionIndex] = Deferred()
        self._waiters.append(d)
        if len(self._waiters) == 1:
            scan = maybeDeferred(self.store.inventory)
            scan.addCallback(self._inventoried).addErrback(self._inventory_failed)
        return d

    def _inventoried(self, stored: Iterable[StoredRun] | None) -> None:
        self.index = RetentionIndex(self.limits, stored or ())
        self._log.info("run store holds {count} runs, {bytes} bytes", count=len(self.index), bytes=self.index.bytes)
        # A store left over the limits (by smaller limits, or an older
        # daemon) is brought within them before the first new run.
        self.prune(self.index.agents())
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(self.index)

    def _inventory_failed(self, failure: Failure) -> None:
        self._log.failure("run store inventory failed", failure=failure)
        # The waiting starts fail; the next one tries again.
        self.index = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(RpcError("the run store could not be read; try again"))

    # -- bookkeeping (the registry reports what it did) -------------------------------------

    def started(self, agent_id: str, run_id: str) -> None:
        if self.index is not None:
            self.index.add(agent_id, run_id)

    def grew(self, agent_id: str, run_id: str, written: int | None) -> None:
        if self.index is not None and type(written) is int:
            self.index.grow(agent_id, run_id, written)

    def summary_written(self, agent_id: str, run_id: str, size: int | None) -> None:
        if self.index is not None and type(size) is int:
            self.index.set_summary(agent_id, run_id, size)

    def ended(self, agent_id: str, run_id: str) -> None:
        if self.index is not None:
            self.index.end(agent_id, run_id)

    # -- the policy ------------------------------------------------------------------------------

    def prune(self, agents: Iterable[str] = ()) -> None:
        """Delete what the policy lets go (see the module docstring)."""
        if self.index is None:
            return
        victims = self.index.prune(agents)
        if victims:
            self._log.info("pruning {count} ended runs from the run store", count=len(victims))
        for victim in victims:
            self.on_pruned(victim.agent_id, victim.run_id)
            self._delete(victim)

    def _delete(self, victim: IndexedRun) -> None:
        d = maybeDeferred(self.store.delete, victim.agent_id, victim.run_id)
        d.addErrback(
            lambda f: self._log.failure(
                "deleting run {run_id} of {agent_id} failed; its files stay outside the quota until a restart",
                failure=f,
                run_id=victim.run_id,
                agent_id=victim.agent_id,
            )
        )

    def full(self) -> bool:
        """Over the byte quota with no ended run left to prune."""
        if self.index is None or not self.index.over_bytes():
            return False
        self.prune()
        return self.index.over_bytes()

    def full_error(self) -> RpcError:
        limit = self.limits.max_bytes
        return limit_error(
            f"the run store is full (run_store_max_bytes = {limit}) and holds no ended run to prune",
            "run_store_full",
            limit,
        )
