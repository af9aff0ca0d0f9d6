"""
The CAR binary frame codec: byte-for-byte vectors for each type, the
frames it refuses and why, fuzzed parsing, round trips both ways, and the
inbound PCM seq policy.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from car_twisted.voice import frames
from car_twisted.voice.frames import (
    FORMAT_MP3,
    FORMAT_PCM,
    FORMAT_WAV,
    FRAME_PCM,
    FRAME_TTS_CHUNK,
    FRAME_TTS_ERROR,
    FRAME_TTS_FINAL,
    HEADER_LEN,
    MAX_ERROR_BYTES,
    Frame,
    FrameError,
    SeqTracker,
    build_frame,
    is_stream_id,
    parse_frame,
    stream_uuid_bytes,
    tts_chunk,
    tts_error,
    tts_final,
)
from car_twisted.voice.model import AUDIO_FORMATS

SID = "00112233445566778899aabbccddeeff"
SID2 = "ffeeddccbbaa99887766554433221100"

FUZZ = settings(max_examples=300, deadline=None)


def hexbytes(*parts):
    return bytes.fromhex("".join(parts))


# type, stream id, seq, format, payload; then the frame written out byte by byte.
VECTORS = [
    pytest.param(
        Frame(FRAME_TTS_CHUNK, SID, 1, FORMAT_WAV, b"RIFF"),
        hexbytes("02", "00112233445566778899aabbccddeeff", "0100000000000000", "02", "52494646"),
        id="tts-chunk-wav",
    ),
    pytest.param(
        Frame(FRAME_TTS_CHUNK, SID2, 0x0100, FORMAT_MP3, b"\xff\xfb\x90\x00"),
        hexbytes("02", "ffeeddccbbaa99887766554433221100", "0001000000000000", "01", "fffb9000"),
        id="tts-chunk-mp3",
    ),
    pytest.param(
        Frame(FRAME_TTS_CHUNK, SID, 7, FORMAT_PCM, b""),
        hexbytes("02", "00112233445566778899aabbccddeeff", "0700000000000000", "00"),
        id="tts-chunk-pcm-empty",
    ),
    pytest.param(
        # samples 1, -1, 32767, -32768 as 16-bit signed LE
        Frame(FRAME_PCM, SID, 2**64 - 1, 0, b"\x01\x00\xff\xff\xff\x7f\x00\x80"),
        hexbytes("01", "00112233445566778899aabbccddeeff", "ffffffffffffffff", "00", "0100ffffff7f0080"),
        id="pcm-max-seq",
    ),
    pytest.param(
        Frame(FRAME_TTS_FINAL, SID2, 0x0102030405060708, 0, b""),
        hexbytes("03", "ffeeddccbbaa99887766554433221100", "0807060504030201", "00"),
        id="tts-final",
    ),
    pytest.param(
        Frame(FRAME_TTS_ERROR, SID, 5, 0, "café ✓".encode()),
        hexbytes("04", "00112233445566778899aabbccddeeff", "0500000000000000", "00", "636166c3a920e29c93"),
        id="tts-error-non-ascii",
    ),
]


@pytest.mark.parametrize(("frame", "data"), VECTORS)
def test_vector_parses(frame, data):
    parsed = parse_frame(data)
    assert parsed == frame
    assert type(parsed.payload) is bytes


@pytest.mark.parametrize(("frame", "data"), VECTORS)
def test_vector_builds(frame, data):
    assert build_frame(frame.type, frame.stream_id, frame.seq, frame.format, frame.payload) == data
    assert frame.encode() == data


def test_convenience_builders_match_vectors():
    assert tts_chunk(SID, 1, "wav", b"RIFF") == VECTORS[0].values[1]
    assert tts_chunk(SID2, 0x0100, "mp3", b"\xff\xfb\x90\x00") == VECTORS[1].values[1]
    assert tts_final(SID2, 0x0102030405060708) == VECTORS[4].values[1]
    assert tts_error(SID, 5, "café ✓") == VECTORS[5].values[1]


def test_constants():
    assert (FRAME_PCM, FRAME_TTS_CHUNK, FRAME_TTS_FINAL, FRAME_TTS_ERROR) == (1, 2, 3, 4)
    assert (FORMAT_PCM, FORMAT_MP3, FORMAT_WAV) == (0, 1, 2)
    assert [AUDIO_FORMATS[f] for f in (FORMAT_PCM, FORMAT_MP3, FORMAT_WAV)] == ["pcm", "mp3", "wav"]
    assert HEADER_LEN == 26


def test_frame_views():
    chunk = parse_frame(VECTORS[0].values[1])
    assert (chunk.format_name, chunk.message) == ("wav", None)
    error = parse_frame(VECTORS[5].values[1])
    assert (error.format_name, error.message) == (None, "café ✓")


def test_parse_accepts_bytearray_and_memoryview():
    data = VECTORS[0].values[1]
    assert parse_frame(bytearray(data)) == parse_frame(memoryview(data)) == parse_frame(data)
    buf = bytearray(data)
    parse_frame(buf)
    buf.extend(b"x")  # the parser let go of the buffer


def header(kind, fmt=0, seq=0, sid=SID):
    return bytes([kind]) + bytes.fromhex(sid) + seq.to_bytes(8, "little") + bytes([fmt])


@pytest.mark.parametrize("kind", [FRAME_PCM, FRAME_TTS_FINAL, FRAME_TTS_ERROR])
def test_format_byte_ignored_on_other_types(kind):
    frame = parse_frame(header(kind, fmt=0x9C))
    assert frame.format == 0
    assert frame.encode() == header(kind)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "frame of 0 bytes is shorter than the 26-byte header"),
        (header(FRAME_PCM)[:25], "frame of 25 bytes is shorter than the 26-byte header"),
        (header(0x00), "unknown frame type 0x00"),
        (header(0x05), "unknown frame type 0x05"),
        (header(0xFF) + b"abc", "unknown frame type 0xff"),
        (header(FRAME_TTS_CHUNK, fmt=3) + b"x", "unknown audio format 0x03"),
        (header(FRAME_TTS_CHUNK, fmt=0xFF), "unknown audio format 0xff"),
        (header(FRAME_TTS_FINAL) + b"oops", "TTS final frame with a 4-byte payload"),
        (header(FRAME_TTS_ERROR) + b"bad \xff", "TTS error message is not UTF-8"),
        (header(FRAME_TTS_ERROR) + "é".encode()[:1], "TTS error message is not UTF-8"),
        (header(FRAME_TTS_ERROR) + "\ud800".encode("utf-8", "surrogatepass"), "TTS error message is not UTF-8"),
        ("not bytes", "frame is not a contiguous byte buffer"),
        (None, "frame is not a contiguous byte buffer"),
        (memoryview(bytes(64))[::2], "frame is not a contiguous byte buffer"),
    ],
)
def test_parse_rejects(data, message):
    with pytest.raises(FrameError) as caught:
        parse_frame(data)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0x05, SID, 0), "unknown frame type 5"),
        ((True, SID, 0), "unknown frame type True"),
        ((FRAME_PCM, SID.upper(), 0), "stream id must be 32 lowercase hex characters"),
        ((FRAME_PCM, SID[:-1], 0), "stream id must be 32 lowercase hex characters"),
        ((FRAME_PCM, "00112233-4455-6677-8899-aabbccddeeff", 0), "stream id must be 32 lowercase hex characters"),
        ((FRAME_PCM, SID, -1), "seq must be an integer in 0..2**64-1, not -1"),
        ((FRAME_PCM, SID, 2**64), f"seq must be an integer in 0..2**64-1, not {2**64}"),
        ((FRAME_PCM, SID, 1.0), "seq must be an integer in 0..2**64-1, not 1.0"),
        ((FRAME_TTS_CHUNK, SID, 0, 3), "unknown audio format 3"),
        ((FRAME_TTS_CHUNK, SID, 0, -1), "unknown audio format -1"),
        ((FRAME_PCM, SID, 0, FORMAT_WAV), "format must be 0 for frame type 0x01"),
        ((FRAME_TTS_FINAL, SID, 0, 0, b"x"), "TTS final frame with a 1-byte payload"),
        ((FRAME_TTS_ERROR, SID, 0, 0, b"\xc3"), "TTS error message is not UTF-8"),
    ],
)
def test_build_rejects(args, message):
    with pytest.raises(ValueError) as caught:
        build_frame(*args)
    assert str(caught.value) == message


def test_tts_chunk_rejects_unknown_format_name():
    with pytest.raises(ValueError, match="unknown audio format 'ogg'"):
        tts_chunk(SID, 0, "ogg", b"")


def test_stream_id_helpers():
    assert is_stream_id(SID)
    assert stream_uuid_bytes(SID) == bytes(range(0, 256, 17))
    for bad in ("", SID + "0", SID.upper(), "g" * 32, " " + SID[1:], SID[:-1] + "\n", None, 12):
        assert not is_stream_id(bad)
    with pytest.raises(ValueError):
        stream_uuid_bytes("xyz")


def test_tts_error_cut_on_a_character_boundary():
    # 4095 ASCII bytes and a 3-byte character: the character does not fit.
    data = tts_error(SID, 0, "a" * 4095 + "✓" + "tail")
    message = parse_frame(data).message
    assert message == "a" * 4095
    # exactly the limit is kept whole
    assert parse_frame(tts_error(SID, 0, "é" * (MAX_ERROR_BYTES // 2))).message == "é" * (MAX_ERROR_BYTES // 2)
    # a lone surrogate cannot be UTF-8: it is replaced, not an exception
    assert parse_frame(tts_error(SID, 0, "bad \ud800")).message == "bad ?"


@given(st.text(max_size=3000))
@FUZZ
def test_tts_error_always_parses_within_the_limit(text):
    frame = parse_frame(tts_error(SID, 0, text * 2))
    encoded = frame.payload
    assert len(encoded) <= MAX_ERROR_BYTES
    assert (text * 2).encode("utf-8", "replace").startswith(encoded)


# --- fuzzing and round trips ---------------------------------------------------------------------------------

stream_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
seqs = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def valid_frames(draw):
    kind = draw(st.sampled_from([FRAME_PCM, FRAME_TTS_CHUNK, FRAME_TTS_FINAL, FRAME_TTS_ERROR]))
    fmt = draw(st.integers(0, len(AUDIO_FORMATS) - 1)) if kind == FRAME_TTS_CHUNK else 0
    if kind == FRAME_TTS_FINAL:
        payload = b""
    elif kind == FRAME_TTS_ERROR:
        payload = draw(st.text(max_size=200)).encode("utf-8", "replace")
    else:
        payload = draw(st.binary(max_size=600))
    return Frame(kind, draw(stream_ids), draw(seqs), fmt, payload)


@st.composite
def frame_like_bytes(draw):
    """Headers with a plausible type and format byte, so the fuzz reaches past the first checks."""
    kind = draw(st.integers(0, 6))
    fmt = draw(st.sampled_from([0, 1, 2, 3, 0xFF]))
    return bytes([kind]) + draw(st.binary(min_size=24, max_size=24)) + bytes([fmt]) + draw(st.binary(max_size=64))


@given(st.one_of(st.binary(max_size=80), frame_like_bytes()))
@FUZZ
def test_parse_raises_only_frame_error(data):
    try:
        frame = parse_frame(data)
    except FrameError:
        return
    assert type(frame.payload) is bytes
    assert len(frame.payload) == len(data) - HEADER_LEN
    assert is_stream_id(frame.stream_id)


@given(valid_frames())
@FUZZ
def test_build_then_parse_round_trips(frame):
    data = build_frame(frame.type, frame.stream_id, frame.seq, frame.format, frame.payload)
    assert len(data) == HEADER_LEN + len(frame.payload)
    assert parse_frame(data) == frame


@given(frame_like_bytes())
@FUZZ
def test_parse_then_build_reproduces_the_bytes(data):
    try:
        frame = parse_frame(data)
    except FrameError:
        return
    if frame.type == FRAME_TTS_CHUNK or data[25] == 0:
        assert frame.encode() == data
    else:
        assert frame.encode() == data[:25] + b"\x00" + data[26:]


@given(valid_frames())
@FUZZ
def test_parse_then_build_of_valid_frames(frame):
    data = frame.encode()
    assert parse_frame(data).encode() == data


# --- SeqTracker ----------------------------------------------------------------------------------------------


def run(tracker, seqs):
    return [tracker.accept(s) for s in seqs]


def test_seq_first_frame_may_start_anywhere():
    tracker = SeqTracker()
    assert run(tracker, [1000, 1001, 1002]) == [True, True, True]
    assert (tracker.last, tracker.accepted, tracker.duplicates, tracker.gaps, tracker.missing) == (1002, 3, 0, 0, 0)


def test_seq_duplicates_and_older_are_dropped():
    tracker = SeqTracker()
    assert run(tracker, [0, 1, 1, 2, 0, 1, 3]) == [True, True, False, True, False, False, True]
    assert (tracker.last, tracker.accepted, tracker.duplicates, tracker.gaps) == (3, 4, 3, 0)


def test_seq_gaps_are_accepted_and_counted():
    tracker = SeqTracker()
    assert run(tracker, [5, 6, 9, 10, 20]) == [True] * 5
    assert (tracker.gaps, tracker.missing, tracker.duplicates) == (2, 2 + 9, 0)
    # a late frame from inside a gap is older than the last: dropped
    assert tracker.accept(8) is False
    assert (tracker.duplicates, tracker.last) == (1, 20)


def test_seq_does_not_wrap():
    tracker = SeqTracker()
    assert run(tracker, [2**64 - 1, 0]) == [True, False]
    assert tracker.duplicates == 1


@given(st.lists(seqs, max_size=50))
@FUZZ
def test_seq_accepted_are_strictly_increasing(values):
    tracker = SeqTracker()
    taken = [s for s in values if tracker.accept(s)]
    assert taken == sorted(set(taken))
    assert tracker.accepted + tracker.duplicates == len(values)
    assert tracker.accepted == len(taken)


def test_module_exports():
    assert set(frames.__all__) <= set(dir(frames))
