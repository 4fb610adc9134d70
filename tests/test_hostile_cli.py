"""Hostile inputs, round 2: helpers shared by tests/test_hostile_*.py, and the command line's own
promise: every failure is one line with exit 2, 3 or 4 (130 when interrupted, with how to
--resume), no traceback, no hang.

All inputs are built in tmp_path; nothing large is committed.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from dppa_stream.checkpoint.reader import close_all
from dppa_stream.cli.main import main as cli_main
from dppa_stream.synthetic import LlamaShape, write_llama_set

TINY = {  # a few tensors, one DP-able linear, odd sizes
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.1.mlp.up_proj.weight": (6, 4),
    "model.norm.weight": (4,),
}


@pytest.fixture(autouse=True)
def _close_fds():
    yield
    close_all()


def tensors(seed=0, dtype=torch.bfloat16, shapes=None, extra=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {n: torch.randn(s, generator=g).to(dtype) for n, s in (shapes or TINY).items()}
    out.update(extra or {})
    return out


def write_model(folder, sd: dict, config: dict | None = None) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config or {"model_type": "llama", "torch_dtype": "bfloat16"}, f)
    return str(folder)


def tiny_pair(root, **kw) -> tuple[str, str]:
    """A base and one fine-tune under root/in."""
    base = write_model(os.path.join(root, "in", "base"), tensors(0, **kw))
    ft = write_model(os.path.join(root, "in", "ft"), {k: v + 0.25 for k, v in tensors(0, **kw).items()})
    return base, ft


def config(path, base, *models, method="task_arithmetic", params="{weight: 1.0}", extra="") -> str:
    lines = [f"merge_method: {method}", f"base_model: {json.dumps(str(base))}", "models:"]
    for m in models:
        lines += [f"  - model: {json.dumps(str(m))}"] + ([f"    parameters: {params}"] if params else [])
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + extra)
    return str(path)


def run(*args):
    """The CLI in this process: (exit code, stderr lines, stdout)."""
    res = CliRunner().invoke(cli_main, [str(a) for a in args])
    assert isinstance(res.exception, (SystemExit, type(None))), res.exception
    return res.exit_code, res.stderr.splitlines(), res.stdout


def cli(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    """The CLI as a separate process."""
    return subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def one_line_error(code, lines, expected_code, *needles) -> str:
    """The README's promise: exactly one line, 'error: ...', the right exit code, no traceback."""
    assert code == expected_code, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def proc_error(res: subprocess.CompletedProcess, expected_code, *needles) -> str:
    return one_line_error(res.returncode, res.stderr.strip().splitlines(), expected_code, *needles)


def digest(root) -> dict:
    """Every file under root (links not followed) with its bytes' hash: proves nothing changed."""
    out = {}
    for d, dirs, files in os.walk(root):
        for f in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, f)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = "->" + os.readlink(p)
            elif not os.path.isfile(p):  # a FIFO planted by a test: never open it
                out[os.path.relpath(p, root)] = "special"
            else:
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def same_tree(a, b) -> None:
    da, db = digest(a), digest(b)
    assert sorted(da) == sorted(db)
    diff = [k for k in da if da[k] != db[k] and k not in ("README.md", "dppa_stream_config.yml")]
    assert not diff, diff


# --- the command line itself ---------------------------------------------------------------------


@pytest.mark.parametrize("args", [["merge", "c.yml"], ["merge", "c.yml", "o", "--no-such-option"],
                                  ["merge", "c.yml", "o", "--seed", "x"], ["stats"], ["nope"]],
                         ids=["missing-out", "unknown-option", "bad-int", "stats-no-config", "unknown-command"])
def test_click_usage_errors_are_one_line(args):
    code, lines, _ = run(*args)
    one_line_error(code, lines, 2)


def test_help_and_version_still_work():
    code, _, out = run("merge", "--help")
    assert code == 0 and "--resume" in out
    code, _, out = run("--version")
    assert code == 0 and "dppa-stream" in out


@pytest.mark.parametrize("spec", ["tcp://", "tcp://[::1", "tcp://host", "tcp://host:notaport", "tcp://:8786",
                                  "tcp://host:99999", "tcp://a b:1"])
def test_malformed_scheduler_address_is_a_quick_usage_error(tmp_path, spec):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    t0 = time.monotonic()
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--scheduler", spec)
    assert time.monotonic() - t0 < 15, "a malformed address must not wait for a connection"
    one_line_error(code, lines, 2, "scheduler")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_malformed_scheduler_address_exits_at_once_without_traceback(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    t0 = time.monotonic()
    res = cli("merge", cfg, tmp_path / "out", "--scheduler", "tcp://[::1", timeout=180)
    assert time.monotonic() - t0 < 60, "the 40 s wait of a half-made Client at exit is back"
    proc_error(res, 2, "scheduler")
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr


def test_scheduler_file_that_is_a_fifo_does_not_hang(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    os.mkfifo(tmp_path / "sched.json")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--scheduler-file", tmp_path / "sched.json")
    one_line_error(code, lines, 2, "sched.json")


def test_scheduler_file_with_malformed_address(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    (tmp_path / "sched.json").write_text(json.dumps({"address": "tcp://[::1"}))
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--scheduler-file", tmp_path / "sched.json")
    one_line_error(code, lines, 2, "sched.json")


def test_huge_seed_is_a_usage_error(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--seed", "9" * 400)
    one_line_error(code, lines, 2, "--seed")


@pytest.mark.parametrize("opt,value", [("--step", "nan"), ("--step", "-1"), ("--max-evals", "0"),
                                       ("--start", "nan,1"), ("--dense-score", "inf")])
def test_search_options_checked_up_front(tmp_path, opt, value):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft, method="dppa", params=None)
    code, lines, _ = run("search", cfg, tmp_path / "out", "--eval-cmd", "echo 1 {model}", opt, value)
    one_line_error(code, lines, 2, opt)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.search").exists()


# --- interruptions ---------------------------------------------------------------------------------

MID = LlamaShape(hidden=128, intermediate=344, layers=4, vocab=1024)


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid")
    base, ft1, ft2 = write_llama_set(str(root / "in"), MID, 2, shard_size=1_000_000)
    cfg = config(root / "dppa.yml", base, ft1, ft2, method="dppa", params="{amplification: [1.8, 1.0]}")
    ref = root / "reference"
    res = cli("merge", cfg, ref, "-q", "--unit-size", "60KB")
    assert res.returncode == 0, res.stderr
    return root, cfg, ref


def _as_from_a_terminal():
    """Ctrl-C reaches the run as it does from a terminal. A test runner started in the background
    by a shell without job control (a CI script's `&`, nohup) ignores SIGINT, its children inherit
    that, and Python keeps an inherited "ignored": the merge would rightly never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(cfg, out, sig, *opts):
    """Start a merge, send `sig` to its process group once it has written run state, return it."""
    partial = out.parent / (out.name + ".partial")
    p = subprocess.Popen([sys.executable, "-m", "dppa_stream.cli.main", "merge", cfg, str(out), "-q",
                          "--unit-size", "60KB", *opts], stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=_as_from_a_terminal)
    deadline = time.time() + 240
    while p.poll() is None and time.time() < deadline and not (partial / ".dppa-stream" / "run.json").exists():
        time.sleep(0.05)
    time.sleep(0.3)
    if p.poll() is not None:
        pytest.skip("the run ended before it could be interrupted")
    os.killpg(p.pid, sig)
    err = p.communicate(timeout=240)[1]
    return p.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("sig,opts", [(signal.SIGINT, ["--scheduler", "processes:2"]),
                                      (signal.SIGTERM, ["--scheduler", "threads:1"])], ids=["ctrl-c-processes", "sigterm"])
def test_interrupt_is_one_line_with_resume_and_resumes(tmp_path, mid, sig, opts):
    _, cfg, ref = mid
    out = tmp_path / "out"
    code, err = _interrupt(cfg, out, sig, *opts)
    lines = err.strip().splitlines()
    assert code == 130, err
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err and not out.exists()
    res = cli("merge", cfg, out, "-q", "--unit-size", "60KB", "--resume")
    assert res.returncode == 0, res.stderr
    same_tree(ref, out)


def test_an_interrupt_that_abandons_a_coroutine_is_still_one_line():
    """A signal can land while a library (zarr's synchronous API, under the statistics store) has
    made a coroutine and not yet handed it to its event loop. Python prints a "never awaited"
    warning when that coroutine is freed, after the message. The run still says one line: this
    raced the SIGTERM case above now and then."""
    code = ("from dppa_stream.cli.main import _run\n"
            "async def step():\n    pass\n"
            "def work():\n    pending = step()\n    raise KeyboardInterrupt\n"
            "_run(False, work)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 130, p.stderr
    assert p.stderr.strip().splitlines() == ["interrupted; nothing was kept: rerun the command"], p.stderr


@pytest.mark.parametrize("spec", ["processes:0", "threads:100000", "threads:-1", "processes:٣", "threads:" + "9" * 400])
def test_absurd_worker_counts_are_usage_errors(tmp_path, spec):
    base, ft = tiny_pair(tmp_path)
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), tmp_path / "out", "--scheduler", spec)
    one_line_error(code, lines, 2, "worker count")


def test_report_file_inside_an_input_is_refused(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    target = os.path.join(base, "model.safetensors")
    before = digest(tmp_path / "in")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--json", target)
    one_line_error(code, lines, 2, "--json", "input")
    assert digest(tmp_path / "in") == before and not (tmp_path / "out").exists()


def test_empty_out_is_a_usage_error(tmp_path):
    base, ft = tiny_pair(tmp_path)
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), "", "--overwrite")
    one_line_error(code, lines, 2, "OUT")
