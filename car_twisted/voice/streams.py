"""
Live voice streams: transcription (PCM in, transcript events out) and
speech (text in, audio events out).

Recognition blocks, so it runs in the reactor's thread pool through one
``RecognitionPool`` per daemon, whose semaphore bounds how many
recognizer calls run at once (two by default: one per core here).  Each
stream feeds its recognizer one chunk at a time, in order; PCM that
arrives meanwhile waits in the stream's buffer, which is bounded in bytes
(``max_pending_bytes``, 30 s of the declared audio by default): a push
past it is refused with ``-32603`` ``data.reason: "overrun"`` (a binary
frame past it is dropped and the client gets a ``voice.event`` of type
``error`` saying so), never buffered without limit.

Events, in order, through the stream's ``IVoiceEventSink``:
``partial {text}`` when the hypothesis of the utterance in progress
changes; ``final {text, start, end, segment}`` (plus ``speaker`` /
``meeting_id`` where known) for each finished segment; ``error {message}``
if recognition fails.  A speech stream sends ``tts_chunk {stream_id, seq,
format, is_final}`` with audio, then one empty ``tts_chunk`` with
``is_final: true``, or ``tts_error {stream_id, seq, message}``.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from car_twisted.errors import RpcError
from car_twisted.interfaces import ISpeaker, ITranscriber, IVoiceEventSink
from car_twisted.json_value import JsonValue
from car_twisted.voice.model import Segment, TranscriptUpdate, VoiceEvent
from car_twisted.voice.recognizers import RecognitionPool, Recognizer, open_recognizer

__all__ = ["RecognitionPool", "SpeechStream", "StreamOverrun", "TranscriptionStream"]

# RecognitionPool lives with the recognizers; re-exported for the hub.

#: Audio handed to the recognizer per call, in seconds.
CHUNK_SECS = 0.5
DEFAULT_BUFFER_SECS = 30.0
MAX_BUFFER_BYTES = 8 * 1024 * 1024
_log = Logger()


class StreamOverrun(RpcError):
    """The client pushes faster than recognition runs: this push was refused."""

    def __init__(self, session_id: str, queued: int, limit: int) -> None:
        super().__init__(
            f"voice stream {session_id!r} is behind: {queued} bytes wait for recognition (limit {limit}); "
            "push more slowly or stop the stream",
            data={"reason": "overrun", "queued_bytes": queued, "limit": limit},
        )


class TranscriptionStream:
    """
    One ``pcm_push`` stream: bytes in through L{feed}, events out through
    C{sink}, the final result from L{stop}.

    @ivar on_segment: called with each finished segment and its number
        (meetings persist them).
    """

    def __init__(
        self,
        session_id: str,
        transcriber: ITranscriber,
        pool: RecognitionPool,
        sink: IVoiceEventSink,
        sample_rate: int,
        channels: int,
        max_pending_bytes: int | None = None,
        extra: dict[str, JsonValue] | None = None,
    ) -> None:
        self.session_id = session_id
        self.transcriber = transcriber
        self.pool = pool
        self.sink = sink
        self.sample_rate = sample_rate
        self.channels = channels
        self.bytes_per_sec = sample_rate * channels * 2
        self.chunk_bytes = max(2 * channels, int(self.bytes_per_sec * CHUNK_SECS) // (2 * channels) * (2 * channels))
        self.max_pending = max_pending_bytes or min(MAX_BUFFER_BYTES, int(self.bytes_per_sec * DEFAULT_BUFFER_SECS))
        # Fields every final carries (speaker, meeting_id).
        self.extra = dict(extra or {})
        self.on_segment: Callable[[Segment, int], None] | None = None
        self.status = "starting"
        self.segments: list[Segment] = []
        self.bytes_in = 0
        self.overruns = 0
        self._buffer = bytearray()
        self._recognition: Recognizer | None = None
        self._busy = False
        self._partial: str | None = None
        self._stopping: list[Deferred[dict[str, JsonValue]]] = []
        self._error: str | None = None

    # -- life cycle ----------------------------------------------------------

    def open(self) -> Deferred[None]:
        """Make the recognizer (a worker process, or the pool); fails if the provider cannot run."""

        def opened(recognition: Recognizer) -> None:
            if self.status == "closed":
                recognition.close()
                return
            self._recognition = recognition
            self.status = "streaming"
            self._pump()

        d = open_recognizer(self.transcriber, self.pool, self.pool.reactor, self.sample_rate, self.channels)
        return d.addCallback(opened)

    def describe(self) -> dict[str, JsonValue]:
        return {
            "session_id": self.session_id,
            "status": self.status,
            "provider": self.transcriber.name,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "audio_secs": round(self.bytes_in / self.bytes_per_sec, 3),
            "segments": len(self.segments),
            "queued_bytes": len(self._buffer),
            **self.extra,
        }

    def feed(self, pcm: bytes) -> int:
        """
        Queue PCM for recognition; @return: bytes now waiting.

        @raise StreamOverrun: past the buffer bound (nothing was queued).
        @raise RpcError: the stream is stopping or closed.
        """
        if self.status not in ("starting", "streaming"):
            raise RpcError(f"voice stream {self.session_id!r} is {self.status}: no more audio is taken")
        if len(self._buffer) + len(pcm) > self.max_pending:
            self.overruns += 1
            raise StreamOverrun(self.session_id, len(self._buffer), self.max_pending)
        self._buffer += pcm
        self.bytes_in += len(pcm)
        self._pump()
        return len(self._buffer)

    def stop(self) -> Deferred[dict[str, JsonValue]]:
        """Recognize what is queued, flush the recognizer, and fire with the result."""
        waiter: Deferred[dict[str, JsonValue]] = Deferred()
        if self.status == "closed":
            waiter.callback(self.result())
            return waiter
        self._stopping.append(waiter)
        if self.status in ("starting", "streaming"):
            self.status = "stopping"
        self._pump()
        return waiter

    def drop(self) -> None:
        """The connection went: free the recognizer, send nothing more (a pending stop fires with what there is)."""
        self.status = "closed"
        self._buffer.clear()
        waiters, self._stopping = self._stopping, []
        for waiter in waiters:
            waiter.callback(self.result())
        if self._recognition is not None and not self._busy:
            recognition, self._recognition = self._recognition, None
            recognition.close()

    # -- the recognition loop -----------------------------------------------------

    def _pump(self) -> None:
        if self._busy or self._recognition is None:
            if self.status == "closed" and self._recognition is not None and not self._busy:
                self.drop()
            return
        recognition = self._recognition
        if self._buffer:
            chunk = bytes(self._buffer[: self.chunk_bytes])
            del self._buffer[: self.chunk_bytes]
            self._busy = True
            recognition.accept(chunk).addCallbacks(self._recognized, self._failed)
        elif self.status == "stopping":
            self._busy = True
            self.status = "finishing"
            recognition.finish().addCallbacks(self._finished, self._failed)

    def _recognized(self, update: TranscriptUpdate) -> None:
        self._busy = False
        if self.status == "closed":
            self.drop()
            return
        for segment in update.finals:
            self._final(segment)
        if update.partial is not None and update.partial != self._partial and update.partial.strip():
            self._partial = update.partial
            self._emit({"type": "partial", "text": update.partial})
        self._pump()

    def _finished(self, segments: tuple[Segment, ...]) -> None:
        self._busy = False
        if self.status != "closed":
            for segment in segments:
                self._final(segment)
        self._close("stopped")

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        _log.failure("recognition failed on voice stream {session_id}", failure=failure, session_id=self.session_id)
        self._error = failure.getErrorMessage() or repr(failure.value)
        if self.status != "closed":
            self._emit({"type": "error", "message": f"recognition failed: {self._error}"[:500]})
        self._buffer.clear()
        self._close("failed")

    def _final(self, segment: Segment) -> None:
        index = len(self.segments)
        self.segments.append(segment)
        self._partial = None
        body: dict[str, JsonValue] = {
            "type": "final",
            "text": segment.text,
            "start": round(segment.start, 3),
            "end": round(segment.end, 3),
            "segment": index,
        }
        if segment.confidence is not None:
            body["confidence"] = segment.confidence
        body.update(self.extra)
        if self.on_segment is not None:
            try:
                self.on_segment(segment, index)
            except Exception:
                _log.failure("voice segment hook failed")
        self._emit(body)

    def _emit(self, body: dict[str, JsonValue]) -> None:
        if self.status == "closed":
            return
        try:
            self.sink.send(VoiceEvent(self.session_id, body))
        except Exception:
            _log.failure("voice event sink failed on stream {session_id}", session_id=self.session_id)

    def _close(self, status: str) -> None:
        recognition, self._recognition = self._recognition, None
        if recognition is not None:
            recognition.close()
        if self.status != "closed":
            self.status = status
        waiters, self._stopping = self._stopping, []
        for waiter in waiters:
            waiter.callback(self.result())

    def result(self) -> dict[str, JsonValue]:
        result = self.describe()
        result["text"] = " ".join(s.text for s in self.segments if s.text)
        result["transcript"] = [
            {"text": s.text, "start": round(s.start, 3), "end": round(s.end, 3)} for s in self.segments
        ]
        if self._error is not None:
            result["error"] = self._error
        return result


class SpeechStream:
    """One ``voice.tts_stream``: C{speaker} output as events through C{sink}."""

    def __init__(self, stream_id: str, speaker: ISpeaker, sink: IVoiceEventSink, binary: bool) -> None:
        self.stream_id = stream_id
        self.speaker = speaker
        self.sink = sink
        self.binary = binary
        self.seq = 0
        self.bytes_out = 0
        self.status = "speaking"
        self._synthesis: Deferred[None] | None = None

    def start(self, text: str, voice: str | None) -> Deferred[None]:
        """Begin; the Deferred fires when the stream has ended, however it ended (never fails)."""
        d = self.speaker.speak(text, voice, self._chunk)
        self._synthesis = d
        return d.addCallbacks(self._done, self._failed)

    def cancel(self) -> bool:
        """Stop it; False if it had already ended."""
        if self.status != "speaking":
            return False
        self.status = "cancelled"
        if self._synthesis is not None:
            self._synthesis.cancel()
        return True

    def _chunk(self, audio: bytes) -> None:
        if self.status != "speaking" or not audio:
            return
        self.bytes_out += len(audio)
        self._emit({"type": "tts_chunk", "stream_id": self.stream_id, "format": self.speaker.audio_format, "is_final": False}, audio)

    def _done(self, _: object) -> None:
        if self.status == "speaking":
            self.status = "done"
            self._emit({"type": "tts_chunk", "stream_id": self.stream_id, "format": self.speaker.audio_format, "is_final": True}, b"")

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) or self.status != "speaking":
            return
        self.status = "failed"
        _log.failure("speech failed on stream {stream_id}", failure=failure, stream_id=self.stream_id)
        message = (failure.getErrorMessage() or repr(failure.value))[:500]
        self._emit({"type": "tts_error", "stream_id": self.stream_id, "message": f"speech failed: {message}"}, None)

    def _emit(self, body: dict[str, JsonValue], audio: bytes | None) -> None:
        body["seq"] = self.seq
        self.seq += 1
        try:
            self.sink.send(VoiceEvent(self.stream_id, body, audio=audio, binary=self.binary))
        except Exception:
            _log.failure("voice event sink failed on stream {stream_id}", stream_id=self.stream_id)
