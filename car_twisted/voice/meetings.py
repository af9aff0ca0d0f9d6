"""
Meetings on disk: ``<root>/.car/meetings/<id>/``.

``meeting.json`` holds the metadata (id, title, started_at, ended_at,
status, audio, segment count, summary), replaced atomically (temp +
rename, 0600) when it changes; ``transcript.jsonl`` gets one line per
finished segment, appended and flushed before the segment's event goes
out, so a crash loses at most the segment being written and a torn last
line is skipped on reading.  All file work runs off the reactor thread,
one write at a time per meeting, in order.

The summary is extractive (no model): the transcript's segments scored by
how many of the meeting's frequent content words they hold, the best few
kept in their spoken order.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from car_twisted._util import off_reactor
from car_twisted.auth import write_secret_file
from car_twisted.json_value import JsonValue
from car_twisted.private_files import FileTooLarge, ensure_private_dir, open_private, read_private
from car_twisted.rpc.envelope import dumps

__all__ = ["MeetingFiles", "MEETING_ID", "summarize", "meetings_dir"]

MEETING_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_MEETINGS_LISTED = 1000
MAX_TRANSCRIPT_BYTES = 64 * 1024 * 1024
MAX_META_BYTES = 1024 * 1024
SUMMARY_SENTENCES = 3
_WORD = re.compile(r"[a-z0-9']+")
_STOP = frozenset(
    "a an and are as at be but by for from has have he her his i if in is it its me my of on or our she so that the "
    "their them then there they this to uh um was we were what when which who will with you your yeah okay ok".split()
)
_log = Logger()


def meetings_dir(root: Path) -> Path:
    return root / ".car" / "meetings"


def summarize(texts: list[str], sentences: int = SUMMARY_SENTENCES) -> str:
    """The best C{sentences} segments by shared frequent words, in spoken order."""
    words = [[w for w in _WORD.findall(t.lower()) if w not in _STOP and len(w) > 1] for t in texts]
    counts = Counter(w for ws in words for w in set(ws))
    if not counts:
        return " ".join(t for t in texts[:sentences] if t)
    scored = sorted(
        range(len(texts)),
        key=lambda i: (-sum(counts[w] for w in set(words[i])) / (1 + len(words[i])) ** 0.5, i),
    )
    keep = sorted(i for i in scored[:sentences] if texts[i].strip())
    return " ".join(texts[i].strip() for i in keep)


class MeetingFiles:
    """One meeting's directory, written in order off the reactor thread."""

    def __init__(self, reactor: IReactorTime, directory: Path) -> None:
        self.reactor = reactor
        self.directory = directory
        self._lock = DeferredLock()

    def _run(self, fn: Callable[[], None]) -> Deferred[None]:
        return self._lock.run(off_reactor, self.reactor, fn)

    def write_meta(self, meta: dict[str, JsonValue]) -> Deferred[None]:
        body = dumps(meta).decode()

        def write() -> None:
            ensure_private_dir(self.directory)
            write_secret_file(self.directory / "meeting.json", body)

        return self._run(write)

    def append_segment(self, record: dict[str, JsonValue]) -> Deferred[None]:
        line = dumps(record) + b"\n"

        def append() -> None:
            ensure_private_dir(self.directory)
            fd = open_private(self.directory / "transcript.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

        return self._run(append)


def read_meeting(directory: Path) -> dict[str, JsonValue] | None:
    """Metadata and segments of the meeting in C{directory} (blocking), or None."""
    try:
        meta = json.loads(read_private(directory / "meeting.json", MAX_META_BYTES))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, FileTooLarge):
        return {"id": directory.name, "status": "unreadable"}
    if not isinstance(meta, dict):
        return {"id": directory.name, "status": "unreadable"}
    segments: list[JsonValue] = []
    try:
        raw = read_private(directory / "transcript.jsonl", MAX_TRANSCRIPT_BYTES)
    except FileNotFoundError:
        raw = b""
    except FileTooLarge:
        raw = b""
        meta["transcript_truncated"] = True
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line: the segment being written when the daemon stopped
        if isinstance(record, dict):
            segments.append(record)
    meta["transcript"] = segments
    meta["text"] = " ".join(str(s.get("text", "")) for s in segments if isinstance(s, dict) and s.get("text"))
    return meta


def list_meetings(root: Path) -> list[dict[str, JsonValue]]:
    """Every meeting's metadata under C{root}, newest first (blocking, bounded)."""
    base = meetings_dir(root)
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not MEETING_ID.match(name) or os.path.islink(base / name):
            continue
        meeting = read_meeting(base / name)
        if meeting is not None:
            meeting.pop("transcript", None)
            meeting.pop("text", None)
            found.append(meeting)
        if len(found) >= MAX_MEETINGS_LISTED:
            break
    found.sort(key=lambda m: str(m.get("started_at", "")), reverse=True)
    return found
