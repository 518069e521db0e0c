"""The serving batcher: requests gathered into one call, bounded admission, timeouts, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi import HTTPException

from visionautoml.deploy.batching import Batcher


class Recorder:
    """A scoring function that notes the size of each call (the batcher's only input)."""

    def __init__(self, release: threading.Event | None = None) -> None:
        self.calls: list[list[int]] = []
        self.release = release

    def __call__(self, items: list[int]) -> list[int]:
        if self.release is not None:
            self.release.wait(10)
        self.calls.append(list(items))
        return [item * 10 for item in items]


async def _requests(batcher: Batcher, requests: list[list[int]], timeout: float = 10) -> list:
    tickets = [batcher.admit() for _ in requests]
    deadline = time.monotonic() + timeout

    async def one(ticket, items):
        try:
            return await batcher.run(ticket, items, deadline)
        finally:
            batcher.leave(ticket)

    return await asyncio.gather(*(one(t, items) for t, items in zip(tickets, requests, strict=True)))


@pytest.mark.parametrize(
    ("max_batch", "expected_calls"),
    [(8, [[1, 2, 3, 4]]), (1, [[1], [2, 3], [4]]), (3, [[1, 2, 3], [4]])],
)
def test_requests_on_their_way_are_gathered_up_to_the_batch_size(max_batch, expected_calls):
    score = Recorder()
    batcher = Batcher(score, threads=1, queue_size=8, timeout_s=10, max_batch=max_batch, wait_s=2.0)
    answers = asyncio.run(_requests(batcher, [[1], [2, 3], [4]]))
    batcher.shutdown()
    assert answers == [[10], [20, 30], [40]]  # each request gets its own items' results, in order
    assert score.calls == expected_calls  # a request is never split, even beyond the batch size


def test_a_lone_request_does_not_wait_for_the_window():
    score = Recorder()
    batcher = Batcher(score, threads=1, queue_size=4, timeout_s=10, max_batch=8, wait_s=5.0)
    started = time.monotonic()
    assert asyncio.run(_requests(batcher, [[7]])) == [[70]]
    assert time.monotonic() - started < 2.5
    batcher.shutdown()


def test_admission_is_bounded_and_a_late_request_times_out_without_being_scored():
    release = threading.Event()
    score = Recorder(release)
    batcher = Batcher(score, threads=1, queue_size=1, timeout_s=0.3, max_batch=1)

    async def scenario() -> None:
        first, second = batcher.admit(), batcher.admit()
        with pytest.raises(HTTPException) as busy:
            batcher.admit()
        assert busy.value.status_code == 503 and busy.value.headers == {"Retry-After": "1"}
        deadline = time.monotonic() + 0.3
        running = asyncio.ensure_future(batcher.run(first, [1], deadline))
        await asyncio.sleep(0.05)
        with pytest.raises(HTTPException) as late:
            await batcher.run(second, [2], deadline)
        assert late.value.status_code == 504 and "longer than 0.3 s" in late.value.detail
        with pytest.raises(HTTPException):
            await running
        batcher.leave(first)
        batcher.leave(second)
        release.set()
        third = batcher.admit()
        assert await batcher.run(third, [3], time.monotonic() + 10) == [30]
        batcher.leave(third)

    asyncio.run(scenario())
    batcher.shutdown()
    assert [1] in score.calls and [3] in score.calls
    assert [2] not in score.calls  # it timed out while queued: dropped before any inference


def test_a_failing_call_fails_its_requests_and_the_thread_scores_on():
    state = {"fail": True}

    def score(items: list[int]) -> list[int]:
        if state.pop("fail", False):
            raise RuntimeError("model exploded")
        return items

    batcher = Batcher(score, threads=1, queue_size=4, timeout_s=5, max_batch=4, wait_s=0.5)
    with pytest.raises(RuntimeError, match="model exploded"):
        asyncio.run(_requests(batcher, [[1], [2]]))
    assert asyncio.run(_requests(batcher, [[5]])) == [[5]]
    batcher.shutdown()
