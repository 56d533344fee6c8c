"""LoopInbox: a pass's events for every running request reach the event loop with one wake-up,
each stream's events in order."""

from __future__ import annotations

import asyncio
import threading

from service.api.servicer import LoopInbox


class CountingLoop:
    """The loop as LoopInbox uses it, counting the wake-ups asked of it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.wakeups = 0

    def call_soon_threadsafe(self, callback, *args):
        self.wakeups += 1
        return self.loop.call_soon_threadsafe(callback, *args)


def test_a_burst_of_events_wakes_the_loop_once_and_keeps_each_streams_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        counting = CountingLoop(loop)
        inbox = LoopInbox(counting)  # type: ignore[arg-type]
        queues = [asyncio.Queue() for _ in range(4)]

        def deliver(start: int) -> None:  # a pass's events for four requests, from another thread
            for i in range(start, start + 25):
                for q, queue in enumerate(queues):
                    inbox.put(queue, (q, i))

        thread = threading.Thread(target=deliver, args=(0,))
        thread.start()
        thread.join()
        assert counting.wakeups == 1
        loop.run_until_complete(asyncio.sleep(0))
        for q, queue in enumerate(queues):
            assert [queue.get_nowait() for _ in range(queue.qsize())] == [(q, i) for i in range(25)]
        deliver(25)  # the next burst, after the loop drained the first
        assert counting.wakeups == 2
        loop.run_until_complete(asyncio.sleep(0))
        assert all(queue.qsize() == 25 for queue in queues)
    finally:
        loop.close()
