"""Background loops (heartbeats, sweeps, refreshes) that stop between rounds.

Cancelling a task in the middle of a database call can leave its pooled connection
checked out; SQLAlchemy then reports it, with a traceback, when the garbage collector
finds it at exit. So a loop pauses through `Pauses.pause`, which returns False once a
stop is asked, and `stop` waits for the round in progress; only a round that outlasts
`grace` seconds is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib


class Pauses:
    def __init__(self) -> None:
        self._stopping = asyncio.Event()

    async def pause(self, seconds: float) -> bool:
        """Sleep `seconds`; False (at once) when the loop is to end."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    async def stop(self, task: asyncio.Task[None] | None, grace: float = 5.0) -> None:
        """End the loop running as `task` at its next pause; ready for another start after."""
        self._stopping.set()
        try:
            if task is not None:
                await _finish(task, grace)
        finally:
            self._stopping = asyncio.Event()


async def _finish(task: asyncio.Task[None], grace: float) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(task), grace)
    except TimeoutError:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    except asyncio.CancelledError:
        if not task.done():  # our caller was cancelled, not the loop
            raise
