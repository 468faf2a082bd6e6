"""asyncio support for ``gpuio.Future``.

``await fut`` runs :func:`await_future`: it registers a done-callback on the gpu-io future, which gpu-io
calls on its own thread when the I/O completes; the callback wakes the event loop with
``loop.call_soon_threadsafe``. No polling, and the loop is never blocked. Cancelling the awaiting
task cancels the I/O.
"""

from __future__ import annotations

import asyncio
from typing import Any


async def await_future(fut: Any) -> Any:
    """Waits for a ``gpuio.Future`` from asyncio and returns its result (or raises its error)."""
    if fut.done():
        return fut.result()
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def _wake(_f: Any) -> None:
        def _set() -> None:
            if not waiter.done():
                waiter.set_result(None)

        try:
            loop.call_soon_threadsafe(_set)
        except RuntimeError:
            pass  # the loop was closed meanwhile: nobody is waiting any more

    fut.add_done_callback(_wake)
    try:
        await waiter
    except asyncio.CancelledError:
        fut.cancel()
        raise
    return fut.result()
