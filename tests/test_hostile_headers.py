"""Class 4, untrusted checkpoint content: every malformed header or index is one InputError line
(exit 3), never an internal error, traceback or hang. Valid corner cases (0-D scalars, zero-size
tensors, odd names) are accepted and merge; FP8 codes without their scales, other small float
formats (FP6/FP4/E8M0) and empty checkpoints are refused at open time (readable quantized formats:
test_quant.py)."""

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dppa_stream.checkpoint import Checkpoint, read_rows
from dppa_stream.checkpoint.reader import INDEX_NAME
from dppa_stream.errors import InputError

from .test_hostile_cli import config, one_line_error, run, tensors, write_model

DEEP = 100_000


def raw(path, header, data=b"") -> str:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)
    return str(path)


def ent(dtype, shape, a, b):
    return {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}


def refused(path, *needles) -> str:
    with pytest.raises(InputError) as e:
        Checkpoint.open(str(path))
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= 2000, msg[:300]
    msg.encode("utf-8")  # printable everywhere: no lone surrogate reaches the terminal
    for n in needles:
        assert n in msg, (n, msg)
    return msg


HEADERS = {
    "product-overflows": (lambda: {"w": ent("F32", [2**62, 2**62], 0, 8)}, 8, ["'w'", "2**63"]),
    "dim-above-int64": (lambda: {"w": ent("F32", [2**63, 1], 0, 8)}, 8, ["'w'", "shape"]),
    "dims-product-above-int64-with-zero": (lambda: {"w": ent("F32", [2**40, 2**40, 0], 0, 0)}, 0, ["'w'", "2**63"]),
    "offset-above-int64": (lambda: {"w": ent("F32", [2], 2**64, 2**64 + 8)}, 8, ["'w'", "data_offsets"]),
    "4000-digit-dim": (lambda: {"w": ent("F32", [int("9" * 4000)], 0, 8)}, 8, ["'w'", "digits"]),
    "bool-dim": (lambda: {"w": ent("F32", [True], 0, 4)}, 4, ["'w'", "shape"]),
    "shape-not-a-list": (lambda: {"w": ent("F32", {"a": 1}, 0, 4)}, 4, ["'w'", "shape"]),
    "lone-surrogate-name": (lambda: b'{"w\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4,
                            ["not valid Unicode"]),
    "surrogate-metadata": (lambda: b'{"__metadata__": {"a": "\\udc80"}, "w": {"dtype": "F32", "shape": [1], '
                                   b'"data_offsets": [0, 4]}}', 4, ["__metadata__"]),
    "duplicate-name": (lambda: b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                               b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, ["'w'", "twice"]),
    # repeated keys that a plain parse would drop, leaving a valid header (see format.header_entries)
    "duplicate-key-in-entry": (lambda: b'{"w": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                               4, ["'dtype'", "twice"]),
    "duplicate-key-next-to-an-escaped-colon": (
        lambda: b'{"w\\u003ax": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, ["twice"]),
    "duplicate-metadata-key": (lambda: b'{"__metadata__": {"a": "b:c", "a": "b:c"}, '
                                       b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, ["'a'", "twice"]),
    "duplicate-metadata": (lambda: b'{"__metadata__": {"a": "b"}, "__metadata__": {"a": "b"}, '
                                   b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, ["__metadata__", "twice"]),
    "5000-digit-integer": (lambda: ('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}').encode(),
                           4, ["JSON"]),
    "nested-100k-deep": (lambda: ('{"w": ' + "[" * DEEP + "]" * DEEP + "}").encode(), 0, ["nested too deeply"]),
    "nested-objects-100k-deep": (lambda: ('{"w": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}").encode(), 0, ["JSON"]),
    "huge-string-name": (lambda: {"x" * 200_000: ent("F32", [1], 0, 4), "b": ent("F32", [1], 0, 4)}, 4, ["overlaps"]),
    "no-tensors": (lambda: {}, 0, ["no tensors"]),
    "only-metadata": (lambda: {"__metadata__": {"format": "pt"}}, 0, ["no tensors"]),
}


@pytest.mark.parametrize("case", list(HEADERS), ids=list(HEADERS))
def test_malformed_header_is_one_input_error(tmp_path, case):
    build, nbytes, needles = HEADERS[case]
    path = raw(tmp_path / "x.safetensors", build(), bytes(nbytes))
    refused(path, path, *needles)


@pytest.mark.parametrize("index", [
    b'{"weight_map": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"weight_map": {"w": "a.safetensors"}, "metadata": {"total_size": ' + b"9" * 5000 + b"}}",
    b'{"weight_map": {"w\\ud800": "a.safetensors"}}',
    b'{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}',
], ids=["nested", "5000-digits", "surrogate-name", "duplicate-key"])
def test_malformed_index_is_one_input_error(tmp_path, index):
    os.makedirs(tmp_path / "ck")
    save_file({"w": torch.ones(2)}, tmp_path / "ck" / "a.safetensors")
    (tmp_path / "ck" / INDEX_NAME).write_bytes(index)
    refused(tmp_path / "ck", INDEX_NAME)


# --- unreadable quantized tensors are refused, never merged into a copy of the base -------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_without_scales_is_refused_at_open(tmp_path, dtype):
    base = write_model(tmp_path / "in" / "base", tensors(0))
    ft_sd = tensors(0)
    ft_sd["model.layers.0.mlp.up_proj.weight"] = ft_sd["model.layers.0.mlp.up_proj.weight"].to(dtype)
    ft = write_model(tmp_path / "in" / "ft", ft_sd)
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), tmp_path / "out", "-q")
    one_line_error(code, lines, 3, "model.safetensors", "'model.layers.0.mlp.up_proj.weight'", "F8_",
                   "without a scale")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("dtype", ["F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "F8_E4M3FNUZ"])
def test_other_small_float_formats_are_refused_as_quantized(tmp_path, dtype):
    path = raw(tmp_path / "q.safetensors", {"w": ent(dtype, [4], 0, 4)}, bytes(4))
    refused(path, "'w'", dtype, "dequantize")


# --- valid corner cases are read, and merge ------------------------------------------------------------


@pytest.mark.parametrize("name", ["tab\there", "new\nline", "nul\0byte", "quote\"s'", "uni\u2028code", "x" * 5000])
def test_odd_tensor_names_merge_and_errors_stay_one_line(tmp_path, name):
    base = write_model(tmp_path / "in" / "base", tensors(0, extra={name: torch.ones(3, dtype=torch.bfloat16)}))
    ft = write_model(tmp_path / "in" / "ft", tensors(1, extra={name: torch.full((3,), 2.0, dtype=torch.bfloat16)}))
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), tmp_path / "out", "-q")
    assert code == 0, lines
    assert load_file(str(tmp_path / "out" / "model.safetensors"))[name].tolist() == [2.0, 2.0, 2.0]
    bad = write_model(tmp_path / "in" / "bad", tensors(1, extra={name: torch.ones(4, dtype=torch.bfloat16)}))
    code, lines, _ = run("merge", config(tmp_path / "c2.yml", base, bad), tmp_path / "out2", "-q")
    one_line_error(code, lines, 3, "[4]", "[3]")


@pytest.mark.parametrize("escaped", [False, True])
def test_names_with_colons_are_read(tmp_path, escaped):
    """':' in names and metadata (counted by the check for repeated keys), also written as \\u003A."""
    c = b"\\u003A" if escaped else b":"
    header = (b'{"__metadata__": {"k:1": "v:2"}, "a:b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
              b'"c' + c + b'd": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}')
    ck = Checkpoint.open(raw(tmp_path / "c.safetensors", header, bytes(12)))
    start = 8 + len(header)
    assert [(n, e.shape, e.offset) for n, e in ck.tensors.items()] == [("a:b", (1,), start), ("c:d", (2,), start + 4)]


def test_zero_size_next_to_a_huge_dimension_is_read(tmp_path):
    path = raw(tmp_path / "z.safetensors", {"z": ent("BF16", [2**40, 0], 0, 0), "w": ent("F32", [2], 0, 8)}, bytes(8))
    ck = Checkpoint.open(path)
    e = ck.tensors["z"]
    assert e.nbytes == 0 and read_rows(e, 0, e.rows).shape == (2**40, 0)


def _corner_pair(tmp_path, extra_shape, name):
    g = torch.Generator().manual_seed(0)
    sds = []
    for i in range(2):
        sd = tensors(i)
        sd[name] = (torch.randn(extra_shape, generator=g) + i).to(torch.bfloat16)
        sds.append(sd)
    base = write_model(tmp_path / "in" / "base", sds[0])
    ft = write_model(tmp_path / "in" / "ft", sds[1])
    return base, ft, sds


METHOD_PARAMS = {"task_arithmetic": "{weight: 1.0}", "linear": "{weight: 1.0}", "ties": "{weight: 1.0, density: 0.5}",
                 "dare_ties": "{weight: 1.0, density: 0.5}", "magnitude": "{weight: 1.0, density: 0.5}",
                 "dppa": "{amplification: [1.8, 1.0]}", "dp": None,
                 "dare_linear": "{weight: 1.0, density: 0.5}", "breadcrumbs": "{weight: 1.0, density: 0.5}",
                 "breadcrumbs_ties": "{weight: 1.0, density: 0.5}", "della": "{weight: 1.0, density: 0.5}",
                 "della_linear": "{weight: 1.0, density: 0.5}", "slerp": None, "multislerp": "{weight: 1.0}",
                 "karcher": None, "sce": None, "nearswap": None, "arcee_fusion": None, "passthrough": None,
                 "ram": None, "ramplus_tl": None}
# global parameters some methods need; linear and karcher merge a base_model as one more model
METHOD_EXTRA = {"linear": "parameters: {weight: 1.0}\n", "slerp": "parameters: {t: 0.3}\n",
                "nearswap": "parameters: {t: 0.01}\n", "sce": "parameters: {select_topk: 0.5}\n"}


def _corner_config(tmp_path, base, ft, method):
    if method == "passthrough":  # exactly one input, no base
        (tmp_path / "c.yml").write_text(f"merge_method: passthrough\nmodels:\n  - model: {json.dumps(str(ft))}\n")
        return str(tmp_path / "c.yml")
    return config(tmp_path / "c.yml", base, ft, method=method, params=METHOD_PARAMS[method],
                  extra=METHOD_EXTRA.get(method, ""))


@pytest.mark.parametrize("method", list(METHOD_PARAMS))
def test_scalar_tensor_merges(tmp_path, method):
    base, ft, sds = _corner_pair(tmp_path, (), "model.scale")
    code, lines, _ = run("merge", _corner_config(tmp_path, base, ft, method), tmp_path / "out", "-q")
    assert code == 0, lines
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["model.scale"].shape == ()


@pytest.mark.parametrize("method", list(METHOD_PARAMS))
def test_zero_size_linear_merges(tmp_path, method):
    base, ft, _ = _corner_pair(tmp_path, (0, 4), "model.layers.0.self_attn.q_proj.weight")
    code, lines, _ = run("merge", _corner_config(tmp_path, base, ft, method), tmp_path / "out", "-q")
    assert code == 0, lines
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"].shape == (0, 4)


def test_zero_size_with_huge_dimension_merges_quickly(tmp_path):
    for name in ("base", "ft"):
        os.makedirs(tmp_path / name)
        raw(tmp_path / name / "model.safetensors", {"z": ent("BF16", [2**40, 0], 0, 0), "w": ent("BF16", [4], 0, 8)},
            bytes(8))
    cfg = config(tmp_path / "c.yml", tmp_path / "base", tmp_path / "ft")
    res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", cfg, str(tmp_path / "out"), "-q"],
                         capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr
