"""
The voice sinks: where a stream's events go.

``WsVoiceEventSink`` sends them to one client: ``voice.event {session_id,
event}`` notifications (the shape ``car-runtime``'s voice handler takes),
and for a speech stream that asked for binary frames, its audio as CAR
binary frames in place of JSON ``tts_*`` events: each ``tts_chunk`` with
audio as ``0x02``, the final empty ``tts_chunk {is_final: true}`` as
``0x03``, ``tts_error`` as ``0x04``.

``WsMemgineIngestSink`` wraps any sink: each ``final`` transcript segment
becomes a Conversation fact in a memory graph (speaker, meeting or stream
id and times in its metadata), and every event, finals included, is then
passed on unchanged and in order.  Both are reached through the daemon's
registry (``car_twisted.adapters``), so an embedder may register its own.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from twisted.logger import Logger
from zope.interface import implementer

from car_twisted.errors import RpcError
from car_twisted.interfaces import IMemgine, IMemgineIngestSink, IVoiceEventSink
from car_twisted.json_value import JsonValue
from car_twisted.memory.model import Fact
from car_twisted.session import ClientSession
from car_twisted.voice import frames
from car_twisted.voice.model import VoiceEvent

__all__ = ["WsMemgineIngestSink", "WsVoiceEventSink", "VOICE_EVENT"]

VOICE_EVENT = "voice.event"
_log = Logger()


@implementer(IVoiceEventSink)
class WsVoiceEventSink:
    """Events to one client connection."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    def send(self, event: VoiceEvent) -> None:
        channel = self.session.channel
        if event.binary and event.type.startswith("tts_"):
            frame = self._frame(event)
            if frame is not None:
                channel.sink.send_binary(frame)
                return
        body = event.body
        if event.audio is not None:
            body = {**body, "audio_b64": base64.b64encode(event.audio).decode("ascii")}
        channel.notify(VOICE_EVENT, {"session_id": event.session_id, "event": body})

    @staticmethod
    def _frame(event: VoiceEvent) -> bytes | None:
        body = event.body
        seq = body.get("seq")
        if not isinstance(seq, int):
            return None
        if event.type == "tts_chunk":
            if body.get("is_final") is True and not event.audio:
                return frames.tts_final(event.session_id, seq)
            fmt = body.get("format")
            return frames.tts_chunk(event.session_id, seq, fmt if isinstance(fmt, str) else "wav", event.audio or b"")
        if event.type == "tts_error":
            message = body.get("message")
            return frames.tts_error(event.session_id, seq, message if isinstance(message, str) else "speech failed")
        return None


def _no_op(fact: Fact) -> None:
    pass


@implementer(IMemgineIngestSink)
class WsMemgineIngestSink:
    """
    Final segments into C{graph}, every event on to C{upstream}.

    A segment's fact id is derived from its stream and segment number, so
    a replayed final replaces its fact rather than adding a second.
    """

    def __init__(self, upstream: IVoiceEventSink, graph: IMemgine) -> None:
        self.upstream = upstream
        self.graph = graph
        self.on_ingest: Callable[[Fact], None] = _no_op

    def send(self, event: VoiceEvent) -> None:
        if event.type == "final":
            self._ingest(event)
        self.upstream.send(event)

    def _ingest(self, event: VoiceEvent) -> None:
        body = event.body
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            return
        speaker = _str(body.get("speaker"))
        meeting = _str(body.get("meeting_id"))
        segment = body.get("segment")
        metadata: dict[str, JsonValue] = {
            "voice_session_id": event.session_id,
            "start": body.get("start"),
            "end": body.get("end"),
        }
        tags = ["voice"]
        if speaker:
            metadata["speaker"] = speaker
        if meeting:
            metadata["meeting_id"] = meeting
            tags.append("meeting")
        where = f"meeting {meeting}" if meeting else f"voice session {event.session_id}"
        fact_id = f"voice-{event.session_id}-{segment}" if isinstance(segment, int) else None
        try:
            fact = self.graph.add(
                f"{speaker or 'speaker'} in {where}",
                text.strip(),
                "conversation",
                fact_id=fact_id,
                tags=tags,
                source="voice",
                metadata=metadata,
            )
        except (RpcError, ValueError) as e:
            # The transcript still reaches the client; memory is best effort.
            _log.warn("voice segment not remembered: {error}", error=str(e))
            return
        except Exception:
            _log.failure("voice segment not remembered")
            return
        self.on_ingest(fact)


def _str(value: JsonValue) -> str | None:
    return value if isinstance(value, str) and value else None
