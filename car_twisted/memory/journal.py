"""
A memory graph's files: the snapshot ``<name>.json`` and its journals
``<name>.json.journal-<n>``.

The snapshot holds the whole graph and the number of the first journal
that follows it (``"journal": n``).  Each change after it is a line in
journal ``n`` or later (``put`` a fact's whole state, ``del`` an id,
``utility``, ``reset``), appended and flushed before the change is
acknowledged.  Loading reads the snapshot, then the journals from ``n``
on, in order; a torn last line (a crash mid-append) is skipped.
Compaction writes a new snapshot naming a new journal number, then
removes the journals before it, so a crash at any point leaves files that
load to the same graph.  All of this blocks: callers run it off the
reactor thread.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from car_twisted.json_value import JsonValue
from car_twisted.private_files import open_private, read_private

__all__ = ["JournalRead", "append", "journal_path", "journals", "open_for_append", "read_journals", "remove_before", "write_all"]

MAX_JOURNAL_BYTES = 1024 * 1024 * 1024
_MARK = ".journal-"


def journal_path(snapshot: Path, n: int) -> Path:
    return snapshot.with_name(f"{snapshot.name}{_MARK}{n}")


def journals(snapshot: Path) -> list[tuple[int, Path]]:
    """The journals beside C{snapshot}, by number."""
    prefix = snapshot.name + _MARK
    try:
        names = os.listdir(snapshot.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            found.append((int(name[len(prefix) :]), snapshot.parent / name))
    return sorted(found)


class JournalRead:
    """What the journals from one number on hold."""

    def __init__(self) -> None:
        self.entries: list[JsonValue] = []
        self.bad_lines = 0
        self.torn = 0
        self.last = 0


def read_journals(snapshot: Path, first: int) -> JournalRead:
    out = JournalRead()
    for n, path in journals(snapshot):
        out.last = max(out.last, n)
        if n < first:
            continue
        raw = read_private(path, MAX_JOURNAL_BYTES)
        lines = raw.split(b"\n")
        if lines and lines[-1] != b"":
            out.torn += 1  # no newline at the end: the append a crash cut short
            lines = lines[:-1]
        for line in lines:
            if not line:
                continue
            try:
                out.entries.append(json.loads(line))
            except ValueError:
                out.bad_lines += 1
    return out


def open_for_append(path: Path) -> int:
    """A descriptor appending to C{path}, 0600, not following symlinks."""
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, data: bytes, fsync: bool) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    if fsync:
        os.fsync(fd)


def append(path: Path, data: bytes, fsync: bool) -> None:
    """Append C{data} (whole lines) to C{path}, 0600, not following symlinks."""
    fd = open_for_append(path)
    try:
        write_all(fd, data, fsync)
    finally:
        os.close(fd)


def remove_before(snapshot: Path, first: int) -> None:
    """Remove the journals a newer snapshot includes."""
    for n, path in journals(snapshot):
        if n < first:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
