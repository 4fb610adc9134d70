"""Pass 2 merges a work unit's whole small tensors as one batch (`units.BatchRows`,
`MergeMethod.merge_batch`): the bytes equal the tensor-by-tensor path and independent references,
with parameters that differ from tensor to tensor inside a batch; reads and writes are coalesced;
a NaN deep inside a batch is still named by file and tensor."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from dppa_stream import merge_pass, units
from dppa_stream.config import parse_config
from dppa_stream.errors import InputError
from dppa_stream.pipeline import MergeOptions, merge

from . import reference_kernels as rk
from .reference import gta, keep_mask, load_model, prune_le, stream_key, topk_keep

LAYERS, EXPERTS, HIDDEN, INNER = 3, 16, 16, 8
DENSITY = [0.2, 0.4, 0.6]  # the gradient [0.2, 0.6] at layers 0, 1, 2 (t = 0, 0.5, 1); outside the layers: t = 0
WEIGHTS = {"gate_proj": 0.3, "up_proj": 0.7}  # a filter list; other tensors 0.5


def _tensors():
    out = [("model.embed_tokens.weight", (64, HIDDEN))]
    for n in range(LAYERS):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN))]
        for e in range(EXPERTS):
            out += [(f"{p}mlp.experts.{e}.gate_proj.weight", (INNER, HIDDEN)),
                    (f"{p}mlp.experts.{e}.up_proj.weight", (INNER, HIDDEN)),
                    (f"{p}mlp.experts.{e}.down_proj.weight", (HIDDEN, INNER))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (64, HIDDEN))]


def _write(folder, tensors: dict) -> str:
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "mixtral", "num_hidden_layers": LAYERS, "num_local_experts": EXPERTS,
                   "hidden_size": HIDDEN}, f)
    return str(folder)


def _models(seed=3):
    g = torch.Generator().manual_seed(seed)
    models = []
    for k in range(3):
        tensors = {}
        for i, (name, shape) in enumerate(_tensors()):
            base = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02
            if k:
                delta = torch.randn(shape, generator=g) * 1e-3
                base = base + delta * (torch.rand(shape, generator=g) > 0.1)  # ties at 0 among the deltas
            tensors[name] = base.to(torch.bfloat16)
        models.append(tensors)
    return models


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return [_write(root / n, m) for n, m in zip(("base", "ft1", "ft2"), _models())]


def _config(paths, method, extra_params="", extra=""):
    base, *fts = paths
    weight = "[{filter: gate_proj, value: 0.3}, {filter: up_proj, value: 0.7}, {value: 0.5}]"
    density = {"task_arithmetic": "", "dppa": ", amplification: [1.5, 1.0]"}.get(method, ", density: [0.2, 0.6]")
    models = "".join(f"  - model: {p}\n    parameters: {{weight: {weight}{density}{extra_params}}}\n" for p in fts)
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}dtype: float32\nout_dtype: bfloat16\n{extra}"


def _merge(text, out, **opts):
    return merge(parse_config(text, "<test>"), str(out), MergeOptions(quiet=True, **opts))


def _batched_and_single(text, tmp_path, monkeypatch, **opts):
    """Merge `text` batched, then tensor by tensor (batching switched off): the bytes must be
    equal. Returns the batched output's tensors."""
    _merge(text, tmp_path / "batched", **opts)
    monkeypatch.setattr(merge_pass, "_batch_spans", lambda *a: ([], None))
    _merge(text, tmp_path / "single")
    assert _bytes(tmp_path / "batched") == _bytes(tmp_path / "single")
    return load_model(str(tmp_path / "batched"))


def _bytes(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def _params(name):
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
    weight = next((w for key, w in WEIGHTS.items() if key in name), 0.5)
    return DENSITY[layer], weight


def _reference(paths, method):
    """Per tensor, from the method descriptions (tests/reference.py), with that tensor's density
    and weight worked out here from the config's gradient and filter list."""
    base, fts = load_model(paths[0]), [load_model(p) for p in paths[1:]]
    out = {}
    for name, b0 in base.items():
        density, weight = _params(name)
        b = b0.float()
        deltas = [ft[name].float() - b for ft in fts]
        if method == "ties":
            deltas = [topk_keep(d, density) for d in deltas]
        elif method == "magnitude":
            deltas = [prune_le(d, 1 - density) for d in deltas]
        elif method == "breadcrumbs_ties":
            deltas = [d * rk.breadcrumbs_keep(d.reshape(-1), density, 0.1).reshape(d.shape) for d in deltas]
        elif method.startswith("dare"):
            deltas = [_dare(d, density, stream_key(0, i, name)) for i, d in enumerate(deltas)]
        elif method.startswith("della"):
            deltas = [_della(d, density, 0.1, stream_key(0, i, name)) for i, d in enumerate(deltas)]
        consensus = method in ("ties", "breadcrumbs_ties", "dare_ties", "della")
        out[name] = gta(b, deltas, [weight, weight], consensus, method in ("ties", "della"), 1.0).to(torch.bfloat16)
    return out


def _della(d, density, epsilon, key):
    """DELLA's kept delta: each element kept with its rank's probability (tests/reference_kernels.py;
    a 1-D tensor is one vector), drawn from the counter stream one element at a time; L1 rescale."""
    shape = (1, d.numel()) if d.dim() == 1 else tuple(d.shape)
    probs = rk.della_keep_probability(rk.della_ranks(d.reshape(shape), shape), shape[1], density, epsilon)
    keep = torch.tensor([bool(keep_mask(key, i, 1, p)[0]) for i, p in enumerate(probs)]).reshape(d.shape)
    return _rescaled(d, d * keep)


def _dare(d, density, key):
    """DARE's kept delta with mergekit's L1 rescale (as tests/reference.py)."""
    return _rescaled(d, d * torch.from_numpy(keep_mask(key, 0, d.numel(), density)).reshape(d.shape))


def _rescaled(d, kept):
    """mergekit's L1 rescale of the `kept` part of delta `d`, sums exact (`math.fsum`)."""
    before = math.fsum(d.abs().reshape(-1).double().tolist())
    after = math.fsum(kept.abs().reshape(-1).double().tolist())
    return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept


@pytest.mark.parametrize("method", ["ties", "magnitude", "breadcrumbs_ties", "task_arithmetic", "dare_ties",
                                    "dare_linear", "della", "della_linear"])
def test_batches_equal_tensor_by_tensor_and_the_reference(moe, tmp_path, monkeypatch, method):
    """Default units (every tensor in one batch, densities and weights varying inside it) against
    the tensor-by-tensor path (batching switched off) and against 512-byte units; all equal the
    independent reference."""
    extra = {"breadcrumbs_ties": ", gamma: 0.1", "della": ", epsilon: 0.1", "della_linear": ", epsilon: 0.1"}.get(method, "")
    text = _config(moe, method, extra)
    calls = []
    real = merge_pass.merge_batch
    monkeypatch.setattr(merge_pass, "merge_batch", lambda m, batch, *a: calls.append(len(batch.items)) or
                        real(m, batch, *a))
    res = _merge(text, tmp_path / "batched", scheduler="threads:1")
    assert max(calls) >= res.tensors - 2, calls  # (the lm_head and embeddings fit; one batch holds all)
    monkeypatch.setattr(merge_pass, "_batch_spans", lambda *a: ([], None))
    _merge(text, tmp_path / "single")
    monkeypatch.undo()
    _merge(text, tmp_path / "small", unit_bytes=512)
    assert _bytes(tmp_path / "batched") == _bytes(tmp_path / "single") == _bytes(tmp_path / "small")
    want = _reference(moe, method)
    got = load_model(str(tmp_path / "batched"))
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n].view(torch.int16), want[n].view(torch.int16)), n


def test_linear_batches_equal_tensor_by_tensor(moe, tmp_path, monkeypatch):
    text = f"merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: [{{filter: gate_proj, value: 0.3}}, {{value: {w}}}]}}\n"
        for p, w in zip(moe, (0.5, 1.25, 2.0))) + "dtype: float32\nout_dtype: bfloat16\n"
    got = _batched_and_single(text, tmp_path, monkeypatch)
    models = [load_model(p) for p in moe]
    for name in got:
        w = torch.tensor([0.3 if "gate_proj" in name else x for x in (0.5, 1.25, 2.0)]).reshape(-1, *[1] * got[name].dim())
        want = ((w * torch.stack([m[name].float() for m in models])).sum(0) / w.sum(0)).to(torch.bfloat16)
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_batches_of_one_parameter_set_merge_as_one_span(moe, tmp_path, monkeypatch, method):
    """Every tensor with the same weights and nothing pruned: the batch goes to the kernel as one
    span, not a segment per tensor; the bytes equal the tensor-by-tensor path and the reference.
    With a weight that differs between tensors the segments are kept (the tests above)."""
    from dppa_stream import kernels

    segment_kernel = {"task_arithmetic": "gta_segments", "linear": "weighted_sum_segments"}[method]
    calls = []
    real = getattr(kernels, segment_kernel)
    monkeypatch.setattr(kernels, segment_kernel, lambda *a: calls.append(1) or real(*a))
    weights = (0.5, 1.25, 2.0)
    if method == "linear":
        text = "merge_method: linear\nmodels:\n" + "".join(
            f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in zip(moe, weights))
    else:
        text = f"merge_method: task_arithmetic\nbase_model: {moe[0]}\nmodels:\n" + "".join(
            f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in zip(moe[1:], weights[1:]))
    text += "dtype: float32\nout_dtype: bfloat16\n"
    got = _batched_and_single(text, tmp_path, monkeypatch, scheduler="threads:1")
    assert not calls  # (the tensor-by-tensor path never calls the segments kernel either)
    models = [load_model(p) for p in moe]
    for name in got:
        b = models[0][name].float()
        if method == "linear":
            w = torch.tensor(weights).reshape(-1, *[1] * b.dim())
            want = (w * torch.stack([m[name].float() for m in models])).sum(0) / w.sum(0)
        else:
            want = gta(b, [m[name].float() - b for m in models[1:]], list(weights[1:]), False, False, 1.0)
        assert torch.equal(got[name].view(torch.int16), want.to(torch.bfloat16).view(torch.int16)), name


def test_pruned_tensors_keep_their_segments_even_with_equal_records(tmp_path, monkeypatch):
    """TIES on tensors that are copies of one another (every |delta| tied at the threshold): their
    kernel records are equal, but which ties each keeps is counted from its own first element, so
    the batch must stay one segment per tensor; the bytes equal the tensor-by-tensor path."""
    signs = torch.tensor([1.0, -1.0, -1.0, 1.0] * 8).reshape(4, 8)
    names = [f"model.layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(12)]
    base = {n: torch.zeros(4, 8, dtype=torch.bfloat16) for n in names}
    fts = [{n: (signs * 1e-2 * k).to(torch.bfloat16) for n in names} for k in (1, 2)]
    paths = [_write(tmp_path / n, m) for n, m in zip(("base", "ft1", "ft2"), [base, *fts])]
    text = (f"merge_method: ties\nbase_model: {paths[0]}\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: 0.5, density: 0.5}}\n" for p in paths[1:]) + "dtype: bfloat16\n")
    got = _batched_and_single(text, tmp_path, monkeypatch, scheduler="threads:1")
    assert all(torch.equal(got[n], got[names[0]]) for n in names)


def test_same_rows_compares_bytes():
    """Rows are the same only bit for bit: -0.0 is not 0.0 (a weight's sign of zero reaches the
    output), and a NaN row equals itself."""
    import numpy as np

    from dppa_stream.methods.base import same_rows

    assert same_rows(np.array([[0.5, 1.0]] * 3, np.float32), np.ones(3, bool), np.zeros(1), np.zeros(0))
    assert not same_rows(np.array([[0.0], [-0.0]], np.float32))
    assert same_rows(np.array([[np.nan], [np.nan]], np.float32))
    assert not same_rows(np.ones(2, bool), np.array([1.0, 2.0]))
    rec = np.zeros((3, 2), [("mode", np.int64), ("weight", np.float32)])
    assert same_rows(rec)
    rec["weight"][2, 1] = 0.25
    assert not same_rows(rec)


def test_one_read_per_input_and_one_write_per_run(moe, tmp_path, monkeypatch):
    """A work unit of ~150 tensors stored back to back: 3 reads (one per input) and 1 write."""
    import dppa_stream.checkpoint.reader as reader
    import dppa_stream.checkpoint.writer as writer

    reads, writes = [], []
    real_read, real_write = os.preadv, os.pwrite
    monkeypatch.setattr(reader.os, "preadv", lambda fd, bufs, at: reads.append(at) or real_read(fd, bufs, at))
    monkeypatch.setattr(writer.os, "pwrite", lambda fd, data, at: writes.append(at) or real_write(fd, data, at))
    res = _merge(_config(moe, "ties"), tmp_path / "out", scheduler="threads:1")
    monkeypatch.undo()
    assert res.units == 1 and res.tensors > 150
    assert len(reads) == 3 and len(writes) == 1, (len(reads), len(writes))


@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "della", "dppa"])
def test_nan_deep_in_a_batch_is_named(tmp_path, monkeypatch, method):
    """A NaN in the 37th tensor of a fine-tune (one batch holds them all): the error names that
    file and tensor and its elements, and no output appears."""
    models = _models()
    name = list(models[2])[36]
    bad = models[2][name].clone()
    bad.view(-1)[5] = float("nan")
    models[2][name] = bad
    paths = [_write(tmp_path / n, m) for n, m in zip(("base", "ft1", "ft2"), models)]
    with pytest.raises(InputError) as err:
        _merge(_config(paths, method), tmp_path / "out")
    msg = str(err.value)
    assert paths[2] in msg and repr(name) in msg and f"elements 0..{bad.numel() - 1}" in msg and "1 NaN" in msg, msg
    assert not os.path.exists(tmp_path / "out")
    # --allow-nonfinite: merged as the tensor-by-tensor path merges it
    _merge(_config(paths, method), tmp_path / "batched", allow_nonfinite=True)
    monkeypatch.setattr(merge_pass, "_batch_spans", lambda *a: ([], None))
    _merge(_config(paths, method), tmp_path / "single", allow_nonfinite=True)
    assert _bytes(tmp_path / "batched") == _bytes(tmp_path / "single")


def test_kill_during_batches_then_resume_is_byte_identical(moe, tmp_path):
    """Killed once 2 work units (of ~20 batched tensors each) are recorded, the other thread in
    the middle of its batch: --resume redoes what was not recorded and the bytes equal an
    uninterrupted run."""
    import signal
    import subprocess
    import sys

    from .crash_at import crash_run

    cfg = tmp_path / "ties.yml"
    cfg.write_text(_config(moe, "ties"))
    args = ("-q", "--unit-size", "30KB")
    ref = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", cfg, tmp_path / "ref", *args,
                          "--json", tmp_path / "ref.json"], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    summary = json.loads((tmp_path / "ref.json").read_text())
    assert summary["tensors"] >= 10 * summary["units"] and summary["units"] >= 4, summary
    killed = crash_run("units:2", "merge", cfg, tmp_path / "out", *args, "--scheduler", "threads:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", cfg, tmp_path / "out", *args,
                          "--resume", "--json", tmp_path / "r.json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r.json").read_text())["resumed_units"] >= 2
    assert _bytes(tmp_path / "ref") == _bytes(tmp_path / "out")


@pytest.mark.parametrize("method", ["ties", "dppa"])
def test_batches_found_on_columns_equal_item_by_item(moe, tmp_path, monkeypatch, method):
    """A uniform work unit's batches are found on columns (`merge_pass._uniform`); they, and the
    bytes, equal what the item-by-item check finds (here with batches cut at a few tensors or
    bytes, so they start and end inside work units). A work unit mixing input dtypes (float32 norms among
    bfloat16 matrices) is checked item by item, and equals the tensor-by-tensor path. For a local
    method (ties) a task plans its tensors; DPPA's come planned before pass 2 (`DPUnitPlans`)."""
    found = {}
    real = merge_pass._batch_spans

    def spans(label):
        monkeypatch.setattr(merge_pass, "_batch_spans", lambda *a: found.setdefault(label, []).append(real(*a)[0]) or
                            real(*a))

    text = _config(moe, method)
    monkeypatch.setattr(units, "BATCH_MAX_ITEMS", 7)
    monkeypatch.setattr(units, "BATCH_MAX_BYTES", 6000)
    spans("columns")
    _merge(text, tmp_path / "columns", unit_bytes=100_000)
    spans("items")
    monkeypatch.setattr(merge_pass, "_uniform", lambda *a: None)
    _merge(text, tmp_path / "items", unit_bytes=100_000)
    monkeypatch.undo()
    columns, items = sorted(found["columns"]), sorted(found["items"])
    assert columns == items and any(len(s) > 10 and len(set(hi - lo for lo, hi in s)) > 1 for s in columns), columns
    assert _bytes(tmp_path / "columns") == _bytes(tmp_path / "items")

    models = [{n: t.float() if t.dim() == 1 else t for n, t in m.items()} for m in _models()]
    paths = [_write(tmp_path / n, m) for n, m in zip(("base", "ft1", "ft2"), models)]
    uniform = []
    real_uniform = merge_pass._uniform
    monkeypatch.setattr(merge_pass, "_uniform", lambda *a: uniform.append(real_uniform(*a)) or uniform[-1])
    _merge(_config(paths, method), tmp_path / "mixed")
    assert uniform and all(u is None for u in uniform)
    monkeypatch.setattr(merge_pass, "_batch_spans", lambda *a: ([], None))
    _merge(_config(paths, method), tmp_path / "single")
    assert _bytes(tmp_path / "mixed") == _bytes(tmp_path / "single")


def test_slerp_coefficients_of_a_batch_equal_the_scalar_formulas():
    """`slerp_batch` and `nuslerp_batch` (numpy and one kernel over a batch's Gram entries) equal
    the scalar formulas bit for bit: on the lerp path (nearly parallel), on the arc, at zero
    norms, antiparallel and with NaN/Inf."""
    import numpy as np

    from dppa_stream.methods.interp import nuslerp_batch, slerp_batch

    rng = np.random.default_rng(0)

    def arc(t, cos):
        theta = math.acos(cos)
        return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)

    def slerp(t, aa, ab, bb):  # mergekit's slerp weights, written out here
        na, nb = math.sqrt(aa), math.sqrt(bb)
        na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
        dot = max(-1.0, min(1.0, ab / (na * nb)))
        return (1 - t, t) if abs(dot) > 0.9995 else arc(t, dot)

    def nuslerp(t, aa, ab, bb):  # mergekit's nuslerp weights
        n0, n1 = max(math.sqrt(aa), 1e-7), max(math.sqrt(bb), 1e-7)
        c = max(-1.0, min(1.0, ab / (n0 * n1)))
        return (1 - t, t) if 1 - c * c <= 1e-16 else arc(t, c)

    rows = []
    for _ in range(5000):
        a, b = rng.normal(size=50), rng.normal(size=50)
        b = a + rng.choice([0.0, 1e-9, 1e-3, 1e-2, 0.5, 3.0]) * b  # near and far from the base
        rows.append((a @ a, a @ b, b @ b))
    rows += [(0.0, 0.0, 0.0), (1e-20, 0.0, 4.0), (4.0, -4.0, 4.0), (4.0, 4.0, 4.0),
             (float("nan"), 1.0, 1.0), (1.0, float("inf"), 1.0), (float("inf"), 1.0, float("inf"))]
    grams = np.array(rows)
    t = rng.choice([0.0, 0.4, 1.0, 0.73], len(grams))
    for batch, scalar in ((slerp_batch, slerp), (nuslerp_batch, nuslerp)):
        want = np.array([scalar(float(tk), *g) for tk, g in zip(t, rows)])
        assert batch(t, grams).tobytes() == want.tobytes()
        assert (want[:, 0] != 1 - t).any() and (want[:, 0] == 1 - t).any()  # both the arc and the lerp taken
