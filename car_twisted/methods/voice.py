"""
``voice.*``: streaming transcription (``pcm_push``), speech out, the live
streams and the providers; ``car_twisted.voice.hub`` runs them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from car_twisted.errors import INVALID_PARAMS, InvalidParams, RpcError
from car_twisted.interfaces import IMethodProvider, IVoiceEventSink
from car_twisted.json_value import JsonValue
from car_twisted.rpc.registry import MethodSpec
from car_twisted.session import ClientSession
from car_twisted.voice import frames
from car_twisted.voice.hub import VoiceConnection
from car_twisted.voice.streams import SpeechStream, TranscriptionStream

if TYPE_CHECKING:
    from car_twisted.state import ServerState

__all__ = ["VoiceMethods", "AudioSource", "parse_audio_source"]

MAX_TTS_CHARS = 64 * 1024
_ID = {"max_len": 128}


@attrs.frozen
class AudioSource:
    sample_rate: int = 16000
    channels: int = 1


def parse_audio_source(raw: dict[str, JsonValue]) -> AudioSource:
    """``audio_source``: only ``pcm_push`` (16-bit signed LE PCM pushed by the client)."""
    kind = raw.get("kind")
    if kind != "pcm_push":
        raise InvalidParams("audio_source.kind", f"only 'pcm_push' is supported (got {kind!r})")
    rate = raw.get("sample_rate", 16000)
    channels = raw.get("channels", 1)
    if isinstance(rate, bool) or not isinstance(rate, int) or not 8000 <= rate <= 48000:
        raise InvalidParams("audio_source.sample_rate", "expected 8000 to 48000")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels not in (1, 2):
        raise InvalidParams("audio_source.channels", "expected 1 or 2")
    return AudioSource(rate, channels)


def _check_id(value: str, field: str) -> str:
    if not value or not value.isprintable():
        raise InvalidParams(field, "expected a non-empty printable string")
    return value


@attrs.frozen
class StartParams:
    session_id: str = attrs.field(metadata=_ID)
    audio_source: dict[str, JsonValue]
    options: dict[str, JsonValue] | None = None


@attrs.frozen
class PushParams:
    session_id: str = attrs.field(metadata=_ID)
    pcm_b64: str = attrs.field(metadata={"max_len": 16 * 1024 * 1024})


@attrs.frozen
class SessionParams:
    session_id: str = attrs.field(metadata=_ID)


@attrs.frozen
class TtsStartParams:
    stream_id: str = attrs.field(metadata=_ID)
    text: str = attrs.field(metadata={"max_len": MAX_TTS_CHARS})
    options: dict[str, JsonValue] | None = None


@attrs.frozen
class TtsCancelParams:
    stream_id: str = attrs.field(metadata=_ID)


def _option_str(options: dict[str, JsonValue] | None, name: str) -> str | None:
    value = (options or {}).get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 128:
        raise InvalidParams(f"options.{name}", "expected a string of at most 128 characters")
    return value


@implementer(IMethodProvider)
class VoiceMethods:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.hub = state.voice

    def methods(self) -> Iterable[MethodSpec]:
        m = MethodSpec
        return (
            m("voice.transcribe_stream.start", self.start, params=StartParams,
              description="Open a pcm_push transcription stream; partial and final voice.event notifications follow."),
            m("voice.transcribe_stream.push", self.push, params=PushParams,
              description="Base64 16-bit PCM for a stream (binary frames 0x01 do the same)."),
            m("voice.transcribe_stream.stop", self.stop, params=SessionParams,
              description="Finish a stream: its final transcript."),
            m("voice.tts_stream.start", self.tts_start, params=TtsStartParams,
              description="Speak text: tts_chunk events, or binary frames 0x02/0x03/0x04."),
            m("voice.tts_stream.cancel", self.tts_cancel, params=TtsCancelParams,
              description="Stop a speech stream (idempotent)."),
            m("voice.tts_stream.list", self.tts_list, description="This connection's live speech streams."),
            m("voice.sessions.list", self.sessions_list, description="This connection's live transcription streams."),
            m("voice.providers.list", self.providers_list, description="Speech providers and whether they run here."),
        )

    # -- transcription -------------------------------------------------------------

    def start(self, session: ClientSession, p: StartParams) -> Deferred[dict[str, JsonValue]]:
        return ensureDeferred(self.open_stream(session, p.session_id, p.audio_source, p.options, {}))

    async def open_stream(
        self,
        session: ClientSession,
        stream_id: str,
        audio_source: dict[str, JsonValue],
        options: dict[str, JsonValue] | None,
        extra: dict[str, JsonValue],
    ) -> dict[str, JsonValue]:
        """Open a transcription stream (``voice.transcribe_stream.start`` and ``meeting.start``)."""
        _check_id(stream_id, "session_id")
        source = parse_audio_source(audio_source)
        transcriber = self.hub.transcriber(_option_str(options, "provider"))
        conn = self.hub.reserve(session, stream_id)
        try:
            sink = await self.hub.transcript_sink(session)
        except BaseException:
            self.hub.unreserve(stream_id)
            raise
        stream = TranscriptionStream(stream_id, transcriber, self.hub.pool, sink, source.sample_rate, source.channels,
                                     extra=extra)
        await self.hub.open_transcription(session, stream, conn)
        return {**stream.describe(), "binary_frames": frames.is_stream_id(stream_id)}

    def _stream(self, session: ClientSession, session_id: str) -> tuple[VoiceConnection, TranscriptionStream]:
        conn = session.existing_feature(VoiceConnection)
        stream = conn.streams.get(session_id) if conn is not None else None
        if conn is None or stream is None:
            raise RpcError(f"no voice stream {session_id!r} on this connection", data={"field": "session_id"},
                           code=INVALID_PARAMS)
        return conn, stream

    def push(self, session: ClientSession, p: PushParams) -> dict[str, JsonValue]:
        _, stream = self._stream(session, p.session_id)
        try:
            pcm = base64.b64decode(p.pcm_b64, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParams("pcm_b64", "not valid base64") from None
        if len(pcm) % 2:
            raise InvalidParams("pcm_b64", "16-bit PCM has an even number of bytes")
        queued = stream.feed(pcm)
        return {"session_id": stream.session_id, "status": stream.status, "accepted_bytes": len(pcm),
                "queued_bytes": queued, "segments": len(stream.segments)}

    def stop(self, session: ClientSession, p: SessionParams) -> Deferred[dict[str, JsonValue]]:
        conn, stream = self._stream(session, p.session_id)
        return self.finish(conn, stream)

    def finish(self, conn: VoiceConnection, stream: TranscriptionStream) -> Deferred[dict[str, JsonValue]]:
        def ended(result: dict[str, JsonValue]) -> dict[str, JsonValue]:
            self.hub.release(conn, stream.session_id)
            return result

        return stream.stop().addCallback(ended)

    def sessions_list(self, session: ClientSession, params: JsonValue) -> list[JsonValue]:
        conn = session.existing_feature(VoiceConnection)
        return [stream.describe() for stream in conn.streams.values()] if conn is not None else []

    # -- speech ------------------------------------------------------------------------

    def tts_start(self, session: ClientSession, p: TtsStartParams) -> dict[str, JsonValue]:
        _check_id(p.stream_id, "stream_id")
        binary = (p.options or {}).get("binary_frames", False)
        if not isinstance(binary, bool):
            raise InvalidParams("options.binary_frames", "expected true or false")
        if binary and not frames.is_stream_id(p.stream_id):
            raise InvalidParams("stream_id", "with binary_frames it must be 32 lowercase hex characters (a UUID, no dashes)")
        if not p.text.strip():
            raise InvalidParams("text", "nothing to say")
        speaker = self.hub.speaker(_option_str(p.options, "provider"))
        voice = _option_str(p.options, "voice_id")
        sink = session.component(IVoiceEventSink)
        if sink is None:
            raise RpcError("no voice event sink is registered for this connection")
        conn = self.hub.reserve(session, p.stream_id)
        stream = SpeechStream(p.stream_id, speaker, sink, binary)
        conn.speech[p.stream_id] = stream
        stream.start(p.text, voice).addBoth(lambda _: self.hub.release(conn, p.stream_id))
        return {"stream_id": p.stream_id, "binary_frames": binary, "provider": speaker.name,
                "format": speaker.audio_format}

    def tts_cancel(self, session: ClientSession, p: TtsCancelParams) -> dict[str, JsonValue]:
        conn = session.existing_feature(VoiceConnection)
        stream = conn.speech.get(p.stream_id) if conn is not None else None
        cancelled = stream.cancel() if stream is not None else False
        if conn is not None and stream is not None:
            self.hub.release(conn, p.stream_id)
        return {"stream_id": p.stream_id, "cancelled": cancelled}

    def tts_list(self, session: ClientSession, params: JsonValue) -> dict[str, JsonValue]:
        conn = session.existing_feature(VoiceConnection)
        return {"streams": list(conn.speech) if conn is not None else []}

    # -- providers ---------------------------------------------------------------------

    def providers_list(self, session: ClientSession, params: JsonValue) -> list[JsonValue]:
        out: list[JsonValue] = []
        for kind, providers in (("stt", self.hub.transcribers), ("tts", self.hub.speakers)):
            for provider in providers:
                why = provider.unavailable()
                row: dict[str, JsonValue] = {"id": provider.name, "kind": kind, "available": why is None,
                                             "description": provider.description}
                if why is not None:
                    row["reason"] = why
                out.append(row)
        return out
