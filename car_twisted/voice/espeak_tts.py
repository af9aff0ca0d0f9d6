"""
Offline speech output with the ``espeak-ng`` program.

``speak`` runs ``espeak-ng --stdout --stdin -b 1 [-v VOICE]`` under the
reactor's process machinery: the text goes in on stdin (never in argv, so
a text starting with ``-`` is spoken, not parsed as an option) and the WAV
it writes to stdout is handed to ``on_chunk`` as it arrives, coalesced to
at least ``CHUNK_BYTES`` (the last chunk may be shorter).

The WAV header
--------------
Writing to a pipe, espeak-ng cannot know the length of its audio when it
writes the header, so the RIFF and ``data`` sizes it writes are
placeholders: ``0x7FFFF024`` and ``0x7FFFF000`` (1.51), the "length
unknown" values sox itself writes to pipes.  No streamed header can carry
the true length; a reader has to read the data chunk up to the end of the
file.  The stdlib ``wave`` module does that (``readframes`` stops at the
end of the data; only ``getnframes()`` reports the placeholder), and sox
reads it as a stream of unknown length without a warning.  Other
placeholders behave worse: a size of 0 makes ``wave`` read no audio at all,
and ``0xFFFFFFFF`` makes sox warn of a premature end of file.  So the
header is checked (``RIFF``, ``WAVE``, a ``data`` chunk within its first
``MAX_HEADER_BYTES``) and its two sizes are always set to the sox/espeak-ng
values above, whatever the installed espeak-ng wrote; output that is not a
WAV stream fails the synthesis.  The header leaves in the first chunk, so
nothing waits for the end.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
from collections.abc import Callable
from typing import cast

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from car_twisted.interfaces import ISpeaker
from car_twisted.voice.model import VoiceUnavailable

__all__ = [
    "CHUNK_BYTES",
    "EspeakSpeaker",
    "KILL_GRACE_SECS",
    "MAX_OUTPUT_BYTES",
    "MAX_TEXT_BYTES",
    "SpeechFailed",
    "VOICE_PATTERN",
]

#: The program, looked up on PATH when no path is given.
EXECUTABLE = "espeak-ng"
#: Voice names passed to ``-v``: a letter or digit, then letters, digits,
#: ``_``, ``+`` and ``-`` (``en-us``, ``en-us+f3``, ``mb-en1``).
VOICE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-]{0,63}")
#: The most text (UTF-8 bytes) one call speaks.
MAX_TEXT_BYTES = 64 * 1024
#: The most audio one call may produce; past it the process is killed.
MAX_OUTPUT_BYTES = 64 * 1024 * 1024
#: Chunks handed to ``on_chunk`` are at least this long, except the last.
CHUNK_BYTES = 8 * 1024
#: After SIGTERM, how long before SIGKILL.
KILL_GRACE_SECS = 2.0
#: The ``data`` chunk must start within this many bytes of the output.
MAX_HEADER_BYTES = 4096
#: How much of espeak-ng's stderr a failure quotes.
STDERR_TAIL_BYTES = 2048
#: The "length unknown" data size written into the header (see the module docstring).
UNKNOWN_DATA_SIZE = 0x7FFFF000

_NOT_FOUND = "espeak-ng not found on PATH (apt-get install espeak-ng)"
# Environment variables the child keeps (nothing else of the daemon's
# environment, which may hold tokens, reaches it).
_CHILD_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "ESPEAK_DATA_PATH")


class SpeechFailed(Exception):
    """espeak-ng failed, or its output was refused; the message says why."""


class _HeaderError(Exception):
    pass


def _data_offset(head: bytes) -> int | None:
    """
    Where the ``data`` chunk's size field is in C{head} (the output so far),
    or None if more output is needed to tell.

    @raise _HeaderError: C{head} does not begin a WAV stream.
    """
    if len(head) >= 4 and head[:4] != b"RIFF":
        raise _HeaderError("espeak-ng's output is not a WAV stream (no RIFF header)")
    if len(head) >= 12 and head[8:12] != b"WAVE":
        raise _HeaderError("espeak-ng's output is not a WAV stream (no WAVE form)")
    offset = 12
    while len(head) >= offset + 8:
        chunk_id = head[offset : offset + 4]
        if chunk_id == b"data":
            return offset + 4
        (size,) = struct.unpack_from("<I", head, offset + 4)
        offset += 8 + size + (size & 1)
        if offset > MAX_HEADER_BYTES:
            break
    if offset + 8 > MAX_HEADER_BYTES:
        raise _HeaderError(f"espeak-ng's output has no data chunk in its first {MAX_HEADER_BYTES} bytes")
    return None


def _block_align(head: bytes) -> int:
    """The fmt chunk's block alignment (bytes per frame), 1 if it cannot be read."""
    offset = 12
    while len(head) >= offset + 8:
        chunk_id = head[offset : offset + 4]
        (size,) = struct.unpack_from("<I", head, offset + 4)
        if chunk_id == b"fmt " and size >= 14 and len(head) >= offset + 8 + 14:
            (align,) = struct.unpack_from("<H", head, offset + 8 + 12)
            return max(1, int(align))
        if chunk_id == b"data":
            break
        offset += 8 + size + (size & 1)
    return 1


class _Synthesis(ProcessProtocol):
    """One ``espeak-ng`` run: feeds the text, streams the WAV, reports the end."""

    transport: IProcessTransport | None

    def __init__(
        self,
        clock: IReactorTime,
        text: bytes,
        on_chunk: Callable[[bytes], None],
        max_output: int,
        kill_grace: float,
    ) -> None:
        self.clock = clock
        self.text = text
        self.on_chunk = on_chunk
        self.max_output = max_output
        self.kill_grace = kill_grace
        self.deferred: Deferred[None] = Deferred(self._cancel)
        self.done = False  # the Deferred has fired or been cancelled: no more chunks
        self.ended = False  # the process has exited
        self._buffer = bytearray()
        self._payload_start: int | None = None  # where audio begins, once the header is checked
        self._align = 1
        self._delivered = 0
        self._received = 0
        self._stderr = bytearray()
        self._kill_timer: IDelayedCall | None = None

    # -- the process -------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.text)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if self.done:
            return
        self._received += len(data)
        if self._received > self.max_output:
            self._stop(SpeechFailed(f"espeak-ng produced more than {self.max_output} bytes of audio; stopped"))
            return
        self._buffer += data
        if self._payload_start is None and not self._check_header():
            return
        if len(self._buffer) >= CHUNK_BYTES:
            # Whole frames only (a trailing partial frame waits for the next chunk).
            audio = len(self._buffer) - (self._payload_start or 0)
            self._deliver(len(self._buffer) - audio % self._align)

    def errReceived(self, data: bytes) -> None:
        self._stderr += data
        del self._stderr[:-STDERR_TAIL_BYTES]

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        if self._kill_timer is not None and self._kill_timer.active():
            self._kill_timer.cancel()
        self._kill_timer = None
        if self.done:
            return
        if not reason.check(ProcessDone):
            self._finish(SpeechFailed(self._describe_exit(reason)))
            return
        if self._payload_start is None and not self._check_header(final=True):
            return
        if self._deliver(len(self._buffer)):
            self._finish(None)

    # -- helpers ------------------------------------------------------------------

    def _check_header(self, final: bool = False) -> bool:
        """Check and patch the header once it is all here; False while waiting (or failed)."""
        try:
            size_at = _data_offset(bytes(self._buffer[:MAX_HEADER_BYTES]))
        except _HeaderError as e:
            self._stop(SpeechFailed(str(e)))
            return False
        if size_at is None or len(self._buffer) < size_at + 4:
            if final:
                self._finish(SpeechFailed("espeak-ng exited without writing a WAV header" + self._stderr_note()))
            return False
        payload = size_at + 4
        struct.pack_into("<I", self._buffer, 4, UNKNOWN_DATA_SIZE + payload - 8)
        struct.pack_into("<I", self._buffer, size_at, UNKNOWN_DATA_SIZE)
        self._payload_start = payload
        self._align = _block_align(bytes(self._buffer[:payload]))
        return True

    def _deliver(self, count: int) -> bool:
        """Hand the first C{count} buffered bytes to C{on_chunk}; False if that failed."""
        if count <= 0:
            return True
        chunk = bytes(self._buffer[:count])
        del self._buffer[:count]
        if self._payload_start is not None:
            self._payload_start = max(0, self._payload_start - count)
        self._delivered += len(chunk)
        try:
            self.on_chunk(chunk)
        except Exception as e:
            self._stop(e)
            return False
        return True

    def _describe_exit(self, reason: Failure) -> str:
        value = reason.value
        if isinstance(value, ProcessTerminated) and value.signal is not None:
            how = f"was killed by signal {value.signal}"
        else:
            how = f"exited with status {getattr(value, 'exitCode', None)}"
        return f"espeak-ng {how}" + self._stderr_note()

    def _stderr_note(self) -> str:
        tail = bytes(self._stderr).decode("utf-8", "replace").strip()
        return f": {tail}" if tail else ""

    def _finish(self, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        self._buffer.clear()
        if error is None:
            self.deferred.callback(None)
        else:
            self.deferred.errback(Failure(error))

    def _stop(self, error: BaseException) -> None:
        """Fail now and kill the process."""
        self._finish(error)
        self.kill()

    def _cancel(self, _: Deferred[None]) -> None:
        # Deferred.cancel fails the Deferred with CancelledError after this.
        self.done = True
        self._buffer.clear()
        self.kill()

    def kill(self) -> None:
        """SIGTERM now, SIGKILL if it is still running after the grace period."""
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess("TERM")
        except ProcessExitedAlready:
            return
        if self._kill_timer is None:
            self._kill_timer = self.clock.callLater(self.kill_grace, self._kill_hard)

    def _kill_hard(self) -> None:
        self._kill_timer = None
        if self.ended or self.transport is None:
            return
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass


@implementer(ISpeaker)
class EspeakSpeaker:
    """
    Text to speech with ``espeak-ng`` (WAV, 22050 Hz mono 16-bit with its
    default voices).

    @param reactor: spawns the process and times the kill; must provide
        ``IReactorProcess`` and ``IReactorTime``.
    @param executable: the program's path; by default ``espeak-ng`` is
        looked up on ``PATH`` at each call.
    """

    name = "espeak-ng"
    description = "Offline speech synthesis (espeak-ng, WAV)"
    audio_format = "wav"

    def __init__(
        self,
        reactor: IReactorTime,
        executable: str | None = None,
        *,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
        kill_grace: float = KILL_GRACE_SECS,
    ) -> None:
        self.reactor = reactor
        self.executable = executable
        self.max_output_bytes = max_output_bytes
        self.kill_grace = kill_grace

    def _program(self) -> str | None:
        """The executable to run, or None if there is none."""
        if self.executable is None:
            return shutil.which(EXECUTABLE)
        path = self.executable
        if os.sep not in path:
            return shutil.which(path)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None

    def unavailable(self) -> str | None:
        if not IReactorProcess.providedBy(self.reactor):
            return "this reactor cannot run processes"
        if self._program() is None:
            if self.executable is None:
                return _NOT_FOUND
            return f"{self.executable} is not an executable program (apt-get install espeak-ng)"
        return None

    def speak(self, text: str, voice: str | None, on_chunk: Callable[[bytes], None]) -> Deferred[None]:
        # A NUL would end espeak-ng's reading of the text early.
        data = text.replace("\0", " ").encode("utf-8", "replace")
        if len(data) > MAX_TEXT_BYTES:
            return fail(ValueError(f"text is {len(data)} bytes of UTF-8; at most {MAX_TEXT_BYTES} are spoken at once"))
        if voice is not None and VOICE_PATTERN.fullmatch(voice) is None:
            return fail(ValueError(f"invalid voice name {voice!r} (letters, digits, '_', '+', '-'; at most 64)"))
        why = self.unavailable()
        program = self._program()
        if why is not None or program is None:
            return fail(VoiceUnavailable(why or _NOT_FOUND))
        argv = [program, "--stdout", "--stdin", "-b", "1"]
        if voice is not None:
            argv += ["-v", voice]
        env = {key: os.environ[key] for key in _CHILD_ENV if key in os.environ}
        synthesis = _Synthesis(self.reactor, data, on_chunk, self.max_output_bytes, self.kill_grace)
        try:
            cast(IReactorProcess, self.reactor).spawnProcess(synthesis, program, argv, env=env)
        except OSError as e:
            return fail(SpeechFailed(f"cannot run {program}: {e}"))
        return synthesis.deferred
