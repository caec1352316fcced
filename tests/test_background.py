"""Background loops stop between rounds, never in the middle of one (gateway.background)."""

from __future__ import annotations

import asyncio

from gateway.background import Pauses


async def test_stop_waits_for_the_round_in_progress() -> None:
    pauses, rounds, finished = Pauses(), [], []

    async def loop() -> None:
        while True:
            rounds.append(1)
            await asyncio.sleep(0.2)  # a round of work, e.g. a database call
            finished.append(1)
            if not await pauses.pause(60):
                return

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)  # in the middle of the first round
    await pauses.stop(task)
    assert task.done() and not task.cancelled()
    assert rounds == finished == [1]


async def test_a_round_that_outlasts_the_grace_is_cancelled() -> None:
    pauses = Pauses()

    async def stuck() -> None:
        await asyncio.sleep(60)

    task = asyncio.create_task(stuck())
    await asyncio.sleep(0)
    await pauses.stop(task, grace=0.1)
    assert task.cancelled()


async def test_pauses_can_be_used_again_after_a_stop() -> None:
    pauses = Pauses()
    await pauses.stop(None)
    started = asyncio.get_running_loop().time()
    assert await pauses.pause(0.05) is True
    assert asyncio.get_running_loop().time() - started >= 0.04
