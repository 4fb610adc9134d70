"""Where tasks run: a dask.distributed Client for every scheduler spec, plus progress reporting.

`threads` (default) is an in-process cluster of threads; `processes:N` a LocalCluster of N
single-threaded worker processes; `tcp://HOST:PORT` or a scheduler file an existing cluster.
One futures-based code path serves all of them, so they produce the same bytes by construction.
Tasks return only numpy arrays and ints, and read with plain positional reads so worker RSS
stays honest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import click

from .errors import UsageError, short

log = logging.getLogger("dppa_stream")

FAN_IN = 8
DASK_LOGS = False  # show distributed's own log lines (the CLI's -vv)


def trim_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: thousands of freed
    256 KiB histograms fragment the heap and inflate the resident size for the rest of the run)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class SchedulerSpec:
    kind: str  # threads | processes | address | file
    workers: int = 0
    address: str = ""

    @classmethod
    def parse(cls, spec: str | None, scheduler_file: str | None = None) -> "SchedulerSpec":
        if scheduler_file:
            return cls("file", address=scheduler_file)
        spec = (spec or "threads").strip()
        if spec == "threads" or spec.startswith("threads:"):
            n = spec.partition(":")[2]
            return cls("threads", _count(n, spec) if n else (os.cpu_count() or 1))
        if spec.startswith("processes"):
            n = spec.partition(":")[2]
            return cls("processes", _count(n, spec) if n else (os.cpu_count() or 1))
        if spec.startswith(("tcp://", "tls://", "inproc://", "ws://", "wss://")):
            return cls("address", address=check_address(spec, "--scheduler"))
        raise UsageError(
            f"--scheduler {short(spec)}: use 'threads', 'threads:N', 'processes:N' or a scheduler address like tcp://HOST:8786"
        )


def check_address(address: str, what: str) -> str:
    """A scheduler address must name a host and a port (tcp://HOST:PORT, tcp://[::1]:PORT):
    distributed turns a malformed one into a 40 s hang and a traceback at exit."""
    if address.startswith("inproc://"):
        return address
    try:
        parts = urlsplit(address)
        ok = bool(parts.hostname) and parts.port is not None and 0 < parts.port < 65536 and parts.path in ("", "/")
    except ValueError:  # "[::1" (no closing bracket), a port that is not a number
        ok = False
    if not ok or not address.isprintable() or " " in address:
        raise UsageError(f"{what} {short(address)}: not a scheduler address like tcp://HOST:8786 or tcp://[::1]:8786")
    return address


def _address_from_file(path: str) -> str:
    """The scheduler address in a Dask scheduler file (read here: distributed would wait forever
    for a file that does not exist)."""
    import json

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block us
    except FileNotFoundError:
        raise UsageError(f"--scheduler-file {path}: no such file (start the scheduler with --scheduler-file first)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"--scheduler-file {path}: cannot open ({getattr(e, 'strerror', None) or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            raise UsageError(f"--scheduler-file {path}: not a Dask scheduler file (not a small regular file)")
        address = json.loads(os.pread(fd, st.st_size, 0).decode("utf-8"))["address"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UsageError(f"--scheduler-file {path}: not a Dask scheduler file ({type(e).__name__})") from None
    finally:
        os.close(fd)
    if not isinstance(address, str):
        raise UsageError(f"--scheduler-file {path}: 'address' is not a string")
    return check_address(address, f"--scheduler-file {path}: address")


@contextlib.contextmanager
def sigint_ignored():
    """Ignore Ctrl-C while a cluster starts or stops. Worker processes started meanwhile inherit
    "ignored" (the only signal state that survives their start), so later a Ctrl-C reaches only
    this process: no worker tracebacks, and no half-started cluster for atexit to trip over. The
    price: a Ctrl-C during these few seconds is dropped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def _connect(address: str):
    """A Client of an existing scheduler. If connecting fails, the half-made client is marked
    closed: its destructor would otherwise wait 40 s and print a traceback at exit."""
    from distributed import Client

    made = []

    class _Client(Client):
        def start(self, **kwargs):
            made.append(self)
            return super().start(**kwargs)

    try:
        return _Client(address, timeout="20s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        for c in made:
            c.status = "closed"
            with contextlib.suppress(Exception):
                c._loop_runner.stop()
        raise UsageError(f"cannot reach the Dask scheduler at {address}: {short(str(e), 200)}") from None


MAX_WORKERS = 1024  # threads or processes on one machine; more is a typo (and would exhaust it)


def _count(n: str, spec: str) -> int:
    if not (n.isascii() and n.isdigit()) or len(n) > 6 or not 1 <= int(n) <= MAX_WORKERS:
        raise UsageError(f"--scheduler {short(spec)}: the worker count must be an integer from 1 to {MAX_WORKERS}")
    return int(n)


@dataclass
class Progress:
    """Counts bytes through a click progress bar (ETA, MB/s); silent when quiet or not a TTY."""

    quiet: bool = False

    @contextlib.contextmanager
    def phase(self, label: str, total: int):
        show = not self.quiet and sys.stderr.isatty()
        t0 = time.perf_counter()
        done = [0]

        def rate(_):
            dt = time.perf_counter() - t0
            return f"{done[0] / dt / 1e6:7.0f} MB/s" if dt > 0 else ""

        if show:
            with click.progressbar(length=max(total, 1), label=f"{label:<8}", show_eta=True, show_percent=True,
                                   item_show_func=rate, file=sys.stderr) as bar:
                def step(n):
                    done[0] += n
                    bar.update(n, done[0])

                yield step
        else:  # not a terminal (or --quiet): no bar; -v logs each phase's size and speed instead

            def step(n):
                done[0] += n

            yield step
        dt = time.perf_counter() - t0
        log.info("%s: %.0f MB in %.2fs (%.0f MB/s)", label, total / 1e6, dt, total / 1e6 / max(dt, 1e-9))


class Executor:
    """Submits tasks to a Dask cluster and gathers results with progress."""

    def __init__(self, spec: SchedulerSpec, worker_memory: int):
        import distributed  # noqa: F401 - first: importing it configures its loggers, which we then quiet

        self.spec = spec
        self._cluster = None
        self.client = None
        if not DASK_LOGS:  # our own errors reach the user as one line; distributed's copies are noise
            logging.getLogger("distributed").setLevel(logging.CRITICAL + 1)
        try:
            with sigint_ignored():
                self._start(spec, worker_memory)
        except BaseException:
            self.close()
            raise

    def _start(self, spec: SchedulerSpec, worker_memory: int) -> None:
        from distributed import Client, LocalCluster

        if spec.kind == "threads":
            self._cluster = LocalCluster(n_workers=1, threads_per_worker=spec.workers, processes=False,
                                         dashboard_address="127.0.0.1:0",
                                         worker_dashboard_address="127.0.0.1:0", memory_limit=0)
            self.client = Client(self._cluster, set_as_default=False)
        elif spec.kind == "processes":
            self._cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                         dashboard_address="127.0.0.1:0",
                                         worker_dashboard_address="127.0.0.1:0", memory_limit=worker_memory,
                                         silence_logs=logging.INFO if DASK_LOGS else logging.CRITICAL + 1)
            self.client = Client(self._cluster, set_as_default=False)
        else:
            address = _address_from_file(spec.address) if spec.kind == "file" else spec.address
            self.client = _connect(address)

    @property
    def worker_count(self) -> int:
        if self.spec.kind in ("threads", "processes"):
            return self.spec.workers
        info = self.client.scheduler_info()["workers"]
        return max(1, sum(w.get("nthreads", 1) for w in info.values()))

    def share(self, obj):
        """Send an object every task uses (the method and its plan) to the workers once; pass the
        returned future in task arguments instead of the object, which would be pickled per task."""
        return self.client.scatter(obj, broadcast=True, hash=False)

    def map(self, fn, calls: list[tuple], sizes: list[int], step, on_done=None) -> list:
        """Run fn(*args) for each call; returns results in call order."""
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, pure=False) for args in calls]
        index = {f.key: i for i, f in enumerate(futures)}
        results = [None] * len(futures)
        for fut in as_completed(futures, loop=self.client.loop):
            i = index[fut.key]
            results[i] = fut.result()
            step(sizes[i])
            if on_done:
                on_done(i, results[i])
            fut.release()
        return results

    def map_reduce(self, fn, calls: list[tuple], sizes: list[int], groups: list, combine, step) -> dict:
        """Run the calls, tree-combine results that share a group on the workers, return group -> result."""
        from distributed import as_completed

        futures = [self.client.submit(fn, *args, pure=False) for args in calls]
        by_group: dict = {}
        for f, g in zip(futures, groups):
            by_group.setdefault(g, []).append(f)
        roots = {}
        for g, parts in by_group.items():
            while len(parts) > 1:
                parts = [self.client.submit(combine, *parts[i:i + FAN_IN], pure=False) if len(parts[i:i + FAN_IN]) > 1
                         else parts[i] for i in range(0, len(parts), FAN_IN)]
            roots[g] = parts[0]
        index = {f.key: i for i, f in enumerate(futures)}
        root_keys = {f.key for f in roots.values()}
        for fut in as_completed(futures, loop=self.client.loop):
            step(sizes[index[fut.key]])
            if fut.key not in root_keys:
                fut.release()  # the combine tasks hold what they still need
        futures.clear()
        out = {g: f.result() for g, f in roots.items()}
        roots.clear()
        self.trim()
        return out

    def trim(self) -> None:
        """malloc_trim on every worker and here."""
        with contextlib.suppress(Exception):
            self.client.run(trim_memory)
        trim_memory()

    def close(self) -> None:
        with sigint_ignored():  # a second Ctrl-C must not leave workers behind (or tracebacks)
            if self.client is not None:
                with contextlib.suppress(Exception):
                    self.client.close()
            if self._cluster is not None:
                with contextlib.suppress(Exception):
                    self._cluster.close()
