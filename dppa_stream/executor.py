"""Where tasks run: Dask's local threaded scheduler for `threads`, a dask.distributed Client for
everything else, plus progress reporting.

`threads` (default) runs the task graph with `dask.threaded` on a pool of our own: no event loop,
no scheduler thread competing with the workers for the GIL (measured on 2 cores: an in-process
distributed cluster cost 2.4 ms of CPU per task and left the worker threads idle half the time).
`processes:N` is a LocalCluster of N single-threaded worker processes; `tcp://HOST:PORT` or a
scheduler file an existing cluster. Both executors run the same tasks, one per work unit, and hand
each result to the caller as it arrives (never keeping them all: a DPPA pass over an MoE model
returns statistics of tens of thousands of tensors), so every scheduler produces the same bytes.
Tasks return only numpy arrays and ints, and read with plain positional reads so worker RSS
stays honest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import urlsplit

from .errors import InputError, OutputError, UsageError, short

log = logging.getLogger("dppa_stream")


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
    """A Client of an existing scheduler, waited for as long as Dask's own connect timeout says
    (`distributed.comm.timeouts.connect`: 30 s unless set, e.g. DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=2m
    for a cluster still starting). If connecting fails, the half-made client is marked closed: its
    destructor would otherwise wait 40 s and print a traceback at exit."""
    import dask
    from distributed import Client

    made = []

    class _Client(Client):
        def start(self, **kwargs):
            made.append(self)
            return super().start(**kwargs)

    try:
        return _Client(address, timeout=dask.config.get("distributed.comm.timeouts.connect"), set_as_default=False)
    except (OSError, TimeoutError, ValueError) as e:
        for c in made:
            c.status = "closed"
            with contextlib.suppress(Exception):
                c._loop_runner.stop()
        raise UsageError(f"cannot reach the Dask scheduler at {address}: {short(str(e), 200)}") from None


AHEAD = 8  # tasks per worker thread a cluster is given ahead of those finished (calls made lazily)

MAX_WORKERS = 1024  # threads or processes on one machine; more is a typo (and would exhaust it)


def _count(n: str, spec: str) -> int:
    if not (n.isascii() and n.isdigit()) or len(n) > 6 or not 1 <= int(n) <= MAX_WORKERS:
        raise UsageError(f"--scheduler {short(spec)}: the worker count must be an integer from 1 to {MAX_WORKERS}")
    return int(n)


@dataclass
class Progress:
    """Counts each phase's bytes and logs its size and speed (-v). `bar`, when given (the CLI's
    progress bar), is called as `bar(label, total_bytes)` and returns a context manager that
    yields `update(n)`, called with each task's bytes as it finishes."""

    bar: Callable[[str, int], contextlib.AbstractContextManager] | None = None

    @contextlib.contextmanager
    def phase(self, label: str, total: int):
        t0 = time.perf_counter()
        with self.bar(label, total) if self.bar is not None else contextlib.nullcontext() as update:
            yield update or (lambda n: None)
        dt = time.perf_counter() - t0
        log.info("%s: %.0f MB in %.2fs (%.0f MB/s)", label, total / 1e6, dt, total / 1e6 / max(dt, 1e-9))


def make_executor(spec: SchedulerSpec, worker_memory: int, dask_logs: bool = False):
    """The executor for a scheduler spec: local threads, or a distributed cluster (`dask_logs`:
    show distributed's own log lines, the CLI's -vv)."""
    return ThreadsExecutor(spec) if spec.kind == "threads" else Executor(spec, worker_memory, dask_logs)


def worker_sees(files: list[tuple[str, int, int]], folder: str | None, versions: tuple) -> tuple[str, str] | None:
    """Run on every worker before a cluster merge starts: the first thing it sees differently from
    the client, as (kind, problem) with kind "usage", "input" or "output"; None when all agree.
    `files`: (path, size, mtime_ns) of every input file as the client catalogued it; `folder`: the
    output's parent, which tasks write into; `versions`: the client's dppa-stream and numba."""
    import numba

    from . import __version__

    if (__version__, numba.__version__) != versions:
        return "usage", (f"runs dppa-stream {__version__} with numba {numba.__version__}, the client "
                         f"{versions[0]} with numba {versions[1]}; use one environment everywhere")
    for path, size, mtime in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            st = os.fstat(fd)
            os.close(fd)
        except OSError as e:
            return "input", f"cannot read {path} ({e.strerror})"
        if (st.st_size, st.st_mtime_ns) != (size, mtime):
            return "input", f"sees another file at {path} (its size or modification time differs from the client's)"
    if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
        return "output", f"cannot write into {folder}"
    return None


class _Call:
    """A task body that Dask must not look into: its arguments are values, never graph keys."""

    __slots__ = ("fn", "args")

    def __init__(self, fn, args: tuple):
        self.fn, self.args = fn, args

    def __call__(self):
        return self.fn(*self.args)


class ThreadsExecutor:
    """`threads`: the task graph on Dask's local threaded scheduler, in this process. Progress and
    the manifest are updated from the scheduler's post-task callback, in the calling thread."""

    def __init__(self, spec: SchedulerSpec):
        from concurrent.futures import ThreadPoolExecutor

        self.spec = spec
        self.pool = ThreadPoolExecutor(spec.workers, thread_name_prefix="dppa-stream-worker")

    @property
    def worker_count(self) -> int:
        return self.spec.workers

    def share(self, obj):
        return obj  # one process: tasks use the object itself

    def check_workers(self, files: list[tuple[str, int, int]], folder: str | None) -> None:
        """Nothing to check: the tasks run in this process."""

    def _get(self, dsk: dict, keys: list, on_task) -> None:
        from dask.threaded import get

        def posttask(key, result, _dsk, _state, _worker):
            on_task(key, result)

        get(dsk, keys, pool=self.pool, num_workers=self.spec.workers, callbacks=[(None, None, None, posttask, None)])

    def map(self, fn, calls: Iterable[tuple], sizes: list[int], step, on_done=None) -> None:
        """Run fn(*args) for each call (`sizes[i]`: call i's bytes); `on_done(i, result)` in this
        thread as each finishes. `calls` may be a generator: each task takes the next call from it
        when it starts, so only the running tasks' arguments exist (a merge's plans are made per
        work unit, just before it runs)."""
        parked: dict[object, tuple] = {}
        pending = enumerate(calls)
        lock = threading.Lock()

        def run(key):  # the result goes to the callback beside Dask, which would keep it to the end
            with lock:
                i, args = next(pending)
            parked[key] = i, fn(*args)

        def finished(key, _none):
            i, result = parked.pop(key)
            step(sizes[i])
            if on_done:
                on_done(i, result)

        self._get({("unit", k): (_Call(run, (("unit", k),)),) for k in range(len(sizes))},
                  [("unit", k) for k in range(len(sizes))], finished)

    def trim(self) -> None:
        trim_memory()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Executor:
    """`processes:N` and clusters: submits tasks to dask.distributed and gathers results with progress."""

    def __init__(self, spec: SchedulerSpec, worker_memory: int, dask_logs: bool = False):
        import distributed  # noqa: F401 - first: importing it configures its loggers, which we then quiet

        self.spec = spec
        self._cluster = None
        self.client = None
        if not dask_logs:  # our own errors reach the user as one line; distributed's copies are noise
            logging.getLogger("distributed").setLevel(logging.CRITICAL + 1)
        try:
            with sigint_ignored():
                self._start(spec, worker_memory, dask_logs)
        except BaseException:
            self.close()
            raise

    def _start(self, spec: SchedulerSpec, worker_memory: int, dask_logs: bool) -> None:
        from distributed import Client, LocalCluster

        if spec.kind == "processes":
            self._cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                         dashboard_address="127.0.0.1:0",
                                         worker_dashboard_address="127.0.0.1:0", memory_limit=worker_memory,
                                         silence_logs=logging.INFO if dask_logs else logging.CRITICAL + 1)
            self.client = Client(self._cluster, set_as_default=False)
        else:
            address = _address_from_file(spec.address) if spec.kind == "file" else spec.address
            self.client = _connect(address)

    @property
    def worker_count(self) -> int:
        if self.spec.kind == "processes":
            return self.spec.workers
        info = self.client.scheduler_info()["workers"]
        return max(1, sum(w.get("nthreads", 1) for w in info.values()))

    def share(self, obj):
        """Send an object every task uses (the method and its plan) to the workers once; pass the
        returned future in task arguments instead of the object, which would be pickled per task."""
        return self.client.scatter(obj, broadcast=True, hash=False)

    def check_workers(self, files: list[tuple[str, int, int]], folder: str | None) -> None:
        """Before any task: every worker runs our code in the client's versions, reads every input
        file as the client catalogued it and can write into the output's folder. A cluster whose
        workers do not share the client's filesystem fails here, in one line naming a worker and
        a path, instead of in the middle of a pass."""
        import numba

        from . import __version__

        try:
            answers = self.client.run(worker_sees, files, folder, (__version__, numba.__version__))
        except Exception as e:  # noqa: BLE001 - e.g. dppa_stream not importable on a worker
            raise UsageError(f"the Dask workers cannot run dppa-stream ({short(f'{type(e).__name__}: {e}', 160)}); "
                             "install the same dppa-stream, numba and numpy on every worker") from None
        errors = {"usage": UsageError, "input": InputError, "output": OutputError}
        for worker, answer in sorted(answers.items()):
            if answer is not None:
                kind, problem = answer
                where = "" if kind == "usage" else "; every worker must see the inputs and the output folder at the " \
                                                    "same paths (a shared filesystem)"
                raise errors[kind](f"Dask worker {worker} {problem}{where}")

    def map(self, fn, calls: Iterable[tuple], sizes: list[int], step, on_done=None) -> None:
        """Run fn(*args) for each call (`sizes[i]`: call i's bytes); `on_done(i, result)` in this
        thread as each finishes. A list of calls is submitted at once; of a generator's (a merge's,
        whose plans are made per work unit), `AHEAD` per worker thread beyond those finished."""
        from distributed import as_completed

        pending = enumerate(calls)
        index: dict = {}

        def submit() -> object | None:
            for i, args in pending:
                fut = self.client.submit(fn, *args, pure=False)
                index[fut.key] = i
                return fut
            return None

        ahead = len(sizes) if isinstance(calls, (list, tuple)) else AHEAD * self.worker_count
        first = [f for f in (submit() for _ in range(ahead)) if f is not None]
        waiting = as_completed(first, loop=self.client.loop)
        first.clear()
        for fut in waiting:
            i = index.pop(fut.key)
            result = fut.result()
            fut.release()
            nxt = submit()
            if nxt is not None:
                waiting.add(nxt)
            step(sizes[i])
            if on_done:
                on_done(i, result)

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
