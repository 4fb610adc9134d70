"""Fuzzing the header and index parsers: no exception other than InputError may escape.

CI runs a bounded number of examples; for a long run:
    HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_fuzz.py
"""

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dppa_stream.checkpoint import Checkpoint
from dppa_stream.errors import InputError

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=50_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(allow_nan=True), st.text(max_size=8))
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "XX", ""]), json_values),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), json_values),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 80), min_size=2, max_size=2), json_values),
})
headers = st.one_of(st.dictionaries(st.text(max_size=6), st.one_of(entries, json_values), max_size=4), json_values)


def _check(path):
    try:
        ck = Checkpoint.open(str(path))
        for e in ck.tensors.values():  # anything accepted must be readable
            from dppa_stream.checkpoint import read_rows

            read_rows(e, 0, e.rows)
    except InputError as e:
        assert "\n" not in str(e)


@given(header=headers, payload=st.binary(max_size=96), lie=st.integers(-3, 3))
def test_header_parser_only_raises_input_error(tmp_path, header, payload, lie):
    raw = json.dumps(header).encode()
    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", max(0, len(raw) + lie)) + raw + payload)
    _check(p)


@given(blob=st.binary(max_size=64))
def test_random_bytes(tmp_path, blob):
    p = tmp_path / "r.safetensors"
    p.write_bytes(blob)
    _check(p)


@given(index=json_values, names=st.lists(st.sampled_from(["a.safetensors", "../x.safetensors", "/etc/passwd", "", "s/t"]), max_size=3))
def test_index_parser_only_raises_input_error(tmp_path, index, names):
    folder = tmp_path / "ck"
    folder.mkdir(exist_ok=True)
    if names:
        index = {"weight_map": {f"t{i}": n for i, n in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _check(folder)
