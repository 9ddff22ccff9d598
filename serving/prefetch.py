"""Run an iterator ahead in a background thread, so reading overlaps inference."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.1
BUSY_CPU_SHARE = 0.25
"""The share of a core the producer must have used lately to count as at work."""
_SAMPLE_SECONDS = 0.02


class _End:
    """The producer finished, normally or with ``error``."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class Prefetched(Generic[T]):
    """The items a background producer made, in order; :attr:`producing` says whether the
    producer is at work on a CPU now, so the consumer can leave it a core."""

    def __init__(
        self, items: queue.Queue[T | _End], finished: threading.Event, thread: threading.Thread
    ) -> None:
        self._items = items
        self._finished = finished
        self._ended = False
        self._cpu_clock = _thread_cpu_clock(thread)
        started = None if self._cpu_clock is None else _clock_seconds(self._cpu_clock)
        self._sample = (time.perf_counter(), started or 0.0)
        self._working = True

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        if self._ended:
            raise StopIteration
        item = self._items.get()
        if isinstance(item, _End):
            self._ended = True
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    @property
    def producing(self) -> bool:
        """Whether the producer is making an item on a CPU now: it has not finished, is not
        waiting for room in the queue, and used at least :data:`BUSY_CPU_SHARE` of a core
        lately (a reader waiting on a remote file needs no core). Where its CPU time cannot
        be read, a producer that is neither finished nor waiting for room counts as at work."""
        if self._finished.is_set() or self._items.full():
            return False
        if self._cpu_clock is None:
            return True
        now = time.perf_counter()
        then, cpu_then = self._sample
        if now - then >= _SAMPLE_SECONDS:
            cpu = _clock_seconds(self._cpu_clock)
            self._working = cpu is not None and (cpu - cpu_then) / (now - then) >= BUSY_CPU_SHARE
            self._sample = (now, cpu_then if cpu is None else cpu)
        return self._working


def _clock_seconds(clock: int) -> float | None:
    """The time of ``clock``; ``None`` once its thread has ended."""
    try:
        return time.clock_gettime(clock)
    except OSError:
        return None


def _thread_cpu_clock(thread: threading.Thread) -> int | None:
    getcpuclockid = getattr(time, "pthread_getcpuclockid", None)  # POSIX only
    if getcpuclockid is None or thread.ident is None:
        return None
    try:
        return int(getcpuclockid(thread.ident))
    except OSError:
        return None


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
        yield Prefetched(items, finished, thread)
    finally:
        stop.set()
        thread.join()
