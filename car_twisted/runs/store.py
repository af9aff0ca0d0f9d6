"""
The JSONL run store: ``$CAR_HOME/runs/{agent_id}/{run_id}.jsonl`` plus a
small ``{run_id}.summary.json`` beside it.

Appends to one run are serialised (each waits for the previous one) and
run in the reactor's thread pool, so a large batch never blocks the
reactor; an append's Deferred fires once its lines are written to the
file (``os.write``: a daemon crash after the ack loses nothing).  With
``fsync=True`` every batch is also synced to disk.  Readers ignore a torn
last line, the trace of a crash mid-write.  Summaries are replaced
atomically (temp + rename).

``inventory`` lists what the store holds and ``delete`` removes a run;
the retention policy that uses them lives in the registry
(``car_twisted.runs.retention``): the store only stores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

import attrs
import orjson
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted._util import off_reactor
from car_twisted.interfaces import IRunStore
from car_twisted.private_files import ensure_private_dir, open_private, read_private
from car_twisted.runs.model import RunRecord, StoredRun, epoch_seconds, valid_key

__all__ = ["JsonlRunStore", "read_records"]

_LOG = ".jsonl"
_SUMMARY = ".summary.json"
R = TypeVar("R")


@attrs.define
class _RunFiles:
    """What one run takes in its agent's directory."""

    log_bytes: int = 0
    summary_bytes: int = 0
    mtime: float | None = None
    summary: Path | None = None


def read_records(path: Path) -> list[RunRecord] | None:
    """Every whole record of a run file; a torn or corrupt tail is skipped."""
    try:
        data = read_private(path)
    except FileNotFoundError:
        return None
    records = []
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # a torn last line (crash mid-write)
        if type(record) is dict:
            records.append(record)
    return records


@implementer(IRunStore)
class JsonlRunStore:
    _log = Logger()

    def __init__(self, reactor: object, root: Path, fsync: bool = False) -> None:
        self.reactor = reactor
        self.root = root
        self.fsync = fsync
        # run id -> [the Deferred each operation chains on, how many are pending]
        self._queues: dict[str, list[object]] = {}

    # -- paths ---------------------------------------------------------------------

    def _dir(self, agent_id: str) -> Path:
        if not valid_key(agent_id):
            raise ValueError(f"unsafe agent id {agent_id!r}")
        return self.root / agent_id

    def _file(self, agent_id: str, run_id: str) -> Path:
        if not valid_key(run_id):
            raise ValueError(f"unsafe run id {run_id!r}")
        return self._dir(agent_id) / f"{run_id}{_LOG}"

    # -- off the reactor -----------------------------------------------------------

    def _blocking(self, fn: Callable[..., R], *args: object) -> Deferred[R]:
        return off_reactor(self.reactor, fn, *args)

    def _serial(self, run_id: str, fn: Callable[..., R], *args: object) -> Deferred[R]:
        """Run C{fn} in a thread after every earlier operation on C{run_id}."""
        queue = self._queues.get(run_id)
        if queue is None:
            queue = self._queues[run_id] = [succeed(None), 0]
        queue[1] = cast(int, queue[1]) + 1
        result: Deferred[R] = Deferred()

        def go(_: object) -> Deferred[None]:
            # chainDeferred leaves the queue's own chain with None, errors
            # included, so one failed write does not stall the next.
            return self._blocking(fn, *args).chainDeferred(result)

        def done(_: object) -> None:
            queue[1] = cast(int, queue[1]) - 1
            if queue[1] == 0 and self._queues.get(run_id) is queue:
                del self._queues[run_id]

        cast("Deferred[None]", queue[0]).addCallback(go).addCallback(done)
        return result

    # -- IRunStore ---------------------------------------------------------------------

    def append(self, agent_id: str, run_id: str, records: list[RunRecord]) -> Deferred[int | None]:
        path = self._file(agent_id, run_id)
        payload = b"".join(orjson.dumps(r) + b"\n" for r in records)
        return self._serial(run_id, self._write, path, payload)

    def _write(self, path: Path, payload: bytes) -> int | None:
        fd = self._open_log(path)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        return len(payload)

    @staticmethod
    def _open_log(path: Path) -> int:
        # The agent's directory may be missing, or removed by a delete of
        # its last run (in another thread) just before this open: make it
        # and try again rather than keep a cache of directories made.
        for _ in range(3):
            try:
                return open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            except FileNotFoundError:
                ensure_private_dir(path.parent)
        return open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def write_summary(self, summary: RunRecord) -> Deferred[int | None]:
        # The registry's summaries (RunMeta.summary) name their run as strings.
        agent_id, run_id = cast(str, summary["agent_id"]), cast(str, summary["run_id"])
        path = self._file(agent_id, run_id).with_suffix(_SUMMARY)
        return self._serial(run_id, self._replace, path, json.dumps(summary))

    def _replace(self, path: Path, text: str) -> int | None:
        from car_twisted.auth import write_secret_file

        write_secret_file(path, text)
        return len(text.encode()) + 1  # write_secret_file adds a newline

    def read(self, agent_id: str, run_id: str) -> Deferred[list[RunRecord] | None]:
        return self._serial(run_id, read_records, self._file(agent_id, run_id))

    def find(self, run_id: str) -> Deferred[str | None]:
        if not valid_key(run_id):
            return maybeDeferred(lambda: None)

        def look() -> str | None:
            try:
                agents = os.listdir(self.root)
            except FileNotFoundError:
                return None
            for agent_id in agents:
                if valid_key(agent_id) and (self.root / agent_id / f"{run_id}{_LOG}").exists():
                    return agent_id
            return None

        return self._blocking(look)

    def summaries(self, agent_id: str) -> Deferred[list[RunRecord]]:
        directory = self._dir(agent_id)

        def scan() -> list[RunRecord]:
            out: list[RunRecord] = []
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                return out
            for name in names:
                if not name.endswith(_SUMMARY):
                    continue
                try:
                    out.append(json.loads(read_private(directory / name)))
                except (OSError, ValueError):
                    self._log.warn("unreadable run summary {name}", name=name)
            return out

        return self._blocking(scan)

    def inventory(self) -> Deferred[list[StoredRun]]:
        return self._blocking(self._scan_all)

    def _scan_all(self) -> list[StoredRun]:
        out: list[StoredRun] = []
        try:
            agents = os.listdir(self.root)
        except FileNotFoundError:
            return out
        for agent_id in agents:
            if valid_key(agent_id):
                out.extend(self._scan_agent(agent_id, self.root / agent_id))
        return out

    def _scan_agent(self, agent_id: str, directory: Path) -> list[StoredRun]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        found: dict[str, _RunFiles] = {}
        for entry in entries:
            name = entry.name
            if name.endswith(_SUMMARY):
                run_id, is_log = name[: -len(_SUMMARY)], False
            elif name.endswith(_LOG):
                run_id, is_log = name[: -len(_LOG)], True
            else:
                continue  # a summary's temp file, or not ours
            if not valid_key(run_id):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            slot = found.setdefault(run_id, _RunFiles())
            if is_log:
                slot.log_bytes, slot.mtime = st.st_size, st.st_mtime
            else:
                slot.summary_bytes, slot.summary = st.st_size, Path(entry.path)
                if slot.mtime is None:
                    slot.mtime = st.st_mtime
        runs = []
        for run_id, files in found.items():
            summary = self._load_summary(files.summary) if files.summary is not None else {}
            started = epoch_seconds(summary.get("started_at"))
            runs.append(
                StoredRun(
                    agent_id=agent_id,
                    run_id=run_id,
                    bytes=files.log_bytes + files.summary_bytes,
                    started=started if started is not None else float(files.mtime or 0.0),
                    ended=summary.get("status", "in_progress") != "in_progress",
                )
            )
        return runs

    def _load_summary(self, path: Path) -> RunRecord:
        try:
            summary = json.loads(read_private(path))
        except (OSError, ValueError):
            self._log.warn("unreadable run summary {path}", path=str(path))
            return {}
        return summary if type(summary) is dict else {}

    def delete(self, agent_id: str, run_id: str) -> Deferred[None]:
        return self._serial(run_id, self._remove, self._file(agent_id, run_id))

    @staticmethod
    def _remove(log: Path) -> None:
        for path in (log, log.with_suffix(_SUMMARY)):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        try:
            log.parent.rmdir()  # an agent's last run: no empty directory left behind
        except OSError:
            pass  # it still holds other runs (or is gone already)
