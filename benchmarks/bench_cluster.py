"""Schedulers side by side, per-task overhead, and the cost of resuming after a crash.

1. The same DPPA merge with threads, processes:1, processes:2 and an external `dask scheduler`
   with 2 `dask worker` processes (loopback): wall time and speedup over threads:1; outputs are
   checked byte-identical.
2. Per-task overhead: a tiny model cut into hundreds of tiny units, where compute is negligible,
   so (wall - startup) / tasks is what the scheduler costs per task.
3. Resume: the merge is SIGKILLed once half of its pass-2 units are recorded, then `--resume`d;
   its time is compared with an uninterrupted run.

    python benchmarks/bench_cluster.py [--small]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import DATA_DIR, RESULTS_DIR, dataset, dppa_cmd, fmt_mib, run_measured, write_config  # noqa: E402

from dppa_stream.synthetic import LlamaShape  # noqa: E402

MID = LlamaShape(hidden=1024, intermediate=2816, layers=12, vocab=32000, heads=16, kv_heads=4)
SMALL = LlamaShape(hidden=512, intermediate=1408, layers=12, vocab=32000, heads=8, kv_heads=4)
TINY = LlamaShape(hidden=64, intermediate=160, layers=4, vocab=512, heads=4, kv_heads=2)
BIN = os.path.dirname(sys.executable)


def same_output(a: str, b: str) -> bool:
    names = sorted(f for f in os.listdir(a) if f.endswith((".safetensors", ".json")))
    return names == sorted(f for f in os.listdir(b) if f.endswith((".safetensors", ".json"))) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


class ExternalCluster:
    """`dask scheduler` + N `dask worker` processes on loopback, stopped by pid."""

    def __init__(self, workdir: str, workers: int = 2):
        self.file = os.path.join(workdir, "scheduler.json")
        if os.path.exists(self.file):
            os.unlink(self.file)
        self.procs = [subprocess.Popen([os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                        "--scheduler-file", self.file, "--no-dashboard"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
        deadline = time.time() + 60
        while not os.path.exists(self.file) and time.time() < deadline:
            time.sleep(0.2)
        for _ in range(workers):
            self.procs.append(subprocess.Popen(
                [os.path.join(BIN, "dask"), "worker", "--scheduler-file", self.file, "--nthreads", "1",
                 "--memory-limit", "2GiB", "--no-dashboard", "--local-directory", workdir],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        from distributed import Client

        with Client(scheduler_file=self.file, timeout="60s") as c:
            c.wait_for_workers(workers, timeout=120)

    def close(self):
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def run(cfg, out, extra, work):
    j = os.path.join(work, "r.json")
    m = run_measured(dppa_cmd(cfg, out, j, ["--overwrite", *extra]))
    if m.rc != 0:
        raise SystemExit(f"failed: {' '.join(m.cmd)}\n{m.stderr_tail}")
    return m, json.load(open(j))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args()
    shape = SMALL if args.small else MID
    work = os.path.join(DATA_DIR, "bench_cluster")
    os.makedirs(work, exist_ok=True)
    paths = dataset(shape, 2, torch.bfloat16)
    cfg = os.path.join(work, "dppa.yml")
    write_config(cfg, "dppa", paths[0], [(p, {}) for p in paths[1:]], {"amplification": [1.8, 1.0]}, dtype=None)
    result = {"shape": shape.__dict__, "params": shape.numel(), "cpus": os.cpu_count(), "schedulers": [], "overhead": [],
              "resume": {}}

    # 1. schedulers
    ref_out = os.path.join(work, "out-threads1")
    cluster = ExternalCluster(work)
    try:
        configs = [("threads:1", ["--scheduler", "threads:1"]), ("threads:2", ["--scheduler", "threads:2"]),
                   ("processes:1", ["--scheduler", "processes:1", "--memory-limit", "3GiB"]),
                   ("processes:2", ["--scheduler", "processes:2", "--memory-limit", "4GiB"]),
                   ("external 2 workers", ["--scheduler-file", cluster.file])]
        base_wall = None
        for name, extra in configs:
            out = ref_out if name == "threads:1" else os.path.join(work, "out-" + name.split()[0].replace(":", ""))
            m, rep = run(cfg, out, extra, work)
            base_wall = base_wall or m.wall_s
            same = out == ref_out or same_output(ref_out, out)
            result["schedulers"].append({"scheduler": name, "wall_s": m.wall_s, "cpu_s": m.cpu_s, "units": rep["units"],
                                         "speedup_vs_threads1": base_wall / m.wall_s, "identical_output": same,
                                         "peak_anon_bytes": m.peak_anon_bytes})
            print(f"{name:20s} wall {m.wall_s:6.1f}s  speedup {base_wall / m.wall_s:4.2f}x  units {rep['units']:5d}  "
                  f"peak {fmt_mib(m.peak_anon_bytes)} MiB  identical {same}", flush=True)

        # 2. per-task overhead: compute is negligible on a tiny model cut into ~1-row units
        tiny = dataset(TINY, 2, torch.bfloat16)
        tcfg = os.path.join(work, "tiny.yml")
        write_config(tcfg, "task_arithmetic", tiny[0], [(p, {"weight": 0.5}) for p in tiny[1:]], dtype=None)
        for name, extra in (("threads:2", ["--scheduler", "threads:2"]),
                            ("processes:2", ["--scheduler", "processes:2", "--memory-limit", "4GiB"]),
                            ("external 2 workers", ["--scheduler-file", cluster.file])):
            _, whole = run(tcfg, os.path.join(work, "tiny-whole"), extra, work)
            _, cut = run(tcfg, os.path.join(work, "tiny-cut"), extra + ["--unit-size", "2KB"], work)
            per_task = (cut["wall_seconds"] - whole["wall_seconds"]) / max(1, cut["units"] - whole["units"])
            result["overhead"].append({"scheduler": name, "tasks": cut["units"], "per_task_ms": per_task * 1e3})
            print(f"{name:20s} per-task overhead {per_task * 1e3:6.2f} ms ({cut['units']} vs {whole['units']} units)", flush=True)
    finally:
        cluster.close()

    # 3. resume after a SIGKILL at half of pass 2
    out = os.path.join(work, "out-resume")
    for d in (out, out + ".partial"):
        shutil.rmtree(d, ignore_errors=True)
    full, rep = run(cfg, os.path.join(work, "out-full"), [], work)
    done = os.path.join(out + ".partial", ".dppa-stream", "done.txt")
    proc = subprocess.Popen([os.path.join(BIN, "dppa-stream"), "merge", cfg, out, "-q"], start_new_session=True)
    t0 = time.perf_counter()
    while proc.poll() is None:
        if os.path.exists(done) and open(done).read().count("\n") >= rep["units"] // 2:
            break
        time.sleep(0.05)
    killed_at = time.perf_counter() - t0
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed, rrep = run(cfg, out, ["--resume"], work)
    same = same_output(os.path.join(work, "out-full"), out)
    result["resume"] = {"uninterrupted_s": full.wall_s, "killed_after_s": killed_at, "resumed_s": resumed.wall_s,
                        "units_skipped": rrep["resumed_units"], "units": rrep["units"], "identical_output": same}
    print(f"resume: uninterrupted {full.wall_s:.1f}s; killed after {killed_at:.1f}s; --resume took {resumed.wall_s:.1f}s "
          f"({rrep['resumed_units']}/{rrep['units']} units skipped); identical {same}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, "bench_cluster.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
