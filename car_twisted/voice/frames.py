"""
CAR binary frames: audio on WebSocket binary messages beside the JSON-RPC
text channel.

Every frame is a 26-byte header and a payload; multi-byte fields are
little-endian::

    offset  size  field
    0       1     type: 0x01 inbound PCM (client to server),
                  0x02 TTS audio chunk, 0x03 TTS final marker,
                  0x04 TTS error (server to client)
    1       16    session/stream UUID, raw bytes
    17      8     seq, u64, monotonic within the session/stream
    25      1     format (0x02 only): 0x00 16-bit signed LE PCM,
                  0x01 MP3, 0x02 WAV (the index in AUDIO_FORMATS)
    26      N     payload

The JSON-RPC ``session_id``/``stream_id`` of a stream carried in frames is
the 32-char lowercase hex of the UUID bytes, no dashes; ``Frame.stream_id``
is that form.  The format byte of types other than 0x02 is ignored on
input (a parsed frame reports 0) and written as 0.  A 0x03 frame has no
payload; a 0x04 payload is the whole UTF-8 error message, no length prefix.

``parse_frame`` raises ``FrameError`` (a ``ValueError``) and nothing else,
whatever it is given.  ``build_frame`` raises ``ValueError`` for anything
``parse_frame`` would refuse, so what it builds always parses back.

Inbound PCM sequence policy (``SeqTracker``, one per stream): the first
frame may start at any seq; after it seq must increase strictly.  A frame
whose seq is equal to or lower than the last accepted one is a duplicate
or arrived late: it is dropped and counted in ``duplicates``.  A seq that
jumps by more than one is accepted, and the jump is counted in ``gaps``
(and the missing frames in ``missing``) so the stream can report the loss;
the audio is not padded.  A u64 seq is never expected to wrap: 0 after
2**64-1 is dropped as older.
"""

from __future__ import annotations

import re
import struct

import attrs

from car_twisted.voice.model import AUDIO_FORMATS

__all__ = [
    "FORMAT_MP3",
    "FORMAT_PCM",
    "FORMAT_WAV",
    "FRAME_PCM",
    "FRAME_TTS_CHUNK",
    "FRAME_TTS_ERROR",
    "FRAME_TTS_FINAL",
    "FRAME_TYPES",
    "HEADER_LEN",
    "MAX_ERROR_BYTES",
    "Frame",
    "FrameError",
    "SeqTracker",
    "build_frame",
    "is_stream_id",
    "parse_frame",
    "stream_uuid_bytes",
    "tts_chunk",
    "tts_error",
    "tts_final",
]

FRAME_PCM = 0x01
FRAME_TTS_CHUNK = 0x02
FRAME_TTS_FINAL = 0x03
FRAME_TTS_ERROR = 0x04
FRAME_TYPES = frozenset({FRAME_PCM, FRAME_TTS_CHUNK, FRAME_TTS_FINAL, FRAME_TTS_ERROR})

FORMAT_PCM = AUDIO_FORMATS.index("pcm")
FORMAT_MP3 = AUDIO_FORMATS.index("mp3")
FORMAT_WAV = AUDIO_FORMATS.index("wav")

#: The most bytes of UTF-8 ``tts_error`` puts in a 0x04 frame.
MAX_ERROR_BYTES = 4096

SEQ_LIMIT = 2**64

HEADER_LEN = 26
_HEADER = struct.Struct("<B16sQB")
assert _HEADER.size == HEADER_LEN

_STREAM_ID = re.compile(r"[0-9a-f]{32}")


class FrameError(ValueError):
    """A binary frame that cannot be taken; the message says why."""


@attrs.frozen
class Frame:
    """
    One parsed binary frame.

    @ivar stream_id: the UUID as 32 lowercase hex characters.
    @ivar format: the format byte of a 0x02 chunk; 0 for other types.
    """

    type: int
    stream_id: str
    seq: int
    format: int
    payload: bytes

    @property
    def format_name(self) -> str | None:
        """``pcm``, ``mp3`` or ``wav`` for a 0x02 chunk, else None."""
        return AUDIO_FORMATS[self.format] if self.type == FRAME_TTS_CHUNK else None

    @property
    def message(self) -> str | None:
        """The error message of a 0x04 frame, else None."""
        return self.payload.decode("utf-8") if self.type == FRAME_TTS_ERROR else None

    def encode(self) -> bytes:
        """This frame's bytes (``build_frame`` of its fields)."""
        return build_frame(self.type, self.stream_id, self.seq, self.format, self.payload)


def is_stream_id(s: object) -> bool:
    """Whether ``s`` is 32 lowercase hex characters (a frame's UUID)."""
    return isinstance(s, str) and _STREAM_ID.fullmatch(s) is not None


def stream_uuid_bytes(stream_id: str) -> bytes:
    """The 16 UUID bytes of a stream id; ValueError if it is not one."""
    if not is_stream_id(stream_id):
        raise ValueError("stream id must be 32 lowercase hex characters")
    return bytes.fromhex(stream_id)


def parse_frame(data: bytes | bytearray | memoryview) -> Frame:
    """Parse one binary WebSocket message; ``FrameError`` if it is bad."""
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError):
        raise FrameError("frame is not a contiguous byte buffer") from None
    try:
        if len(view) < HEADER_LEN:
            raise FrameError(f"frame of {len(view)} bytes is shorter than the {HEADER_LEN}-byte header")
        kind, uuid, seq, fmt = _HEADER.unpack_from(view)
        if kind not in FRAME_TYPES:
            raise FrameError(f"unknown frame type 0x{kind:02x}")
        if kind == FRAME_TTS_CHUNK:
            if fmt >= len(AUDIO_FORMATS):
                raise FrameError(f"unknown audio format 0x{fmt:02x}")
        else:
            fmt = 0
        payload = bytes(view[HEADER_LEN:])
    finally:
        view.release()
    _check_payload(kind, payload, FrameError)
    return Frame(type=kind, stream_id=uuid.hex(), seq=seq, format=fmt, payload=payload)


def _check_payload(kind: int, payload: bytes, error: type[ValueError]) -> None:
    if kind == FRAME_TTS_FINAL and payload:
        raise error(f"TTS final frame with a {len(payload)}-byte payload")
    if kind == FRAME_TTS_ERROR:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise error("TTS error message is not UTF-8") from None


def build_frame(type: int, stream_id: str, seq: int, format: int = 0, payload: bytes = b"") -> bytes:
    """
    The bytes of one frame; ValueError for an unknown type, a bad stream
    id, seq outside 0..2**64-1, a format that is not an AUDIO_FORMATS index
    (0x02) or not 0 (other types), a 0x03 payload or a 0x04 payload that
    is not UTF-8.
    """
    if isinstance(type, bool) or type not in FRAME_TYPES:
        raise ValueError(f"unknown frame type {type!r}")
    uuid = stream_uuid_bytes(stream_id)
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < SEQ_LIMIT:
        raise ValueError(f"seq must be an integer in 0..2**64-1, not {seq!r}")
    if not isinstance(format, int) or isinstance(format, bool):
        raise ValueError(f"unknown audio format {format!r}")
    if type == FRAME_TTS_CHUNK:
        if not 0 <= format < len(AUDIO_FORMATS):
            raise ValueError(f"unknown audio format {format!r}")
    elif format != 0:
        raise ValueError(f"format must be 0 for frame type 0x{type:02x}")
    _check_payload(type, payload, ValueError)
    return _HEADER.pack(type, uuid, seq, format) + payload


def tts_chunk(stream_id: str, seq: int, fmt_name: str, audio: bytes) -> bytes:
    """A 0x02 frame of ``audio`` in format ``pcm``, ``mp3`` or ``wav``."""
    if fmt_name not in AUDIO_FORMATS:
        raise ValueError(f"unknown audio format {fmt_name!r}")
    return build_frame(FRAME_TTS_CHUNK, stream_id, seq, AUDIO_FORMATS.index(fmt_name), audio)


def tts_final(stream_id: str, seq: int) -> bytes:
    """The 0x03 frame that ends a TTS stream."""
    return build_frame(FRAME_TTS_FINAL, stream_id, seq)


def tts_error(stream_id: str, seq: int, message: str) -> bytes:
    """
    A 0x04 frame carrying ``message`` as UTF-8, cut to at most
    MAX_ERROR_BYTES on a character boundary (a lone surrogate becomes ``?``).
    """
    data = message.encode("utf-8", "replace")
    if len(data) > MAX_ERROR_BYTES:
        cut = MAX_ERROR_BYTES
        while data[cut] & 0xC0 == 0x80:  # a continuation byte: not a boundary
            cut -= 1
        data = data[:cut]
    return build_frame(FRAME_TTS_ERROR, stream_id, seq, 0, data)


@attrs.define
class SeqTracker:
    """
    The seq policy of one inbound PCM stream (see the module docstring).

    @ivar last: the last accepted seq, None before the first frame.
    @ivar accepted: frames taken.
    @ivar duplicates: frames dropped for a seq not above ``last``.
    @ivar gaps: accepted frames whose seq jumped by more than one.
    @ivar missing: seqs skipped over by those jumps, in total.
    """

    last: int | None = None
    accepted: int = 0
    duplicates: int = 0
    gaps: int = 0
    missing: int = 0

    def accept(self, seq: int) -> bool:
        """Whether to take the payload of the frame numbered ``seq``."""
        if self.last is not None:
            if seq <= self.last:
                self.duplicates += 1
                return False
            if seq > self.last + 1:
                self.gaps += 1
                self.missing += seq - self.last - 1
        self.last = seq
        self.accepted += 1
        return True
