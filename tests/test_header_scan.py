"""Long safetensors headers in safetensors' own form are scanned (`kernels.headers`), not parsed as
JSON: the entries equal the strict parse's for files safetensors wrote, and any header that
departs from that form in any way gets exactly the strict parse's answer or error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from dppa_stream.checkpoint import format as F
from dppa_stream.errors import InputError


def _strict(path, raw, size):
    return F.parse_entries(path, F.decode_header(path, raw), 8 + len(raw), size)


def _outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except InputError as e:
        return "error", str(e)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A file safetensors wrote: 400 tensors of several dtypes and ranks (a scalar too)."""
    rng = np.random.default_rng(0)
    tensors = {"scalar": np.array(3.0, np.float32)}
    for i in range(400):
        shape = [(8, 4), (3, 2, 5), (7,), (1, 1, 1, 2)][i % 4]
        dtype = [np.float32, np.float16, np.int8, np.uint8, np.int64][i % 5]
        tensors[f"model.layers.{i // 7}.mlp.experts.{i}.w{i % 3}.weight"] = rng.integers(0, 9, shape).astype(dtype)
    path = str(tmp_path_factory.mktemp("scan") / "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    return path, data[8:8 + n], len(data)


def test_a_file_safetensors_wrote_is_scanned_to_the_strict_entries(written):
    path, raw, size = written
    assert len(raw) >= F.SCAN_MIN_BYTES
    got = F._scanned_entries(path, raw, 8 + len(raw), size, ())
    assert got is not None and got == _strict(path, raw, size)
    assert F.header_entries(path, raw, size) == got


def _mutations(raw: bytes):
    text = raw.decode()
    first = text.index('"model.layers.0.')
    yield "space after a colon", text.replace('"dtype":', '"dtype": ', 1)
    yield "keys in another order", text.replace('{"dtype":"F32","shape":[8,4],', '{"shape":[8,4],"dtype":"F32",', 1)
    yield "an escaped name", text[:first] + '"\\u006dodel.' + text[first + len('"model.'):]
    yield "a non-ASCII name", text[:first] + '"mödel.' + text[first + len('"model.'):]
    yield "a name with a control character", text[:first] + '"m\\todel.' + text[first + len('"model.'):]
    yield "a leading zero", text.replace('"shape":[8,4]', '"shape":[08,4]', 1)
    yield "a negative dimension", text.replace('"shape":[8,4]', '"shape":[-8,4]', 1)
    yield "a zero dimension", text.replace('"shape":[7]', '"shape":[0]', 1)
    yield "a 19-digit offset", text.replace('"data_offsets":[0,', '"data_offsets":[0000000000000000000,', 1)
    yield "a float dimension", text.replace('"shape":[8,4]', '"shape":[8.0,4]', 1)
    yield "an unknown dtype", text.replace('"dtype":"F16"', '"dtype":"F17"', 1)
    yield "a lowercase dtype", text.replace('"dtype":"F16"', '"dtype":"f16"', 1)
    yield "other metadata", text.replace('{"format":"pt"}', '{"format":"pt","x":"1"}', 1)
    yield "no metadata", "{" + text[text.index("}", text.index("__metadata__")) + 2:]
    yield "metadata last", "{" + text[text.index("}", text.index("__metadata__")) + 2:].rstrip()[:-1] + \
        ',"__metadata__":{"format":"pt"}}'
    yield "a trailing newline", text.rstrip() + "\n"
    yield "a trailing comma", text.rstrip()[:-1] + ",}"
    yield "truncated", text.rstrip()[:-2]
    yield "a repeated name", text.replace('"model.layers.0.mlp.experts.1.w1.weight"',
                                          '"model.layers.0.mlp.experts.0.w0.weight"', 1)
    yield "a tensor named __metadata__", text.replace('"scalar"', '"__metadata__"', 1)
    yield "overlapping offsets", text.replace('"data_offsets":[0,', '"data_offsets":[1,', 1)
    yield "an extra key", text.replace('"dtype":"F32",', '"dtype":"F32","x":1,', 1)
    yield "a nested shape", text.replace('"shape":[8,4]', '"shape":[[8],4]', 1)


@pytest.mark.parametrize("case", [name for name, _ in _mutations(
    b'{"__metadata__":{"format":"pt"},"scalar":{"dtype":"F32","shape":[],"data_offsets":[0,4]},'
    b'"model.layers.0.mlp.experts.0.w0.weight":{"dtype":"F32","shape":[8,4],"data_offsets":[4,132]},'
    b'"model.layers.0.mlp.experts.1.w1.weight":{"dtype":"F16","shape":[7],"data_offsets":[132,146]}}')])
def test_any_departure_from_the_form_gets_the_strict_answer(written, case):
    path, raw, size = written
    text = dict(_mutations(raw))[case]
    changed = text.encode()
    assert changed != raw
    padded = changed + b" " * (-len(changed) % 8)
    for header in (changed, padded):
        file_size = size - len(raw) + len(header)
        scanned = F._scanned_entries(path, header, 8 + len(header), file_size, ())
        if case == "no metadata":  # still the form: scanned, to the strict entries
            assert scanned is not None and scanned == _strict(path, header, file_size)
        elif case not in ("a repeated name", "a zero dimension", "overlapping offsets"):
            assert scanned is None
        assert _outcome(F.header_entries, path, header, file_size) == _outcome(_strict, path, header, file_size)


def test_scanned_and_parsed_headers_agree_on_random_layouts(tmp_path):
    """Random tensor sets written by safetensors (names, dtypes, ranks, order): the scan's entries
    are the JSON parse's."""
    rng = np.random.default_rng(1)
    for trial in range(5):
        tensors = {}
        for i in range(int(rng.integers(200, 500))):
            shape = tuple(int(d) for d in rng.integers(1, 6, int(rng.integers(0, 4))))
            dtype = [np.float32, np.float64, np.float16, np.int32, np.bool_][int(rng.integers(0, 5))]
            tensors[f"t{trial}.{rng.integers(0, 10**9)}.{i}"] = np.zeros(shape, dtype)
        path = str(tmp_path / f"m{trial}.safetensors")
        save_file(tensors, path, metadata={"format": "pt"} if trial % 2 else None)
        with open(path, "rb") as f:
            data = f.read()
        raw = data[8:8 + int.from_bytes(data[:8], "little")]
        assert len(raw) >= F.SCAN_MIN_BYTES
        got = F._scanned_entries(path, raw, 8 + len(raw), len(data), ())
        assert got is not None and got == _strict(path, raw, len(data))
        assert [e.name for e in got] == [n for n, _ in sorted(json.loads(raw).items(), key=lambda kv: (
            kv[1]["data_offsets"] if kv[0] != "__metadata__" else [-1]))][int(trial % 2):]
