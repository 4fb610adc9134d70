"""Shared helpers for the benchmark and parity scripts (not part of the installed package).

- cached synthetic checkpoints under benchmarks/data/ (git-ignored), keyed by their parameters;
- mergekit-style YAML configs that both dppa-stream and mergekit 0.1.5 accept;
- running a command as a subprocess while sampling the peak anonymous memory (RssAnon from
  /proc/<pid>/status, summed over the process and all its descendants) every few tens of ms.
  RSS/VmHWM are deliberately not used: they count mapped file pages, which are reclaimable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import psutil

from dppa_stream.memory import rss_anon as _rss_anon
from dppa_stream.synthetic import LlamaShape

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DATA_DIR = os.path.join(HERE, "data")
RESULTS_DIR = os.path.join(HERE, "results")

DPPA_BIN = os.environ.get("DPPA_STREAM_BIN") or os.path.join(os.path.dirname(sys.executable), "dppa-stream")
MK_VENV = os.environ.get("MERGEKIT_VENV") or os.path.join(REPO, ".venv-mergekit")
MK_BIN = os.path.join(MK_VENV, "bin", "mergekit-yaml")

COMPLETE_MARK = ".complete.json"

# The ~0.5B-parameter set most benchmarks use, and a ~60M quick-check set (`--small`).
BIG = LlamaShape(hidden=1280, intermediate=3456, layers=24, vocab=32000, heads=20, kv_heads=4)
SMALL = LlamaShape(hidden=512, intermediate=1408, layers=12, vocab=32000, heads=8, kv_heads=4)


# ----------------------------------------------------------------------------------------------
# Synthetic checkpoints


def dataset(shape, finetunes: int, dtype, seed: int = 0, drift: float = 1e-3, tag: str = "") -> list[str]:
    """Paths (base first) of a cached `write_llama_set` output; generated on first use.

    The folder name encodes every generation parameter; a marker file written last makes an
    interrupted generation regenerate instead of being reused half-written.
    """
    import torch  # noqa: F401  (dtype objects)

    from dppa_stream.synthetic import write_llama_set

    dname = str(dtype).removeprefix("torch.")
    key = (f"{tag + '_' if tag else ''}llama_h{shape.hidden}_i{shape.intermediate}_l{shape.layers}_v{shape.vocab}"
           f"_a{shape.heads}_kv{shape.kv_heads}{'_tied' if shape.tie_embeddings else ''}_{dname}_ft{finetunes}"
           f"_s{seed}_d{drift:g}")
    folder = os.path.join(DATA_DIR, key)
    names = ["base"] + [f"ft{k + 1}" for k in range(finetunes)]
    paths = [os.path.join(folder, n) for n in names]
    mark = os.path.join(folder, COMPLETE_MARK)
    if os.path.isfile(mark):
        return paths
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    t0 = time.perf_counter()
    print(f"generating {key} ({shape.numel() / 1e9:.3f} B params x {finetunes + 1} models) ...", flush=True)
    got = write_llama_set(folder, shape, finetunes=finetunes, dtype=dtype, seed=seed, drift=drift)
    assert [os.path.abspath(p) for p in got] == paths, (got, paths)
    with open(mark, "w") as f:
        json.dump({"shape": asdict(shape), "finetunes": finetunes, "dtype": dname, "seed": seed, "drift": drift,
                   "numel": shape.numel(), "seconds": time.perf_counter() - t0}, f, indent=2)
    print(f"  done in {time.perf_counter() - t0:.0f}s", flush=True)
    return paths


def weight_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def input_bytes(paths: list[str]) -> int:
    return sum(os.path.getsize(f) for p in paths for f in weight_files(p))


# ----------------------------------------------------------------------------------------------
# Which dppa-stream code runs (others edit the tree while benchmarks run)


def code_version() -> dict:
    """HEAD commit and the uncommitted changes under dppa_stream/ and cli/ of the live tree."""
    def git(*a):
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True).stdout.strip()

    return {"head": git("rev-parse", "HEAD"), "dirty": git("status", "--porcelain", "--", "dppa_stream", "cli").splitlines()}


def snapshot(rev: str = "HEAD") -> dict:
    """Export dppa_stream/ and cli/ at `rev` (read-only `git archive`) to benchmarks/data/snapshots/<sha>/
    laid out as an importable package (cli/ becomes dppa_stream/cli/). Putting that folder first on
    PYTHONPATH makes the venv's `dppa-stream` script run it instead of the live editable tree."""
    sha = subprocess.run(["git", "-C", REPO, "rev-parse", rev], capture_output=True, text=True, check=True).stdout.strip()
    dest = os.path.join(DATA_DIR, "snapshots", sha)
    if not os.path.isdir(os.path.join(dest, "dppa_stream", "cli")):
        tmp = dest + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", sha, "dppa_stream", "cli"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        os.rename(os.path.join(tmp, "cli"), os.path.join(tmp, "dppa_stream", "cli"))
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)
    return {"rev": rev, "sha": sha, "path": dest}


def ours_env(snap: dict | None) -> dict | None:
    if not snap:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = snap["path"] + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_snapshot_import(snap: dict) -> str:
    """The file `dppa_stream.cli.main` resolves to under the snapshot environment (sanity check)."""
    code = "import dppa_stream.cli.main as m, dppa_stream as d; print(d.__file__); print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=ours_env(snap), capture_output=True, text=True, check=True,
                         cwd=snap["path"])
    files = out.stdout.split()
    if not all(f.startswith(snap["path"]) for f in files):
        raise RuntimeError(f"snapshot not used: {files}")
    return files[0]


# ----------------------------------------------------------------------------------------------
# Configs


def write_config(path: str, method: str, base: str, models: list[tuple[str, dict]], parameters: dict | None = None,
                 dtype: str | None = "float32", out_dtype: str | None = None) -> str:
    """A mergekit-style YAML (the subset both tools accept). The base is not listed under models."""
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for p, params in models:
        lines.append(f"  - model: {p}")
        if params:
            lines.append("    parameters:")
            lines += [f"      {k}: {_yaml_value(v)}" for k, v in params.items()]
    if parameters:
        lines.append("parameters:")
        lines += [f"  {k}: {_yaml_value(v)}" for k, v in parameters.items()]
    if dtype:
        lines.append(f"dtype: {dtype}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def _yaml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def mergekit_available() -> bool:
    return os.access(MK_BIN, os.X_OK)


def dppa_cmd(cfg: str, out: str, json_path: str, extra: list[str] | None = None) -> list[str]:
    return [DPPA_BIN, "merge", cfg, out, "--overwrite", "-q", "--json", json_path] + list(extra or [])


def mergekit_cmd(cfg: str, out: str, extra: list[str] | None = None) -> list[str]:
    return [MK_BIN, cfg, out, "--out-shard-size", "5B"] + list(extra or [])


def mergekit_env() -> dict:
    env = dict(os.environ)
    # Local paths only; never let transformers/huggingface_hub try the network (no tokenizer here).
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


# ----------------------------------------------------------------------------------------------
# Measured subprocess


def _rchar(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Measured:
    cmd: list[str]
    rc: int
    wall_s: float
    peak_anon_bytes: int
    samples: int
    max_gap_ms: float
    max_procs: int
    rchar_bytes: int  # bytes through read()/pread() syscalls, tree, last value seen per pid (mmap reads not counted)
    cpu_s: float  # user+sys CPU seconds of the process tree (wait4 rusage: the child and its reaped descendants)
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.02, log_path: str | None = None,
                 cwd: str | None = None) -> Measured:
    """Run `cmd`; sample Σ RssAnon over its process tree every `interval` seconds until it exits."""
    if log_path is None:
        import tempfile

        fd, log_path = tempfile.mkstemp(prefix="bench-", suffix=".log")
        os.close(fd)
    log = open(log_path, "w")
    t0 = time.perf_counter()
    boosted = _boost_sampler()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_child_priority(boosted), cwd=cwd)
    root = psutil.Process(proc.pid)
    peak = samples = max_procs = 0
    max_gap = 0.0
    gaps: list[float] = []
    rchar: dict[int, int] = {}
    last = time.perf_counter()
    status = rusage = None

    def reap(block: bool):
        # wait4 instead of Popen.poll: its rusage covers the child and every descendant it waited for.
        nonlocal status, rusage
        if status is None:
            pid, st, ru = os.wait4(proc.pid, 0 if block else os.WNOHANG)
            if pid:
                status, rusage = st, ru
        return status is not None

    try:
        while True:
            try:
                pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pids = [proc.pid]
            total = 0
            for pid in pids:
                total += _rss_anon(pid)
                rc = _rchar(pid)
                if rc:
                    rchar[pid] = max(rchar.get(pid, 0), rc)
            if reap(False):
                break  # the sample just taken may be of a zombie (RssAnon gone): not a problem for the peak
            peak = max(peak, total)
            max_procs = max(max_procs, len(pids))
            samples += 1
            now = time.perf_counter()
            max_gap = max(max_gap, now - last)
            gaps.append(now - last)
            last = now
            time.sleep(max(0.0, interval - (time.perf_counter() - now)))
    finally:
        if status is None:
            proc.kill()
            reap(True)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
    wall = time.perf_counter() - t0
    with open(log_path, errors="replace") as f:
        stderr_text = f.read()
    cpu = rusage.ru_utime + rusage.ru_stime
    gaps.sort()
    extra = {"sampler_nice": os.getpriority(os.PRIO_PROCESS, 0), "sampler_boosted": boosted,
             "gap_p50_ms": 1000 * gaps[len(gaps) // 2] if gaps else 0.0,
             "gap_p99_ms": 1000 * gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] if gaps else 0.0,
             "gaps_over_50ms": sum(1 for g in gaps if g > 0.05)}
    return Measured(cmd, proc.returncode, wall, peak, samples, max_gap * 1000, max_procs, sum(rchar.values()),
                    cpu, stderr_text[-2000:], extra)


SAMPLER_NICE = -10


def _boost_sampler() -> bool:
    """Raise this (sampling) process's priority so the sampler keeps its interval on a busy
    2-core box; needs CAP_SYS_NICE (root). The measured child is put back to nice 0."""
    if os.getpriority(os.PRIO_PROCESS, 0) <= SAMPLER_NICE:
        return True
    try:
        os.setpriority(os.PRIO_PROCESS, 0, SAMPLER_NICE)
        return True
    except OSError:
        return False


def _child_priority(boosted: bool):
    if not boosted:
        return None

    def reset():
        try:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except OSError:
            pass

    return reset


def io_floor(paths: list[str], block: int = 16 << 20) -> dict:
    """Read every input weight file once with buffered 16 MiB reads; returns bytes and seconds."""
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        for fpath in weight_files(p):
            with open(fpath, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(view)
                    if not n:
                        break
                    total += n
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "gb_per_s": total / dt / 1e9}


def fmt_mib(b: int | float) -> str:
    return f"{b / 2**20:.0f}"


def evict(paths: list[str]) -> None:
    """Drop these files' pages from the page cache (no root or drop_caches needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(p, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def refill(paths: list[str]) -> None:
    """Evict every weight file of these checkpoints and read it back once, so the page cache holds
    them as reads fill it (readahead), whatever wrote them. The generators write tensor by tensor:
    `bench_moe --wider 2`'s unfused set (16 KiB writes) read from the cache at 7.6 GB/s as written
    and 8.9-10.3 GB/s once read back, its fused twin at 12.0 as written, so layouts were compared
    partly by how their files had been written."""
    evict([f for p in paths for f in weight_files(p)])
    io_floor(paths)


def write_floor(nbytes: int, path: str, block: int = 16 << 20) -> float:
    """Seconds to write `nbytes` of zeros in 16 MiB blocks and fsync them (the file is removed)."""
    buf = bytes(block)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left:
            n = min(left, block)
            f.write(buf[:n])
            left -= n
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


def two_pass_floor(paths: list[str], out_bytes: int, scratch: str, cold: bool) -> dict:
    """What any two-pass merge must do at least: read every input twice (evicted before each read
    when `cold`), write the output once and fsync it. Leaves the inputs evicted when `cold`."""
    files = [f for p in paths for f in weight_files(p)]
    reads = []
    for _ in range(2):
        if cold:
            evict(files)
        reads.append(io_floor(paths)["seconds"])
    write = write_floor(out_bytes, os.path.join(scratch, "floor.bin"))
    if cold:
        evict(files)
    return {"seconds": sum(reads) + write, "read_s": reads, "write_s": write}


def folder_digest(folder: str) -> dict[str, str]:
    """SHA-256 of every file directly in `folder`, by name (to compare two outputs byte for byte)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
            out[name] = h.hexdigest()
    return out


def save_result(name: str, result: dict) -> str:
    """Write a benchmark's JSON under benchmarks/results/; returns its path."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path
