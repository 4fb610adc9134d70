"""Bit-for-bit parity with mergekit 0.1.5 for ties and task_arithmetic (float32 inputs), run when
mergekit is installed: in this environment, or in the venv named by $MERGEKIT_VENV
(benchmarks/parity_mergekit.py is the longer version of this check)."""

import os
import shutil
import subprocess

import pytest
import torch

from dppa_stream.config import parse_config
from dppa_stream.pipeline import MergeOptions, merge
from dppa_stream.synthetic import LlamaShape, write_llama_set

from .reference import load_model


def _mergekit():
    venv = os.environ.get("MERGEKIT_VENV", "/work/mk-venv")
    for cand in (os.path.join(venv, "bin", "mergekit-yaml"), shutil.which("mergekit-yaml")):
        if cand and os.path.exists(cand):
            return cand
    return None


MK = _mergekit()
pytestmark = pytest.mark.skipif(MK is None, reason="mergekit 0.1.5 not installed (set MERGEKIT_VENV)")


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", "{weight: 0.7}"),
    ("ties", "{weight: 0.6, density: 0.3}"),
])
def test_bit_identical_to_mergekit(tmp_path, method, params):
    base, ft1, ft2 = write_llama_set(str(tmp_path / "in"), LlamaShape(hidden=48, intermediate=80, layers=2, vocab=64),
                                     2, torch.float32, seed=3)
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {params}\n"
            f"  - model: {ft2}\n    parameters: {params}\ndtype: float32\n")
    (tmp_path / "c.yml").write_text(text)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run([MK, str(tmp_path / "c.yml"), str(tmp_path / "mk")], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    merge(parse_config(text), str(tmp_path / "ours"), MergeOptions(quiet=True))
    ours, theirs = load_model(str(tmp_path / "ours")), load_model(str(tmp_path / "mk"))
    assert set(ours) == set(theirs)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name}: {int((ours[name] != theirs[name]).sum())} differ"
