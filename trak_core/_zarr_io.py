"""Waiting for zarr writes still in flight after an interrupted call.

One job. zarr 3 runs its IO on an event loop in a thread of its own (``zarr_io``): a ``KeyboardInterrupt``
(or any exception) raised in the caller's thread while it waits for a write leaves that write running, and on a
slow filesystem it lands later, over what the next call recorded (a checkpoint made complete by a rerun was
rolled back to "nothing written" two seconds after). :func:`settle` waits for every task on that loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys

__all__ = ["settle"]

log = logging.getLogger("trak_core")


async def _drain() -> None:
    current = asyncio.current_task()  # not another thread's _drain: two calls failing at once each waited for the
    pending = [task for task in asyncio.all_tasks()  # other's, and both hung for the whole timeout
               if task is not current and getattr(task.get_coro(), "cr_code", None) is not _drain.__code__]
    if pending:
        await asyncio.wait(pending)


def settle(timeout: float = 60.0) -> None:
    """Return once zarr's IO loop has no write in flight (at most ``timeout`` seconds; then a warning)."""
    module = sys.modules.get("zarr.core.sync")  # not imported: zarr never wrote in this process
    loop = getattr(module, "loop", [None])[0] if module is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return
    future = asyncio.run_coroutine_threadsafe(_drain(), loop)
    try:
        future.result(timeout)
    except (TimeoutError, concurrent.futures.TimeoutError):  # one class from Python 3.11 on, two before
        log.warning("zarr writes of the interrupted call are still running after %.0f s; wait for them to end "
                    "before featurizing into the same store again", timeout)
