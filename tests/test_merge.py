"""Streaming merges equal the independent in-memory reference, bit for bit, whatever the chunking."""

import filecmp
import json
import os

import pytest
import torch

from dppa_stream.config import parse_config
from dppa_stream.pipeline import MergeOptions, merge

from .reference import load_model, reference_merge


def _yaml(method, base, models, weights, densities=None, extra_params="", dtype=None):
    lines = [f"merge_method: {method}"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for i, m in enumerate(models):
        p = [f"weight: {weights[i]}"]
        if densities:
            p.append(f"density: {densities[i]}")
        lines.append(f"  - model: {m}\n    parameters: {{{', '.join(p)}}}")
    if extra_params:
        lines.append(f"parameters: {{{extra_params}}}")
    if dtype:
        lines.append(f"out_dtype: {dtype}")
    return "\n".join(lines) + "\n"


def _bitwise_equal(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        x, y = a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)
        assert torch.equal(x, y), f"{k}: {int((a[k] != b[k]).sum())} elements differ"


CASES = [
    ("task_arithmetic", [0.7, 0.4], None, "", dict(normalize=False)),
    ("task_arithmetic", [0.7, 0.4], None, "normalize: true, lambda: 1.3", dict(normalize=True, lam=1.3)),
    ("ties", [0.5, 0.8], [0.2, 0.35], "", dict()),
    ("ties", [1.0, -0.5], [0.05, 1.0], "normalize: false, lambda: 0.9", dict(normalize=False, lam=0.9)),
    ("magnitude", [1.0, 1.0], [0.1, 0.3], "", dict()),
    ("dare_linear", [0.6, 0.6], [0.3, 0.5], "", dict()),
    ("dare_ties", [0.6, 0.6], [0.3, 0.9], "rescale: false", dict(rescale=False)),
    ("linear", [0.25, 0.75], None, "", dict()),
]


@pytest.mark.parametrize("method,weights,densities,params,ref_kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype,sharded", [(torch.bfloat16, True), (torch.float16, False), (torch.float32, True)])
def test_matches_reference(tmp_path, ckpts, method, weights, densities, params, ref_kw, dtype, sharded):
    base, ft1, ft2 = ckpts(dtype, 2, sharded)
    use_base = base if method != "linear" else None
    cfg = parse_config(_yaml(method, use_base, [ft1, ft2], weights, densities, params))
    out = tmp_path / "out"
    merge(cfg, str(out), MergeOptions(quiet=True, seed=7))
    got = load_model(str(out))
    want = reference_merge(method, use_base, [ft1, ft2], weights, densities, seed=7, **ref_kw)
    _bitwise_equal(got, want)


@pytest.mark.parametrize("method,densities", [("ties", [0.2, 0.35]), ("ties", [1.0, 0.3]), ("magnitude", [0.1, 0.3]),
                                              ("dare_ties", [0.3, 0.6]), ("task_arithmetic", None)])
def test_chunking_does_not_change_bytes(tmp_path, ckpts, method, densities):
    """Tensors split over many units (stats via Dask passes) equal whole-tensor units (inline stats)."""
    base, ft1, ft2 = ckpts(torch.bfloat16, 2, True)
    cfg = parse_config(_yaml(method, base, [ft1, ft2], [0.5, 0.5], densities))
    whole, split = tmp_path / "whole", tmp_path / "split"
    r1 = merge(cfg, str(whole), MergeOptions(quiet=True))
    r2 = merge(cfg, str(split), MergeOptions(quiet=True, unit_bytes=3000))
    assert r1.split_tensors == 0 and r2.split_tensors > 20
    for f in sorted(os.listdir(whole)):
        assert filecmp.cmp(whole / f, split / f, shallow=False), f


RANKED = [  # methods whose thresholds are exact ranks (methods/ranks.py), with their reference arguments
    ("breadcrumbs", "models:\n  - model: {ft1}\n    parameters: {weight: 0.6, density: 0.7}\n"
                    "  - model: {ft2}\n    parameters: {weight: 0.5, density: 0.4}\nparameters: {gamma: 0.05}\n",
     dict(weights=[0.6, 0.5], densities=[0.7, 0.4], gamma=0.05)),
    ("breadcrumbs_ties", "models:\n  - model: {ft1}\n    parameters: {weight: 1.0, density: 0.8}\n"
                         "  - model: {ft2}\n    parameters: {weight: 0.5, density: 0.5}\n",
     dict(weights=[1.0, 0.5], densities=[0.8, 0.5])),
    ("sce", "models:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {select_topk: 0.3}\n",
     dict(weights=None, select_topk=0.3)),
    ("arcee_fusion", "models:\n  - model: {ft1}\n", dict(weights=None)),
]


@pytest.mark.parametrize("method,models,ref_kw", RANKED, ids=[r[0] for r in RANKED])
@pytest.mark.parametrize("unit_bytes", [None, 3000])
def test_ranked_selections_match_reference(tmp_path, ckpts, method, models, ref_kw, unit_bytes):
    """Thresholds at exact ranks (breadcrumbs' two boundaries, SCE's variance, Arcee's quartiles)
    equal a whole-tensor sort, ties lowest index first, also when tensors are split over units
    (bf16 deltas: large tie classes)."""
    base, ft1, ft2 = ckpts(torch.bfloat16, 2, True)
    text = f"merge_method: {method}\nbase_model: {base}\n" + models.replace("{ft1}", ft1).replace("{ft2}", ft2) + "out_dtype: float32\n"
    r = merge(parse_config(text), str(tmp_path / "out"), MergeOptions(quiet=True, unit_bytes=unit_bytes))
    assert (r.split_tensors > 20) == (unit_bytes is not None)
    paths = [ft1] if method == "arcee_fusion" else [ft1, ft2]
    _bitwise_equal(load_model(str(tmp_path / "out")),
                   reference_merge(method, base, paths, out_dtype=torch.float32, **ref_kw))


def test_bf16_ties_at_threshold_keep_lowest_index(tmp_path):
    """Heavy ties straddling the threshold, split over units: exactly k kept, lowest indices first."""
    from safetensors.torch import save_file

    n_rows, cols = 64, 33
    base = torch.zeros(n_rows, cols, dtype=torch.bfloat16)
    vals = torch.tensor([0.0, 0.25, 0.5, 0.5, -0.5, 1.0, -2.0], dtype=torch.bfloat16)
    ft = vals[torch.arange(n_rows * cols) % 7].reshape(n_rows, cols)
    for name, t in (("base", base), ("ft", ft)):
        os.makedirs(tmp_path / name)
        save_file({"w": t}, str(tmp_path / name / "model.safetensors"), {"format": "pt"})
    cfg = parse_config(_yaml("ties", str(tmp_path / "base"), [str(tmp_path / "ft")], [1.0], [0.5]))
    merge(cfg, str(tmp_path / "a"), MergeOptions(quiet=True, unit_bytes=200))
    got = load_model(str(tmp_path / "a"))["w"]
    want = reference_merge("ties", str(tmp_path / "base"), [str(tmp_path / "ft")], [1.0], [0.5])["w"]
    assert int((got != 0).sum()) == int(0.5 * n_rows * cols)
    assert torch.equal(got, want)


def test_dare_same_seed_same_bytes_other_seed_differs(tmp_path, ckpts):
    base, ft1, ft2 = ckpts(torch.bfloat16, 2, False)
    cfg = parse_config(_yaml("dare_linear", base, [ft1, ft2], [0.5, 0.5], [0.3, 0.3]))
    merge(cfg, str(tmp_path / "a"), MergeOptions(quiet=True, seed=1))
    merge(cfg, str(tmp_path / "b"), MergeOptions(quiet=True, seed=1, unit_bytes=2000))
    merge(cfg, str(tmp_path / "c"), MergeOptions(quiet=True, seed=2))
    a, b, c = (open(tmp_path / x / "model.safetensors", "rb").read() for x in "abc")
    assert a == b and a != c
    # the realised keep rate of each fine-tune's delta is density (0.3): merged - base is zero where
    # both models dropped an element, i.e. with probability 0.7 ** 2 wherever both deltas are non-zero
    merge(parse_config(_yaml("dare_linear", base, [ft1, ft2], [0.5, 0.5], [0.3, 0.3], dtype="float32")),
          str(tmp_path / "f32"), MergeOptions(quiet=True, seed=1))  # float32 output: no rounding hides a kept delta
    name = "model.layers.0.mlp.up_proj.weight"
    b = load_model(base)[name].float()
    d1, d2 = (load_model(f)[name].float() - b for f in (ft1, ft2))
    merged = load_model(str(tmp_path / "f32"))[name] - b
    both = (d1 != 0) & (d2 != 0)
    assert both.sum() > 2000
    dropped = float((merged[both] == 0).float().mean())
    assert abs(dropped - 0.7 ** 2) < 0.03, dropped


def test_output_layout_and_hf_files(tmp_path, ckpts):
    base, ft1, ft2 = ckpts(torch.bfloat16, 2, True)
    cfg = parse_config(_yaml("task_arithmetic", base, [ft1, ft2], [0.5, 0.5]) + "dtype: float32\n")
    out = tmp_path / "out"
    merge(cfg, str(out), MergeOptions(quiet=True, shard_size=30_000))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    tensors = load_model(str(out))
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert (out / "generation_config.json").exists()
    card = (out / "README.md").read_text()
    assert "task_arithmetic" in card and ft1 in card
    assert not (tmp_path / "out.partial").exists()
    assert not (out / ".dppa-stream").exists()
    for f in files:  # every shard is valid safetensors with pt metadata
        from safetensors import safe_open

        with safe_open(str(out / f), "pt") as h:
            assert h.metadata() == {"format": "pt"}


@pytest.mark.slow
def test_processes_scheduler_same_bytes(tmp_path, ckpts):
    base, ft1, ft2 = ckpts(torch.bfloat16, 2, True)
    cfg = parse_config(_yaml("ties", base, [ft1, ft2], [0.5, 0.5], [0.3, 0.3]))
    merge(cfg, str(tmp_path / "threads"), MergeOptions(quiet=True, unit_bytes=5000))
    merge(cfg, str(tmp_path / "procs"), MergeOptions(quiet=True, scheduler="processes:2", memory_limit=3 << 30))
    for f in sorted(os.listdir(tmp_path / "threads")):
        assert filecmp.cmp(tmp_path / "threads" / f, tmp_path / "procs" / f, shallow=False), f


def test_a_run_whose_process_exits_next_leaves_its_bookkeeping_to_the_exit(tmp_path, ckpts, monkeypatch):
    """`MergeOptions.exiting` (the console script): the session stays referenced rather than freed
    object by object; any other caller (the API, a test calling the CLI's `main`) frees it."""
    from dppa_stream import pipeline

    monkeypatch.setattr(pipeline, "_LEFT_FOR_EXIT", [])
    base, ft1, ft2 = ckpts(torch.bfloat16, 2, True)
    cfg = parse_config(_yaml("task_arithmetic", base, [ft1, ft2], [0.5, 0.5]))
    merge(cfg, str(tmp_path / "a"), MergeOptions(quiet=True))
    assert pipeline._LEFT_FOR_EXIT == []
    merge(cfg, str(tmp_path / "b"), MergeOptions(quiet=True, exiting=True))
    assert len(pipeline._LEFT_FOR_EXIT) == 1
    assert sorted(pipeline._LEFT_FOR_EXIT[0].inputs.names) == sorted(load_model(str(tmp_path / "b")))
    for f in os.listdir(tmp_path / "a"):
        if f.endswith(".safetensors"):
            assert filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False), f
