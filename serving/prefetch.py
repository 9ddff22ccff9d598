"""Run an iterator ahead in a background thread, so reading overlaps inference."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.1


class _End:
    """The producer finished, normally or with ``error``."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Prefetched(Generic[T]):
    """The items a background producer made, in order; :attr:`producing` says whether the
    producer is at work now, so the consumer can leave it a core."""

    def __init__(self, items: queue.Queue[T | _End], finished: threading.Event) -> None:
        self._items = items
        self._finished = finished

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        item = self._items.get()
        if isinstance(item, _End):
            self._finished.set()
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    @property
    def producing(self) -> bool:
        """Whether the producer is making an item now: it has not finished and is not
        waiting for room in the queue."""
        return not self._finished.is_set() and not self._items.full()


@contextmanager
def prefetched(produce: Callable[[], Iterator[T]], *, depth: int = 1) -> Iterator[Prefetched[T]]:
    """Yield an iterator over ``produce()`` whose items are made in a background thread.

    At most ``depth`` finished items wait in the queue, so memory stays bounded. An exception
    in the producer is raised in the consumer. Leaving the block early stops the producer
    after its current item and joins it, so nothing touches the source once the block ends.
    """
    items: queue.Queue[T | _End] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    finished = threading.Event()

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
            finished.set()
            put(_End(error))
        else:
            finished.set()
            put(_End(None))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="bsym-prefetch", daemon=True)
    thread.start()
    try:
        yield Prefetched(items, finished)
    finally:
        stop.set()
        thread.join()
