"""NaN/Inf weights are refused by default (file, tensor, count; exit 3; nothing written) and merged
when --allow-nonfinite is given."""

import os
import subprocess
import sys

import torch
from safetensors.torch import save_file


def _setup(tmp_path):
    base = {"w": torch.zeros(8, 4, dtype=torch.bfloat16), "b": torch.ones(3, dtype=torch.bfloat16)}
    ft = {"w": torch.full((8, 4), 0.5, dtype=torch.bfloat16), "b": torch.ones(3, dtype=torch.bfloat16)}
    ft["w"][2, 1] = float("nan")
    ft["w"][5, 0] = float("inf")
    for name, sd in (("base", base), ("ft", ft)):
        os.makedirs(tmp_path / name)
        save_file(sd, str(tmp_path / name / "model.safetensors"), {"format": "pt"})
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                   f"  - model: {tmp_path / 'ft'}\n    parameters: {{weight: 1.0}}\n")
    return cfg


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", *map(str, args)], capture_output=True, text=True)


def test_nonfinite_refused_with_name_and_count(tmp_path):
    cfg = _setup(tmp_path)
    res = _cli("merge", cfg, tmp_path / "out", "-q")
    assert res.returncode == 3, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "'w'" in lines[0] and "2 NaN/Inf" in lines[0] and "ft" in lines[0], res.stderr
    assert not (tmp_path / "out").exists()


def test_nonfinite_allowed_on_request(tmp_path):
    cfg = _setup(tmp_path)
    res = _cli("merge", cfg, tmp_path / "out", "-q", "--allow-nonfinite")
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "out" / "model.safetensors"))["w"]
    assert torch.isnan(w[2, 1]) and torch.isinf(w[5, 0]) and w[0, 0].item() == 0.5
