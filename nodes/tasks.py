"""Stopping the background tasks a component owns: cancel, then await, so none leaks."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

__all__ = ["cancel_all"]


async def cancel_all(tasks: Iterable[asyncio.Task[object] | None]) -> None:
    """Cancel every task given (``None`` skipped) and wait until each has ended.

    Whatever a task raised while it ended (its cancellation included) is swallowed: the
    owner is shutting down, and a task that failed earlier has logged its failure.
    """
    live = [t for t in tasks if t is not None]
    for task in live:
        task.cancel()
    await asyncio.gather(*live, return_exceptions=True)
