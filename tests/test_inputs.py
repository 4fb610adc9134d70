"""Checkpoint inputs: malformed, unsafe or mismatched ones fail early with a one-line error that
names the file and tensor; well-formed ones read back exactly; our writer matches safetensors.

Every bad input is built here, in tmp_path, either with `safetensors.torch.save_file` and then
damaged, or byte by byte (8-byte little-endian header length, JSON header, raw data).
"""

import hashlib
import json
import math
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from dppa_stream.checkpoint import Checkpoint, ShardLayout, read_rows, write_rows
from dppa_stream.checkpoint.format import DTYPES, MAX_HEADER_SIZE, NAME_OF_TORCH_DTYPE, build_header
from dppa_stream.checkpoint.reader import INDEX_NAME, close_all
from dppa_stream.cli.main import main as cli
from dppa_stream.config import parse_config
from dppa_stream.errors import EXIT_INPUT, EXIT_OUTPUT, InputError, OutputError
from dppa_stream.inputs import open_inputs
from dppa_stream.output import check_output as _check_output


@pytest.fixture(autouse=True)
def _close_fds():
    yield
    close_all()  # read_rows caches descriptors by path


# --- helpers -----------------------------------------------------------------------------------


def raw_file(path, header, data=b"", length=None) -> str:
    """A safetensors-shaped file written by hand; `header` is a dict (JSON-encoded here) or bytes."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return str(path)


def ent(dtype, shape, start, stop):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, stop]}


def expect(exc, fn, *needles) -> str:
    """`fn()` raises `exc` (not just any DppaError) with a one-line message containing every needle."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    return msg


def rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def folder_ckpt(folder, tensors: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), {"format": "pt"})
    return str(folder)


def sharded_ckpt(folder, shards: dict[str, dict], weight_map=None) -> str:
    """Shards {filename: tensors} plus an index (default: each tensor mapped to its shard)."""
    os.makedirs(folder, exist_ok=True)
    for fname, tensors in shards.items():
        save_file(tensors, os.path.join(folder, fname), {"format": "pt"})
    if weight_map is None:
        weight_map = {n: f for f, ts in shards.items() for n in ts}
    with open(os.path.join(folder, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    return str(folder)


def ties_yaml(base, *models) -> str:
    lines = ["merge_method: ties", f"base_model: {json.dumps(str(base))}", "models:"]
    for m in models:
        lines += [f"  - model: {json.dumps(str(m))}", "    parameters: {weight: 0.5, density: 0.5}"]
    return "\n".join(lines) + "\n"


def digest(root) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def mkdir_payload(target) -> bytes:
    """A pickle whose loading creates the directory `target` (how a malicious .bin runs code)."""

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(target),))

    return pickle.dumps(Evil())


W = {"w": torch.arange(16, dtype=torch.float32).reshape(4, 4)}


# --- one malformed file ------------------------------------------------------------------------


def _truncated(p):
    save_file(W, p)
    os.truncate(p, os.path.getsize(p) - 4)
    return p


def _tiny(p):
    with open(p, "wb") as f:
        f.write(b"\1\2\3")
    return p


def _trailing(p):
    save_file(W, p)
    with open(p, "ab") as f:
        f.write(b"\0" * 5)
    return p


BAD_FILES = {
    # id: (builder(path) -> path, needles besides the path)
    "shorter-than-8-bytes": (_tiny, ["shorter than 8 bytes"]),
    "truncated-shard": (_truncated, ["'w'", "past the end of the file", "truncated"]),
    "header-length-past-eof": (lambda p: raw_file(p, b"{}", length=1000), ["header length 1000", "past the end"]),
    "header-length-over-limit": (lambda p: raw_file(p, b"{}", length=MAX_HEADER_SIZE + 1),
                                 [f"{MAX_HEADER_SIZE + 1}", "exceeds", f"{MAX_HEADER_SIZE}"]),
    "header-not-utf8": (lambda p: raw_file(p, b'{"w\xff\xfe": 1}  '), ["not valid UTF-8"]),
    "header-not-json": (lambda p: raw_file(p, b'{"w": {"dtype"'), ["not valid JSON"]),
    "header-not-object": (lambda p: raw_file(p, b"[1, 2, 3]"), ["not a JSON object"]),
    "unknown-dtype": (lambda p: raw_file(p, {"w": ent("F128", [2], 0, 32)}, bytes(32)), ["'w'", "dtype 'F128'"]),
    "dtype-not-a-string": (lambda p: raw_file(p, {"w": ent(["F32"], [2], 0, 8)}, bytes(8)), ["'w'", "unsupported dtype"]),
    "entry-not-object": (lambda p: raw_file(p, {"w": [0, 8]}, bytes(8)), ["'w'", "not an object"]),
    "negative-shape": (lambda p: raw_file(p, {"w": ent("F32", [-2], 0, 8)}, bytes(8)), ["'w'", "shape [-2]"]),
    "float-shape": (lambda p: raw_file(p, {"w": ent("F32", [2.0], 0, 8)}, bytes(8)), ["'w'", "shape [2.0]"]),
    "bad-metadata": (lambda p: raw_file(p, {"__metadata__": {"format": 1}, "w": ent("F32", [2], 0, 8)}, bytes(8)),
                     ["__metadata__"]),
    "offsets-reversed": (lambda p: raw_file(p, {"w": ent("F32", [0], 8, 0)}, bytes(8)), ["'w'", "data_offsets [8, 0]"]),
    "offsets-negative": (lambda p: raw_file(p, {"w": ent("F32", [2], -8, 0)}, bytes(8)), ["'w'", "data_offsets"]),
    "offsets-out-of-range": (lambda p: raw_file(p, {"a": ent("F32", [2], 0, 8), "w": ent("F32", [2], 64, 72)}, bytes(16)),
                             ["'w'", "past the end of the file"]),
    "overlapping-offsets": (lambda p: raw_file(p, {"a": ent("F32", [2], 0, 8), "b": ent("F32", [2], 4, 12)}, bytes(12)),
                            ["'b'", "overlaps"]),
    "same-offsets": (lambda p: raw_file(p, {"a": ent("F32", [2], 0, 8), "b": ent("I32", [2], 0, 8)}, bytes(8)),
                     ["'b'", "overlaps"]),
    "hole-between-tensors": (lambda p: raw_file(p, {"a": ent("F32", [2], 0, 8), "b": ent("F32", [2], 12, 20)}, bytes(20)),
                             ["4 unused bytes", "'b'", "hole"]),
    "hole-before-first": (lambda p: raw_file(p, {"a": ent("F16", [2], 6, 10)}, bytes(10)), ["6 unused bytes", "'a'"]),
    "byte-count-mismatch": (lambda p: raw_file(p, {"w": ent("BF16", [3, 2], 0, 8)}, bytes(8)),
                            ["'w'", "holds 8 bytes", "[3, 2] x BF16 needs 12"]),
    "trailing-bytes": (_trailing, ["5 bytes after the last tensor"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_malformed_file_is_refused(tmp_path, case):
    build, needles = BAD_FILES[case]
    path = str(build(str(tmp_path / "x.safetensors")))
    expect(InputError, lambda: Checkpoint.open(path), path, *needles)


@pytest.mark.parametrize("case", ["truncated-shard", "header-not-json", "hole-between-tensors"])
def test_malformed_file_in_a_folder_is_refused(tmp_path, case):
    build, needles = BAD_FILES[case]
    os.makedirs(tmp_path / "ck")
    path = str(build(str(tmp_path / "ck" / "model.safetensors")))
    expect(InputError, lambda: Checkpoint.open(str(tmp_path / "ck")), path, *needles)


def test_missing_checkpoint_and_empty_folder(tmp_path):
    expect(InputError, lambda: Checkpoint.open(str(tmp_path / "nope")), str(tmp_path / "nope"), "no such checkpoint")
    os.makedirs(tmp_path / "empty")
    expect(InputError, lambda: Checkpoint.open(str(tmp_path / "empty")), str(tmp_path / "empty"),
           "model.safetensors", INDEX_NAME)


# --- sharded checkpoints with an index ----------------------------------------------------------


def _two_shards(folder, weight_map=None):
    return sharded_ckpt(folder, {"a.safetensors": {"x": torch.ones(2), "y": torch.ones(3)},
                                 "b.safetensors": {"z": torch.ones(4)}}, weight_map)


def test_tensor_stored_twice_across_shards(tmp_path):
    ck = sharded_ckpt(tmp_path / "ck", {"a.safetensors": {"x": torch.ones(2), "y": torch.ones(3)},
                                        "b.safetensors": {"x": torch.zeros(2), "z": torch.ones(4)}},
                      {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"})
    expect(InputError, lambda: Checkpoint.open(ck), str(tmp_path / "ck" / "b.safetensors"), "'x'")


def test_shard_tensor_not_in_weight_map(tmp_path):
    ck = _two_shards(tmp_path / "ck", {"x": "a.safetensors", "z": "b.safetensors"})
    expect(InputError, lambda: Checkpoint.open(ck), str(tmp_path / "ck" / "a.safetensors"), "'y'", "not mapped")


def test_index_maps_tensor_to_shard_that_lacks_it(tmp_path):
    wm = {"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors", "q": "b.safetensors"}
    ck = _two_shards(tmp_path / "ck", wm)
    expect(InputError, lambda: Checkpoint.open(ck), INDEX_NAME, "'q'", "'b.safetensors'", "not stored there")


def test_missing_shard(tmp_path):
    ck = _two_shards(tmp_path / "ck", {"x": "a.safetensors", "y": "a.safetensors", "z": "model-00003-of-00003.safetensors"})
    expect(InputError, lambda: Checkpoint.open(ck), INDEX_NAME, "'model-00003-of-00003.safetensors'", "missing")


@pytest.mark.parametrize("rel", ["../outside.safetensors", "sub/../../outside.safetensors"])
def test_weight_map_dotdot_is_refused(tmp_path, rel):
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")  # exists and is valid: refused anyway
    os.makedirs(tmp_path / "ck" / "sub")
    ck = sharded_ckpt(tmp_path / "ck", {}, {"w": rel})
    expect(InputError, lambda: Checkpoint.open(ck), INDEX_NAME, repr(rel), "outside the checkpoint folder")


def test_weight_map_absolute_path_is_refused(tmp_path):
    outside = str(tmp_path / "outside.safetensors")
    save_file({"w": torch.ones(2)}, outside)
    ck = sharded_ckpt(tmp_path / "ck", {}, {"w": outside})
    expect(InputError, lambda: Checkpoint.open(ck), INDEX_NAME, repr(outside), "relative path")


def test_weight_map_symlink_outside_is_refused(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    ck = sharded_ckpt(tmp_path / "ck", {}, {"w": "link.safetensors"})
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "ck" / "link.safetensors")
    expect(InputError, lambda: Checkpoint.open(ck), INDEX_NAME, "'link.safetensors'", "outside the checkpoint folder")


def test_weight_map_symlink_inside_is_fine(tmp_path):
    ck = sharded_ckpt(tmp_path / "ck", {"real.safetensors": {"w": torch.ones(2)}}, {"w": "link.safetensors"})
    os.symlink("real.safetensors", tmp_path / "ck" / "link.safetensors")
    assert list(Checkpoint.open(ck).tensors) == ["w"]


@pytest.mark.parametrize("value", [["a.safetensors"], {"f": "a.safetensors"}, 3, ""])
def test_weight_map_value_not_a_filename(tmp_path, value):
    ck = _two_shards(tmp_path / "ck", {"x": value, "y": "a.safetensors", "z": "b.safetensors"})
    expect(InputError, lambda: Checkpoint.open(ck), INDEX_NAME, "shard filename", "relative path")


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'{"metadata": {"total_size": 4}}',
                                  b'{"weight_map": {}}', b'{"weight_map": ["a.safetensors"]}'],
                         ids=["not-json", "not-utf8", "list", "no-weight-map", "empty-weight-map", "weight-map-list"])
def test_malformed_index(tmp_path, text):
    ck = _two_shards(tmp_path / "ck")
    (tmp_path / "ck" / INDEX_NAME).write_bytes(text)
    expect(InputError, lambda: Checkpoint.open(ck), str(tmp_path / "ck" / INDEX_NAME))


# --- pickled weights are refused, never loaded ---------------------------------------------------


def test_marker_payload_really_runs_code(tmp_path):
    """Guard for the tests below: unpickling our payload does create its marker."""
    pickle.loads(mkdir_payload(tmp_path / "proof"))
    assert (tmp_path / "proof").is_dir()


def test_pickled_folder_is_refused_unloaded(tmp_path):
    os.makedirs(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{}")
    (tmp_path / "ck" / "pytorch_model.bin").write_bytes(mkdir_payload(tmp_path / "PWNED"))
    expect(InputError, lambda: Checkpoint.open(str(tmp_path / "ck")),
           str(tmp_path / "ck" / "pytorch_model.bin"), "pickled", "convert", "safetensors")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.pth", "model.ckpt"])
def test_bare_pickle_file_is_refused_unloaded(tmp_path, name):
    (tmp_path / name).write_bytes(mkdir_payload(tmp_path / "PWNED"))
    expect(InputError, lambda: Checkpoint.open(str(tmp_path / name)), str(tmp_path / name), "convert", "safetensors")
    assert not (tmp_path / "PWNED").exists()


# --- several checkpoints must agree --------------------------------------------------------------


def _open_pair(tmp_path, base_tensors, ft_tensors):
    base = folder_ckpt(tmp_path / "base", base_tensors)
    ft = folder_ckpt(tmp_path / "ft", ft_tensors)
    return lambda: open_inputs(parse_config(ties_yaml(base, ft))), ft


def test_shape_mismatch(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    fn, ft = _open_pair(tmp_path, {name: torch.zeros(4, 3)}, {name: torch.zeros(4, 5)})
    msg = expect(InputError, fn, ft, repr(name), "[4, 5]", "[4, 3]", str(tmp_path / "base"))
    assert "vocabulary" not in msg


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_vocab_mismatch_hint(tmp_path, name):
    fn, ft = _open_pair(tmp_path, {name: torch.zeros(10, 4), "n": torch.zeros(2)}, {name: torch.zeros(12, 4), "n": torch.zeros(2)})
    expect(InputError, fn, ft, repr(name), "[12, 4]", "[10, 4]", "vocabulary sizes differ", "tokenizer_source: union")


def test_mixed_float_dtypes_are_accepted_integer_mismatch_is_not(tmp_path):
    """Real values merge whatever their dtype (decoded to float32); integer tensors are copied,
    so their dtypes must agree."""
    fn, _ = _open_pair(tmp_path / "f", {"w": torch.zeros(3, dtype=torch.bfloat16)}, {"w": torch.zeros(3, dtype=torch.float16)})
    assert fn().outputs["w"].models[0].dtype == "F16"
    fn, ft = _open_pair(tmp_path / "i", {"w": torch.zeros(3, dtype=torch.int64)}, {"w": torch.zeros(3, dtype=torch.int32)})
    expect(InputError, fn, ft, "'w'", "I32", "I64")
    fn, ft = _open_pair(tmp_path / "m", {"w": torch.zeros(3, dtype=torch.float32)}, {"w": torch.zeros(3, dtype=torch.int32)})
    expect(InputError, fn, ft, "'w'", "I32", "F32")


def test_missing_and_extra_names_listed(tmp_path):
    common = {"c": torch.zeros(2)}
    base = {**common, **{f"only_base.{i}": torch.zeros(2) for i in range(5)}}
    ft = {**common, "only_ft.0": torch.zeros(2), "only_ft.1": torch.zeros(2)}
    fn, ftp = _open_pair(tmp_path, base, ft)
    msg = expect(InputError, fn, ftp, "5 missing (e.g. only_base.0, only_base.1, only_base.2)",
                 "2 extra (e.g. only_ft.0, only_ft.1)")
    assert "only_base.3" not in msg  # a few, not all


def test_fine_tunes_compared_with_each_other_without_base(tmp_path):
    a = folder_ckpt(tmp_path / "a", {"w": torch.zeros(3)})
    b = folder_ckpt(tmp_path / "b", {"w": torch.zeros(4)})
    cfg = parse_config(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
                       f"  - model: {b}\n    parameters: {{weight: 1}}\n")
    expect(InputError, lambda: open_inputs(cfg), b, "'w'", "[4]", "[3]")


# --- the output location ------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    base = folder_ckpt(tmp_path / "in" / "base", {"w": torch.zeros(3)})
    ft = folder_ckpt(tmp_path / "in" / "ft", {"w": torch.ones(3)})
    return open_inputs(parse_config(ties_yaml(base, ft)))


def test_output_inside_an_input_folder(tmp_path, pair):
    for out in (tmp_path / "in" / "ft" / "merged", tmp_path / "in" / "base"):
        expect(OutputError, lambda: _check_output(str(out), pair, True), str(out), "input")


def test_existing_output_needs_overwrite(tmp_path, pair):
    os.makedirs(tmp_path / "out")
    expect(OutputError, lambda: _check_output(str(tmp_path / "out"), pair, False), str(tmp_path / "out"), "--overwrite")
    _check_output(str(tmp_path / "out"), pair, True)


def test_output_parent_missing(tmp_path, pair):
    out = str(tmp_path / "no" / "such" / "out")
    expect(OutputError, lambda: _check_output(out, pair, False), out, "does not exist")


def test_output_containing_an_input_folder(tmp_path, pair):
    expect(OutputError, lambda: _check_output(str(tmp_path / "in"), pair, True), str(tmp_path / "in"))


# --- the CLI: one line, the documented exit code, nothing written, inputs untouched ---------------


def _cli_case(tmp_path, ft_tensors=None, damage=None, out=None, make_out=False):
    """Base + one fine-tune under tmp/in (fine-tune sharded in 3), a config, then `merge CFG OUT`."""
    t = {"model.embed_tokens.weight": rand((7, 4), torch.bfloat16), "a": rand((3, 5), torch.bfloat16),
         "b": rand((5,), torch.bfloat16)}
    base = folder_ckpt(tmp_path / "in" / "base", t)
    ft_t = ft_tensors or {k: v + 1 for k, v in t.items()}
    ft = sharded_ckpt(tmp_path / "in" / "ft", {f"model-0000{i + 1}-of-00003.safetensors": {k: ft_t[k]}
                                              for i, k in enumerate(ft_t)})
    if damage:
        damage(tmp_path / "in")
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(ties_yaml(base, ft))
    out = str(out or tmp_path / "out")
    if make_out:
        os.makedirs(out)
        with open(os.path.join(out, "keep.txt"), "w") as f:
            f.write("old output")
    before = digest(tmp_path / "in")
    res = CliRunner().invoke(cli, ["merge", str(cfg), out, "--quiet"])
    assert digest(tmp_path / "in") == before, "inputs changed"
    assert not os.path.exists(out + ".partial")
    return res, out


def assert_one_line_error(res, code, *needles):
    assert res.exit_code == code, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output and res.stdout == ""
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_cli_truncated_shard(tmp_path):
    shard = tmp_path / "in" / "ft" / "model-00002-of-00003.safetensors"
    res, out = _cli_case(tmp_path, damage=lambda _: os.truncate(shard, os.path.getsize(shard) - 2))
    assert_one_line_error(res, EXIT_INPUT, str(shard), "'a'", "truncated")
    assert not os.path.exists(out)


def test_cli_weight_map_outside(tmp_path):
    def damage(root):
        save_file({"a": torch.zeros(3, 5, dtype=torch.bfloat16)}, root / "evil.safetensors")
        idx = json.loads((root / "ft" / INDEX_NAME).read_text())
        idx["weight_map"]["a"] = "../evil.safetensors"
        (root / "ft" / INDEX_NAME).write_text(json.dumps(idx))

    res, out = _cli_case(tmp_path, damage=damage)
    assert_one_line_error(res, EXIT_INPUT, INDEX_NAME, "'../evil.safetensors'", "outside")
    assert not os.path.exists(out)


def test_cli_pickled_weights(tmp_path):
    def damage(root):
        for f in os.listdir(root / "ft"):
            os.remove(root / "ft" / f)
        (root / "ft" / "pytorch_model.bin").write_bytes(mkdir_payload(tmp_path / "PWNED"))

    res, out = _cli_case(tmp_path, damage=damage)
    assert_one_line_error(res, EXIT_INPUT, "pytorch_model.bin", "convert")
    assert not os.path.exists(out) and not (tmp_path / "PWNED").exists()


def test_cli_vocab_mismatch(tmp_path):
    ft = {"model.embed_tokens.weight": torch.zeros(9, 4, dtype=torch.bfloat16),
          "a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(5, dtype=torch.bfloat16)}
    res, out = _cli_case(tmp_path, ft_tensors=ft)
    assert_one_line_error(res, EXIT_INPUT, "'model.embed_tokens.weight'", "vocabulary")
    assert not os.path.exists(out)


def test_cli_existing_output(tmp_path):
    res, out = _cli_case(tmp_path, make_out=True)
    assert_one_line_error(res, EXIT_OUTPUT, out, "--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    with open(os.path.join(out, "keep.txt")) as f:
        assert f.read() == "old output"


def test_cli_output_inside_input(tmp_path):
    res, out = _cli_case(tmp_path, out=tmp_path / "in" / "base" / "merged")
    assert_one_line_error(res, EXIT_OUTPUT, "inside the input folder")
    assert not os.path.exists(out)


def test_cli_subprocess_input_error(tmp_path):
    """The installed command itself: exit 3, one stderr line, no traceback, nothing written."""
    base = folder_ckpt(tmp_path / "in" / "base", W)
    ft = raw_file(tmp_path / "in" / "ft.safetensors", {"w": ent("F32", [4, 4], 0, 64)}, bytes(60))
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(ties_yaml(base, ft))
    before = digest(tmp_path / "in")
    exe = os.path.join(os.path.dirname(sys.executable), "dppa-stream")
    if not os.path.exists(exe):
        pytest.skip("dppa-stream is not installed next to this interpreter")
    p = subprocess.run([exe, "merge", str(cfg), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert p.returncode == EXIT_INPUT, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ft in lines[0] and "truncated" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert digest(tmp_path / "in") == before


# --- well-formed checkpoints read back exactly ---------------------------------------------------


TENSORS = {  # odd row counts, the three float dtypes, plus the corner cases a reader must survive
    "model.embed_tokens.weight": (torch.bfloat16, (13, 6)),
    "model.layers.0.self_attn.q_proj.weight": (torch.float16, (7, 5)),
    "model.layers.0.mlp.down_proj.weight": (torch.float32, (9, 3, 2)),
    "model.layers.0.input_layernorm.weight": (torch.bfloat16, (11,)),
    "model.norm.weight": (torch.float32, (5,)),
    "lm_head.weight": (torch.float16, (13, 6)),
    "scalar": (torch.float32, ()),
    "empty": (torch.float16, (0, 4)),
    "position_ids": (torch.int64, (1, 9)),
}


def _tensors():
    return {n: rand(shape, dt, seed=i) for i, (n, (dt, shape)) in enumerate(TENSORS.items())}


def _check_reads(ck: Checkpoint, tensors: dict):
    assert set(ck.tensors) == set(tensors)
    for name, t in tensors.items():
        e = ck.tensors[name]
        assert e.dtype == NAME_OF_TORCH_DTYPE[t.dtype] and e.shape == tuple(t.shape), name
        assert same_bits(read_rows(e, 0, e.rows), t if t.dim() else t.reshape(())), name
        n = e.rows
        for start, stop in {(1, n - 1), (2, min(n, 5)), (n - 1, n), (n // 2, n // 2)}:
            if 0 <= start <= stop <= n and t.dim():
                assert same_bits(read_rows(e, start, stop), t[start:stop]), (name, start, stop)


def test_read_sharded_checkpoint(tmp_path):
    t = _tensors()
    names = list(t)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": {n: t[n] for n in names[i::3]} for i in range(3)}
    ck = Checkpoint.open(sharded_ckpt(tmp_path / "ck", shards))
    assert ck.folder == str(tmp_path / "ck")
    assert sorted(ck.files) == sorted(str(tmp_path / "ck" / f) for f in shards)
    _check_reads(ck, t)


def test_read_bare_file(tmp_path):
    t = _tensors()
    save_file(t, tmp_path / "m.safetensors", {"format": "pt"})
    ck = Checkpoint.open(str(tmp_path / "m.safetensors"))
    assert ck.folder is None and ck.files == [str(tmp_path / "m.safetensors")]
    _check_reads(ck, t)


# --- our header and shard layout are byte-identical to safetensors' -----------------------------


def _all_dtype_specs():
    """Every supported dtype, with names chosen so name order disagrees with dtype order."""
    specs = [(f"t{len(DTYPES) - i:02d}", d, (3, i % 3 + 1)) for i, d in enumerate(DTYPES)]
    specs += [(n, NAME_OF_TORCH_DTYPE[dt], shape) for n, (dt, shape) in TENSORS.items()]
    return specs


def _header_of(path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[: 8 + n]


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_build_header_matches_save_file(tmp_path, metadata):
    specs = _all_dtype_specs()
    tensors = {n: rand(shape, DTYPES[d][0]) for n, d, shape in specs}
    save_file(tensors, tmp_path / "ref.safetensors", metadata)
    header, offsets = build_header(specs, metadata or {})
    assert header == _header_of(tmp_path / "ref.safetensors")
    ref = json.loads(header[8:])
    assert offsets == {n: v["data_offsets"][0] for n, v in ref.items() if n != "__metadata__"}


def test_build_header_quotes_names_as_save_file(tmp_path):
    """Names that JSON escapes (quotes, backslashes, control characters) or keeps as they are
    (non-ASCII) come out as safetensors writes them."""
    names = ['a"b', "back\\slash", "new\nline\ttab\x01", "é.中.weight", "plain"]
    specs = [(n, "F32", (2, i + 1)) for i, n in enumerate(names)]
    save_file({n: rand(shape, DTYPES[d][0]) for n, d, shape in specs}, tmp_path / "ref.safetensors", {"format": "pt"})
    assert build_header(specs, {"format": "pt"})[0] == _header_of(tmp_path / "ref.safetensors")


def _write_layout(out, specs, tensors, shard_size) -> ShardLayout:
    layout = ShardLayout(specs, shard_size)
    os.makedirs(out)
    layout.preallocate(str(out))
    for n, t in reversed(tensors.items()):  # any order, any row split
        place, rows = layout.placements[n], (t.shape[0] if t.dim() else 1)
        half = rows // 2
        write_rows(str(out), place, half * math.prod(t.shape[1:]), t[half:] if t.dim() else t)
        if half:
            write_rows(str(out), place, 0, t[:half])
    layout.finish(str(out))
    return layout


@pytest.mark.parametrize("shard_size", [10**9, 200])
def test_shard_layout_matches_save_file(tmp_path, shard_size):
    specs = _all_dtype_specs()
    tensors = {n: rand(shape, DTYPES[d][0], seed=i) for i, (n, d, shape) in enumerate(specs)}
    out = tmp_path / "out"
    layout = _write_layout(out, specs, tensors, shard_size)
    assert (len(layout.files) > 2) == (shard_size == 200)
    for fname in layout.files:
        group = {n: tensors[n] for n in tensors if layout.placements[n].file == fname}
        save_file(group, tmp_path / "ref.safetensors", {"format": "pt"})
        assert (out / fname).read_bytes() == (tmp_path / "ref.safetensors").read_bytes(), fname
    # FP8 tensors are written faithfully but, without their scales, refused as inputs; the rest reads back
    expect(InputError, lambda: Checkpoint.open(str(out)), "F8_", "without a scale")
    plain = [s for s in specs if not s[1].startswith("F8")]
    _write_layout(tmp_path / "plain", plain, {n: tensors[n] for n, _, _ in plain}, shard_size)
    close_all()
    _check_reads(Checkpoint.open(str(tmp_path / "plain")), {n: tensors[n] for n, _, _ in plain})



def _repeat_set(tmp_path, n=3):
    """Sharded checkpoints with one index and the same shard headers (FP8 weights with scales
    included), different numbers: how one tool writes a base and its fine-tunes."""
    paths = []
    for i in range(n):
        shards = {"model-1.safetensors": {"a.weight": torch.randn(4, 3) + i, "b.bias": torch.randn(5)},
                  "model-2.safetensors": {"q.weight": (torch.randn(4, 4) + i).to(torch.float8_e4m3fn),
                                          "q.weight_scale_inv": torch.rand(1) + 1, "c.weight": torch.randn(2, 2)}}
        paths.append(sharded_ckpt(tmp_path / f"m{i}", shards))
    return paths


def test_checkpoint_repeating_an_index_and_its_headers_reuses_their_checks(tmp_path):
    """A fine-tune whose index and shard headers repeat the base's byte for byte shares its layout
    and gets the catalogue a full open gives it (entries and quantized parts at its own files)."""
    paths = _repeat_set(tmp_path)
    known: dict = {}
    cks = [Checkpoint.open(p, known=known) for p in paths]
    assert cks[1].layout is cks[0].layout and cks[2].layout is cks[0].layout
    for p, ck in zip(paths, cks):
        close_all()
        alone = Checkpoint.open(p)
        assert ck.tensors == alone.tensors and list(ck.tensors) == list(alone.tensors)
        assert ck.files == alone.files and ck.stamps == alone.stamps
        assert all(part.file.startswith(p) for t in ck.tensors.values() for part in getattr(t, "parts", (t,)))
    assert type(cks[2].tensors["q.weight"]).__name__ == "Quantized"
    assert torch.equal(read_rows(cks[2].tensors["a.weight"], 0, 4), read_rows(alone.tensors["a.weight"], 0, 4))


@pytest.mark.parametrize("change", ["index", "header", "cut", "config", "missing", "outside"])
def test_checkpoint_differing_from_a_repeated_layout_is_opened_on_its_own(tmp_path, change):
    """Any difference (the index's bytes, one shard's header, a file cut short, a quantization
    config) takes the full path with all its checks; errors name the fine-tune's files."""
    paths = _repeat_set(tmp_path)
    ft, shard = paths[1], os.path.join(paths[1], "model-2.safetensors")
    if change == "index":  # same mapping, other bytes: opened on its own, same catalogue
        with open(os.path.join(ft, INDEX_NAME)) as f:
            index = json.load(f)
        with open(os.path.join(ft, INDEX_NAME), "w") as f:
            json.dump(index, f, indent=1)
    elif change == "header":  # c.weight [2, 2] -> [1, 4]: same header length, other bytes
        save_file({"q.weight": (torch.randn(4, 4)).to(torch.float8_e4m3fn), "q.weight_scale_inv": torch.rand(1) + 1,
                   "c.weight": torch.randn(1, 4)}, shard, {"format": "pt"})
    elif change == "cut":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 4)
    elif change == "config":
        with open(os.path.join(ft, "config.json"), "w") as f:
            json.dump({"quantization_config": {"quant_method": "gptq"}}, f)
    elif change == "missing":
        os.remove(shard)
    else:
        os.remove(shard)
        os.symlink(os.path.join(paths[0], "model-2.safetensors"), shard)
    known: dict = {}
    base = Checkpoint.open(paths[0], known=known)
    if change in ("index", "header"):
        ck = Checkpoint.open(ft, known=known)
        assert ck.layout is not base.layout
        close_all()
        assert ck.tensors == Checkpoint.open(ft).tensors
        assert (ck.tensors["c.weight"].shape == (1, 4)) == (change == "header")
        return
    needles = {"cut": [shard, "truncated"], "config": [os.path.join(ft, "config.json"), "gptq"],
               "missing": [INDEX_NAME, "model-2.safetensors", "missing"], "outside": ["model-2.safetensors", "outside"]}
    got = expect(InputError, lambda: Checkpoint.open(ft, known=known), *needles[change])
    assert got == expect(InputError, lambda: Checkpoint.open(ft), *needles[change])  # the same error as on its own


def test_catalogued_entries_are_ordinary_frozen_tensor_entries(tmp_path):
    """Entries built the fast way (format._entries, in C) are TensorEntry in every way: immutable,
    equal and hashed as the constructor's own (and unequal to a plain tuple or another class of
    entry with the same fields), and they pickle (to process workers)."""
    from dppa_stream.checkpoint import TensorEntry
    from dppa_stream.lora import AdaptedEntry

    ck = Checkpoint.open(folder_ckpt(tmp_path / "m", {"a": torch.ones(2, 3), "b": torch.ones(4)}))
    for e in ck.tensors.values():
        same = TensorEntry(e.name, e.dtype, e.shape, e.file, e.offset, e.nbytes, e.file_id)
        assert type(e) is TensorEntry and e == same and hash(e) == hash(same) and repr(e) == repr(same)
        assert pickle.loads(pickle.dumps(e)) == e
        assert e != tuple(e) and tuple(e) != e and e != AdaptedEntry(*e) and AdaptedEntry(*e) != e
        with pytest.raises(AttributeError):
            e.offset = 0

def test_headers_repeated_by_another_checkpoint_are_its_own(tmp_path):
    """A fine-tune whose shard repeats the base's header byte for byte (parsed once) gets entries
    at its own file; one with that header but cut short is still refused, naming its file."""
    tensors = {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(5)}
    known: dict = {}
    paths = []
    for name in ("base", "ft", "cut"):
        os.makedirs(tmp_path / name)
        save_file({k: v + len(paths) for k, v in tensors.items()}, tmp_path / name / "model.safetensors")
        paths.append(str(tmp_path / name / "model.safetensors"))
    with open(paths[2], "r+b") as f:
        f.truncate(os.path.getsize(paths[2]) - 4)
    base = Checkpoint.open(str(tmp_path / "base"), known=known)
    ft = Checkpoint.open(str(tmp_path / "ft"), known=known)
    for name, e in ft.tensors.items():
        b = base.tensors[name]
        assert (e.file, e.offset, e.shape, e.dtype) == (paths[1], b.offset, b.shape, b.dtype)
        assert e.file_id[:2] == (os.stat(paths[1]).st_dev, os.stat(paths[1]).st_ino)
        assert torch.equal(read_rows(e, 0, e.rows), tensors[name] + 1)
    with pytest.raises(InputError, match="cut/model.safetensors"):
        Checkpoint.open(str(tmp_path / "cut"), known=known)


@pytest.mark.parametrize("text", [
    '{"a":1,"a":2}', '{"a:":1,"a:":2}', '{"m":{"x":1,"x":2}}', '{"m":[{"x":"1:2"},{"y":1,"y":2}]}',
    '{"k:":"v:","w":{"a":"b:c"}}', '{"a":"\\u003a","a":1}', '{"a\\u003a":1,"a:":2}', '{"a\\u003A":1,"b":"::"}',
    '[1,2,{"q":[["a:b"],{"z":1}]}]', '"x:y"', '{"a":1, "b" : 2}', '{"w":{"n1":"f:1","n2":"f:1"},"w":1}',
    '{"weight_map":{"a":"s:1","b":"s:2","a":"s:1"}}', '{"a":1,}', '[' * 100_000, '{"a":' + '9' * 5000 + '}'])
def test_untrusted_json_without_the_hook_answers_as_with_it(text):
    """`loads_untrusted` parses without a duplicate-key hook and counts ':' to rule repeats out:
    the same value or the same error as the hooked parse (the reference, written out here)."""
    from dppa_stream.checkpoint.format import loads_untrusted

    def reference():
        def hook(pairs):
            keys = [k for k, _ in pairs]
            dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
            if dup is not None:
                raise InputError(f"W: key {dup!r} appears twice")
            return dict(pairs)
        try:
            return json.loads(text, object_pairs_hook=hook)
        except (ValueError, RecursionError):
            return "invalid"

    try:
        got = loads_untrusted(text, "W")
    except InputError as e:
        got = str(e) if "twice" in str(e) else "invalid"
    try:
        want = reference()
    except InputError as e:
        want = str(e)
    assert got == want
