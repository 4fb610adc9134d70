"""MoE-shaped checkpoints: many small tensors share work units, fused `[experts, out, in]` tensors
split inside an expert, every output stays byte-identical whatever the unit size, resume works
in the middle of a multi-tensor work unit, and a run whose bookkeeping cannot fit is refused
before it reads a tensor."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dppa_stream import sources, units
from dppa_stream.config import parse_config
from dppa_stream.errors import UsageError
from dppa_stream.pipeline import MergeOptions, merge, plan_units, unit_needs

from .crash_at import crash_run
from .reference import reference_merge
from .reference_dppa import dppa_merge

LAYERS, EXPERTS, HIDDEN, INNER = 3, 8, 16, 8


def _matrices(layers=LAYERS):
    """The unfused tensors of a small MoE model (no router, so that every 2-D tensor in a block
    is a linear for the independent DPPA reference as well)."""
    out = [("model.embed_tokens.weight", (64, HIDDEN))]
    for n in range(layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
        out += [(p + f"self_attn.{x}_proj.weight", (HIDDEN, HIDDEN)) for x in "qkvo"]
        for e in range(EXPERTS):
            out += [(f"{p}mlp.experts.{e}.gate_proj.weight", (INNER, HIDDEN)),
                    (f"{p}mlp.experts.{e}.up_proj.weight", (INNER, HIDDEN)),
                    (f"{p}mlp.experts.{e}.down_proj.weight", (HIDDEN, INNER))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (64, HIDDEN))]


def _fuse(tensors: dict) -> dict:
    """The same numbers with each layer's experts stacked: `mlp.experts.gate_proj` [E, out, in]."""
    out, stacks = {}, {}
    for name, t in tensors.items():
        if ".mlp.experts." not in name:
            out[name] = t
            continue
        prefix, rest = name.split(".mlp.experts.")
        stacks.setdefault(f"{prefix}.mlp.experts.{rest.split('.')[1]}", []).append(t)
    out.update({k: torch.stack(v) for k, v in stacks.items()})
    return out


def _write(folder, tensors: dict) -> str:
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "mixtral", "num_hidden_layers": LAYERS, "num_local_experts": EXPERTS,
                   "hidden_size": HIDDEN}, f)
    return str(folder)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """{"unfused": [base, ft1, ft2], "fused": [...]}: bf16, fine-tunes = base + heavy-tailed deltas."""
    root = tmp_path_factory.mktemp("moe")
    g = torch.Generator().manual_seed(7)
    models = []
    for k in range(3):
        tensors = {}
        for name, shape in _matrices():
            base = torch.randn(shape, generator=torch.Generator().manual_seed(hash(name) % 2**31)) * 0.02
            if k:
                delta = torch.distributions.StudentT(3.0).sample(shape) * 1e-3 * (1 + torch.rand(1, generator=g))
                base = base + delta * (torch.rand(shape, generator=g) > 0.05)
            tensors[name] = base.to(torch.bfloat16)
        models.append(tensors)
    names = ("base", "ft1", "ft2")
    return {"unfused": [_write(root / "unfused" / n, m) for n, m in zip(names, models)],
            "fused": [_write(root / "fused" / n, _fuse(m)) for n, m in zip(names, models)]}


def _config(paths, method: str, per_model: str = "", extra: str = "") -> str:
    base, *fts = paths
    models = "".join(f"  - model: {p}\n" + (f"    parameters: {{{per_model}}}\n" if per_model else "") for p in fts)
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}{extra}"


CONFIGS = {
    "ties": ("ties", "weight: 0.5, density: 0.3", "dtype: float32\nout_dtype: bfloat16\n"),
    "dppa": ("dppa", "", "parameters: {amplification: [1.8, 1.0]}\n"),
    "dppa_exact": ("dppa", "", "parameters: {semantics: exact, amplification: [1.8, 1.0]}\n"),
    "della": ("della", "weight: 0.5, density: 0.5, epsilon: 0.1", "dtype: float32\n"),
    "model_stock_rows": ("model_stock", "", "parameters: {filter_wise: true}\ndtype: float32\n"),
    "breadcrumbs": ("breadcrumbs_ties", "weight: 0.5, density: 0.7, gamma: 0.02", ""),
}


def _merge(text: str, out, **opts):
    return merge(parse_config(text, "<test>"), str(out), MergeOptions(quiet=True, **opts))


def _same(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        with open(os.path.join(a, n), "rb") as fa, open(os.path.join(b, n), "rb") as fb:
            assert fa.read() == fb.read(), n


@pytest.mark.parametrize("layout", ["unfused", "fused"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_same_bytes_whatever_the_unit_size(moe, tmp_path, layout, name):
    """Default work units (every tensor whole, many per work unit) against 512-byte units (fused
    expert tensors split inside an expert, matrices split into rows) and 40 KB units on one thread."""
    method, per_model, extra = CONFIGS[name]
    text = _config(moe[layout], method, per_model, extra)
    whole = _merge(text, tmp_path / "whole")
    assert whole.split_tensors == 0
    if layout == "unfused":
        assert whole.units < whole.tensors / 10, "small tensors should share work units"
    small = _merge(text, tmp_path / "small", unit_bytes=512)
    assert small.split_tensors > 0 and small.units > whole.units
    _same(tmp_path / "whole", tmp_path / "small")
    other = _merge(text, tmp_path / "other", unit_bytes=40_000, scheduler="threads:1")
    _same(tmp_path / "whole", tmp_path / "other")


def test_unfused_against_independent_references(moe, tmp_path):
    """TIES and DPPA over ~80 small tensors batched into a few work units (their statistics saved
    to and read back from the store) equal whole-tensor references written from the method
    descriptions."""
    from .reference import load_model

    paths = moe["unfused"]
    res = _merge(_config(paths, "ties", "weight: 0.5, density: 0.3", "dtype: float32\nout_dtype: bfloat16\n"),
                 tmp_path / "ties")
    assert res.units < 10
    want = reference_merge("ties", paths[0], paths[1:], [0.5, 0.5], [0.3, 0.3], out_dtype=torch.bfloat16)
    got = load_model(str(tmp_path / "ties"))
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n].view(torch.int16), want[n].view(torch.int16)), n

    _merge(_config(paths, "dppa", "", "parameters: {amplification: [1.8, 1.0]}\n"), tmp_path / "dppa")
    base, fts = load_model(paths[0]), [load_model(p) for p in paths[1:]]
    want = dppa_merge(base, fts, [0.9, 0.8], [[1.8, 1.0], [1.8, 1.0]], [1.0, 1.0])
    got = load_model(str(tmp_path / "dppa"))
    for n in want:
        assert torch.equal(got[n].view(torch.int16), want[n].view(torch.int16)), n


def test_fused_experts_split_where_the_method_allows(moe):
    """An elementwise method splits a fused [E, out, in] tensor at rows of its last dimension;
    DELLA (ranks along dimension 1) only at whole first-axis slices."""
    name = "model.layers.0.mlp.experts.gate_proj"
    for method, per_model, multiple in (("ties", "weight: 0.5, density: 0.3", HIDDEN),
                                        ("della", "weight: 0.5, density: 0.5, epsilon: 0.1", INNER * HIDDEN)):
        cfg = parse_config(_config(moe["fused"], method, per_model), "<test>")
        from dppa_stream.inputs import open_inputs

        inputs = open_inputs(cfg)
        planned = plan_units(inputs, cfg.method(0), unit_needs(inputs, cfg), 512)[name]  # 64 elements of 8 bytes
        starts = [u.flat_start for u in planned]
        assert all(s % multiple == 0 for s in starts), (method, starts)
        if method == "ties":
            assert len(planned) == 2 * EXPERTS, "ties should split inside an expert"
        else:
            assert len(planned) == EXPERTS, "della units are whole experts, however small the unit size"
        assert planned[-1].flat_stop == EXPERTS * INNER * HIDDEN


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600)


def test_resume_after_a_kill_in_the_middle_of_batched_work_units(moe, tmp_path):
    """Killed once 3 work units of ~10 tensors each are recorded: --resume skips those and
    writes the rest; the output equals an uninterrupted run."""
    cfg = tmp_path / "dppa.yml"
    cfg.write_text(_config(moe["unfused"], "dppa", "", "parameters: {amplification: [1.8, 1.0]}\n"))
    ref = _cli("merge", cfg, tmp_path / "ref", "-q", "--unit-size", "30KB", "--json", tmp_path / "ref.json")
    assert ref.returncode == 0, ref.stderr
    summary = json.loads((tmp_path / "ref.json").read_text())
    assert summary["tensors"] >= 5 * summary["units"], summary  # several tensors per work unit
    killed = crash_run("units:3", "merge", cfg, tmp_path / "out", "-q", "--unit-size", "30KB", "--scheduler", "threads:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done = (tmp_path / "out.partial" / ".dppa-stream" / "done.txt").read_text().splitlines()
    assert len(done) == 3
    res = _cli("merge", cfg, tmp_path / "out", "-q", "--unit-size", "30KB", "--resume", "--json", tmp_path / "r.json")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["resumed_units"] == 3
    _same(tmp_path / "ref", tmp_path / "out")


def test_bookkeeping_that_cannot_fit_is_refused_before_reading(moe, tmp_path, monkeypatch):
    """The client's state per tensor counts against --memory-limit: with state large enough (as
    for ~100k tensors) the run stops with one line naming the need, before it reads any tensor
    or creates anything."""
    monkeypatch.setattr(units, "PLAN_STATE", 4 << 20)  # every planned tensor holds 4 MiB here
    monkeypatch.setattr(sources, "read_range", lambda *a: pytest.fail("a tensor was read"))
    text = _config(moe["unfused"], "dppa", "", "")
    with pytest.raises(UsageError) as e:
        _merge(text, tmp_path / "out", memory_limit=1 << 30)
    msg = str(e.value)
    assert "\n" not in msg and "--memory-limit 1024 MiB is too small" in msg and "keep track of every tensor" in msg
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


@pytest.mark.parametrize("name", ["dppa", "dppa_exact"])
def test_fused_dppa_merged_per_unit_as_per_expert(moe, tmp_path, monkeypatch, name):
    """DPPA merges a fused expert tensor's unit with one kernel call over its experts
    (`DPUnitPlans.part_records`): the same bytes as a call per expert (`DeltaMethod.merge_unit`),
    for whole tensors and for units split inside an expert."""
    from dppa_stream.methods.dppa import DPPA, DPUnitPlans
    from dppa_stream.methods.gta import DeltaMethod

    method, per_model, extra = CONFIGS[name]
    text = _config(moe["fused"], method, per_model, extra)
    used = []
    part_records = DPUnitPlans.part_records
    monkeypatch.setattr(DPUnitPlans, "part_records",
                        lambda self, unit, c: used.append(unit.numel) or part_records(self, unit, c))
    for unit in (None, 512):
        _merge(text, tmp_path / f"one{unit}", unit_bytes=unit)
    assert len(used) > 2 * EXPERTS, used
    monkeypatch.setattr(DPPA, "merge_unit", lambda self, rows, plan, out, code: DeltaMethod.merge_unit(
        self, rows, plan.segments(0) if isinstance(plan, DPUnitPlans) else plan, out, code))
    for unit in (None, 512):
        _merge(text, tmp_path / f"each{unit}", unit_bytes=unit)
        _same(tmp_path / f"one{unit}", tmp_path / f"each{unit}")
