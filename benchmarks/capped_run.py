#!/usr/bin/env python3
"""Run one command under a hard memory cap (a cgroup-v1 memory cgroup) and report its peak memory.

    python benchmarks/capped_run.py LIMIT_BYTES CMD [ARGS...]

Needs root and the cgroup-v1 memory controller (on cgroup v2, use
`systemd-run --scope -p MemoryMax=... -p MemorySwapMax=0 CMD` instead). The cgroup is made as a
child of this process's own memory cgroup, so nothing outside the command's process tree is
limited, and is removed afterwards. The limit covers anonymous memory and page cache, with swap
accounting capped at the same value where the kernel has it; a command that needs more is killed
by the kernel (a non-zero exit status, and `oom_kill` > 0 in the report).

While the command runs, memory.stat is sampled every 50 ms; the last line on stderr reports the
exit status, the wall time, the cap, the peaks of anonymous memory (total_rss), page cache and
mapped files, the kernel's own max_usage_in_bytes and the oom_kill count:

    [capped_run] rc=0 wall=12.3s limit=1024MiB peak_anon(total_rss)=230MiB peak_cache=... oom_kill=0

The exit status is the command's. benchmarks/bench_memory.py and tests/test_methods.py use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

SAMPLE_SECONDS = 0.05
PEAKS = ("total_rss", "total_cache", "total_mapped_file")


def own_memory_cgroup() -> str:
    """The folder of this process's cgroup-v1 memory cgroup."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return f"/sys/fs/cgroup/memory{path}"
    raise SystemExit("capped_run: no cgroup-v1 memory controller for this process")


def read_stat(cgroup: str) -> dict[str, int]:
    with open(os.path.join(cgroup, "memory.stat")) as f:
        return {k: int(v) for k, v in (line.split() for line in f)}


def write(cgroup: str, name: str, value) -> None:
    with open(os.path.join(cgroup, name), "w") as f:
        f.write(str(value))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit(__doc__.strip().splitlines()[2])
    limit, cmd = int(argv[0]), argv[1:]
    cgroup = os.path.join(own_memory_cgroup(), f"capped.{os.getpid()}")
    os.mkdir(cgroup)
    try:
        write(cgroup, "memory.limit_in_bytes", limit)
        try:
            write(cgroup, "memory.memsw.limit_in_bytes", limit)
        except OSError:
            pass  # the kernel keeps no swap accounting: the memory limit alone applies

        def join_cgroup():  # runs in the child before exec: the command starts inside the cap
            write(cgroup, "cgroup.procs", os.getpid())

        started = time.time()
        proc = subprocess.Popen(cmd, preexec_fn=join_cgroup)
        peak = dict.fromkeys(PEAKS, 0)
        while proc.poll() is None:
            try:
                stat = read_stat(cgroup)
                for k in PEAKS:
                    peak[k] = max(peak[k], stat.get(k, 0))
            except OSError:
                pass
            time.sleep(SAMPLE_SECONDS)
        with open(os.path.join(cgroup, "memory.oom_control")) as f:
            oom = dict(line.split() for line in f).get("oom_kill", "?")
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes")) as f:
            max_usage = int(f.read())
        print(f"[capped_run] rc={proc.returncode} wall={time.time() - started:.1f}s limit={limit >> 20}MiB "
              f"peak_anon(total_rss)={peak['total_rss'] >> 20}MiB peak_cache={peak['total_cache'] >> 20}MiB "
              f"peak_mapped_file={peak['total_mapped_file'] >> 20}MiB max_usage={max_usage >> 20}MiB oom_kill={oom}",
              file=sys.stderr)
        return proc.returncode
    finally:
        for _ in range(50):  # the cgroup can be removed once the kernel has reaped its last task
            try:
                os.rmdir(cgroup)
                break
            except OSError:
                time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
