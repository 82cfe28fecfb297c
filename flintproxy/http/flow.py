"""Flow control of one connection, both directions: the one home of the mechanism.

Modelled on uvicorn's ``protocols/http/flow_control.py``. Reading pauses when what a
peer sent piles up faster than it is consumed, and resumes once it has been taken;
writing waits (``drain``) while the transport's buffer is above its high-water mark.

A writer that waits forever is how a client that stops reading holds a stream, its
upstream connection and its reservation: ``stalled`` tells how long writing has been
paused, so that one sweep a second (the server's) can cut such a connection instead
of a timer per write.
"""

from __future__ import annotations

import asyncio

__all__ = ["FlowControl"]


class FlowControl:
    """Read pause/resume and write drain for one transport."""

    __slots__ = ("_transport", "_waiter", "closed", "paused_at", "read_paused",
                 "write_paused")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._waiter: asyncio.Future[None] | None = None
        self.read_paused = False
        self.write_paused = False
        self.paused_at = 0.0  # loop time writing last paused
        self.closed = False

    # -- reading ------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self._transport.resume_reading()

    # -- writing (the asyncio.Protocol callbacks delegate here) -------------------

    def pause_writing(self, now: float) -> None:
        self.write_paused = True
        self.paused_at = now

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    def connection_lost(self) -> None:
        self.closed = True
        self._wake()

    def stalled(self, now: float, limit_s: float) -> bool:
        """Writing has been paused (the peer reads nothing) for longer than ``limit_s``."""
        return self.write_paused and now - self.paused_at > limit_s

    async def drain(self) -> None:
        """Return once the peer has read enough; ConnectionResetError once it has gone."""
        if self.closed:
            raise ConnectionResetError("the peer closed the connection")
        if not self.write_paused:
            return
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter  # one writer per connection: it alone awaits this
        if self.closed:
            raise ConnectionResetError("the peer closed the connection")

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
