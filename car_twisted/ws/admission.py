"""
``Admission``: the connections that have not authenticated yet.

From TCP accept until ``session.auth`` succeeds a connection is a guest:
it gets a short deadline, small messages, and one of a few guest slots,
in all and per peer address.  When the slots are full the oldest guest is
dropped to make room, so a flood of silent sockets can delay a real
client by at most the moment it takes that client to authenticate, never
lock it out; and guests never count against the authenticated
connections.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Admission"]

# A guest is any hashable handle on its connection (the protocol itself).
Guest = Hashable


class Admission:
    """
    @ivar max_total: guests in all.
    @ivar max_per_peer: guests per peer address.
    @ivar deadline: seconds from accept to authenticate.
    @ivar evicted: guests dropped to make room (for operators and tests).
    @ivar expired: guests dropped at their deadline.
    """

    _log = Logger()

    def __init__(self, clock: IReactorTime, max_total: int, max_per_peer: int, deadline: float) -> None:
        self.clock = clock
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self.deadline = deadline
        self.evicted = 0
        self.expired = 0
        # Oldest first, in all and per peer; values are (peer, timer, drop).
        self._guests: OrderedDict[Guest, tuple[str, IDelayedCall, Callable[[], None]]] = OrderedDict()
        self._by_peer: dict[str, OrderedDict[Guest, None]] = {}

    def __len__(self) -> int:
        return len(self._guests)

    def guests_of(self, peer: str) -> int:
        return len(self._by_peer.get(peer, ()))

    def admit(self, conn: Guest, peer: str, expire: Callable[[], None], drop: Callable[[], None]) -> None:
        """
        Take C{conn} as a guest from C{peer}, making room first.

        @param expire: called at the deadline (the connection then closes).
        @param drop: called to evict the connection when room is needed.
        """
        same_peer = self._by_peer.get(peer)
        if same_peer is not None and len(same_peer) >= self.max_per_peer:
            self._evict(next(iter(same_peer)))
        elif len(self._guests) >= self.max_total:
            self._evict(next(iter(self._guests)))
        timer = self.clock.callLater(self.deadline, self._expire, conn, expire)
        self._guests[conn] = (peer, timer, drop)
        self._by_peer.setdefault(peer, OrderedDict())[conn] = None

    def authenticated(self, conn: Guest) -> None:
        """C{conn} is a guest no more."""
        self._forget(conn)

    def gone(self, conn: Guest) -> None:
        """C{conn} disconnected."""
        self._forget(conn)

    def _forget(self, conn: Guest) -> tuple[str, IDelayedCall, Callable[[], None]] | None:
        entry = self._guests.pop(conn, None)
        if entry is None:
            return None
        peer, timer, _ = entry
        if timer.active():
            timer.cancel()
        same_peer = self._by_peer[peer]
        del same_peer[conn]
        if not same_peer:
            del self._by_peer[peer]
        return entry

    def _evict(self, conn: Guest) -> None:
        entry = self._forget(conn)
        if entry is None:
            return
        self.evicted += 1
        self._log.debug("unauthenticated connection from {peer} dropped to make room", peer=entry[0])
        entry[2]()

    def _expire(self, conn: Guest, expire: Callable[[], None]) -> None:
        if self._forget(conn) is not None:
            self.expired += 1
            expire()
