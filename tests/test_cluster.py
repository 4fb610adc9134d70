"""Merges on a real dask.distributed cluster: a `dask scheduler` and two `dask worker` processes on
loopback, started the way a cluster user would start them.

The output must not depend on where tasks ran: the CLI with `--scheduler tcp://...`, with
`--scheduler-file` and with the default in-process threads must write byte-identical files, and so
must a merge during which a worker is SIGKILLed (its tasks re-run elsewhere; writes are positional
and idempotent). An unreachable scheduler is a one-line usage error, not a hang.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from dppa_stream.config import load_config
from dppa_stream.errors import InputError, OutputError
from dppa_stream.pipeline import MergeOptions, merge
from dppa_stream.synthetic import LlamaShape, write_llama_set

SMALL = LlamaShape(hidden=40, intermediate=72, layers=3, vocab=97)
BIG = LlamaShape(hidden=256, intermediate=688, layers=6, vocab=2048)  # ~190 work units at 200 kB
FAULT_UNIT_BYTES = 200_000
CLI_TIMEOUT = 120  # a hang fails the test instead of stalling the suite


# --------------------------------------------------------------------------- cluster processes

class Cluster:
    """A scheduler and N workers as subprocesses, each in its own process group (the worker's
    nanny and its spawned worker process share that group)."""

    def __init__(self, root: str, workers: int = 2):
        self.root = root
        self.n_workers = workers
        self.scheduler_file = os.path.join(root, "scheduler.json")
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs = []
        self.address = ""
        self.client = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self.root, f"{name}.log"), "wb")
        self._logs.append(log)
        p = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=self.root, start_new_session=True)
        self.procs[name] = p
        return p

    def log_tail(self, name: str, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            with open(os.path.join(self.root, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        return ""

    def start(self) -> None:
        from distributed import Client

        loopback = ["--dashboard-address", "127.0.0.1:0", "--no-dashboard"]
        sched = self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                          "--scheduler-file", self.scheduler_file, *loopback])
        # distributed's Client(scheduler_file=...) would wait forever for a file that never comes
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                with open(self.scheduler_file) as f:
                    self.address = json.load(f)["address"]
                break
            if sched.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start:\n{self.log_tail('scheduler')}")
            time.sleep(0.1)
        assert self.address.startswith("tcp://127.0.0.1:"), self.address
        for i in range(1, self.n_workers + 1):
            local = os.path.join(self.root, f"worker-{i}-tmp")
            os.makedirs(local, exist_ok=True)
            self._spawn(f"worker-{i}", ["worker", "--scheduler-file", self.scheduler_file, "--host", "127.0.0.1",
                                        "--name", f"worker-{i}", "--nthreads", "1", "--memory-limit", "1.5GiB",
                                        "--local-directory", local, *loopback])
        self.client = Client(scheduler_file=self.scheduler_file, timeout="30s", set_as_default=False)
        try:
            self.client.wait_for_workers(self.n_workers, timeout=60)
        except TimeoutError:
            logs = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in self.procs)
            raise RuntimeError(f"workers did not register within 60 s:\n{logs}") from None

    def worker_names(self) -> list[str]:
        return sorted(w["name"] for w in self.client.scheduler_info()["workers"].values())

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        """Signal one process group (scheduler or worker: nanny + worker process)."""
        p = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)

    def stop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close(timeout=10)
        # workers first, then the scheduler: terminate, then kill whatever is left
        for name in sorted(self.procs, key=lambda n: n == "scheduler"):
            p = self.procs[name]
            if p.poll() is None:
                self.kill(name, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            # the group may hold stragglers even when the leader is gone (e.g. a resource tracker)
            self.kill(name, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for log in self._logs:
            log.close()


@contextlib.contextmanager
def running_cluster(root: str, workers: int = 2):
    c = Cluster(root, workers)
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running_cluster(str(tmp_path_factory.mktemp("cluster"))) as c:
        yield c


def _prefix_counts(client, prefix: str) -> dict:
    """How many times the scheduler moved tasks of this key prefix into each state (cumulative)."""

    def get(dask_scheduler, prefix=prefix):
        tp = dask_scheduler.task_prefixes.get(prefix)
        return dict(tp.state_counts) if tp is not None else {}

    return client.run_on_scheduler(get)


# --------------------------------------------------------------------------- inputs and helpers

@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return write_llama_set(str(tmp_path_factory.mktemp("small")), SMALL, finetunes=2)


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    return write_llama_set(str(tmp_path_factory.mktemp("big")), BIG, finetunes=2)


def _config(folder, method: str, paths: list[str], params: str | None) -> str:
    base, *models = paths
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for m in models:
        lines.append(f"  - model: {m}")
        if params:
            lines.append(f"    parameters: {{{params}}}")
    path = os.path.join(folder, f"{method}.yml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _ties(folder, paths):
    return _config(folder, "ties", paths, "weight: 0.5, density: 0.3")


def _cli(*args, timeout=CLI_TIMEOUT, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=None if env is None else {**os.environ, **env})


def _merge_ok(*args):
    r = _cli(*args, "--quiet")
    assert r.returncode == 0, f"dppa-stream merge {' '.join(map(str, args))} exited {r.returncode}:\n{r.stderr}"


def _assert_same_files(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    assert any(n.endswith(".safetensors") for n in names), names
    for n in names:
        assert filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False), f"{n} differs between {a} and {b}"


# --------------------------------------------------------------------------- tests

def test_cluster_is_up_on_loopback(cluster):
    workers = cluster.client.scheduler_info()["workers"]
    assert sorted(w["name"] for w in workers.values()) == ["worker-1", "worker-2"], (workers, cluster.log_tail("scheduler"))
    for addr in workers:
        assert addr.startswith("tcp://127.0.0.1:"), addr


def test_ties_same_bytes_threads_tcp_and_scheduler_file(cluster, small_set, tmp_path):
    cfg = _ties(tmp_path, small_set)
    before = _prefix_counts(cluster.client, "merge_work").get("memory", 0)
    _merge_ok(cfg, tmp_path / "threads")
    _merge_ok(cfg, tmp_path / "tcp", "--scheduler", cluster.address)
    after_tcp = _prefix_counts(cluster.client, "merge_work").get("memory", 0)
    _merge_ok(cfg, tmp_path / "file", "--scheduler-file", cluster.scheduler_file)
    after_file = _prefix_counts(cluster.client, "merge_work").get("memory", 0)
    # the cluster runs really ran their tasks on the cluster (one merge task per work unit: one here)
    assert after_tcp - before >= 1
    assert after_file - after_tcp >= 1
    _assert_same_files(tmp_path / "threads", tmp_path / "tcp")
    _assert_same_files(tmp_path / "threads", tmp_path / "file")


def test_dppa_same_bytes_threads_and_cluster(cluster, small_set, tmp_path):
    cfg = _config(tmp_path, "dppa", small_set, None)
    _merge_ok(cfg, tmp_path / "threads")
    _merge_ok(cfg, tmp_path / "tcp", "--scheduler", cluster.address)
    _assert_same_files(tmp_path / "threads", tmp_path / "tcp")


@pytest.fixture(scope="module")
def big_reference(big_set, tmp_path_factory):
    """The big ties merge on the default threads scheduler, same work units as the cluster runs."""
    folder = tmp_path_factory.mktemp("big_ref")
    cfg = _ties(folder, big_set)
    res = merge(load_config(cfg), str(folder / "out"), MergeOptions(quiet=True, unit_bytes=FAULT_UNIT_BYTES))
    return cfg, str(folder / "out"), res


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["stats_task", "merge_work"])
def test_worker_killed_mid_pass_same_bytes(big_reference, tmp_path, phase):
    """SIGKILL one worker (nanny and worker process: a lost node) while `phase` tasks run; the merge
    completes on the survivor and writes the same bytes as the threads run."""
    cfg, ref_out, ref = big_reference
    assert ref.split_tensors > 0  # so the cluster run has statistics passes as well as the merge pass
    (tmp_path / "cl").mkdir()
    with running_cluster(str(tmp_path / "cl")) as cl:
        out = str(tmp_path / "out")
        box = {}

        def run():
            try:
                box["result"] = merge(load_config(cfg), out,
                                      MergeOptions(scheduler=cl.address, quiet=True, unit_bytes=FAULT_UNIT_BYTES))
            except BaseException as e:  # re-raised in the test thread
                box["error"] = e

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threshold = 30  # of ~170 statistics tasks (two passes) or ~190 merge tasks
        deadline = time.monotonic() + 60
        done = 0
        while t.is_alive() and time.monotonic() < deadline:
            done = _prefix_counts(cl.client, phase).get("memory", 0)
            if done >= threshold:
                break
            time.sleep(0.01)
        assert t.is_alive(), f"the merge finished before the kill ({done} {phase} done); use more units"
        assert done >= threshold, f"only {done} {phase} tasks done after 60 s"
        cl.kill("worker-2")
        cl.procs["worker-2"].wait(timeout=10)
        t.join(timeout=90)
        assert not t.is_alive(), "the merge did not finish within 90 s of the worker's death"
        if "error" in box:
            raise box["error"]
        counts = _prefix_counts(cl.client, phase)
        assert cl.worker_names() == ["worker-1"]
    res = box["result"]
    assert res.units == ref.units
    # the dead worker's work was done again: a task in flight there was started again (one more
    # `processing` than `memory`), or a finished merge result it alone held was computed again (pass 2
    # submits its calls in a window, so the worker may hold results rather than running tasks):
    # more results than work units
    processing, results = counts.get("processing", 0), counts.get("memory", 0)
    assert processing > results or (phase == "merge_work" and results > res.units), \
        f"killed after {done} done; {phase}: {counts}, {res.units} work units"
    _assert_same_files(ref_out, out)


@pytest.mark.slow
def test_unreachable_scheduler_is_a_one_line_usage_error(small_set, tmp_path):
    cfg = _ties(tmp_path, small_set)
    out = tmp_path / "out"
    t0 = time.monotonic()
    # Dask's own connect timeout applies (30 s by default): set short here, and honoured
    r = _cli(cfg, out, "--scheduler", "tcp://127.0.0.1:1", env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"})
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "tcp://127.0.0.1:1" in lines[0]
    assert took < 20, f"took {took:.0f} s with a connect timeout of 2 s"
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_missing_scheduler_file_is_a_one_line_usage_error(small_set, tmp_path):
    cfg = _ties(tmp_path, small_set)
    r = _cli(cfg, tmp_path / "out", "--scheduler-file", tmp_path / "nope.json", timeout=60)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.json" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_replaced_input_is_read_afresh_by_long_lived_workers(cluster, tmp_path):
    paths = write_llama_set(str(tmp_path / "set"), SMALL, finetunes=2, seed=0)
    other = write_llama_set(str(tmp_path / "other"), SMALL, finetunes=2, seed=7)
    cfg = load_config(_ties(tmp_path, paths))
    opts = MergeOptions(scheduler=cluster.address, quiet=True)
    merge(cfg, str(tmp_path / "before"), opts)  # the workers now hold a descriptor of ft1's file
    # re-save ft1 in place (a new file renamed over the old one, as most tools write checkpoints)
    os.replace(os.path.join(other[1], "model.safetensors"), os.path.join(paths[1], "model.safetensors"))
    merge(cfg, str(tmp_path / "cluster"), opts)
    merge(cfg, str(tmp_path / "threads"), MergeOptions(quiet=True))  # this process never read these files
    _assert_same_files(tmp_path / "threads", tmp_path / "cluster")


def test_workers_that_see_other_files_are_refused_before_any_task(cluster, small_set, tmp_path):
    """The pre-flight check: a worker that cannot read an input as the client catalogued it (here:
    the file changed after the client read its header, as a worker's unshared local copy would
    differ) stops the run in one line naming the worker and the file, before any task runs."""
    from dppa_stream.executor import Executor, SchedulerSpec
    from dppa_stream.inputs import open_inputs

    cfg = load_config(_ties(tmp_path, small_set))
    inputs = open_inputs(cfg)
    files = [(st.path, st.identity[3], st.identity[2]) for ck in inputs.all for st in ck.stamps.values()]
    ex = Executor(SchedulerSpec.parse(cluster.address), 0)
    try:
        ex.check_workers(files, str(tmp_path))  # all is well: no error
        moved = [(files[0][0], files[0][1], files[0][2] + 1)] + files[1:]
        with pytest.raises(InputError) as e:
            ex.check_workers(moved, str(tmp_path))
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("Dask worker tcp://") and files[0][0] in msg and "shared" in msg
        with pytest.raises(InputError, match="cannot read"):
            ex.check_workers([(str(tmp_path / "missing.safetensors"), 1, 1)], str(tmp_path))
        with pytest.raises(OutputError, match="cannot write"):
            ex.check_workers(files, str(tmp_path / "no-such-folder"))
    finally:
        ex.close()
