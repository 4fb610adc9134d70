"""Iso-C and TSV-M: end to end against the float64 in-memory references written from their papers
(tests/reference_spectral.py), byte-identical whatever the work units, the exact Gram accumulation
independent of the order blocks are added in, and the memory refusal."""

import os

import numpy as np
import pytest
import torch

from dppa_stream.config import parse_config
from dppa_stream.errors import UsageError
from dppa_stream.methods.isoc import ROW_BLOCK, exact_add, exact_value, orientation
from dppa_stream.pipeline import MergeOptions, merge
from dppa_stream.synthetic import LlamaShape, write_llama_set

from . import reference_spectral as ref
from .reference import load_model

# embeddings and lm_head (1100 x 40) span three row blocks; q/o (40 x 40) and gate/up (72 x 40) are
# tall, k/v (20 x 40) and down (40 x 72) wide (worked on transposed, one unit each)
SHAPE = LlamaShape(hidden=40, intermediate=72, layers=2, vocab=2 * ROW_BLOCK + 76, heads=4, kv_heads=2)
REFERENCES = {"iso_c": ref.iso_c, "tsv_m": ref.tsv_m}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectral")
    return {(dtype, k): write_llama_set(str(root / f"{dtype}-{k}"), SHAPE, k, dtype, seed=7, drift=3e-2)
            for dtype, k in ((torch.float32, 2), (torch.float32, 3), (torch.bfloat16, 2))}


def _config(method, paths, alpha=None, out_dtype=None):
    lines = [f"merge_method: {method}", f"base_model: {paths[0]}", "models:"]
    lines += [f"  - model: {p}" for p in paths[1:]]
    if alpha is not None:
        lines.append(f"parameters: {{alpha: {alpha}}}")
    if out_dtype:
        lines.append(f"out_dtype: {out_dtype}")
    return parse_config("\n".join(lines) + "\n")


def _merge(tmp_path, name, cfg, **opts):
    out = str(tmp_path / name)
    merge(cfg, out, MergeOptions(quiet=True, **opts))
    return load_model(out)


@pytest.mark.parametrize("method", sorted(REFERENCES))
@pytest.mark.parametrize("finetunes,alpha", [(2, None), (3, 1.3)])
def test_matches_paper_reference(tmp_path, models, method, finetunes, alpha):
    """float32 inputs, float32 output: every tensor within one float32 rounding of the float64
    reference (the streamed Gram route differs from a direct SVD by ~1e-13 relative)."""
    paths = models[(torch.float32, finetunes)]
    got = _merge(tmp_path, "out", _config(method, paths, alpha), unit_bytes=60_000)
    inputs = [load_model(p) for p in paths]
    for name, out in got.items():
        want = REFERENCES[method](inputs[0][name].numpy(), [m[name].numpy() for m in inputs[1:]],
                                  1.0 if alpha is None else alpha)
        np.testing.assert_allclose(out.numpy(), want, rtol=2.5e-7, atol=1e-9, err_msg=name)
        if orientation(tuple(out.shape)) is not None:  # the method changed the matrix (not task arithmetic)
            ta = inputs[0][name].double().numpy() + (1.0 if alpha is None else alpha) * sum(
                m[name].double().numpy() - inputs[0][name].double().numpy() for m in inputs[1:])
            assert np.abs(want - ta).max() > 1e-4, name


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_byte_identical_whatever_the_units(tmp_path, models, method):
    """Whole tensors (one unit each), one row block per unit, and units on processes: same bytes."""
    paths = models[(torch.bfloat16, 2)]
    cfg = _config(method, paths)
    whole = _merge(tmp_path, "whole", cfg)
    split = _merge(tmp_path, "split", cfg, unit_bytes=50_000)
    procs = _merge(tmp_path, "procs", cfg, unit_bytes=120_000, scheduler="processes:2")
    assert set(whole) == set(split) == set(procs)
    for name in whole:
        for other in (split, procs):
            assert torch.equal(whole[name].view(torch.int16), other[name].view(torch.int16)), name


def test_split_embeddings_use_several_units(models):
    """The byte-identity test above is only meaningful if the embeddings really are split."""
    from dppa_stream.inputs import open_inputs
    from dppa_stream.pipeline import plan_units, unit_needs

    cfg = _config("iso_c", models[(torch.bfloat16, 2)])
    inputs = open_inputs(cfg, False, True)
    units = plan_units(inputs, cfg.method(0), unit_needs(inputs, cfg), 50_000)
    assert len(units["model.embed_tokens.weight"]) == 3
    assert len(units["model.layers.0.mlp.down_proj.weight"]) == 1  # wide: whole


def test_exact_gram_sum_is_order_free():
    """Block Grams added in any grouping give the same limbs, and the value is the exact sum."""
    rng = np.random.default_rng(3)
    grams = [(lambda x: x.T @ x)(rng.normal(size=(7, 5)) * 10.0 ** rng.integers(-6, 3)) for _ in range(6)]
    one = None
    for g in grams:
        one = exact_add(one, g, "t")
    a, b = None, None
    for g in grams[::2]:
        a = exact_add(a, g, "t")
    for g in grams[1::2][::-1]:
        b = exact_add(b, g, "t")
    from dppa_stream.methods.isoc import DeltaGram

    two = DeltaGram(0, args=("sum", 5)).combine(b, a)
    assert np.array_equal(one, two)
    from fractions import Fraction

    for i, j in ((0, 0), (1, 3), (4, 2)):
        exact = sum(Fraction(float(g[i, j])) for g in grams)
        assert abs(float(exact) - exact_value(one)[i, j]) <= 2.0 ** -52 * abs(float(exact)) + 2.0 ** -118


def test_memory_limit_refused_before_reading(tmp_path):
    """256 columns, three fine-tunes: TSV-M's Gram of [D_1 | D_2 | D_3] is 768 x 768 (three int64
    limbs, a block Gram, eigh's copies: ~45 MiB a task), which 400 MiB for two workers cannot hold
    next to the processes (300 MiB) and the tasks' overhead; Iso-C's 256 x 256 fits."""
    paths = write_llama_set(str(tmp_path / "wide"), LlamaShape(hidden=256, intermediate=64, layers=1, vocab=64), 3,
                            torch.float32)
    with pytest.raises(UsageError, match=r"--memory-limit 400 MiB is too small for tsv_m: tensor 'model\..*' needs "
                                         r"\d+ MiB in one task .*; need at least \d+ MiB \(or use fewer workers, "
                                         r"or a --unit-size"):
        merge(_config("tsv_m", paths), str(tmp_path / "out"), MergeOptions(quiet=True, memory_limit=400 << 20,
                                                                          scheduler="threads:2"))
    assert not os.path.exists(tmp_path / "out.partial") and not os.path.exists(tmp_path / "out")
    merge(_config("iso_c", paths), str(tmp_path / "iso"), MergeOptions(quiet=True, memory_limit=400 << 20,
                                                                       scheduler="threads:2", unit_bytes=4 << 20))


def test_rank_deficient_sum_keeps_its_directions_only():
    """A rank-1 sum of task vectors: Iso-C gives mean(S) u v^T with the mean over all min(m, n)
    singular values (the others are zero); the directions of zero singular values, which an SVD
    fills with arbitrary vectors, are left out (docs/spectral.md)."""
    from dppa_stream.methods.isoc import IsoC

    rng = np.random.default_rng(5)
    u, v = rng.normal(size=30), rng.normal(size=8)
    x = np.outer(u, v)
    a, m = IsoC.__new__(IsoC).factors(x.T @ x, (30, 8, False), 1)
    got = (x @ a[0]) @ m
    s = np.linalg.norm(u) * np.linalg.norm(v)
    np.testing.assert_allclose(got, s / 8 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v)), atol=1e-12)
    from dppa_stream.methods.tsvm import TsvM

    for cls, w in ((IsoC, 8), (TsvM, 16)):  # no delta at all: the matrix stays the base
        a, m = cls.__new__(cls).factors(np.zeros((w, w)), (30, 8, False), w // 8)
        assert m.shape == (0, 8) and all(p.shape == (8, 0) for p in a)


def test_nonfinite_deltas_refused_in_one_line(tmp_path):
    """A matrix holding NaN/Inf has no SVD: one line naming the file and the tensor, with or without
    --allow-nonfinite; a tall matrix (row blocks) and a wide one (worked on transposed)."""
    paths = write_llama_set(str(tmp_path / "in"), LlamaShape(hidden=16, intermediate=24, layers=1, vocab=32), 1,
                            torch.float32)
    from safetensors.torch import load_file, save_file

    f = os.path.join(paths[1], "model.safetensors")
    clean = load_file(f)
    for tensor, value in (("mlp.up_proj", float("nan")), ("self_attn.k_proj", float("-inf"))):
        sd = {k: v.clone() for k, v in clean.items()}
        sd[f"model.layers.0.{tensor}.weight"][3, 2] = value
        save_file(sd, f, metadata={"format": "pt"})
        for method in sorted(REFERENCES):
            for opts in (dict(), dict(allow_nonfinite=True)):
                with pytest.raises(Exception, match="NaN") as e:
                    merge(_config(method, paths), str(tmp_path / "out"), MergeOptions(quiet=True, **opts))
                assert "\n" not in str(e.value) and str(e.value).startswith(f"{f}: tensor 'model.layers.0.{tensor}")


_RUNNER = """
import json, sys
from dppa_stream.config import parse_config
from dppa_stream.pipeline import MergeOptions, merge
out = {}
for name, text, dst in json.loads(sys.argv[1]):
    r = merge(parse_config(text), dst,
              MergeOptions(quiet=True, memory_limit=%d, unit_bytes=50_000, scheduler="threads:2"))
    out[name] = {"peak": r.peak_anon_bytes, "split": r.split_tensors}
assert "torch" not in sys.modules
print(json.dumps(out))
"""


def test_peak_memory_within_the_limit(tmp_path, models):
    """In a fresh process (no torch), both methods split the embeddings and stay under the limit."""
    import json
    import subprocess
    import sys

    limit = 450 << 20
    paths = models[(torch.bfloat16, 2)]
    jobs = [(m, "merge_method: %s\nbase_model: %s\nmodels:\n" % (m, paths[0]) + "".join(
        f"  - model: {p}\n" for p in paths[1:]), str(tmp_path / m)) for m in REFERENCES]
    res = subprocess.run([sys.executable, "-c", _RUNNER % limit, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name, r in json.loads(res.stdout.strip().splitlines()[-1]).items():
        assert r["split"] >= 2, (name, r)
        assert 0 < r["peak"] <= limit, f"{name}: peak {r['peak'] >> 20} MiB over {limit >> 20} MiB"


@pytest.mark.parametrize("cond", [1e2, 1e5])
def test_gram_route_accuracy_on_ill_conditioned_deltas(cond):
    """The Gram squares the condition number, yet the projection stays within ~eps * cond of the
    direct SVD: 1124 x 128 deltas of two tasks with log-spaced spectra, streamed in row blocks."""
    from dppa_stream.methods.isoc import IsoC, one_blas_thread
    from dppa_stream.methods.tsvm import TsvM

    one_blas_thread()  # as the methods run (two BLAS threads on a busy machine are far slower)
    rng = np.random.default_rng(11)
    m, n = 2 * ROW_BLOCK + 100, 128

    def delta():
        u, _ = np.linalg.qr(rng.normal(size=(m, n)))
        v, _ = np.linalg.qr(rng.normal(size=(n, n)))
        return ((u * np.logspace(0, -np.log10(cond), n)) @ v.T * 1e-3).astype(np.float32).astype(np.float64)

    def gram(x):
        acc = None
        for r in range(0, m, ROW_BLOCK):
            acc = exact_add(acc, x[r:r + ROW_BLOCK].T @ x[r:r + ROW_BLOCK], "t")
        return exact_value(acc)

    d = [delta(), delta()]
    zero = np.zeros((m, n))
    a, mm = IsoC.__new__(IsoC).factors(gram(d[0] + d[1]), (m, n, False), 2)
    want = ref.iso_c(zero, d)
    assert np.abs((d[0] + d[1]) @ a[0] @ mm - want).max() <= 1e-13 * cond * np.abs(want).max()
    x = np.hstack(d)
    a, mm = TsvM.__new__(TsvM).factors(gram(x), (m, n, False), 2)
    want = ref.tsv_m(zero, d)
    assert np.abs(np.hstack([d[0] @ a[0], d[1] @ a[1]]) @ mm - want).max() <= 1e-13 * cond * np.abs(want).max()


_BLAS_RUNNER = """
import sys
import numpy
import dppa_stream
from threadpoolctl import threadpool_info

def blas():
    return sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})

before = blas()
for out in sys.argv[2:]:
    dppa_stream.merge(sys.argv[1], out, quiet=True)
print(before, blas())
"""


def test_the_api_gives_back_the_callers_blas_threads(tmp_path, models):
    """A spectral merge runs BLAS one thread per process (determinism); a script or notebook that
    calls `dppa_stream.merge` gets its own thread count back afterwards (a fresh process: BLAS
    started with two threads, as on a 2-core machine)."""
    import subprocess
    import sys

    paths = models[(torch.bfloat16, 2)]
    cfg = tmp_path / "iso_c.yml"
    models_yml = "".join(f"  - model: {p}\n" for p in paths[1:])
    cfg.write_text(f"merge_method: iso_c\nbase_model: {paths[0]}\nmodels:\n{models_yml}")
    outs = [str(tmp_path / "one"), str(tmp_path / "two")]
    res = subprocess.run([sys.executable, "-c", _BLAS_RUNNER, str(cfg), *outs], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OPENBLAS_NUM_THREADS="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split("\n")[-2] == "[2] [2]"
    one, two = (tmp_path / o / "model.safetensors" for o in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()


@pytest.mark.parametrize("fault", ["stats:1", "units:3"])
def test_sigkill_then_resume_is_byte_identical(tmp_path, models, fault):
    """TSV-M killed once the Gram matrices of the split tensors are stored (or a few units into pass 2),
    then resumed on two processes: the stored Grams load back, and the output is the same bytes."""
    import json
    import signal
    import subprocess
    import sys

    from .crash_at import crash_run

    paths = models[(torch.bfloat16, 2)]
    cfg = tmp_path / "tsv_m.yml"
    cfg.write_text("merge_method: tsv_m\nbase_model: %s\nmodels:\n%s" % (paths[0], "".join(
        f"  - model: {p}\n" for p in paths[1:])))
    args = ["-q", "--unit-size", "50KB"]
    whole = tmp_path / "whole"
    merge(_config("tsv_m", paths), str(whole), MergeOptions(quiet=True))
    killed = crash_run(fault, "merge", cfg, tmp_path / "out", *args, "--scheduler", "threads:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "out.partial" / ".dppa-stream" / "run.json").exists()
    res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", str(cfg), str(tmp_path / "out"),
                          *args, "--resume", "--scheduler", "processes:2", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "r.json").read_text())
    assert summary["split_tensors"] >= 2 and summary["resumed_units"] >= (3 if fault == "units:3" else 0)
    assert (whole / "model.safetensors").read_bytes() == (tmp_path / "out" / "model.safetensors").read_bytes()
