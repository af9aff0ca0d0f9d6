"""
Where a stream's recognizer runs.

A recognizer's calls block, and some engines (pocketsphinx among them)
hold Python's GIL while they decode: run in a thread, they would stall the
reactor for seconds and never use a second core.  So a transcriber that
names a ``worker_factory`` (``"module:Class"``) runs in a worker process
of its own, one per stream, spoken to over its stdin/stdout
(``car_twisted.voice.worker``); any other runs in the reactor's thread
pool, bounded by the ``RecognitionPool``.  Both look the same to a stream:
``accept`` / ``finish`` / ``close`` return Deferreds, one call at a time.

The worker protocol: each request is one byte (``o`` open, ``a`` accept,
``f`` finish, ``c`` close), a 4-byte big-endian length and that many
bytes (JSON for ``o``, PCM for ``a``); each answer is a 4-byte length and
a JSON object, ``{"ok": ...}`` or ``{"error": "..."}``, in request order.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeVar, cast

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted._util import off_reactor
from car_twisted.interfaces import IRecognition, ITranscriber
from car_twisted.voice.model import Segment, TranscriptUpdate

__all__ = ["Recognizer", "RecognitionPool", "WorkerDied", "open_recognizer", "segment_from_wire", "update_from_wire"]

R = TypeVar("R")
_LEN = struct.Struct(">I")
MAX_ANSWER_BYTES = 4 * 1024 * 1024
#: Seconds a worker may take to exit after its stdin closes before it is killed.
EXIT_GRACE_SECS = 2.0
_log = Logger()


class WorkerDied(Exception):
    """The recognizer's worker process ended while a call was waiting."""


class Recognizer(Protocol):
    def accept(self, pcm: bytes) -> Deferred[TranscriptUpdate]: ...
    def finish(self) -> Deferred[tuple[Segment, ...]]: ...
    def close(self) -> None: ...


class RecognitionPool:
    """Blocking recognizer calls in the thread pool, at most C{size} at once."""

    def __init__(self, reactor: IReactorTime, size: int = 2) -> None:
        self.reactor = reactor
        self.size = size
        self._semaphore = DeferredSemaphore(size)

    def run(self, fn: Callable[..., R], *args: object) -> Deferred[R]:
        return self._semaphore.run(off_reactor, self.reactor, fn, *args)


class _Threaded:
    """An in-process IRecognition, its calls in the pool."""

    def __init__(self, pool: RecognitionPool, recognition: IRecognition) -> None:
        self.pool = pool
        self.recognition = recognition

    def accept(self, pcm: bytes) -> Deferred[TranscriptUpdate]:
        return self.pool.run(self.recognition.accept, pcm)

    def finish(self) -> Deferred[tuple[Segment, ...]]:
        return self.pool.run(self.recognition.finish)

    def close(self) -> None:
        self.pool.run(self.recognition.close).addErrback(lambda f: _log.failure("closing a recognizer failed", failure=f))


def segment_from_wire(raw: dict[str, object]) -> Segment:
    confidence = raw.get("confidence")
    return Segment(
        str(raw["text"]),
        float(cast(float, raw["start"])),
        float(cast(float, raw["end"])),
        float(cast(float, confidence)) if confidence is not None else None,
    )


def update_from_wire(raw: dict[str, object]) -> TranscriptUpdate:
    partial = raw.get("partial")
    finals = raw.get("finals") or []
    return TranscriptUpdate(
        partial if isinstance(partial, str) else None,
        tuple(segment_from_wire(s) for s in cast(list[dict[str, object]], finals)),
    )


class _Worker(ProcessProtocol):
    """One recognizer in a child process."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor
        self._buffer = bytearray()
        self._waiting: deque[Deferred[dict[str, object]]] = deque()
        self._gone = False
        self._kill: IDelayedCall | None = None
        self.exited: Deferred[None] = Deferred()

    def call(self, op: bytes, payload: bytes = b"") -> Deferred[dict[str, object]]:
        waiter: Deferred[dict[str, object]] = Deferred()
        if self._gone or self.transport is None:
            waiter.errback(WorkerDied("the recognizer process is gone"))
            return waiter
        self._waiting.append(waiter)
        self.transport.write(op + _LEN.pack(len(payload)) + payload)
        return waiter

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 4:
            (size,) = _LEN.unpack_from(self._buffer)
            if size > MAX_ANSWER_BYTES:
                self._fail(f"the recognizer process sent an answer of {size} bytes")
                return
            if len(self._buffer) < 4 + size:
                return
            body = bytes(self._buffer[4 : 4 + size])
            del self._buffer[: 4 + size]
            if not self._waiting:
                continue
            waiter = self._waiting.popleft()
            try:
                answer = json.loads(body)
            except ValueError:
                waiter.errback(WorkerDied("the recognizer process sent something that is not JSON"))
                continue
            if isinstance(answer, dict) and "error" in answer:
                waiter.errback(RuntimeError(str(answer["error"])[:500]))
            else:
                waiter.callback(answer if isinstance(answer, dict) else {})

    def errReceived(self, data: bytes) -> None:
        _log.info("recognizer process: {text}", text=data.decode("utf-8", "replace").strip()[:1000])

    def _fail(self, why: str) -> None:
        self._gone = True
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:
            waiter.errback(WorkerDied(why))
        self._force()

    def _alive(self) -> bool:
        return self.transport is not None and getattr(self.transport, "pid", None) is not None

    def stop(self) -> None:
        """Close stdin (the worker exits); kill it if it has not within the grace."""
        if self._gone or self.transport is None:
            return
        self.transport.closeStdin()
        self._kill = self.reactor.callLater(EXIT_GRACE_SECS, self._force)

    def _force(self) -> None:
        self._kill = None
        if self._alive():
            try:
                self.transport.signalProcess("KILL")  # type: ignore[union-attr]
            except Exception:
                pass

    def processEnded(self, reason: Failure) -> None:
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._kill = None
        if not self._gone:
            self._gone = True
            why = (
                "the recognizer process exited"
                if reason.check(ProcessDone)
                else f"the recognizer process died: {reason.getErrorMessage()}"
            )
            waiting, self._waiting = self._waiting, deque()
            for waiter in waiting:
                waiter.errback(WorkerDied(why))
        self.exited.callback(None)


class _InProcessWorker:
    """A worker process's recognizer, as a Recognizer."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def accept(self, pcm: bytes) -> Deferred[TranscriptUpdate]:
        return self.worker.call(b"a", pcm).addCallback(lambda answer: update_from_wire(cast(dict[str, object], answer["ok"])))

    def finish(self) -> Deferred[tuple[Segment, ...]]:
        return self.worker.call(b"f").addCallback(
            lambda answer: tuple(segment_from_wire(s) for s in cast(list[dict[str, object]], answer["ok"]))
        )

    def close(self) -> None:
        self.worker.call(b"c").addErrback(lambda f: None)
        self.worker.stop()


def open_recognizer(
    transcriber: ITranscriber, pool: RecognitionPool, reactor: IReactorTime, sample_rate: int, channels: int
) -> Deferred[Recognizer]:
    """A recognizer for one stream: in a worker process when the transcriber names one, else in the pool."""
    factory = getattr(transcriber, "worker_factory", None)
    if not isinstance(factory, str) or not IReactorProcess.providedBy(reactor):
        opened: Deferred[IRecognition] = pool.run(transcriber.open, sample_rate, channels)
        return opened.addCallback(lambda recognition: cast(Recognizer, _Threaded(pool, recognition)))
    worker = _Worker(reactor)
    cast(IReactorProcess, reactor).spawnProcess(
        worker,
        sys.executable,
        [sys.executable, "-m", "car_twisted.voice.worker"],
        env={key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")},
    )
    request = json.dumps({"factory": factory, "options": getattr(transcriber, "worker_options", {}),
                          "sample_rate": sample_rate, "channels": channels}).encode()

    def failed(failure: Failure) -> Failure:
        worker.stop()
        return failure

    return worker.call(b"o", request).addCallbacks(lambda _: cast(Recognizer, _InProcessWorker(worker)), failed)

