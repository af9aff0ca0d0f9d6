"""
The values that travel through the voice pipeline.

A recognizer turns PCM into ``TranscriptUpdate`` values (a partial
hypothesis and any finished ``Segment``); a speaker turns text into audio
chunks; both reach the client as ``VoiceEvent`` values through an
``IVoiceEventSink``.
"""

from __future__ import annotations

import attrs

from car_twisted.json_value import JsonValue

__all__ = [
    "AUDIO_FORMATS",
    "Segment",
    "TranscriptUpdate",
    "VoiceEvent",
    "VoiceUnavailable",
]

#: Audio formats of speech chunks, by name (the binary frame's format byte
#: is their index: 0x00 raw PCM, 0x01 MP3, 0x02 WAV).
AUDIO_FORMATS = ("pcm", "mp3", "wav")


class VoiceUnavailable(Exception):
    """A provider that cannot run here; the message says what is missing."""


@attrs.frozen
class Segment:
    """
    One finished stretch of speech.

    @ivar start / end: seconds from the start of the stream's audio.
    """

    text: str
    start: float
    end: float
    confidence: float | None = None


@attrs.frozen
class TranscriptUpdate:
    """
    What one step of recognition produced: the current partial hypothesis
    of the utterance in progress (None: nothing new) and the segments that
    finished during it, oldest first.
    """

    partial: str | None = None
    finals: tuple[Segment, ...] = ()


@attrs.frozen
class VoiceEvent:
    """
    One event for a client, in stream order.

    @ivar session_id: the transcription stream, meeting or speech stream.
    @ivar body: the ``event`` object of ``voice.event {session_id, event}``
        (``type`` first: ``partial``, ``final``, ``tts_chunk``, ...).
    @ivar audio: speech audio of a ``tts_chunk`` (sent as ``audio_b64`` in
        JSON, or as a binary frame).
    @ivar binary: the stream asked for binary frames (``0x02``-``0x04``)
        instead of JSON ``tts_*`` events.
    """

    session_id: str
    body: dict[str, JsonValue]
    audio: bytes | None = None
    binary: bool = False

    @property
    def type(self) -> str:
        kind = self.body.get("type")
        return kind if isinstance(kind, str) else ""
