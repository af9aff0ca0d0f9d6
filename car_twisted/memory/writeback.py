"""
Writing one loaded graph back to its files.

``JournalWriter`` (engines providing ``IJournaledMemgine``, the embedded
one included): each change is drained as journal lines (O(change), not
O(graph)) and appended off the reactor thread; changes that arrive while
an append runs go together in the next one (group commit), and a caller
that asks is answered once its change is on disk.  When the journal
outgrows the snapshot (or there is no snapshot yet) the graph is
compacted: the snapshot is built a chunk per reactor turn, so a large
graph never holds the thread, encoded and written off it, and the older
journals removed (``car_twisted.memory.journal``).

``SnapshotWriter`` (any other ``IMemgine``): the whole snapshot, at most
once per ``persist_delay``, encoded and written off the reactor thread.

Both write at once from ``flush`` on (the daemon stopping), compact what
they have, and fire its Deferred once everything is on disk.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted._util import off_reactor
from car_twisted.auth import write_secret_file
from car_twisted.errors import RpcError
from car_twisted.interfaces import IJournaledMemgine, IMemgine
from car_twisted.json_value import JsonValue
from car_twisted.memory import journal
from car_twisted.private_files import ensure_private_dir
from car_twisted.rpc.envelope import dumps

__all__ = ["GraphWriter", "JournalWriter", "SnapshotWriter", "COMPACT_MIN_BYTES"]

#: A journal smaller than this is never compacted (unless there is no snapshot yet).
COMPACT_MIN_BYTES = 4 * 1024 * 1024
#: Changes up to this size are appended on the reactor thread (one write);
#: larger ones (a whole-graph reset) go to a worker thread.
SYNC_APPEND_MAX_BYTES = 256 * 1024
_log = Logger()


class GraphWriter:
    """What MemoryScopes asks of a writer."""

    def close(self) -> None:
        """The graph is let go: release what the writer holds open."""

    def __init__(self, reactor: IReactorTime, path: Path, describe: str) -> None:
        self.reactor = reactor
        self.path = path
        self.describe = describe
        self.flushing = False
        self._flush_waiters: list[Deferred[None]] = []

    @property
    def idle(self) -> bool:
        raise NotImplementedError

    def changed(self, wait: bool) -> Deferred[None] | None:
        raise NotImplementedError

    def flush(self) -> Deferred[None]:
        self.flushing = True
        waiter: Deferred[None] = Deferred()
        self._flush_waiters.append(waiter)
        self._kick()
        self._check_flushed()
        return waiter

    def _kick(self) -> None:
        raise NotImplementedError

    def _check_flushed(self) -> None:
        if self._flush_waiters and self.idle:
            waiters, self._flush_waiters = self._flush_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _write_snapshot(self, body: Callable[[], bytes]) -> Deferred[int]:
        path = self.path

        def write() -> int:
            data = body()
            ensure_private_dir(path.parent)
            write_secret_file(path, data.decode())
            return len(data)

        return off_reactor(self.reactor, write)


class SnapshotWriter(GraphWriter):
    def __init__(self, reactor: IReactorTime, path: Path, describe: str, graph: IMemgine, delay: float) -> None:
        super().__init__(reactor, path, describe)
        self.graph = graph
        self.delay = delay
        self.saved_generation = graph.generation
        self.timer: IDelayedCall | None = None
        self.writing = False

    @property
    def idle(self) -> bool:
        return not self.writing and self.timer is None and self.graph.generation == self.saved_generation

    def changed(self, wait: bool) -> None:
        if self.graph.generation == self.saved_generation or self.writing:
            return  # nothing new, or picked up after the write under way
        if self.flushing:
            self._write()
        elif self.timer is None:
            self.timer = self.reactor.callLater(self.delay, self._write)

    def _kick(self) -> None:
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        if not self.writing and self.graph.generation != self.saved_generation:
            self._write()

    def _write(self) -> None:
        self.timer = None
        if self.writing:
            return
        generation = self.graph.generation
        snapshot = self.graph.snapshot()
        self.writing = True

        def done(_: int) -> None:
            self.writing = False
            self.saved_generation = generation
            self.changed(False)  # changed again meanwhile
            self._check_flushed()

        def failed(failure: Failure) -> None:
            self.writing = False
            _log.failure("writing the {scope} memory graph failed", failure=failure, scope=self.describe)
            self._check_flushed()

        self._write_snapshot(lambda: dumps(snapshot)).addCallbacks(done, failed)


class JournalWriter(GraphWriter):
    def __init__(
        self,
        reactor: IReactorTime,
        path: Path,
        describe: str,
        graph: IJournaledMemgine,
        next_journal: int,
        snapshot_bytes: int,
        journal_bytes: int = 0,
        fsync: bool = False,
    ) -> None:
        super().__init__(reactor, path, describe)
        self.graph = graph
        self.journal = next_journal
        self.snapshot_bytes = snapshot_bytes
        # Journal lines the snapshot does not hold yet (replayed at load, appended since).
        self.journal_bytes = journal_bytes
        self.fsync = fsync
        self.appending = False
        self.compacting = False
        self._rewritten = False
        self._fd: int | None = None
        self._fd_journal = -1
        self._pending: list[bytes] = []
        self._waiters: list[Deferred[None]] = []

    @property
    def idle(self) -> bool:
        return not (self.appending or self.compacting or self._pending)

    def changed(self, wait: bool) -> Deferred[None] | None:
        entries = self.graph.drain_changes()
        if entries:
            if entries[0].get("reset") is True:
                self._rewritten = True  # a whole-graph change: compact once it is journaled
            data = b"".join(dumps(entry) + b"\n" for entry in entries)
            if len(data) <= SYNC_APPEND_MAX_BYTES and not self.appending and not self._pending:
                # A small change is one write(2) to the open journal, here:
                # bounded, no thread hop, no Deferred, and in the kernel
                # before the change is answered.
                self._append_now(data)
                self._maybe_compact()
                return None
            self._pending.append(data)
        waiter: Deferred[None] | None = None
        if wait:
            waiter = Deferred()
            if not self._pending and not self.appending:
                waiter.callback(None)
            else:
                self._waiters.append(waiter)
        self._kick()
        return waiter

    def _append_now(self, data: bytes) -> None:
        """
        Append on the reactor thread.

        @raise RpcError: the write failed (the change is made but not saved).
        """
        try:
            if self._fd is None or self._fd_journal != self.journal:
                self._close_fd()
                ensure_private_dir(self.path.parent)
                self._fd = journal.open_for_append(journal.journal_path(self.path, self.journal))
                self._fd_journal = self.journal
            journal.write_all(self._fd, data, self.fsync)
        except OSError as e:
            self._close_fd()
            _log.failure("appending to the {scope} memory journal failed", scope=self.describe)
            raise RpcError(f"the change was made but not saved: {e}"[:300]) from None
        self.journal_bytes += len(data)

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close_fd()

    def _kick(self) -> None:
        if self.appending or not self._pending:
            if not self.appending and not self._pending:
                self._maybe_compact()
            return
        data = b"".join(self._pending)
        waiters = self._waiters
        self._pending, self._waiters = [], []
        self.appending = True
        path = journal.journal_path(self.path, self.journal)

        def write() -> None:
            ensure_private_dir(path.parent)
            journal.append(path, data, self.fsync)

        def done(_: None) -> None:
            self.appending = False
            self.journal_bytes += len(data)
            for waiter in waiters:
                waiter.callback(None)
            self._kick()
            self._check_flushed()

        def failed(failure: Failure) -> None:
            self.appending = False
            _log.failure("appending to the {scope} memory journal failed", failure=failure, scope=self.describe)
            error = RpcError(f"the change was made but not saved: {failure.getErrorMessage()}"[:300])
            for waiter in waiters:
                waiter.errback(error)
            self._kick()
            self._check_flushed()

        off_reactor(self.reactor, write).addCallbacks(done, failed)

    def _maybe_compact(self) -> None:
        if self.compacting or not self.journal_bytes:
            return
        outgrown = self.journal_bytes > max(COMPACT_MIN_BYTES, self.snapshot_bytes)
        if self.flushing or self._rewritten or not self.snapshot_bytes or outgrown:
            self._rewritten = False
            self._compact()

    def _compact(self) -> None:
        self.compacting = True
        header, chunks = self.graph.snapshot_chunks()
        first = self.journal + 1
        self.journal = first  # later changes go to the journal after the snapshot
        self._close_fd()
        self.journal_bytes = 0
        records: list[JsonValue] = []
        self._step(chunks, records, header, first)

    def _step(self, chunks: Iterator[list[JsonValue]], records: list[JsonValue], header: dict[str, JsonValue], first: int) -> None:
        try:
            chunk = next(chunks)
        except StopIteration:
            self._finish(records, header, first)
            return
        except Exception:
            _log.failure("building the {scope} memory snapshot failed", scope=self.describe)
            self.compacting = False
            self._check_flushed()
            return
        records.extend(chunk)
        # One chunk per reactor turn: requests run between them.
        self.reactor.callLater(0, self._step, chunks, records, header, first)

    def _finish(self, records: list[JsonValue], header: dict[str, JsonValue], first: int) -> None:
        snapshot = {**header, "journal": first, "facts": records}
        path = self.path

        def body() -> bytes:
            return dumps(snapshot)

        def written(size: int) -> Deferred[None]:
            self.snapshot_bytes = size
            return off_reactor(self.reactor, journal.remove_before, path, first)

        def done(_: object) -> None:
            self.compacting = False
            self._kick()
            self._check_flushed()

        def failed(failure: Failure) -> None:
            # The journals are all still there: nothing is lost, the next compaction tries again.
            _log.failure("compacting the {scope} memory graph failed", failure=failure, scope=self.describe)
            done(None)

        self._write_snapshot(body).addCallback(written).addCallbacks(done, failed)


def writer_for(
    reactor: IReactorTime,
    path: Path,
    describe: str,
    graph: IMemgine,
    delay: float,
    next_journal: int,
    snapshot_bytes: int,
    journal_bytes: int,
) -> GraphWriter:
    if IJournaledMemgine.providedBy(graph):
        return JournalWriter(reactor, path, describe, graph, next_journal, snapshot_bytes, journal_bytes)
    return SnapshotWriter(reactor, path, describe, graph, delay)

