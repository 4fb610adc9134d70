"""Executors take their calls lazily: a merge's plans are made per work unit as pass 2 runs, so only
the calls of running (or, on a cluster, a few queued) tasks exist at any time."""

from __future__ import annotations

import threading
import time

import pytest

from dppa_stream.executor import SchedulerSpec, ThreadsExecutor


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_threads_map_takes_each_call_when_its_task_starts(workers):
    n = 40
    made, done = [], []
    lock = threading.Lock()
    ahead = []  # calls made but not finished, seen as each call is made

    def calls():
        for i in range(n):
            with lock:
                made.append(i)
                ahead.append(len(made) - len(done))
            yield (i,)

    def task(i):
        time.sleep(0.002)
        with lock:
            done.append(i)
        return i * i

    got, steps = {}, []
    ex = ThreadsExecutor(SchedulerSpec("threads", workers))
    try:
        ex.map(task, calls(), [10 + i for i in range(n)], steps.append, lambda i, r: got.__setitem__(i, r))
    finally:
        ex.close()
    assert got == {i: i * i for i in range(n)}  # every call ran once and its result went to its index
    assert sorted(steps) == [10 + i for i in range(n)]
    assert max(ahead) <= workers  # never more calls made than tasks running


def test_threads_map_still_takes_a_list():
    ex = ThreadsExecutor(SchedulerSpec("threads", 2))
    got = {}
    try:
        ex.map(lambda a, b: a + b, [(1, 2), (3, 4)], [1, 1], lambda n: None, got.__setitem__)
    finally:
        ex.close()
    assert got == {0: 3, 1: 7}
