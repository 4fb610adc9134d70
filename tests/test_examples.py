"""The example configs parse (paths need not exist) and the API example runs."""

import glob
import os
import subprocess
import sys

import pytest
import torch

from dppa_stream.config import parse_config
from dppa_stream.methods import METHODS
from dppa_stream.pipeline import MergeOptions, merge

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
CONFIGS = sorted(glob.glob(os.path.join(EXAMPLES, "*.yml")) + glob.glob(os.path.join(EXAMPLES, "*.yaml")))


def test_one_example_per_method():
    names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIGS}
    assert names == set(METHODS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_config_parses(path):
    with open(path, encoding="utf-8") as f:
        cfg = parse_config(f.read(), path)
    assert cfg.merge_method == os.path.splitext(os.path.basename(path))[0]
    assert 1 <= len(cfg.models) <= 2
    assert all("/models/" in m.path for m in cfg.models)
    cfg.method()  # every parameter resolves and the method accepts it


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_example_config_merges(tmp_path, ckpts, path):
    """With ./models/ pointing at small synthetic checkpoints, each example merges as written."""
    base = ckpts(torch.bfloat16, 2, False)[0]
    with open(path, encoding="utf-8") as f:
        text = f.read().replace("./models/", os.path.dirname(base) + "/")
    res = merge(parse_config(text, path), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert res.tensors > 0 and os.path.isfile(tmp_path / "out" / "config.json")


def test_api_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "api_merge.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("dppa: merged ") for line in lines), proc.stdout
    assert any(line.startswith("ties: merged ") for line in lines), proc.stdout
