"""Memory: the default budget, and the peak anonymous memory of our process tree.

We report anonymous memory (RssAnon) summed over this process and its children, sampled every
50 ms. VmRSS/VmHWM would count mapped and page-cache file pages, which are reclaimable and say
nothing about what the merge needs.
"""

from __future__ import annotations

import threading
import time

import psutil

DEFAULT_FRACTION = 0.5


def default_budget() -> int:
    """Half of the memory available now."""
    return int(psutil.virtual_memory().available * DEFAULT_FRACTION)


def rss_anon(pid: int) -> int:
    """Anonymous resident memory of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_anon_bytes(pid: int | None = None) -> int:
    proc = psutil.Process(pid)
    return sum(rss_anon(p) for p in [proc.pid] + [c.pid for c in proc.children(recursive=True)])


class PeakSampler:
    """Background thread recording the peak RssAnon of the process tree every 50 ms.

    Listing child processes scans all of /proc, so the list is refreshed once a second only."""

    def __init__(self, interval: float = 0.05, rescan: float = 1.0):
        self.interval, self.rescan = interval, rescan
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        pids, scanned = [me.pid], 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - scanned > self.rescan:
                try:
                    pids = [me.pid] + [c.pid for c in me.children(recursive=True)]
                except psutil.Error:
                    pass
                scanned = now
            self.peak = max(self.peak, sum(rss_anon(p) for p in pids))
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_anon_bytes())
