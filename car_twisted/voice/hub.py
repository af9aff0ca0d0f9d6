"""
``VoiceHub``: the daemon's voice engine — its providers, the recognition
pool, every live stream (bounded per connection and in all), the live
meetings, and the sink each stream's events go through.

A connection's streams live in its ``VoiceConnection`` feature, so they
end with it and only it can push audio to them (by ``push`` or by binary
frame).  Each transcription stream's events pass through an
``IMemgineIngestSink`` wrapping the connection's ``IVoiceEventSink`` (both
from the daemon's registry), so final segments land in the connection's
memory scope.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted.errors import RpcError
from car_twisted.interfaces import (
    IBinaryReceiver,
    IMemgineIngestSink,
    ISessionFeature,
    ISpeaker,
    ITranscriber,
    IVoiceEventSink,
)
from car_twisted.memory.scopes import scope_of
from car_twisted.rpc.envelope import encode_error
from car_twisted.voice import frames
from car_twisted.voice.model import VoiceEvent
from car_twisted.voice.streams import RecognitionPool, SpeechStream, StreamOverrun, TranscriptionStream

if TYPE_CHECKING:
    from car_twisted.session import ClientSession
    from car_twisted.state import ServerState

__all__ = ["VoiceConnection", "VoiceHub", "voice_binary_receiver"]

MAX_STREAMS_PER_CONNECTION = 8
_log = Logger()


@implementer(ISessionFeature)
class VoiceConnection:
    """One connection's live transcription and speech streams."""

    def __init__(self, hub: VoiceHub) -> None:
        self.hub = hub
        self.streams: dict[str, TranscriptionStream] = {}
        self.speech: dict[str, SpeechStream] = {}
        self.seqs: dict[str, frames.SeqTracker] = {}

    def holds_client_state(self) -> bool:
        return bool(self.streams or self.speech)

    def count(self) -> int:
        return len(self.streams) + len(self.speech)

    def close(self) -> None:
        for stream in self.streams.values():
            stream.drop()
            self.hub.forget(stream.session_id)
        for speech in self.speech.values():
            speech.cancel()
        self.hub.live -= len(self.streams) + len(self.speech)
        self.streams.clear()
        self.speech.clear()
        self.seqs.clear()


class VoiceHub:
    def __init__(self, state: ServerState) -> None:
        self.state = state
        config = state.config
        self.pool = RecognitionPool(state.clock, config.voice_workers)
        self.max_streams = config.max_voice_streams
        self.live = 0
        self._transcribers: tuple[ITranscriber, ...] | None = config.transcribers
        self._speakers: tuple[ISpeaker, ...] | None = config.speakers
        # Streams by id across the daemon: ids are unique while live.
        self._owners: dict[str, ClientSession] = {}

    # -- providers ---------------------------------------------------------------

    @property
    def transcribers(self) -> tuple[ITranscriber, ...]:
        if self._transcribers is None:
            from car_twisted.voice.pocketsphinx_stt import PocketSphinxTranscriber

            self._transcribers = (PocketSphinxTranscriber(),)
        return self._transcribers

    @property
    def speakers(self) -> tuple[ISpeaker, ...]:
        if self._speakers is None:
            from car_twisted.voice.espeak_tts import EspeakSpeaker

            self._speakers = (EspeakSpeaker(self.state.clock),)
        return self._speakers

    def transcriber(self, name: str | None) -> ITranscriber:
        for provider in self.transcribers:
            if name in (None, "local", provider.name):
                why = provider.unavailable()
                if why is not None:
                    raise RpcError(f"speech recognition ({provider.name}) is not available here: {why}",
                                   data={"reason": "provider_unavailable", "provider": provider.name})
                return provider
        raise RpcError(f"unknown speech recognition provider {name!r}", data={"reason": "unknown_provider"}, code=-32602)

    def speaker(self, name: str | None) -> ISpeaker:
        for provider in self.speakers:
            if name in (None, "local", provider.name):
                why = provider.unavailable()
                if why is not None:
                    raise RpcError(f"speech output ({provider.name}) is not available here: {why}",
                                   data={"reason": "provider_unavailable", "provider": provider.name})
                return provider
        raise RpcError(f"unknown speech output provider {name!r}", data={"reason": "unknown_provider"}, code=-32602)

    # -- streams -------------------------------------------------------------------

    def connection(self, session: ClientSession) -> VoiceConnection:
        return session.feature(VoiceConnection, lambda s: VoiceConnection(self))

    def reserve(self, session: ClientSession, stream_id: str) -> VoiceConnection:
        """Room for one more stream named C{stream_id}, or an error."""
        if stream_id in self._owners:
            raise RpcError(f"voice stream {stream_id!r} is already live", data={"reason": "duplicate_stream"}, code=-32602)
        conn = self.connection(session)
        if conn.count() >= MAX_STREAMS_PER_CONNECTION:
            raise RpcError(f"at most {MAX_STREAMS_PER_CONNECTION} voice streams per connection", data={"reason": "stream_limit"})
        if self.live >= self.max_streams:
            raise RpcError(f"at most {self.max_streams} voice streams at once", data={"reason": "stream_limit"})
        self._owners[stream_id] = session
        self.live += 1
        return conn

    def release(self, conn: VoiceConnection, stream_id: str) -> None:
        if conn.streams.pop(stream_id, None) is not None or conn.speech.pop(stream_id, None) is not None:
            self.live -= 1
        conn.seqs.pop(stream_id, None)
        self.forget(stream_id)

    def unreserve(self, stream_id: str) -> None:
        """A reservation whose stream never started."""
        if self._owners.pop(stream_id, None) is not None:
            self.live -= 1

    def forget(self, stream_id: str) -> None:
        self._owners.pop(stream_id, None)

    async def transcript_sink(self, session: ClientSession) -> IVoiceEventSink:
        """The connection's sink, wrapped by the ingest sink into its memory scope when the registry has one."""
        base = session.component(IVoiceEventSink)
        if base is None:
            raise RpcError("no voice event sink is registered for this connection")
        scope = scope_of(session.memory_namespace, session.agent_id)
        try:
            graph = await self.state.memory.graph(scope)
        except Exception:
            _log.failure("voice transcripts not remembered: the memory graph could not be loaded")
            return base
        ingest = self.state.multi_component((base, graph), IMemgineIngestSink)
        if ingest is None:
            return base
        ingest.on_ingest = lambda fact: self.state.memory.changed(scope)
        return ingest

    def open_transcription(
        self,
        session: ClientSession,
        stream: TranscriptionStream,
        conn: VoiceConnection,
    ) -> Deferred[None]:
        conn.streams[stream.session_id] = stream
        if frames.is_stream_id(stream.session_id):
            conn.seqs[stream.session_id] = frames.SeqTracker()

        def failed(failure: Failure) -> Failure:
            self.release(conn, stream.session_id)
            return failure

        opened: Deferred[None] = stream.open()
        opened.addErrback(failed)
        return opened


@implementer(IBinaryReceiver)
class _VoiceBinaryReceiver:
    """Binary frames of one connection: type ``0x01`` PCM to that connection's own streams."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    def receive(self, payload: bytes) -> None:
        try:
            frame = frames.parse_frame(payload)
        except frames.FrameError as e:
            self._refuse(f"binary frame refused: {e}")
            return
        if frame.type != frames.FRAME_PCM:
            self._refuse(f"binary frame refused: type 0x{frame.type:02x} is sent by the daemon, not to it")
            return
        conn = self.session.existing_feature(VoiceConnection)
        stream = conn.streams.get(frame.stream_id) if conn is not None else None
        if conn is None or stream is None:
            self._refuse(f"binary frame refused: no voice stream {frame.stream_id} on this connection")
            return
        tracker = conn.seqs.get(frame.stream_id)
        if tracker is not None and not tracker.accept(frame.seq):
            return  # a duplicate or late frame: dropped, counted
        try:
            stream.feed(frame.payload)
        except StreamOverrun as e:
            stream.sink.send(VoiceEvent(stream.session_id, {"type": "error", "reason": "overrun", "message": e.message,
                                                             "dropped_bytes": len(frame.payload)}))
        except RpcError as e:
            self._refuse(f"binary frame refused: {e.message}")

    def _refuse(self, message: str) -> None:
        self.session.channel.send(encode_error(None, -32602, message))


def voice_binary_receiver(session: ClientSession) -> IBinaryReceiver:
    return _VoiceBinaryReceiver(session)
