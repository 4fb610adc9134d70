"""Crash safety: SIGKILL at any point then --resume gives byte-identical output without redoing
finished work; stale partial outputs are refused; write failures leave nothing under OUT."""

import filecmp
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from dppa_stream.synthetic import LlamaShape, write_llama_set

from .crash_at import crash_run

MID = LlamaShape(hidden=256, intermediate=688, layers=6, vocab=2048)


@pytest.fixture(scope="module")
def mid_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid")
    base, ft1, ft2 = write_llama_set(str(root / "in"), MID, 2, shard_size=3_000_000)
    cfg = root / "dppa.yml"
    cfg.write_text(f"merge_method: dppa\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
                   "parameters: {amplification: [1.8, 1.0]}\n")
    return root, str(cfg)


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", *args], capture_output=True, text=True, **kw)


def _same_tree(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        assert filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False), n


def _merge_then_kill(cfg, out, fault: str) -> None:
    """Run a merge (200 KB units, one thread) that SIGKILLs itself at a chosen point (`fault`:
    "units:N" once N units are recorded, "stats:1" once pass-1 statistics are stored)."""
    proc = crash_run(fault, "merge", cfg, out, "-q", "--unit-size", "200KB", "--scheduler", "threads:1")
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


@pytest.fixture(scope="module")
def reference_out(mid_set):
    root, cfg = mid_set
    out = root / "reference"
    res = _cli("merge", cfg, str(out), "-q", "--unit-size", "200KB")
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("fault", ["stats:1", "units:40"])
def test_sigkill_then_resume_is_byte_identical(tmp_path, mid_set, reference_out, fault):
    _, cfg = mid_set
    out = tmp_path / "out"
    done = tmp_path / "out.partial" / ".dppa-stream" / "done.txt"
    # stats:1: killed once pass-1 statistics are stored, before any pass-2 unit is recorded
    _merge_then_kill(cfg, out, fault)
    assert not out.exists() and (tmp_path / "out.partial").exists()
    finished = done.read_text().count("\n") if done.exists() else 0
    assert finished == (0 if fault.startswith("stats") else 40)

    refused = _cli("merge", cfg, str(out), "-q", "--unit-size", "200KB")
    assert refused.returncode == 4 and "--resume" in refused.stderr

    res = _cli("merge", cfg, str(out), "--unit-size", "200KB", "--resume", "--json", str(tmp_path / "r.json"), "-q")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["resumed_units"] >= finished
    _same_tree(reference_out, out)


def test_resume_refuses_partial_of_other_config(tmp_path, mid_set):
    root, cfg = mid_set
    out = tmp_path / "out"
    os.makedirs(tmp_path / "out.partial" / ".dppa-stream")
    (tmp_path / "out.partial" / ".dppa-stream" / "run.json").write_text('{"fingerprint": "something else"}')
    res = _cli("merge", cfg, str(out), "--resume", "-q")
    assert res.returncode == 4
    assert "different config or different inputs" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_write_failure_then_resume(tmp_path, mid_set, reference_out):
    """A file-size limit (like a full disk) fails cleanly; once lifted, --resume completes."""
    _, cfg = mid_set
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))

    res = _cli("merge", cfg, str(out), "-q", "--unit-size", "200KB", preexec_fn=limit)
    assert res.returncode == 4, res.stderr
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1
    assert "Traceback" not in res.stderr
    assert not out.exists()
    res = _cli("merge", cfg, str(out), "-q", "--unit-size", "200KB", "--resume")
    assert res.returncode == 0, res.stderr
    _same_tree(reference_out, out)


def test_resume_keeps_the_interrupted_runs_unit_plan(tmp_path, mid_set, reference_out):
    """The manifest names units of the first run's plan; a resume with other memory settings must
    reuse that plan, not mix two."""
    _, cfg = mid_set
    out = tmp_path / "out"
    _merge_then_kill(cfg, out, "units:30")
    res = _cli("merge", cfg, str(out), "-q", "--unit-size", "90KB", "--resume")
    assert res.returncode == 0, res.stderr
    _same_tree(reference_out, out)
