"""Concurrent requests gathered into one inference call, on a bounded set of inference threads.

Each inference thread takes the oldest waiting request, then keeps gathering others until
the batch holds ``max_batch`` images or ``wait_s`` has passed; it waits only while more
requests are on their way (admitted, still being read or decoded), so a lone client is never
delayed. One call scores the whole batch (the export's batched path runs its core once),
and every request gets its own images' detections back. ``max_batch`` 1 turns gathering off:
each request is its own call, as many at a time as there are threads.

Admission is bounded: beyond ``threads + queue`` requests in the system a request gets 503
at once instead of piling up, and a request waits at most ``timeout_s`` (else 504); a
request that timed out is dropped from the queue before it costs inference time.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from fastapi import HTTPException

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


@dataclass(eq=False)
class Ticket:
    """One admitted request; ``queued`` once its images wait for (or are in) an inference call."""

    queued: bool = False


@dataclass(eq=False)
class _Job(Generic[_Item]):
    items: Sequence[_Item]
    future: Future = field(default_factory=Future)


class Batcher(Generic[_Item, _Result]):
    """Runs ``score(items of several requests)`` on ``threads`` threads; see the module docstring."""

    def __init__(
        self,
        score: Callable[[list[_Item]], list[_Result]],
        *,
        threads: int,
        queue_size: int,
        timeout_s: float,
        max_batch: int = 1,
        wait_s: float = 0.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._score = score
        self._capacity = threads + queue_size
        self._timeout = timeout_s
        self._max_batch = max(1, max_batch)
        self._wait = max(0.0, wait_s)
        self._on_batch = on_batch
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._admitted = 0
        self._arriving = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"inference-{index}", daemon=True)
            for index in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def admit(self) -> Ticket:
        """Count a request in before it is read and decoded; 503 when the server is full."""
        with self._lock:
            if self._admitted >= self._capacity:
                raise HTTPException(
                    503, "the server is busy; retry in a moment", headers={"Retry-After": "1"}
                )
            self._admitted += 1
            self._arriving += 1
        return Ticket()

    def leave(self, ticket: Ticket) -> None:
        """Count a request out (answered, failed or timed out)."""
        with self._lock:
            self._admitted -= 1
            if not ticket.queued:
                self._arriving -= 1

    async def run(self, ticket: Ticket, items: Sequence[_Item], deadline: float) -> list[_Result]:
        """Queue an admitted request's items and wait for their results until ``deadline`` (monotonic)."""
        job: _Job[_Item] = _Job(items)
        with self._lock:
            ticket.queued = True
            self._arriving -= 1
        self._jobs.put(job)
        try:
            remaining = max(0.0, deadline - time.monotonic())
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)), remaining)
        except TimeoutError:
            job.future.cancel()
            raise HTTPException(
                504, f"inference took longer than {self._timeout:g} s; send fewer or smaller images"
            ) from None

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            if not first.future.set_running_or_notify_cancel():
                continue
            batch = [first]
            size = len(first.items)
            deadline = time.monotonic() + self._wait
            while size < self._max_batch:
                job = self._next(deadline)
                if job is None:
                    break
                if not job.future.set_running_or_notify_cancel():
                    continue
                batch.append(job)
                size += len(job.items)
            self._run(batch)

    def _next(self, deadline: float) -> _Job | None:
        """A waiting job: at once if one is queued, else only while others are on their way."""
        try:
            job = self._jobs.get_nowait()
        except queue.Empty:
            with self._lock:
                others_coming = self._arriving > 0
            remaining = deadline - time.monotonic()
            if not others_coming or remaining <= 0:
                return None
            try:
                job = self._jobs.get(timeout=remaining)
            except queue.Empty:
                return None
        if job is None:  # shutting down: leave the sentinel for this thread's next round
            self._jobs.put(None)
        return job

    def _run(self, batch: list[_Job]) -> None:
        items = [item for job in batch for item in job.items]
        started = time.perf_counter()
        try:
            results: list[Any] = self._score(items)
        except BaseException as error:  # each waiting request gets the failure, the thread lives on
            for job in batch:
                job.future.set_exception(error)
            return
        if self._on_batch is not None:
            self._on_batch(len(items), time.perf_counter() - started)
        start = 0
        for job in batch:
            job.future.set_result(results[start : start + len(job.items)])
            start += len(job.items)
