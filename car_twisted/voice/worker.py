"""
A recognizer's worker process (``python -m car_twisted.voice.worker``): the
other side of ``car_twisted.voice.recognizers``.  Reads requests from
stdin, runs the blocking recognizer, writes answers to stdout, and exits
when stdin closes.  Nothing here touches Twisted.
"""

from __future__ import annotations

import importlib
import json
import struct
import sys
from typing import BinaryIO

from car_twisted.voice.model import Segment

_LEN = struct.Struct(">I")
MAX_REQUEST_BYTES = 64 * 1024 * 1024


def _segment(segment: Segment) -> dict[str, object]:
    return {"text": segment.text, "start": segment.start, "end": segment.end, "confidence": segment.confidence}


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    recognition = None
    while True:
        head = _read_exactly(stdin, 5)
        if head is None:
            break
        op = head[:1]
        (size,) = _LEN.unpack(head[1:])
        if size > MAX_REQUEST_BYTES:
            break
        payload = _read_exactly(stdin, size) if size else b""
        if payload is None:
            break
        try:
            if op == b"o":
                request = json.loads(payload)
                module, _, name = str(request["factory"]).partition(":")
                transcriber = getattr(importlib.import_module(module), name)(**dict(request.get("options") or {}))
                why = transcriber.unavailable()
                if why is not None:
                    raise RuntimeError(why)
                recognition = transcriber.open(int(request["sample_rate"]), int(request["channels"]))
                answer: dict[str, object] = {"ok": True}
            elif recognition is None:
                raise RuntimeError("no recognizer is open")
            elif op == b"a":
                update = recognition.accept(payload)
                answer = {"ok": {"partial": update.partial, "finals": [_segment(s) for s in update.finals]}}
            elif op == b"f":
                answer = {"ok": [_segment(s) for s in recognition.finish()]}
            elif op == b"c":
                recognition.close()
                recognition = None
                answer = {"ok": True}
            else:
                raise RuntimeError(f"unknown request {op!r}")
        except Exception as e:  # the daemon reports it; the worker keeps serving
            answer = {"error": f"{type(e).__name__}: {e}"}
        body = json.dumps(answer).encode()
        stdout.write(_LEN.pack(len(body)) + body)
        stdout.flush()
    if recognition is not None:
        recognition.close()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
