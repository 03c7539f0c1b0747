"""A bounded thread pool that stops every transfer when one fails."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Cancelled(Exception):
    """Raised inside a worker that noticed the stop event (never escapes run_all)."""


def run_all(fn: Callable[[T, threading.Event], R], items: Sequence[T], jobs: int) -> list[R]:
    """``fn(item, stop)`` for every item on at most *jobs* threads; results in item order.

    The first exception (or Ctrl-C / SIGTERM in the calling thread) sets *stop*,
    which workers check between chunks; queued items do not start; the pool is
    drained before the exception is re-raised, so no thread is left writing.
    """
    stop = threading.Event()
    if not items:
        return []
    pool = cf.ThreadPoolExecutor(max_workers=max(1, min(jobs, len(items))),
                                 thread_name_prefix="lamina-transfer")
    futures = [pool.submit(fn, it, stop) for it in items]
    try:
        cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                exc = f.exception()
                if not isinstance(exc, Cancelled):
                    raise exc  # type: ignore[misc]
        return [f.result() for f in futures]
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
