"""Hugging Face Hub IDs: resolved through a local cache laid out on disk as huggingface_hub lays it
out (refs/, snapshots/ of symlinks into blobs/), and downloaded with --download from a local
server standing in for the Hub (tests/fake_hub.py, HF_ENDPOINT). Never the internet."""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from dppa_stream import hub
from dppa_stream.config import parse_config
from dppa_stream.errors import InputError, UsageError
from dppa_stream.synthetic import LlamaShape, write_llama_set

from .fake_hub import FakeHub

SHAPE = LlamaShape(hidden=16, intermediate=24, layers=2, vocab=32, heads=4, kv_heads=2)


def cache_model(cache: str, repo_id: str, folder: str, refs=("main",), commit: str | None = None) -> str:
    """Put `folder` into the cache as `repo_id` (blobs, a snapshot of symlinks, refs); its snapshot."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snap


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubsets")
    paths = write_llama_set(str(root / "plain"), SHAPE, 2, torch.bfloat16, seed=5, shard_size=3000)
    wide = write_llama_set(str(root / "wide"), LlamaShape(hidden=24, intermediate=24, layers=2, vocab=32, heads=4,
                                                          kv_heads=2), 1, torch.bfloat16, seed=6)
    return {"base": paths[0], "ft1": paths[1], "ft2": paths[2], "wide": wide[1]}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh cache folder, found through HF_HUB_CACHE, and no offline mode from the outside."""
    cache = str(tmp_path / "hf-cache")
    os.makedirs(cache)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return cache


def cli(*args, env_extra=None, cwd=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def ta(base: str, *fts: str, extra: str = "") -> str:
    body = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in fts)
    return f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{body}{extra}"


def same_files(a: str, b: str) -> None:
    names = sorted(f for f in os.listdir(a) if f not in ("README.md", "dppa_stream_config.yml"))
    assert names == sorted(f for f in os.listdir(b) if f not in ("README.md", "dppa_stream_config.yml"))
    for f in names:
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


# --- resolution ------------------------------------------------------------------------------------


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == str(tmp_path / "xdg" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.cache_dir() == str(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == str(tmp_path / "c")


def test_ids_resolve_through_refs_and_snapshots(sets, env, tmp_path, monkeypatch):
    main = cache_model(env, "org/base", sets["base"], refs=("main", "v1"))
    other = cache_model(env, "org/base", sets["ft1"], refs=("v2",), commit="b" * 40)
    assert hub.locate("org/base", "cfg", "base_model").path == main
    assert hub.locate("org/base@v1", "cfg", "base_model").path == main
    assert hub.locate("org/base@v2", "cfg", "base_model").path == other
    assert hub.locate("org/base@" + "b" * 40, "cfg", "base_model").path == other
    repo = os.path.join(env, "models--org--base")  # a cache repository folder given as a path
    assert hub.locate(repo, "cfg", "base_model").path == main
    assert hub.locate(repo + "@v2", "cfg", "base_model").path == other
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", os.path.dirname(env))  # HF_HOME/hub
    os.rename(env, os.path.join(os.path.dirname(env), "hub"))
    assert hub.locate("org/base@v2", "cfg", "base_model").path.endswith("snapshots/" + "b" * 40)
    monkeypatch.chdir(tmp_path)  # a local folder that exists wins over the ID it looks like
    os.makedirs("org/base")
    assert hub.locate("org/base", "cfg", "base_model").path == str(tmp_path / "org" / "base")


def test_missing_or_partly_cached_ids_are_pending(sets, env):
    got = hub.locate("org/none", "cfg.yml:2", "base_model")
    assert got.pending is not None and got.path == "hf://org/none@main"
    msg = str(got.pending.missing())
    assert "cfg.yml:2" in msg and env in msg and "--download" in msg and "\n" not in msg
    snap = cache_model(env, "org/part", sets["ft1"])
    shard = next(f for f in sorted(os.listdir(snap)) if f.endswith(".safetensors"))
    os.remove(os.path.join(snap, shard))
    part = hub.locate("org/part", "cfg", "base_model")
    assert part.pending is not None and "partly" in str(part.pending.missing()) and shard in str(part.pending.missing())


def test_offline_mode_is_named(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = str(hub.locate("org/none", "cfg", "base_model").pending.missing())
    assert "HF_HUB_OFFLINE" in msg


@pytest.mark.parametrize("text, needle", [
    ("org/base@", "not a usable revision"),
    ("org/base@../x", "not a usable revision"),
])
def test_strings_that_cannot_name_a_model(env, text, needle):
    with pytest.raises(UsageError, match=needle):
        parse_config(ta(text, "/m/ft"), "cfg.yml")


def test_revision_on_a_plain_folder_is_refused(sets, env):
    with pytest.raises(UsageError, match="applies to Hub IDs"):
        parse_config(ta(sets["base"] + "@main", sets["ft1"]), "cfg.yml")


def test_a_missing_adapter_on_the_cli_is_one_line_exit_3(sets, env, tmp_path):
    (tmp_path / "c.yml").write_text(ta(sets["base"], sets["ft1"] + "+org/lora"))
    res = cli("merge", tmp_path / "c.yml", tmp_path / "out")
    assert res.returncode == 3 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "LoRA adapter" in res.stderr and "org/lora" in res.stderr and "adapter_config.json" in res.stderr


# --- merges from the cache -------------------------------------------------------------------------


def test_a_mergekit_config_with_hub_ids_and_a_union_tokenizer_runs_unchanged(env, tmp_path):
    pytest.importorskip("transformers")
    from .vocab_models import vocab_set

    local = vocab_set(str(tmp_path / "local"), torch.bfloat16, names=("base", "ft1", "ft2"))
    for name, path in local.items():
        cache_model(env, f"someorg/{name}-7b", path)
    # as mergekit users write it: the base listed among the models, IDs with and without a revision
    text = """models:
  - model: someorg/base-7b
  - model: someorg/ft1-7b
    parameters:
      weight: 0.5
      density: 0.5
  - model: someorg/ft2-7b@main
    parameters:
      weight: 0.5
      density: 0.5
merge_method: ties
base_model: someorg/base-7b
parameters:
  normalize: true
tokenizer_source: union
dtype: bfloat16
"""
    (tmp_path / "hub.yml").write_text(text)
    res = cli("merge", tmp_path / "hub.yml", tmp_path / "from-cache", "-q", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name, path in local.items():
        text = text.replace(f"someorg/{name}-7b@main", path).replace(f"someorg/{name}-7b", path)
    (tmp_path / "local.yml").write_text(text)
    res = cli("merge", tmp_path / "local.yml", tmp_path / "from-paths", "-q")
    assert res.returncode == 0, res.stderr
    same_files(tmp_path / "from-cache", tmp_path / "from-paths")
    card = (tmp_path / "from-cache" / "README.md").read_text()
    assert "someorg/ft1-7b" in card and env not in card  # the model card names the models as the config does


def test_stats_and_slices_resolve_ids_too(sets, env, tmp_path):
    for name in ("base", "ft1"):
        cache_model(env, f"org/{name}", sets[name])
    (tmp_path / "dppa.yml").write_text(f"merge_method: dppa\nbase_model: org/base\nmodels:\n  - model: org/ft1\n")
    res = cli("stats", tmp_path / "dppa.yml", "-q", "--json", tmp_path / "s.json")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "s.json").read_text())["models"][0]["path"].endswith(hashlib.sha1(b"org/ft1").hexdigest())
    (tmp_path / "sl.yml").write_text("merge_method: passthrough\nslices:\n  - sources:\n"
                                     "      - {model: org/ft1, layer_range: [0, 2]}\n  - sources:\n"
                                     "      - {model: org/base, layer_range: [1, 2]}\n")
    res = cli("merge", tmp_path / "sl.yml", tmp_path / "sl", "-q")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "sl" / "config.json").read_text())["num_hidden_layers"] == 3


def test_a_missing_id_is_one_line_naming_the_cache_and_the_flag(sets, env, tmp_path):
    (tmp_path / "c.yml").write_text(ta("org/base", sets["ft1"]))
    res = cli("merge", tmp_path / "c.yml", tmp_path / "out")
    assert res.returncode == 3 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "c.yml:2" in res.stderr and env in res.stderr and "--download" in res.stderr
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.partial")


# --- downloads -------------------------------------------------------------------------------------


def _hub_env(fake: FakeHub, env: str) -> dict:
    return {"HF_ENDPOINT": fake.url, "HF_HUB_CACHE": env, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_download_fetches_only_what_a_merge_needs(sets, env, tmp_path):
    with FakeHub() as fake:
        for name in ("base", "ft1"):
            folder = tmp_path / "publish" / name
            folder.mkdir(parents=True)
            for f in os.listdir(sets[name]):
                with open(os.path.join(sets[name], f), "rb") as src:
                    (folder / f).write_bytes(src.read())
            (folder / "pytorch_model.bin").write_bytes(b"\0" * 1000)  # not needed: never fetched
            (folder / "README.md").write_text("# a model card")
            fake.add(f"org/{name}", str(folder))
        (tmp_path / "c.yml").write_text(ta("org/base", "org/ft1"))
        res = cli("merge", tmp_path / "c.yml", tmp_path / "out", "-q", "--download", env_extra=_hub_env(fake, env))
        assert res.returncode == 0, res.stderr
        assert not fake.fetched("pytorch_model.bin") and not fake.fetched("README.md")
        shards = [f for f in os.listdir(sets["base"]) if f.endswith(".safetensors")]
        assert len(shards) > 1 and all(fake.fetched(s) for s in shards)
    # the cache now answers on its own: no server, no --download
    res = cli("merge", tmp_path / "c.yml", tmp_path / "again", "-q", env_extra={"HF_HUB_CACHE": env})
    assert res.returncode == 0, res.stderr
    (tmp_path / "l.yml").write_text(ta(sets["base"], sets["ft1"]))
    assert cli("merge", tmp_path / "l.yml", tmp_path / "local", "-q").returncode == 0
    same_files(tmp_path / "again", tmp_path / "local")
    same_files(tmp_path / "out", tmp_path / "local")


def test_an_incompatible_set_is_refused_from_the_headers_before_the_weights(sets, env, tmp_path):
    with FakeHub() as fake:
        fake.add("org/base", sets["base"])
        fake.add("org/wide", sets["wide"])  # another hidden size
        (tmp_path / "c.yml").write_text(ta("org/base", "org/wide"))
        res = cli("merge", tmp_path / "c.yml", tmp_path / "out", "--download", env_extra=_hub_env(fake, env))
        assert res.returncode == 3 and len(res.stderr.splitlines()) == 1, res.stderr
        assert "has shape" in res.stderr
        weights = [(m, r) for m, p, r in fake.requests if p.endswith(".safetensors")]
        assert weights and all(m == "GET" and r == "bytes=0-99999" for m, r in weights), weights  # headers only
    blobs = [f for d, _, fs in os.walk(env) for f in fs if "blobs" in d]
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(env) if "blobs" in d for f in fs)
    assert blobs and total < 20_000  # configs and the index, no weights


def test_a_partly_cached_model_is_completed(sets, env, tmp_path):
    snap = cache_model(env, "org/base", sets["base"])
    cache_model(env, "org/ft1", sets["ft1"])
    shard = sorted(f for f in os.listdir(snap) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.realpath(os.path.join(snap, shard)))  # an interrupted download: no blob, no link
    os.remove(os.path.join(snap, shard))
    (tmp_path / "c.yml").write_text(ta("org/base", "org/ft1"))
    res = cli("merge", tmp_path / "c.yml", tmp_path / "out")
    assert res.returncode == 3 and "partly" in res.stderr and shard in res.stderr
    with FakeHub() as fake:
        fake.add("org/base", sets["base"])
        fake.repos["org/base"]["commit"] = os.path.basename(snap)  # the same commit as the cached snapshot
        res = cli("merge", tmp_path / "c.yml", tmp_path / "out", "-q", "--download", env_extra=_hub_env(fake, env))
        assert res.returncode == 0, res.stderr
        fetched = {p.rsplit("/", 1)[1] for m, p, r in fake.requests if m == "GET" and r is None and "/resolve/" in p}
    assert shard in fetched and not any(f.endswith(".safetensors") and f != shard for f in fetched)


@pytest.mark.parametrize("model, needle", [("org/nothere", "is not a model on"), ("org/base@v9", "has no revision")])
def test_hub_errors_are_one_line(sets, env, tmp_path, model, needle):
    with FakeHub() as fake:
        fake.add("org/base", sets["base"])
        (tmp_path / "c.yml").write_text(ta(model, sets["ft1"]))
        res = cli("merge", tmp_path / "c.yml", tmp_path / "out", "--download", env_extra=_hub_env(fake, env))
    assert res.returncode == 3 and len(res.stderr.splitlines()) == 1, res.stderr
    assert needle in res.stderr and "c.yml:2" in res.stderr


def test_offline_mode_blocks_downloads(sets, env, tmp_path):
    (tmp_path / "c.yml").write_text(ta("org/base", sets["ft1"]))
    res = cli("merge", tmp_path / "c.yml", tmp_path / "out", "--download", env_extra={"HF_HUB_OFFLINE": "1"})
    assert res.returncode == 3 and "HF_HUB_OFFLINE" in res.stderr, res.stderr


def test_pending_models_refused_by_the_api_without_download(env):
    from dppa_stream.inputs import open_inputs

    cfg = parse_config(ta("org/base", "org/ft"), "cfg.yml")
    assert set(cfg.pending) == {"hf://org/base@main", "hf://org/ft@main"}
    with pytest.raises(InputError, match="--download"):
        open_inputs(cfg)
