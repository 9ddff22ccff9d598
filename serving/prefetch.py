"""Run an iterator one step ahead in a background thread, so reading overlaps inference."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.1


class _End:
    """The producer finished, normally or with ``error``."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


@contextmanager
def prefetched(produce: Callable[[], Iterator[T]], *, depth: int = 1) -> Iterator[Iterator[T]]:
    """Yield an iterator over ``produce()`` whose items are made in a background thread.

    At most ``depth`` finished items wait in the queue, so memory stays bounded. An exception
    in the producer is raised in the consumer. Leaving the block early stops the producer
    after its current item and joins it, so nothing touches the source once the block ends.
    """
    items: queue.Queue[T | _End] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: T | _End) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        iterator = produce()
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as error:
            put(_End(error))
        else:
            put(_End(None))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def consume() -> Iterator[T]:
        while True:
            item = items.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item

    thread = threading.Thread(target=work, name="bsym-prefetch", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()
