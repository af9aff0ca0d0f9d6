"""
Recognizers that hold the GIL run in worker processes: one per stream,
spoken to over pipes, gone when the stream ends, and a dead worker fails
the waiting call instead of hanging it.  The worker loop itself is also
driven in-process over byte streams.
"""

import io
import json
import os
import signal
import struct

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from car_twisted.voice.pocketsphinx_stt import PocketSphinxTranscriber
from car_twisted.voice.recognizers import RecognitionPool, WorkerDied, open_recognizer
from car_twisted.voice.worker import serve
import sys
from pathlib import Path

from support import until

sys.path.insert(0, str(Path(__file__).parent.parent / "unit"))  # the worker loop test imports test_voice's recognizer

LEN = struct.Struct(">I")


def worker_pids():
    """Our children running the worker module (a /proc scan)."""
    me = str(os.getpid())
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if ppid == me and b"car_twisted.voice.worker" in cmd:
            found.append(int(pid))
    return found


@pytest_twisted.ensureDeferred
async def test_a_stream_recognizes_in_its_own_process_which_ends_with_it(reactor):
    before = set(worker_pids())
    recognizer = await open_recognizer(PocketSphinxTranscriber(), RecognitionPool(reactor), reactor, 16000, 1)
    (pid,) = set(worker_pids()) - before
    silence = b"\x00\x00" * 16000
    update = await recognizer.accept(silence)
    assert update.finals == ()
    assert await recognizer.finish() == ()
    recognizer.close()
    await until(reactor, lambda: pid not in worker_pids(), "the worker to exit")


@pytest_twisted.ensureDeferred
async def test_a_dead_worker_fails_the_waiting_call(reactor):
    before = set(worker_pids())
    recognizer = await open_recognizer(PocketSphinxTranscriber(), RecognitionPool(reactor), reactor, 16000, 1)
    (pid,) = set(worker_pids()) - before
    waiting: Deferred = recognizer.accept(b"\x01\x00" * 160000)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDied):
        await waiting
    with pytest.raises(WorkerDied):
        await recognizer.accept(b"\x00\x00")
    await until(reactor, lambda: pid not in worker_pids(), "the killed worker to be reaped")


def frames(*requests):
    out = b""
    for op, payload in requests:
        out += op + LEN.pack(len(payload)) + payload
    return out


def answers(raw):
    out = []
    while raw:
        (size,) = LEN.unpack(raw[:4])
        out.append(json.loads(raw[4 : 4 + size]))
        raw = raw[4 + size :]
    return out


def test_the_worker_loop_answers_in_order_and_reports_errors():
    opening = json.dumps({"factory": "test_voice:TextTranscriber", "options": {}, "sample_rate": 16000, "channels": 1}).encode()
    stdin = io.BytesIO(frames((b"a", b"too early"), (b"o", opening), (b"a", b"hello world. again"), (b"f", b""),
                              (b"x", b""), (b"c", b"")))
    stdout = io.BytesIO()
    serve(stdin, stdout)
    early, opened, accepted, finished, unknown, closed = answers(stdout.getvalue())
    assert "no recognizer is open" in early["error"] and opened == {"ok": True}
    assert accepted["ok"]["partial"] == "again" and [s["text"] for s in accepted["ok"]["finals"]] == ["hello world"]
    assert [s["text"] for s in finished["ok"]] == ["again"]
    assert "unknown request" in unknown["error"] and closed == {"ok": True}
