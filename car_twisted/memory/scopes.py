"""
``MemoryScopes``: which graph a connection's ``memory.*`` calls act on, and
how each graph is kept on disk.

| the connection is bound by | graph | file under ``$CAR_HOME/memory/`` |
| --- | --- | --- |
| ``session.auth {memory_namespace}`` | private to the namespace | ``memory-namespaces/<encoded>.json`` |
| ``session.auth {agent_id}`` (no namespace) | the agent's own | ``agents/<agent_id>.json`` |
| neither | the daemon's shared graph | ``shared.json`` |

A namespace wins over an agent binding.  ``<encoded>`` is an injective
lowercase percent-encoding of the namespace's UTF-8 bytes: ``a``-``z``,
``0``-``9``, ``-``, ``_`` and ``.`` pass through, every other byte
(``%`` and uppercase letters included) becomes ``%`` and two lowercase hex
digits, so two namespaces never share a file and no name escapes the
directory (``.`` and ``..`` are encoded too).

Graphs are loaded lazily, off the reactor thread, on first use.  After a
change a graph is written back atomically (temp + rename, 0600), batched
(one write per ``PERSIST_DELAY_SECS`` at most) and off the reactor thread,
so no request waits for the disk.  A file that cannot be read as a graph
is set aside as ``<file>.corrupt-<n>``, reported in the log, and the scope
starts empty: never silently emptied, never half-loaded.  ``flush`` (the
daemon stopping) writes every changed graph at once and waits until all
are on disk, changes made while it writes included.

Bounds: each graph's facts count against its own byte budget
(``graph_bytes``) inside one for every graph (``total_bytes``), and each
loaded graph holds ``GRAPH_OVERHEAD_BYTES`` of the total, so the number of
graphs is bounded too; past ``MAX_LOADED_GRAPHS`` the least recently used
graph with nothing left to write is let go (it loads again on next use).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted._util import off_reactor
from car_twisted.budget import ByteBudget
from car_twisted.errors import RpcError
from car_twisted.interfaces import IJournaledMemgine, IMemgine, IMemoryScope
from car_twisted.json_value import JsonValue
from car_twisted.memory import journal
from car_twisted.memory.writeback import GraphWriter, writer_for
from car_twisted.private_files import UnsafeStateError, read_private
from car_twisted.rpc.envelope import dumps

__all__ = [
    "GRAPH_OVERHEAD_BYTES",
    "MAX_GRAPH_FILE_BYTES",
    "MAX_LOADED_GRAPHS",
    "MemoryScope",
    "MemoryScopes",
    "encode_namespace",
    "PERSIST_DELAY_SECS",
    "SHARED",
]

PERSIST_DELAY_SECS = 0.5
MAX_LOADED_GRAPHS = 64
GRAPH_OVERHEAD_BYTES = 256 * 1024
#: A graph file larger than this is not read (its graph could not fit anyway).
MAX_GRAPH_FILE_BYTES = 1024 * 1024 * 1024
_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_.")


MAX_STEM_CHARS = 200


def _file_stem(name: str) -> str:
    """
    The encoded name, or for one too long for a file name its first part,
    ``~`` and the SHA-256 of the name (``~`` is always encoded otherwise,
    so a shortened stem never equals a whole one).
    """
    stem = encode_namespace(name)
    if len(stem) <= MAX_STEM_CHARS:
        return stem
    return f"{stem[:120]}~{hashlib.sha256(name.encode()).hexdigest()}"


def encode_namespace(namespace: str) -> str:
    """The file stem of a namespace: lowercase percent-encoding of its UTF-8 bytes."""
    out = []
    for byte in namespace.encode("utf-8"):
        out.append(chr(byte) if byte in _PLAIN and namespace not in (".", "..") else f"%{byte:02x}")
    return "".join(out)


@implementer(IMemoryScope)
@attrs.frozen
class MemoryScope:
    """One graph: C{kind} is ``shared``, ``namespace`` or ``agent``; C{name} names it."""

    kind: str
    name: str = ""

    def relative_path(self) -> Path:
        if self.kind == "namespace":
            return Path("memory-namespaces") / f"{_file_stem(self.name)}.json"
        if self.kind == "agent":
            return Path("agents") / f"{_file_stem(self.name)}.json"
        return Path("shared.json")

    def describe(self) -> str:
        return self.kind if self.kind == "shared" else f"{self.kind} {self.name!r}"


SHARED = MemoryScope("shared")


def scope_of(memory_namespace: str | None, agent_id: str | None) -> MemoryScope:
    """The scope table: a namespace wins, then an agent binding, else the shared graph."""
    if memory_namespace:
        return MemoryScope("namespace", memory_namespace)
    if agent_id:
        return MemoryScope("agent", agent_id)
    return SHARED


class _Kept:
    """One loaded graph, its budget, and how it is written back."""

    def __init__(self, scope: MemoryScope, graph: IMemgine, budget: ByteBudget, writer: GraphWriter) -> None:
        self.scope = scope
        self.graph = graph
        self.budget = budget
        self.writer = writer

    @property
    def idle(self) -> bool:
        """Nothing to write and nothing being written: it can be let go."""
        return self.writer.idle


@attrs.frozen
class _OnDisk:
    """What loading found: the snapshot (None: none or unreadable) and the journals after it."""

    snapshot: JsonValue | None
    snapshot_bytes: int
    problem: str | None
    journal: journal.JournalRead


#: Makes one scope's graph; its facts should count against the budget given.
GraphFactory = Callable[[MemoryScope, ByteBudget], IMemgine]


class MemoryScopes:
    _log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        root: Path,
        make_graph: GraphFactory,
        persist_delay: float = PERSIST_DELAY_SECS,
        graph_bytes: int = 256 * 1024 * 1024,
        total_bytes: int = 1024 * 1024 * 1024,
        max_loaded: int = MAX_LOADED_GRAPHS,
    ) -> None:
        self.reactor = reactor
        self.root = root
        self.make_graph = make_graph
        self.persist_delay = persist_delay
        self.graph_bytes = graph_bytes
        self.max_loaded = max_loaded
        self.total = ByteBudget("memory (all graphs)", total_bytes)
        # Least recently used first.
        self._kept: dict[MemoryScope, _Kept] = {}
        self._waiting: dict[MemoryScope, list[Deferred[IMemgine]]] = {}
        # While the daemon stops: changes are written at once.
        self._flushing = False

    def __len__(self) -> int:
        return len(self._kept)

    # -- getting a graph ---------------------------------------------------------------

    def loaded(self, scope: MemoryScope) -> IMemgine | None:
        kept = self._kept.pop(scope, None)
        if kept is None:
            return None
        self._kept[scope] = kept  # most recently used
        return kept.graph

    def graph(self, scope: MemoryScope) -> Deferred[IMemgine]:
        """C{scope}'s graph, loading it (off the reactor) on first use."""
        graph = self.loaded(scope)
        if graph is not None:
            return succeed(graph)
        waiter: Deferred[IMemgine] = Deferred()
        waiters = self._waiting.setdefault(scope, [])
        waiters.append(waiter)
        if len(waiters) == 1:
            self._load(scope).addBoth(self._settle, scope)
        return waiter

    def _settle(self, outcome: _Kept | Failure, scope: MemoryScope) -> None:
        for waiter in self._waiting.pop(scope, []):
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome.graph)

    def _load(self, scope: MemoryScope) -> Deferred[_Kept]:
        path = self.root / scope.relative_path()

        def read() -> _OnDisk:
            snapshot: JsonValue | None = None
            size = 0
            problem = None
            try:
                raw = read_private(path, MAX_GRAPH_FILE_BYTES)
                size = len(raw)
                snapshot = json.loads(raw)
            except FileNotFoundError:
                pass
            except UnsafeStateError:
                raise  # someone else's file: the call fails, nothing is moved
            except ValueError as e:
                problem = str(e)
            first = snapshot.get("journal", 0) if isinstance(snapshot, dict) else 0
            first = first if isinstance(first, int) and not isinstance(first, bool) else 0
            return _OnDisk(snapshot, size, problem, journal.read_journals(path, first))

        def loaded(disk: _OnDisk) -> _Kept:
            budget, graph = self._make(scope)
            problem = disk.problem
            try:
                if disk.snapshot is not None and problem is None:
                    try:
                        graph.restore(disk.snapshot)
                    except ValueError as e:
                        problem = str(e)
                if problem is not None:
                    self._set_aside(scope, path, problem)
                entries = disk.journal.entries
                if entries or disk.journal.torn:
                    if IJournaledMemgine.providedBy(graph):
                        skipped = graph.replay(entries)
                        if skipped or disk.journal.bad_lines or disk.journal.torn:
                            self._log.warn(
                                "the {scope} memory journal: {skipped} entries skipped, {bad} unreadable lines, "
                                "{torn} torn last lines (a crash mid-append)",
                                scope=scope.describe(), skipped=skipped, bad=disk.journal.bad_lines, torn=disk.journal.torn,
                            )
                if IJournaledMemgine.providedBy(graph):
                    graph.mark_saved()
            except BaseException:
                # Too big for its budget now, say: the files stay, the call fails.
                budget.release(budget.used)
                raise
            journal_bytes = sum(len(dumps(entry)) + 1 for entry in entries) if entries else 0
            writer = writer_for(
                self.reactor, path, scope.describe(), graph, self.persist_delay,
                next_journal=disk.journal.last + 1,
                snapshot_bytes=disk.snapshot_bytes if problem is None else 0,
                journal_bytes=journal_bytes,
            )
            if self._flushing:
                writer.flush()
            return self._keep(scope, graph, budget, writer)

        d: Deferred[_OnDisk] = off_reactor(self.reactor, read)
        return d.addCallback(loaded)

    def _make(self, scope: MemoryScope) -> tuple[ByteBudget, IMemgine]:
        self._let_go()
        budget = ByteBudget(f"the {scope.describe()} memory graph", self.graph_bytes, parent=self.total)
        budget.reserve(GRAPH_OVERHEAD_BYTES)
        try:
            return budget, self.make_graph(scope, budget)
        except BaseException:
            budget.release(budget.used)
            raise

    def _keep(self, scope: MemoryScope, graph: IMemgine, budget: ByteBudget, writer: GraphWriter) -> _Kept:
        kept = _Kept(scope, graph, budget, writer)
        self._kept[scope] = kept
        return kept

    def _let_go(self) -> None:
        """Past C{max_loaded}, drop the least recently used graphs with nothing to write."""
        excess = len(self._kept) + 1 - self.max_loaded
        if excess <= 0:
            return
        for scope, kept in list(self._kept.items()):
            if excess <= 0:
                break
            if kept.idle:
                del self._kept[scope]
                kept.budget.release(kept.budget.used)
                kept.writer.close()
                excess -= 1

    def _set_aside(self, scope: MemoryScope, path: Path, why: str) -> None:
        n = 1
        while path.with_name(f"{path.name}.corrupt-{n}").exists():
            n += 1
        aside = path.with_name(f"{path.name}.corrupt-{n}")
        try:
            os.replace(path, aside)
        except OSError:
            self._log.failure("cannot set aside {path}", path=str(path))
            raise
        self._log.critical(
            "the {scope} memory graph at {path} could not be read ({why}); set aside as {aside}, starting empty",
            scope=scope.describe(),
            path=str(path),
            why=why[:300],
            aside=str(aside),
        )

    # -- writing back ----------------------------------------------------------------------

    def changed(self, scope: MemoryScope, wait: bool = False) -> Deferred[None] | None:
        """
        C{scope}'s graph changed: write it back (``car_twisted.memory.writeback``).

        @param wait: return a Deferred that fires once the change is on
            disk (journaled engines; otherwise None: written soon).
        """
        kept = self._kept.get(scope)
        if kept is None:
            return None
        if wait:
            return kept.writer.changed(True)
        try:
            kept.writer.changed(False)
        except RpcError:
            pass  # logged by the writer; nobody is waiting for this change
        return None

    def flush(self) -> Deferred[None]:
        """
        Write every changed graph now and fire once all are on disk (the
        daemon stopping); from here on a change is written at once.  A
        write that fails is logged, not retried.
        """
        self._flushing = True
        flushes = [kept.writer.flush() for kept in list(self._kept.values())]
        done: Deferred[None] = DeferredList(flushes, consumeErrors=True).addCallback(lambda _: None)
        return done

    def replace(self, scope: MemoryScope, graph_change: Callable[[IMemgine], int]) -> int:
        """Run a whole-graph change (``memory.load``) and schedule the write-back."""
        kept = self._kept[scope]
        count = graph_change(kept.graph)
        self.changed(scope)
        return count
