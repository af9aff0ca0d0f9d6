"""
``meeting.*``: a transcription stream whose segments are kept on disk
(``car_twisted.voice.meetings``) and remembered (the ingest sink), with a
summary when it stops.

Audio reaches a meeting like any stream: ``voice.transcribe_stream.push``
with ``session_id`` set to the meeting id, or binary frames (the id is a
32-hex UUID when the daemon picks it).  ``root`` (default ``$CAR_HOME``)
holds ``.car/meetings/<id>/``; a ``root`` from the wire is confined under
``$CAR_HOME/meeting-roots/`` like the memory sandbox.  Only the connection
that started a meeting stops it; if that connection goes, the meeting is
closed as ``interrupted`` with what it had.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from zope.interface import implementer

from car_twisted._util import off_reactor
from car_twisted.errors import INVALID_PARAMS, InvalidParams, RpcError
from car_twisted.interfaces import IMethodProvider
from car_twisted.json_value import JsonValue
from car_twisted.rpc.registry import MethodSpec
from car_twisted.sandbox import confined_dir
from car_twisted.session import ClientSession
from car_twisted.voice.hub import VoiceConnection
from car_twisted.voice.meetings import MEETING_ID, MeetingFiles, list_meetings, meetings_dir, read_meeting, summarize
from car_twisted.voice.model import Segment
from car_twisted.voice.streams import TranscriptionStream

if TYPE_CHECKING:
    from car_twisted.methods.voice import VoiceMethods
    from car_twisted.state import ServerState

__all__ = ["MeetingMethods"]

_log = Logger()
_TEXT = {"max_len": 1024}


@attrs.frozen
class StartParams:
    audio_source: dict[str, JsonValue]
    id: str | None = attrs.field(default=None, metadata={"max_len": 64})
    title: str | None = attrs.field(default=None, metadata=_TEXT)
    speaker: str | None = attrs.field(default=None, metadata={"max_len": 128})
    root: str | None = attrs.field(default=None, metadata={"max_len": 4096})
    options: dict[str, JsonValue] | None = None


@attrs.frozen
class StopParams:
    meeting_id: str = attrs.field(metadata={"max_len": 64})
    summarize: bool = True


@attrs.frozen
class ListParams:
    root: str | None = attrs.field(default=None, metadata={"max_len": 4096})


@attrs.frozen
class GetParams:
    meeting_id: str = attrs.field(metadata={"max_len": 64})
    root: str | None = attrs.field(default=None, metadata={"max_len": 4096})


@attrs.define
class _Live:
    session: ClientSession
    stream: TranscriptionStream
    files: MeetingFiles
    meta: dict[str, JsonValue]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _meeting_id(raw: str) -> str:
    if not MEETING_ID.match(raw):
        raise InvalidParams("meeting_id", "expected 1 to 64 letters, digits, '-' or '_'")
    return raw


@implementer(IMethodProvider)
class MeetingMethods:
    def __init__(self, state: ServerState, voice: VoiceMethods) -> None:
        self.state = state
        self.voice = voice
        self.live: dict[str, _Live] = {}

    def methods(self) -> Iterable[MethodSpec]:
        m = MethodSpec
        return (
            m("meeting.start", self.start, params=StartParams,
              description="Start a meeting (audio_source pcm_push); voice.event notifications follow."),
            m("meeting.stop", self.stop, params=StopParams, description="Stop a meeting: transcript and summary."),
            m("meeting.list", self.list, params=ListParams, description="Meetings under a root ($CAR_HOME by default)."),
            m("meeting.get", self.get, params=GetParams, description="One meeting's full record."),
        )

    async def _root(self, raw: str | None, method: str) -> Path:
        home = self.state.config.paths.home
        if raw is None:
            return home
        base = home / "meeting-roots"
        root: Path = await off_reactor(self.state.clock, confined_dir, base, raw, method)
        return root

    # -- start / stop ---------------------------------------------------------------------

    def start(self, session: ClientSession, p: StartParams) -> Deferred[dict[str, JsonValue]]:
        return ensureDeferred(self._start(session, p))

    async def _start(self, session: ClientSession, p: StartParams) -> dict[str, JsonValue]:
        meeting_id = _meeting_id(p.id) if p.id is not None else uuid.uuid4().hex
        if meeting_id in self.live:
            raise RpcError(f"meeting {meeting_id!r} is already running", data={"field": "id"}, code=INVALID_PARAMS)
        root = await self._root(p.root, "meeting.start")
        directory = meetings_dir(root) / meeting_id
        if await off_reactor(self.state.clock, (directory / "meeting.json").exists):
            raise RpcError(f"meeting {meeting_id!r} already exists under this root", data={"field": "id"}, code=INVALID_PARAMS)
        files = MeetingFiles(self.state.clock, directory)
        extra: dict[str, JsonValue] = {"meeting_id": meeting_id}
        if p.speaker:
            extra["speaker"] = p.speaker
        described = await self.voice.open_stream(session, meeting_id, p.audio_source, p.options, extra)
        conn = session.existing_feature(VoiceConnection)
        assert conn is not None  # open_stream made it
        stream = conn.streams[meeting_id]
        meta: dict[str, JsonValue] = {
            "id": meeting_id,
            "title": p.title,
            "started_at": _now(),
            "status": "recording",
            "root": p.root,
            "audio": {"kind": "pcm_push", "sample_rate": stream.sample_rate, "channels": stream.channels},
        }
        live = _Live(session, stream, files, meta)
        self.live[meeting_id] = live
        stream.on_segment = lambda segment, index: self._segment(live, segment, index)
        session.on_close(lambda: self._interrupted(meeting_id))
        try:
            await files.write_meta(meta)
        except BaseException:
            self.live.pop(meeting_id, None)
            stream.drop()
            raise
        return {**meta, "session_id": meeting_id, "binary_frames": described["binary_frames"]}

    def _segment(self, live: _Live, segment: Segment, index: int) -> None:
        record: dict[str, JsonValue] = {
            "segment": index,
            "text": segment.text,
            "start": round(segment.start, 3),
            "end": round(segment.end, 3),
            "at": _now(),
        }
        speaker = live.stream.extra.get("speaker")
        if speaker is not None:
            record["speaker"] = speaker
        live.files.append_segment(record).addErrback(
            lambda f: _log.failure("a meeting segment was not written", failure=f)
        )

    def stop(self, session: ClientSession, p: StopParams) -> Deferred[dict[str, JsonValue]]:
        meeting_id = _meeting_id(p.meeting_id)
        live = self.live.get(meeting_id)
        if live is None:
            raise RpcError(f"no running meeting {meeting_id!r}", data={"field": "meeting_id"}, code=INVALID_PARAMS)
        if live.session is not session:
            raise RpcError(f"meeting {meeting_id!r} was started by another connection", data={"reason": "forbidden"})
        return ensureDeferred(self._stop(live, p.summarize, "stopped"))

    async def _stop(self, live: _Live, want_summary: bool, status: str) -> dict[str, JsonValue]:
        meeting_id = str(live.meta["id"])
        self.live.pop(meeting_id, None)
        conn = live.session.existing_feature(VoiceConnection)
        if status == "stopped" and conn is not None and meeting_id in conn.streams:
            result = await self.voice.finish(conn, live.stream)
        else:
            # The connection went: what was recognized is kept, the rest is lost with it.
            result = live.stream.result()
        texts = [s.text for s in live.stream.segments]
        meta = dict(live.meta)
        meta.update(
            status=status,
            ended_at=_now(),
            segments=len(texts),
            audio_secs=result.get("audio_secs"),
            summary=summarize(texts) if want_summary else None,
        )
        await live.files.write_meta(meta)  # after every segment write: the lock keeps them in order
        return {**meta, "transcript": result.get("transcript", []), "text": result.get("text", "")}

    def _interrupted(self, meeting_id: str) -> None:
        live = self.live.get(meeting_id)
        if live is None:
            return
        ensureDeferred(self._stop(live, True, "interrupted")).addErrback(
            lambda f: _log.failure("closing an interrupted meeting failed", failure=f)
        )

    # -- reading -----------------------------------------------------------------------------

    def list(self, session: ClientSession, p: ListParams) -> Deferred[dict[str, JsonValue]]:
        async def go() -> dict[str, JsonValue]:
            root = await self._root(p.root, "meeting.list")
            meetings: list[JsonValue] = list(await off_reactor(self.state.clock, list_meetings, root))
            return {"meetings": meetings}

        return ensureDeferred(go())

    def get(self, session: ClientSession, p: GetParams) -> Deferred[JsonValue]:
        meeting_id = _meeting_id(p.meeting_id)

        async def go() -> JsonValue:
            root = await self._root(p.root, "meeting.get")
            record = await off_reactor(self.state.clock, read_meeting, meetings_dir(root) / meeting_id)
            if record is None:
                raise RpcError(f"no meeting {meeting_id!r} under this root", data={"field": "meeting_id"},
                               code=INVALID_PARAMS)
            return record

        return ensureDeferred(go())
