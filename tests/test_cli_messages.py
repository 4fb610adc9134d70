"""What the command line says in everyday situations: the summary's lines, the demo's config, a
missing parent folder, run state that cannot be written, absurd layer numbers, and a repository
that needs nothing outside itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dppa_stream import output
from dppa_stream.config import parse_config
from dppa_stream.errors import OutputError
from dppa_stream.pipeline import MergeOptions, merge

from .test_hostile_cli import cli, config, one_line_error, proc_error, run, tensors, tiny_pair, write_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summary_prints_each_line_on_its_own(ckpts, tmp_path):
    base, ft1, _ = ckpts(torch.bfloat16, 2)
    cfg = tmp_path / "dp.yml"
    cfg.write_text(f"merge_method: dp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
                   "parameters: {pruning_rate: 0.95, lamda: 0.4}\n")  # pushes some densities below 1/n
    code, lines, _ = run("merge", cfg, tmp_path / "out")
    assert code == 0, lines
    assert lines[-2].startswith("merged ") and lines[-1].startswith("DP clamped the density of "), lines
    assert not any("\\n" in line for line in lines), lines


def test_demo_config_works_from_any_folder(tmp_path):
    (tmp_path / "a").mkdir()
    res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "demo", "rel-out", "--method",
                          "task_arithmetic", "-q"], cwd=tmp_path / "a", capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    cfg = tmp_path / "a" / "rel-out" / "task_arithmetic.yml"
    (tmp_path / "b").mkdir()
    res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", str(cfg), "again", "-q"],
                         cwd=tmp_path / "b", capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    a, b = tmp_path / "a" / "rel-out" / "merged", tmp_path / "b" / "again"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_missing_parent_folder_says_to_create_it(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    code, lines, _ = run("merge", cfg, tmp_path / "nope" / "out")
    line = one_line_error(code, lines, 4, str(tmp_path / "nope"), "does not exist; create it first")
    assert "rerun" not in line and "--resume" not in line
    assert not (tmp_path / "nope").exists()


def test_run_state_that_cannot_be_written_leaves_nothing_to_resume(tmp_path, monkeypatch):
    base, ft = tiny_pair(tmp_path)
    text = open(config(tmp_path / "c.yml", base, ft)).read()
    real = output.write_atomic

    def full(path, data):
        if path.endswith(output.RUN_STATE):
            raise output.write_failed(path, OSError(28, "No space left on device"))
        real(path, data)

    monkeypatch.setattr(output, "write_atomic", full)
    with pytest.raises(OutputError) as info:
        merge(parse_config(text), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert "nothing was kept" in str(info.value) and "--resume" not in str(info.value)
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out").exists()
    monkeypatch.setattr(output, "write_atomic", real)  # space freed: the same command now just works
    merge(parse_config(text), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("digits", [10, 5000])
def test_block_number_with_too_many_digits_is_an_input_error(tmp_path, digits):
    name = f"model.layers.{'7' * digits}.mlp.up_proj.weight"
    sd = tensors(0, extra={name: torch.ones(4, 4, dtype=torch.bfloat16)})
    base = write_model(tmp_path / "base", sd)
    ft = write_model(tmp_path / "ft", {k: v + 1 for k, v in sd.items()})
    res = cli("merge", config(tmp_path / "c.yml", base, ft), tmp_path / "out")
    line = proc_error(res, 3, f"{digits}-digit number", "not a model checkpoint")
    assert len(line) < 600  # the name is clipped, not printed whole


def test_the_repository_needs_nothing_outside_it():
    """Tests, docs, benchmarks and code never point to a folder next to the repository."""
    needles = [os.path.join("..", "shared"), "shared" + os.sep + "tools", "shared" + os.sep + "docs"]
    bad = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("data", "cache", "__pycache__")]
        for f in files:
            if not f.endswith((".py", ".md", ".yml", ".yaml", ".toml", ".json", ".txt", ".cfg")):
                continue
            path = os.path.join(folder, f)
            with open(path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            if any(n in text for n in needles):
                bad.append(os.path.relpath(path, ROOT))
    assert not bad, bad
