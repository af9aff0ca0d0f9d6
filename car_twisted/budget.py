"""
``ByteBudget``: a byte count with a ceiling, optionally inside a larger one.

A connection's stored state draws on its own budget, which draws on the
daemon's; a reservation succeeds only if every level has room, so one
connection cannot take more than its share nor all connections more than
the daemon's.
"""

from __future__ import annotations

from car_twisted.errors import RpcError

__all__ = ["ByteBudget", "BudgetExceeded"]


class BudgetExceeded(RpcError):
    """A write that would pass a byte budget; nothing was stored."""

    def __init__(self, what: str, limit: int, wanted: int) -> None:
        super().__init__(
            f"{what} is full: {wanted} more bytes would pass its limit of {limit} bytes",
            data={"reason": "byte_budget", "what": what, "limit": limit},
        )


class ByteBudget:
    """
    @ivar what: names the budget in errors ("connection state").
    @ivar limit: the ceiling in bytes.
    @ivar used: bytes reserved now.
    """

    def __init__(self, what: str, limit: int, parent: ByteBudget | None = None) -> None:
        self.what = what
        self.limit = limit
        self.parent = parent
        self.used = 0

    def __repr__(self) -> str:
        return f"<ByteBudget {self.what} {self.used}/{self.limit}>"

    def reserve(self, n: int) -> None:
        """
        Take C{n} bytes here and in every enclosing budget, or none at all.

        @raise BudgetExceeded: naming the first budget without room.
        """
        level: ByteBudget | None = self
        while level is not None:
            if level.used + n > level.limit:
                raise BudgetExceeded(level.what, level.limit, n)
            level = level.parent
        level = self
        while level is not None:
            level.used += n
            level = level.parent

    def retake(self, n: int) -> None:
        """Count C{n} bytes at every level without a check: only for bytes just released (an undo)."""
        level: ByteBudget | None = self
        while level is not None:
            level.used += n
            level = level.parent

    def release(self, n: int) -> None:
        """Give back C{n} bytes (never below zero)."""
        level: ByteBudget | None = self
        while level is not None:
            level.used = max(0, level.used - n)
            level = level.parent
