"""Run the dppa-stream CLI with a crash hook installed: `python tests/crash_at.py POINT:N ARGS...`
SIGKILLs this process at the N-th `durable.fault_point(POINT, ...)` ("units": once N work units
are recorded as done; "stats": once N statistics rounds are saved), so a crash test stops a run
at a chosen place instead of racing a timer. The tool itself never reads such a setting."""

import os
import runpy
import signal
import subprocess
import sys


def crash_run(fault: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """The CLI with `args` as a separate process that kills itself at `fault` ("units:3")."""
    return subprocess.run([sys.executable, os.path.abspath(__file__), fault, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def main() -> None:
    point, _, n = sys.argv[1].partition(":")

    def hook(at: str, count: int) -> None:
        if at == point and count >= int(n or 0):
            os.kill(os.getpid(), signal.SIGKILL)

    from dppa_stream import durable

    durable.fault_hook = hook
    sys.argv = ["dppa-stream", *sys.argv[2:]]
    runpy.run_module("dppa_stream.cli.main", run_name="__main__")


if __name__ == "__main__":
    main()
