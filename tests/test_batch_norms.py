"""The methods that need per-tensor norms or selections (slerp and the other Gram methods,
row-wise nuslerp and model_stock, SCE, RAM/RAM+, nearswap, Arcee fusion) merge a work unit's whole small
tensors as one batch (`MergeMethod.merge_batch`): the bytes equal the tensor-by-tensor path and
512-byte units, with parameters that change from tensor to tensor inside the batch, and equal
independent references (exact sums by `math.fsum`, coefficients from the formulas in float64);
a NaN deep inside a batch is still named by file and tensor."""

import math
import os

import pytest
import torch

from dppa_stream import merge_pass
from dppa_stream.errors import InputError

from .reference import arcee_fusion, load_model, sce
from .test_batch import _bytes, _merge, _models, _write

GRADIENT = [0.25, 0.5, 0.75]  # a parameter [0.25, 0.75] at layers 0, 1, 2 (exact in binary); outside the layers 0.25

CONFIGS = {
    "slerp": "merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\nparameters: {t: [0.25, 0.75]}\n",
    "nuslerp": "merge_method: nuslerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {weight: 0.4}\n"
               "  - model: {ft2}\n    parameters: {weight: [0.25, 0.75]}\n",
    "nuslerp_rows": "merge_method: nuslerp\nmodels:\n  - model: {ft1}\n    parameters: {weight: 0.4}\n"
                    "  - model: {ft2}\n    parameters: {weight: [0.25, 0.75]}\nparameters: {nuslerp_flatten: false}\n",
    "multislerp": "merge_method: multislerp\nbase_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {weight: 0.5}\n"
                  "  - model: {ft2}\n    parameters: {weight: [0.25, 0.75]}\n",
    "karcher": "merge_method: karcher\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "model_stock_filter_wise": "merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft1}\n"
                               "  - model: {ft2}\nparameters: {filter_wise: true}\n",
    "sce": "merge_method: sce\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
           "parameters: {select_topk: [0.25, 0.75]}\n",
    "ram": "merge_method: ram\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
           "parameters: {epsilon: [0.0005, 0.001]}\n",
    "ramplus_tl": "merge_method: ramplus_tl\nbase_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n"
                  "parameters: {epsilon: 0.0005, r: [0.25, 0.75]}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {base}\nmodels:\n  - model: {ft1}\n",
    "nearswap": "merge_method: nearswap\nbase_model: {base}\nmodels:\n  - model: {ft2}\nparameters: {t: [0.0005, 0.001]}\n",
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_norms")
    return [_write(root / n, m) for n, m in zip(("base", "ft1", "ft2"), _models())]


def _config(paths, name, out_dtype="bfloat16"):
    text = CONFIGS[name]
    for k, p in zip(("base", "ft1", "ft2"), paths):
        text = text.replace("{" + k + "}", p)
    return text + f"dtype: float32\nout_dtype: {out_dtype}\n"


def _param(name):
    layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
    return GRADIENT[layer]


@pytest.mark.parametrize("method", list(CONFIGS))
def test_batches_equal_tensor_by_tensor(moe, tmp_path, monkeypatch, method):
    """Default units (the tensors in one batch, a parameter varying inside it) against the
    tensor-by-tensor path (batching switched off) and 512-byte units, float32 output (no rounding
    hides a difference)."""
    text = _config(moe, method, "float32")
    calls = []
    real = merge_pass.merge_batch
    monkeypatch.setattr(merge_pass, "merge_batch", lambda m, batch, *a: calls.append(len(batch.items)) or
                        real(m, batch, *a))
    res = _merge(text, tmp_path / "batched", scheduler="threads:1")
    assert calls and max(calls) >= res.tensors - 2, calls
    monkeypatch.setattr(merge_pass, "_batch_spans", lambda *a: ([], None))
    _merge(text, tmp_path / "single")
    monkeypatch.undo()
    _merge(text, tmp_path / "small", unit_bytes=512)
    assert _bytes(tmp_path / "batched") == _bytes(tmp_path / "single") == _bytes(tmp_path / "small")


def _fsum_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a_i b_i correctly rounded (each product of two float32 values is exact in float64)."""
    return math.fsum((a.double() * b.double()).reshape(-1).tolist())


def _slerp_ref(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp (docs/mergekit.md): lerp when the normalised vectors are (anti)parallel
    beyond 0.9995, else sin((1-t)θ)/sinθ a + sin(tθ)/sinθ b; coefficients in float64, the sum in
    float32 from 0 in input order."""
    na, nb = math.sqrt(_fsum_dot(a, a)), math.sqrt(_fsum_dot(b, b))
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = max(-1.0, min(1.0, _fsum_dot(a, b) / (na * nb)))
    if abs(dot) > 0.9995:
        c = (1 - t, t)
    else:
        theta = math.acos(dot)
        c = (math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta))
    c = [torch.tensor(x, dtype=torch.float32) for x in c]
    return (torch.zeros_like(a) + c[0] * a) + c[1] * b


def _model_stock_ref(base: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
    """mergekit's model_stock: t = n cos / (1 + (n - 1) cos) from the mean cosine of the deltas,
    base + Σ (t / n) d_k in float32 (each delta times its coefficient, summed in order)."""
    n = len(deltas)
    norms = [math.sqrt(_fsum_dot(d, d)) for d in deltas]
    cos = [max(-1.0, min(1.0, _fsum_dot(deltas[i], deltas[j]) / max(norms[i] * norms[j], 1e-6)))
           for i in range(n) for j in range(i + 1, n)]
    c = sum(cos) / len(cos)
    t = 0.0 if abs(1 + (n - 1) * c) < 1e-6 else n * c / (1 + (n - 1) * c)
    w = torch.tensor(t / n, dtype=torch.float32)
    acc = deltas[0] * w
    for d in deltas[1:]:
        acc = acc + d * w
    return base + acc


@pytest.mark.parametrize("method", ["slerp", "model_stock", "sce", "arcee_fusion"])
def test_batches_equal_the_reference(moe, tmp_path, method):
    """One batch of many small tensors, with slerp's t and SCE's select_topk changing by layer, equals
    the independent per-tensor references bit for bit."""
    _merge(_config(moe, method), tmp_path / "out", scheduler="threads:1")
    got = load_model(str(tmp_path / "out"))
    base, ft1, ft2 = (load_model(p) for p in moe)
    assert got.keys() == base.keys()
    for name, b in base.items():
        b = b.float()
        if method == "slerp":
            want = _slerp_ref(_param(name), b, ft1[name].float())
        elif method == "model_stock":
            want = _model_stock_ref(b, [ft1[name].float() - b, ft2[name].float() - b])
        elif method == "sce":
            want = sce(b, [ft1[name].float() - b, ft2[name].float() - b], _param(name))
        else:
            want = arcee_fusion(b, ft1[name].float())
        want = want.to(torch.bfloat16)
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name


@pytest.mark.parametrize("method", ["slerp", "model_stock", "sce", "ramplus_tl"])
def test_nan_deep_in_a_batch_is_named(tmp_path, monkeypatch, method):
    """A NaN in the 37th tensor of a fine-tune (one batch holds them all): the error names that
    file, tensor and its elements, and no output appears; with --allow-nonfinite the batch merges
    as the tensor-by-tensor path does."""
    models = _models()
    name = list(models[1])[36]
    bad = models[1][name].clone()
    bad.view(-1)[5] = float("nan")
    models[1][name] = bad
    paths = [_write(tmp_path / n, m) for n, m in zip(("base", "ft1", "ft2"), models)]
    with pytest.raises(InputError) as err:
        _merge(_config(paths, method), tmp_path / "out")
    msg = str(err.value)
    assert paths[1] in msg and repr(name) in msg and f"elements 0..{bad.numel() - 1}" in msg and "1 NaN" in msg, msg
    assert not os.path.exists(tmp_path / "out")
    _merge(_config(paths, method, "float32"), tmp_path / "batched", allow_nonfinite=True)
    monkeypatch.setattr(merge_pass, "_batch_spans", lambda *a: ([], None))
    _merge(_config(paths, method, "float32"), tmp_path / "single", allow_nonfinite=True)
    assert _bytes(tmp_path / "batched") == _bytes(tmp_path / "single")
