"""
Per-agent stdout / stderr capture with a size bound, and the backward
``tail`` that ``agents.tail_log`` serves.

Each stream goes to ``$CAR_HOME/logs/agents/<id>.<stream>.log``; when a
file passes ``max_bytes`` it is rotated to ``.1`` (replacing the previous
one), so a child that floods its output costs at most twice the bound on
disk.  ``tail`` reads at most ``TAIL_CEILING_BYTES`` from the end of a
file with one backward seek: it never loads a large log, and callers run
it off the reactor thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs

from car_twisted.private_files import ensure_private_dir, open_private

__all__ = ["AgentLog", "StreamTail", "tail", "TAIL_CEILING_BYTES", "DEFAULT_MAX_LOG_BYTES"]

TAIL_CEILING_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_LOG_BYTES = 16 * 1024 * 1024


class AgentLog:
    """Appends one stream of one agent; opened per child run."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_LOG_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        ensure_private_dir(path.parent)
        self._fd: int | None = None
        self._size = 0

    def _open(self) -> int:
        if self._fd is None:
            self._fd = open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def write(self, data: bytes) -> None:
        fd = self._open()
        if self._size + len(data) > self.max_bytes and self._size > 0:
            self.rotate()
            fd = self._open()
        os.write(fd, data)
        self._size += len(data)

    def rotate(self) -> None:
        self.close()
        os.replace(self.path, self.path.with_name(self.path.name + ".1"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@attrs.frozen
class StreamTail:
    lines: tuple[str, ...]
    total: int
    more: bool


def tail(path: Path, n: int, offset: int, ceiling: int = TAIL_CEILING_BYTES) -> StreamTail:
    """
    The window of C{n} lines (all when 0) ending C{offset} lines before the
    end of C{path}, read from at most C{ceiling} trailing bytes.
    """
    try:
        with os.fdopen(open_private(path, os.O_RDONLY), "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - ceiling)
            f.seek(start)
            data = f.read(size - start)
    except FileNotFoundError:
        return StreamTail((), 0, False)
    truncated = start > 0
    lines = data.decode("utf-8", "replace").splitlines()
    if truncated and lines:
        lines = lines[1:]  # the first line was cut by the ceiling
    total = len(lines)
    end = max(0, total - offset)
    begin = 0 if n == 0 else max(0, end - n)
    return StreamTail(tuple(lines[begin:end]), total, truncated or begin > 0)


def tail_streams(paths: dict[str, Path], streams: tuple[str, ...], n: int, offset: int) -> dict[str, object]:
    """The ``agents.tail_log`` result for the C{streams} asked for."""
    lines: list[str] = []
    more = False
    out: dict[str, object] = {"lines": lines, "stdout": [], "stderr": [], "more": more}
    for name in ("stdout", "stderr"):
        path = paths[name]
        out[f"{name}_path"] = str(path)
        if name in streams:
            t = tail(path, n, offset)
            out[name] = list(t.lines)
            out[f"{name}_total"] = t.total
            more = more or t.more
            lines.extend(t.lines)
        else:
            out[f"{name}_total"] = 0
    out["more"] = more
    return out
