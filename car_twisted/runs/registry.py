"""
The run registry on ``ServerState``: ``runs.*`` state, the ceiling, the
open-run caps, the store's retention policy, the disconnect grace window
and the live trace fan-out.

Every check-then-act here is synchronous on the reactor thread: the
ceiling check reserves its turn indices before the store's (threaded)
write starts, so pipelined batches from any number of connections can
never take a run past ``RECORD_TURNS_RUN_CEILING``; the open-run caps and
the store quota are checked and the new run counted in the same step; and
a terminal status is set before the terminal record is written.
"""

from __future__ import annotations

import collections
import re
import uuid
from typing import TYPE_CHECKING, cast

import orjson
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted._util import iso_utc
from car_twisted.errors import InvalidParams, RpcError
from car_twisted.interfaces import IRunStore, ISessionFeature
from car_twisted.json_value import JsonValue
from car_twisted.runs.model import (
    MAX_TURNS_PER_BATCH,
    RECORD_TURNS_RUN_CEILING,
    Appended,
    RecordRunTurnsOutcome,
    RunCeiling,
    RunMeta,
    RunNotFound,
    RunRecord,
    RunTerminal,
    TurnTooLarge,
    bound_turn,
    valid_key,
)
from car_twisted.runs.retention import RunLimits, StoreRetention, limit_error
from car_twisted.runs.subscriptions import MAX_SUBSCRIPTIONS_PER_SESSION, SUBSCRIBER_BACKLOG_BYTES, TraceSubscriptions
from car_twisted.stats import DaemonStats

if TYPE_CHECKING:
    from car_twisted.config import ServerStateConfig
    from car_twisted.methods.runs import StartParams
    from car_twisted.proposal.ir import ActionProposal, ProposalResult
    from car_twisted.session import ClientSession

__all__ = ["RunRegistry", "RunConnection", "MAX_PAGE_BYTES", "SUBSCRIBER_BACKLOG_BYTES"]

MAX_PAGE_BYTES = 8 * 1024 * 1024
MAX_REMEMBERED_RUNS = 4096
# (An alias: ``list`` is a method name inside RunRegistry.)
RunRecords = list[RunRecord]
AgentIds = list[str]
_BAD_TURNS = "runs.record_turns requires { run_id, turns: [RunTurn] }"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64]


@implementer(ISessionFeature)
class RunConnection:
    """
    One connection's part in run tracing: its current run (the one its
    proposals are recorded into).  Open runs and subscriptions pin the
    connection themselves; closing it starts the runs' grace windows.
    """

    def __init__(self, registry: RunRegistry, session: ClientSession) -> None:
        self.registry = registry
        self.session = session
        self.current_run: str | None = None

    def holds_client_state(self) -> bool:
        return False

    def close(self) -> None:
        self.registry.session_closed(self.session)


class RunRegistry:
    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        store: IRunStore,
        grace: float,
        config: ServerStateConfig | None = None,
        stats: DaemonStats | None = None,
    ) -> None:
        self.clock = clock
        self.stats = stats if stats is not None else DaemonStats()
        self.store = store
        self.grace = grace
        self.config = config
        self.limits = RunLimits.from_config(config)
        self.runs: dict[str, RunMeta] = {}
        self.subscriptions = TraceSubscriptions(self.stats)
        # Open (started, not yet terminal) runs per agent and per starting
        # connection (by client id, while it is open).
        self._open_by_agent: collections.Counter[str] = collections.Counter()
        self._open_by_client: collections.Counter[str] = collections.Counter()
        self.retention = StoreRetention(store, self.limits, on_pruned=self._pruned)

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def entitled(session: ClientSession, agent_id: str) -> bool:
        """Reads: the owning agent's own connection or the host role."""
        return session.is_host or session.agent_id == agent_id

    def connection(self, session: ClientSession) -> RunConnection:
        """C{session}'s part in run tracing, made on first use."""
        return session.feature(RunConnection, self._new_connection)

    def current_run(self, session: ClientSession) -> str | None:
        """The run C{session}'s work is recorded into, if it started one."""
        conn = session.existing_feature(RunConnection)
        return conn.current_run if conn is not None else None

    def _new_connection(self, session: ClientSession) -> RunConnection:
        session.channel.on_resume(lambda: self.subscriptions.drain(session))
        return RunConnection(self, session)

    def _remember(self, meta: RunMeta) -> None:
        self.runs[meta.run_id] = meta
        if len(self.runs) > MAX_REMEMBERED_RUNS:
            for run_id, old in list(self.runs.items()):
                if old.terminal:
                    del self.runs[run_id]
                    if len(self.runs) <= MAX_REMEMBERED_RUNS:
                        break

    def _persist(self, meta: RunMeta, records: list[RunRecord]) -> Deferred[int | None]:
        """Lifecycle records (started, ended): the record, then the summary."""
        d = self._append(meta, records)
        d.addCallback(lambda _: self.store.write_summary(meta.summary()))
        return d.addCallback(self._summary_written, meta)

    def _append(self, meta: RunMeta, records: list[RunRecord]) -> Deferred[int | None]:
        """Every append of the registry: the store's, with its bytes booked."""
        self.stats.run_turns += sum(1 for record in records if record.get("record") == "turn")
        return self.store.append(meta.agent_id, meta.run_id, records).addCallback(self._grown, meta)

    def _grown(self, written: int | None, meta: RunMeta) -> int | None:
        self.retention.grew(meta.agent_id, meta.run_id, written)
        return written

    def _summary_written(self, size: int | None, meta: RunMeta) -> int | None:
        self.retention.summary_written(meta.agent_id, meta.run_id, size)
        return size

    def _pruned(self, agent_id: str, run_id: str) -> None:
        meta = self.runs.get(run_id)
        if meta is not None and meta.terminal and meta.agent_id == agent_id:
            del self.runs[run_id]

    # -- open runs ---------------------------------------------------------------------------

    def _check_room(self, session: ClientSession, agent_id: str) -> None:
        """The open-run caps and the store quota, before a new run."""
        limit = self.limits.open_per_agent
        if self._open_by_agent[agent_id] >= limit:
            raise limit_error(
                f"too many open runs for agent {agent_id} (max_open_runs_per_agent = {limit}); complete one first",
                "open_run_limit",
                limit,
            )
        limit = self.limits.open_per_connection
        if self._open_by_client[session.client_id] >= limit:
            raise limit_error(
                f"too many open runs on this connection (max_open_runs_per_connection = {limit}); complete one first",
                "open_run_limit",
                limit,
            )
        if self.retention.full():
            raise self.retention.full_error()

    def _opened(self, meta: RunMeta, session: ClientSession) -> None:
        self._open_by_agent[meta.agent_id] += 1
        self._open_by_client[session.client_id] += 1
        # An open run keeps its connection from being reaped as idle.
        session.activity.pin()
        meta.pinned = True
        self.retention.started(meta.agent_id, meta.run_id)

    def _closed(self, meta: RunMeta) -> None:
        """The run turned terminal: free its open-run slots and its pin."""
        _decrement(self._open_by_agent, meta.agent_id)
        if meta.owner is not None:
            _decrement(self._open_by_client, meta.owner.client_id)
        self._unpin(meta)

    @staticmethod
    def _unpin(meta: RunMeta) -> None:
        if meta.pinned and meta.owner is not None:
            meta.owner.activity.unpin()
        meta.pinned = False

    # -- runs.start ------------------------------------------------------------------------

    async def start(self, session: ClientSession, p: StartParams) -> dict[str, object]:
        agent_id = self._resolve_agent(session, p)
        key = p.idempotency_key
        if key is not None and not valid_key(key):
            raise InvalidParams("idempotency_key", "letters, digits, '.', '_', ':' and '-' only, at most 128")
        await self.retention.ready()
        if key is not None:
            existing = await self._existing(key, agent_id)
            if existing is not None:
                # A re-start of the same run: no new run, nothing counted.
                self.connection(session).current_run = key
                return {"run_id": key, "agent_id": agent_id}
        # No await from here to _opened: the caps and the quota are checked
        # and the run counted in one step.
        self._check_room(session, agent_id)
        run_id = key or self._mint()
        meta = RunMeta(
            run_id=run_id,
            agent_id=agent_id,
            intent=p.intent,
            started_at=iso_utc(self.clock.seconds()),
            agent_name=p.agent_name,
            outcome_description=p.outcome_description,
            owner=session,
        )
        self._remember(meta)
        # Counted before the close hook: a connection already gone gets its
        # pin and slot released by it at once.
        self._opened(meta, session)
        conn = self.connection(session)
        # Set before the ack: a proposal sent right after it is this run's.
        conn.current_run = run_id
        try:
            await self._persist(meta, [meta.started_record()])
        except Exception:
            self._log.failure("run store write failed for new run {run_id}", run_id=run_id)
            # Nothing would ever end a run that was never stored: free its
            # slots now rather than hold them for the daemon's life.
            meta.status = "incomplete"
            meta.ended_at = iso_utc(self.clock.seconds())
            self._closed(meta)
            self.retention.ended(meta.agent_id, meta.run_id)
            if conn.current_run == run_id:
                conn.current_run = None
            raise RpcError(f"run {run_id}: could not be stored") from None
        self.subscriptions.fan_out(meta, meta.started_record(), 0)
        self._log.info("run {run_id} started for agent {agent_id}", run_id=run_id, agent_id=agent_id)
        return {"run_id": run_id, "agent_id": agent_id}

    def _mint(self) -> str:
        return str(uuid.uuid4())

    def _resolve_agent(self, session: ClientSession, p: StartParams) -> str:
        bound = session.agent_id
        if p.agent_id is not None:
            if not valid_key(p.agent_id):
                raise InvalidParams("agent_id", "not a valid agent id")
            # Naming an agent is for that agent's own connection: anything
            # else could write a trace in another agent's name.
            if bound is None:
                raise InvalidParams(
                    "agent_id",
                    "only a connection bound to that agent (session.auth {agent_id, token}) may name it; "
                    "give agent_name instead",
                )
            if p.agent_id != bound:
                raise InvalidParams("agent_id", "does not match this connection's agent binding")
        if bound is not None:
            return bound
        if p.agent_name:
            slug = _slug(p.agent_name)
            if slug:
                return f"name:{slug}"
        raise InvalidParams(
            "agent_id",
            "cannot resolve the run's agent: bind the connection (session.auth {agent_id, token}) or give agent_name",
        )

    async def _existing(self, key: str, agent_id: str) -> RunMeta | dict[str, str] | None:
        meta = self.runs.get(key)
        if meta is None:
            owner = await self.store.find(key)
            meta = self.runs.get(key)  # re-check: a start may have landed meanwhile
            if meta is None:
                if owner is None:
                    return None
                if owner != agent_id:
                    raise InvalidParams("idempotency_key", "names another agent's run")
                return {"run_id": key, "agent_id": owner}
        if meta.agent_id != agent_id:
            raise InvalidParams("idempotency_key", "names another agent's run")
        return meta

    # -- runs.record_turns ----------------------------------------------------------------------

    def reserve(
        self, session: ClientSession, run_id: object, turns: object
    ) -> tuple[RecordRunTurnsOutcome, tuple[RunMeta, list[RunRecord]] | None]:
        """
        Validate, bound and reserve a batch in one synchronous step.
        @return: the outcome and, when appended, the records to write.
        @raise RpcError: bad params (``-32602``), or the store is full
            (``run_store_full``).
        """
        if type(run_id) is not str or not run_id or type(turns) is not list or not turns:
            raise RpcError(_BAD_TURNS, code=-32602, data={"field": "turns" if type(run_id) is str and run_id else "run_id"})
        if len(turns) > MAX_TURNS_PER_BATCH:
            raise RpcError(f"{_BAD_TURNS}: at most {MAX_TURNS_PER_BATCH} turns per batch", code=-32602, data={"field": "turns"})
        if any(type(t) is not dict for t in turns):
            raise RpcError(f"{_BAD_TURNS}: every turn must be an object", code=-32602, data={"field": "turns"})
        meta = self.runs.get(run_id)
        if meta is None or session.agent_id is None or session.agent_id != meta.agent_id:
            return RunNotFound(), None
        if meta.terminal:
            return RunTerminal(), None
        if self.retention.full():
            raise self.retention.full_error()
        bounded = [b for b in (bound_turn(t) for t in turns) if b is not None]
        if len(bounded) < len(turns):
            return TurnTooLarge(), None
        if meta.turn_count + len(bounded) > RECORD_TURNS_RUN_CEILING:
            return RunCeiling(), None
        base = meta.turn_count
        meta.turn_count += len(bounded)
        records: list[RunRecord] = [{"record": "turn", "index": base + i, **b} for i, b in enumerate(bounded)]
        return Appended(base, len(records)), (meta, records)

    async def record(self, session: ClientSession, run_id: object, turns: object) -> dict[str, object]:
        outcome, work = self.reserve(session, run_id, turns)
        if not isinstance(outcome, Appended):
            return {"run_id": run_id, "base_index": 0, "count": 0, "ok": False, "dropped": outcome.dropped}
        assert work is not None  # reserve pairs every Appended with its records
        meta, records = work
        try:
            await self._append(meta, records)
        except Exception:
            self._log.failure("run store append failed for {run_id}", run_id=meta.run_id)
            raise RpcError(f"run {meta.run_id}: the turns could not be stored") from None
        for i, record in enumerate(records):
            self.subscriptions.fan_out(meta, record, outcome.base_index + i + 1)
        return {"run_id": meta.run_id, "base_index": outcome.base_index, "count": outcome.count, "ok": True}

    async def record_proposal(self, session: ClientSession, proposal: ActionProposal, result: ProposalResult) -> None:
        """
        The proposal recorder: each action that was attempted or rejected
        becomes a turn of the session's current run, through the same
        append path (ownership, bounds, ceiling) as ``runs.record_turns``.
        A session without a current run it owns records nothing.
        """
        run_id = self.current_run(session)
        if run_id is None:
            return
        actions = {a.id: a for a in proposal.actions}
        turns: list[RunRecord] = []
        for res in result.results:
            if res.status == "skipped":
                continue
            action = actions[res.action_id]
            turn: RunRecord = {
                "action_id": res.action_id,
                "tool": action.tool or action.type,
                "parameters": action.parameters,
                "output": res.output,
                "status": res.status,
                "proposal_id": result.proposal_id,
            }
            if res.error is not None:
                turn["error"] = res.error
            if res.status == "rejected" and (res.error or "").startswith("denied by policy"):
                turn["policy_rejected"] = True
            turns.append(turn)
        for start in range(0, len(turns), MAX_TURNS_PER_BATCH):
            try:
                await self.record(session, run_id, turns[start : start + MAX_TURNS_PER_BATCH])
            except RpcError as e:
                # The proposal's own answer stands; the trace misses these turns.
                self._log.warn(
                    "proposal {proposal_id} not recorded into run {run_id}: {why}",
                    proposal_id=result.proposal_id,
                    run_id=run_id,
                    why=e.message,
                )
                return

    # -- runs.complete and the grace window ---------------------------------------------------------

    async def complete(self, session: ClientSession, run_id: str, outcome: JsonValue) -> dict[str, object]:
        meta = self.runs.get(run_id)
        if meta is None:
            # Known only to the disk: a run from an earlier daemon life, which
            # is terminal by now.  Say so only to the agent that owns it.
            owner = await self.store.find(run_id)
            if owner is not None and owner == session.agent_id:
                raise RpcError(f"run {run_id} is already terminal")
            raise RpcError(f"unknown run_id {run_id}")
        if meta.owner is not session and (session.agent_id is None or session.agent_id != meta.agent_id):
            raise RpcError(f"unknown run_id {run_id}")
        if meta.terminal:
            raise RpcError(f"run {run_id} is already terminal ({meta.status})")
        self._cancel_grace(meta)
        await self._end(meta, "completed", {"outcome": outcome})
        return {"run_id": run_id, "ok": True}

    async def _end(self, meta: RunMeta, status: str, extra: RunRecord) -> None:
        meta.status = status
        meta.ended_at = iso_utc(self.clock.seconds())
        self._closed(meta)
        record: RunRecord = {"record": "ended", "status": status, "ended_at": meta.ended_at, **extra}
        try:
            await self._persist(meta, [record])
        finally:
            # Prunable only now that its last writes are done: a delete
            # queued before its summary write would leave that behind.
            self.retention.ended(meta.agent_id, meta.run_id)
            self.retention.prune((meta.agent_id,))
        self.subscriptions.fan_out(meta, record, meta.turn_count)
        self._log.info("run {run_id} ended: {status}", run_id=meta.run_id, status=status)

    def _cancel_grace(self, meta: RunMeta) -> None:
        if meta.grace_timer is not None and meta.grace_timer.active():
            meta.grace_timer.cancel()
        meta.grace_timer = None

    def session_closed(self, session: ClientSession) -> None:
        self.subscriptions.drop_session(session)
        for meta in list(self.runs.values()):
            if meta.owner is session:
                self._unpin(meta)
                meta.owner = None
                if not meta.terminal and meta.grace_timer is None:
                    meta.grace_timer = self.clock.callLater(self.grace, self._grace_expired, meta)
        # Its open runs still count for their agents; the connection is gone.
        self._open_by_client.pop(session.client_id, None)

    def _grace_expired(self, meta: RunMeta) -> None:
        meta.grace_timer = None
        if meta.terminal:
            return
        d = self._end_now(meta)
        d.addErrback(lambda f: self._log.failure("marking run {run_id} incomplete failed", failure=f, run_id=meta.run_id))

    def _end_now(self, meta: RunMeta) -> Deferred[None]:
        return ensureDeferred(self._end(meta, "incomplete", {"reason": "connection closed without runs.complete"}))

    def shutdown(self) -> None:
        for meta in self.runs.values():
            self._cancel_grace(meta)

    # -- reads -------------------------------------------------------------------------------------------

    def _forbidden(self, what: str) -> RpcError:
        return RpcError(f"{what}: not visible to this connection (the owning agent's connection or the host role only)")

    async def _locate(self, run_id: str) -> str | None:
        meta = self.runs.get(run_id)
        if meta is not None:
            return meta.agent_id
        return await self.store.find(run_id)

    async def subscribe(self, session: ClientSession, run_id: str) -> dict[str, object]:
        agent_id = await self._locate(run_id)
        if agent_id is None or not self.entitled(session, agent_id):
            raise self._forbidden(f"runs.subscribe {run_id}")
        if self.subscriptions.count(session) >= MAX_SUBSCRIPTIONS_PER_SESSION:
            raise RpcError(f"too many run subscriptions on this connection (at most {MAX_SUBSCRIPTIONS_PER_SESSION})")
        self.connection(session)
        records = await self.store.read(agent_id, run_id) or []
        # No await between the read above and the registration below, and
        # the store ran the read after every earlier append: the snapshot
        # and the stream meet exactly.
        meta = self.runs.get(run_id)
        status = meta.status if meta is not None else self._disk_status(records)
        if meta is not None and not meta.terminal and not session.closed:
            self.subscriptions.add(session, run_id)
        turns = [r for r in records if r.get("record") == "turn"]
        cursor = len(turns)
        shown, truncated = _fit(turns)
        out: dict[str, object] = {"run_id": run_id, "agent_id": agent_id, "turns_so_far": shown, "cursor": cursor, "status": status}
        if truncated:
            out["truncated"] = True
            out["first_index"] = cursor - len(shown)
        return out

    def unsubscribe(self, session: ClientSession, run_id: str) -> dict[str, object]:
        return {"run_id": run_id, "removed": self.subscriptions.remove(session, run_id)}

    @staticmethod
    def _disk_status(records: list[RunRecord]) -> str:
        if records and records[-1].get("record") == "ended":
            return str(records[-1].get("status", "completed"))
        return "incomplete"

    async def list(
        self, session: ClientSession, agent_id: str | None, limit: int | None = None, offset: int | None = None
    ) -> dict[str, object]:
        """
        C{agent_id}'s runs, newest first; with no C{agent_id}, every
        agent's (the host role only).  C{limit} / C{offset} cut one page
        out of the list; a paged (or every-agent) answer also says the
        C{total} and the C{offset}.
        """
        if agent_id is None:
            if not session.is_host:
                raise self._forbidden("runs.list of every agent")
            runs: RunRecords = []
            for each in await self._agents_with_runs():
                runs.extend(await self._summaries(each))
        else:
            if not valid_key(agent_id) or not self.entitled(session, agent_id):
                raise self._forbidden(f"runs.list {agent_id}")
            runs = await self._summaries(agent_id)
        # Newest first; the run id orders runs started in the same instant.
        runs.sort(key=lambda s: (str(s.get("started_at") or ""), str(s.get("run_id") or "")), reverse=True)
        out: dict[str, object] = {"agent_id": agent_id, "runs": runs}
        if agent_id is None or limit is not None or offset is not None:
            start = offset or 0
            out["runs"] = runs[start : start + limit] if limit is not None else runs[start:]
            out["total"] = len(runs)
            out["offset"] = start
        return out

    async def _agents_with_runs(self) -> AgentIds:
        """Every agent the store holds runs of, and every agent with a run in memory."""
        index = await self.retention.ready()
        return sorted(set(index.agents()) | {meta.agent_id for meta in self.runs.values()})

    async def _summaries(self, agent_id: str) -> RunRecords:
        """C{agent_id}'s run summaries: the store's, with the live ones from memory."""
        # Summaries are the registry's own (RunMeta.summary): string ids and times.
        by_id = {
            cast(str, s["run_id"]): s for s in await self.store.summaries(agent_id) if type(s) is dict and "run_id" in s
        }
        for run_id, summary in list(by_id.items()):
            if run_id in self.runs:
                continue
            if summary.get("status") == "in_progress":
                # From an earlier daemon life that never ended the run.
                records = await self.store.read(agent_id, run_id) or []
                summary = {**summary, "status": "incomplete", "turn_count": sum(1 for r in records if r.get("record") == "turn")}
                by_id[run_id] = summary
        for meta in self.runs.values():
            if meta.agent_id == agent_id:
                by_id[meta.run_id] = meta.summary()
        return list(by_id.values())

    async def get_trace(self, session: ClientSession, run_id: str, cursor: int) -> dict[str, object]:
        agent_id = await self._locate(run_id) if valid_key(run_id) else None
        if agent_id is None:
            return {"run_id": run_id, "not_found": True}
        if not self.entitled(session, agent_id):
            raise self._forbidden(f"runs.get_trace {run_id}")
        records = await self.store.read(agent_id, run_id)
        if records is None:
            return {"run_id": run_id, "not_found": True}
        meta = self.runs.get(run_id)
        active = meta is not None and not meta.terminal
        if not active and (not records or records[-1].get("record") != "ended"):
            records.append({"record": "ended", "status": "incomplete", "reason": "no terminal record: the daemon stopped during the run"})
        page, truncated = _fit(records[cursor:], from_start=True)
        out: dict[str, object] = {"run_id": run_id, "agent_id": agent_id, "records": page, "cursor": cursor}
        if truncated:
            out["next_cursor"] = cursor + len(page)
        return out


def _decrement(counter: collections.Counter[str], key: str) -> None:
    if counter[key] > 1:
        counter[key] -= 1
    else:
        counter.pop(key, None)


def _fit(records: list[RunRecord], from_start: bool = False) -> tuple[list[RunRecord], bool]:
    """The records that fit in one reply (from the start, or the newest)."""
    total = 0
    order = records if from_start else list(reversed(records))
    kept: list[RunRecord] = []
    for record in order:
        size = len(orjson.dumps(record))
        if kept and total + size > MAX_PAGE_BYTES:
            break
        total += size
        kept.append(record)
    if not from_start:
        kept.reverse()
    return kept, len(kept) < len(records)
