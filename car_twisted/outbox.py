"""
``Outbox``: notifications for one connection that must never wait on it.

Host events, run traces and A2UI events are fanned out to many
subscribers; a subscriber that does not read must neither hold the others
up nor make the daemon buffer without limit.  An outbox sends a frame at
once while the connection's output flows, queues it while the output is
backed up (bounded in bytes), and past the bound drops it and counts the
drop, so the subscriber can be told it missed something (a gap event, a
cursor jump).  The owner drains it when the connection's output resumes.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from car_twisted.stats import DaemonStats
    from car_twisted.ws.channel import WsChannel

__all__ = ["Outbox"]


class Outbox:
    """
    @param hold_after_drop: once a frame was dropped, drop the ones after
        it too until the backlog drains (the subscriber then gets one gap
        notice and a consistent stream after it), instead of letting later
        frames in as room frees up.
    """

    def __init__(
        self, channel: WsChannel, limit_bytes: int, hold_after_drop: bool = False, stats: DaemonStats | None = None
    ) -> None:
        self.channel = channel
        self.stats = stats
        self.limit_bytes = limit_bytes
        self.hold_after_drop = hold_after_drop
        self.backlog: collections.deque[bytes] = collections.deque()
        self.backlog_bytes = 0
        self.dropped = 0

    def push(self, frame: bytes) -> bool:
        """Send or queue C{frame}; False if it was dropped."""
        holding = self.hold_after_drop and self.dropped
        if self.channel.paused or self.backlog or holding:
            if holding or self.backlog_bytes + len(frame) > self.limit_bytes:
                self.dropped += 1
                if self.stats is not None:
                    self.stats.subscriber_drops += 1
                return False
            self.backlog.append(frame)
            self.backlog_bytes += len(frame)
            return True
        self.channel.send(frame)
        return True

    def drain(self) -> int:
        """
        Send what is queued while the output flows.

        @return: the frames dropped since the last report, once the backlog
            has drained and the output still flows (then counted from 0
            again); else 0.
        """
        channel = self.channel
        while self.backlog and not channel.paused:
            frame = self.backlog.popleft()
            self.backlog_bytes -= len(frame)
            channel.send(frame)
        if self.backlog or channel.paused or not self.dropped:
            return 0
        dropped, self.dropped = self.dropped, 0
        return dropped
