"""Class 2, reads outside a model folder. One policy for weights and every other file: follow a
link only while it stays inside the model's own folder or its Hugging Face cache repository
(models--ORG--NAME with blobs/ and snapshots/); refuse anything else, and anything that is not a
regular file, with exit 3 before any tensor is read."""

import hashlib
import json
import os
import time

import pytest
import torch
from safetensors.torch import save_file

from dppa_stream.checkpoint import Checkpoint
from dppa_stream.checkpoint.reader import INDEX_NAME
from dppa_stream.errors import InputError

from .test_hostile_cli import config, digest, one_line_error, run, same_tree, tensors, write_model


def _pair_with(tmp_path, name, target_fn):
    """base (with `name` made by target_fn(path)) and a fine-tune; returns the config."""
    base = write_model(tmp_path / "in" / "base", tensors(0))
    ft = write_model(tmp_path / "in" / "ft", {k: v + 1 for k, v in tensors(0).items()})
    path = os.path.join(base, name)
    if os.path.lexists(path):
        os.remove(path)
    target_fn(path)
    return config(tmp_path / "c.yml", base, ft), base


def _refused(tmp_path, cfg, *needles):
    before = digest(tmp_path / "in")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    msg = one_line_error(code, lines, 3, *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert digest(tmp_path / "in") == before
    return msg


@pytest.mark.parametrize("target", ["/etc/passwd", "/proc/self/environ", "/etc"])
@pytest.mark.parametrize("name", ["tokenizer.json", "config.json", "generation_config.json", "tokenizer.model"])
def test_link_to_a_system_file_is_refused(tmp_path, name, target):
    cfg, _ = _pair_with(tmp_path, name, lambda p: os.symlink(target, p))
    _refused(tmp_path, cfg, name, "outside")


def test_link_to_a_sibling_folder_is_refused(tmp_path):
    os.makedirs(tmp_path / "secret")
    (tmp_path / "secret" / "key.json").write_text('{"token": "s3cr3t"}')
    cfg, _ = _pair_with(tmp_path, "tokenizer.json", lambda p: os.symlink("../../secret/key.json", p))
    _refused(tmp_path, cfg, "tokenizer.json", "outside")


def test_link_inside_the_folder_is_followed(tmp_path):
    def make(p):
        os.makedirs(os.path.join(os.path.dirname(p), "tok"))
        with open(os.path.join(os.path.dirname(p), "tok", "real.json"), "w") as f:
            f.write('{"version": "1.0"}')
        os.symlink("tok/real.json", p)

    cfg, _ = _pair_with(tmp_path, "tokenizer.json", make)
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    assert code == 0, lines
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not os.path.islink(tmp_path / "out" / "tokenizer.json")


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling"])
def test_tokenizer_that_is_not_a_regular_file(tmp_path, kind):
    make = {"fifo": os.mkfifo, "folder": os.makedirs, "dangling": lambda p: os.symlink("missing.json", p)}[kind]
    cfg, _ = _pair_with(tmp_path, "tokenizer.json", make)
    t0 = time.monotonic()
    _refused(tmp_path, cfg, "tokenizer.json")
    assert time.monotonic() - t0 < 60  # a FIFO must not block the run


def test_weights_link_outside_is_refused(tmp_path):
    save_file(tensors(0), tmp_path / "elsewhere.safetensors")
    base = tmp_path / "in" / "base"
    os.makedirs(base)
    os.symlink(tmp_path / "elsewhere.safetensors", base / "model.safetensors")
    ft = write_model(tmp_path / "in" / "ft", tensors(1))
    _refused(tmp_path, config(tmp_path / "c.yml", base, ft), "model.safetensors", "outside")


def test_index_link_outside_is_refused(tmp_path):
    base = tmp_path / "in" / "base"
    os.makedirs(base)
    save_file(tensors(0), base / "a.safetensors")
    (tmp_path / "idx.json").write_text(json.dumps({"weight_map": {n: "a.safetensors" for n in tensors(0)}}))
    os.symlink(tmp_path / "idx.json", base / INDEX_NAME)
    ft = write_model(tmp_path / "in" / "ft", tensors(1))
    _refused(tmp_path, config(tmp_path / "c.yml", base, ft), INDEX_NAME, "outside")


@pytest.mark.parametrize("rel", ["a\0b.safetensors", "sub\\a.safetensors", "sub/../a.safetensors", "\udc80.safetensors"],
                         ids=["nul", "backslash", "dotdot", "surrogate"])
def test_strange_shard_names_are_refused(tmp_path, rel):
    ck = tmp_path / "ck"
    os.makedirs(ck / "sub")
    save_file({"w": torch.ones(2)}, ck / "a.safetensors")
    (ck / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": rel}}))
    with pytest.raises(InputError) as e:
        Checkpoint.open(str(ck))
    assert "\n" not in str(e.value) and INDEX_NAME in str(e.value)
    str(e.value).encode("utf-8")  # printable: no lone surrogate left in the message


def test_shard_that_is_a_fifo_does_not_hang(tmp_path):
    ck = tmp_path / "ck"
    os.makedirs(ck)
    os.mkfifo(ck / "a.safetensors")
    (ck / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    with pytest.raises(InputError) as e:
        Checkpoint.open(str(ck))
    assert "a.safetensors" in str(e.value)


# --- the Hugging Face cache layout --------------------------------------------------------------------


def hf_cache(root, files: dict[str, bytes], repo="models--org--name", rev="0123abcd") -> str:
    """A Hugging Face hub cache repository: blobs named by hash, snapshot entries linking to them."""
    repo_dir = os.path.join(root, repo)
    snap = os.path.join(repo_dir, "snapshots", rev)
    os.makedirs(os.path.join(repo_dir, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(rev)
    for name, data in files.items():
        blob = os.path.join(repo_dir, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(snap, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    return snap


def _model_files(tmp_path, sd: dict, sharded: bool) -> dict[str, bytes]:
    """The files of a model folder (sharded or not, with config and tokenizer) as bytes."""
    work = tmp_path / f"build-{len(os.listdir(tmp_path))}"
    os.makedirs(work)
    out = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b'{"version": "1.0"}'}
    names = list(sd)
    if sharded:
        shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
        for fname, group in shards.items():
            save_file({n: sd[n] for n in group}, work / fname, {"format": "pt"})
            out[fname] = (work / fname).read_bytes()
        out[INDEX_NAME] = json.dumps({"metadata": {}, "weight_map": {n: f for f, g in shards.items() for n in g}}).encode()
    else:
        save_file(sd, work / "model.safetensors", {"format": "pt"})
        out["model.safetensors"] = (work / "model.safetensors").read_bytes()
    return out


def _plain(root, files: dict[str, bytes]) -> str:
    os.makedirs(root)
    for name, data in files.items():
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    return str(root)


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single-file"])
def test_hugging_face_cache_layout_merges_like_plain_folders(tmp_path, sharded):
    base_files = _model_files(tmp_path, tensors(0), sharded)
    ft_files = _model_files(tmp_path, {k: v + 0.5 for k, v in tensors(0).items()}, sharded)
    cache = tmp_path / "hub"
    base = hf_cache(cache, base_files, "models--org--base")
    ft = hf_cache(cache, ft_files, "models--org--ft")
    code, lines, _ = run("merge", config(tmp_path / "cache.yml", base, ft), tmp_path / "from-cache", "-q")
    assert code == 0, lines
    plain_cfg = config(tmp_path / "plain.yml", _plain(tmp_path / "pb", base_files), _plain(tmp_path / "pf", ft_files))
    code, lines, _ = run("merge", plain_cfg, tmp_path / "from-plain", "-q")
    assert code == 0, lines
    same_tree(tmp_path / "from-plain", tmp_path / "from-cache")
    assert (tmp_path / "from-cache" / "tokenizer.json").read_bytes() == b'{"version": "1.0"}'


def test_cache_link_into_another_repository_is_refused(tmp_path):
    files = _model_files(tmp_path, tensors(0), True)
    cache = tmp_path / "hub"
    other = hf_cache(cache, {"tokenizer.json": b'{"stolen": true}'}, "models--org--other")
    base = hf_cache(cache, files, "models--org--base")
    os.remove(os.path.join(base, "tokenizer.json"))
    os.symlink(os.path.relpath(os.path.realpath(os.path.join(other, "tokenizer.json")), base),
               os.path.join(base, "tokenizer.json"))
    ft = write_model(tmp_path / "in" / "ft", {k: v + 1 for k, v in tensors(0).items()})
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), tmp_path / "out", "-q")
    one_line_error(code, lines, 3, "tokenizer.json", "outside")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_output_inside_the_cache_repository_is_refused(tmp_path):
    base = hf_cache(tmp_path / "hub", _model_files(tmp_path, tensors(0), False), "models--org--base")
    ft = write_model(tmp_path / "in" / "ft", {k: v + 1 for k, v in tensors(0).items()})
    out = os.path.join(os.path.dirname(os.path.dirname(base)), "merged")
    code, lines, _ = run("merge", config(tmp_path / "c.yml", base, ft), out, "-q")
    one_line_error(code, lines, 4, "inside the input folder")
