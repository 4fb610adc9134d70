"""Work that needs Hugging Face transformers, run in a child process.

transformers is large, and the merge process stays small and never imports it: building an
output tokenizer (`tokenizer.child_build`) and checking a config with transformers
(`hf_files.child_check_config`) run here, in a short-lived child of the merge, before any tensor
is merged. The child hides torch from transformers (`sys.modules["torch"] = None`, which makes
transformers treat it as not installed): tokenizers and configs do not need it, and importing it
would cost ~150 MiB of anonymous memory and seconds of start-up. One JSON object in on stdin, one
out on stdout; any failure comes back as one line in `error`.

    python -m dppa_stream.hf_child TASK < payload.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .errors import InputError, printable

TASKS = {"tokenizer": ("dppa_stream.tokenizer", "child_build"),
         "config": ("dppa_stream.hf_files", "child_check_config")}


def run_child(task: str, payload: dict, what: str = "") -> dict:
    """Run `task` in a child process; its result, or InputError with the child's one-line error."""
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "dppa_stream.hf_child", task], input=json.dumps(payload),
                          capture_output=True, text=True, env=env)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise InputError(f"{what or task}: the transformers helper failed ({printable(tail[0], 300)})") from None
    if res.get("error"):
        raise InputError(f"{what + ': ' if what else ''}{res['error']}")
    return res


def main(argv: list[str]) -> int:
    sys.modules["torch"] = None  # see the module docstring
    task = argv[0] if argv else ""
    try:
        module, func = TASKS[task]
        payload = json.loads(sys.stdin.read())
        import importlib

        res = getattr(importlib.import_module(module), func)(payload)
    except ModuleNotFoundError as e:
        res = {"error": f"needs the {e.name} package (pip install transformers)"}
    except Exception as e:  # reported to the parent as one line
        res = {"error": printable(f"{type(e).__name__}: {e}", 1000)}
    sys.stdout.write("\n" + json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
