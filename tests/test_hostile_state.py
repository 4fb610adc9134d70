"""Class 3, run state: unforgeable by tensor names, written atomically, durable before it is
recorded; damaged state is exit 4 with the way out (remove OUT.partial or pass --overwrite)."""

import errno
import json
import os

import numpy as np
import pytest

from dppa_stream import output
from dppa_stream.errors import OutputError
from dppa_stream.output import MANIFEST, WORK_DIR, Manifest, prepare_partial, read_manifest, write_atomic
from dppa_stream.statistics import Abs
from dppa_stream.stats_store import StatsStore
from dppa_stream.summaries import HIST_BINS, Summary

from .test_hostile_cli import config, one_line_error, run, same_tree, tensors, write_model

FORGERS = ["a\tb", "x\t0\ny", "w\t1\n", "\n", '"],["x', "t\u2028u", "nul\0byte", "\t3"]


def _partial(tmp_path, names):
    partial = str(tmp_path / "out.partial")
    prepare_partial(partial, "fp", False, False, {"unit_bytes": 1 << 20}, set(names))
    return partial


def test_manifest_cannot_be_forged_by_tensor_names(tmp_path):
    plan = {n: 1 for n in FORGERS + ["x", "w", "y"]}
    partial = _partial(tmp_path, plan)
    with Manifest(partial) as m:
        for i, name in enumerate(FORGERS):
            m.record(name, i)
    done = read_manifest(os.path.join(partial, WORK_DIR, MANIFEST), plan)
    assert done == {(n, i) for i, n in enumerate(FORGERS)}


def _manifest_with(tmp_path, text: bytes):
    plan = {"a": 1, "b": 1}
    partial = _partial(tmp_path, plan)
    path = os.path.join(partial, WORK_DIR, MANIFEST)
    with open(path, "wb") as f:
        f.write(text)
    return partial, path, plan


@pytest.mark.parametrize("tail", [b'["b", 0', b'["b"', b"\0\0\0\0", b'["b", 0]garbage\n', b"\xff\xfe\n"],
                         ids=["torn", "torn-short", "zeros", "garbage-line", "not-utf8"])
def test_torn_tail_is_ignored_and_repaired(tmp_path, tail):
    partial, path, plan = _manifest_with(tmp_path, b'["a", 0]\n["a", 1]\n' + tail)
    assert read_manifest(path, plan) == {("a", 0), ("a", 1)}
    with Manifest(partial) as m:  # appending after a torn tail must not glue records together
        m.record("b", 3)
    assert read_manifest(path, plan) == {("a", 0), ("a", 1), ("b", 3)}


@pytest.mark.parametrize("middle", [b'["a", 0\n', b'{"a": 0}\n', b'["zzz", 0]\n', b'["a", -1]\n', b"\n"],
                         ids=["torn-middle", "object", "unknown-tensor", "negative-unit", "empty-line"])
def test_damaged_middle_is_a_state_error(tmp_path, middle):
    partial, path, plan = _manifest_with(tmp_path, b'["a", 0]\n' + middle + b'["b", 0]\n')
    with pytest.raises(OutputError) as e:
        read_manifest(path, plan)
    msg = str(e.value)
    assert "\n" not in msg and "--overwrite" in msg and partial in msg and e.value.exit_code == 4


def test_unit_is_recorded_only_after_the_shards_are_synced(tmp_path, monkeypatch):
    partial = _partial(tmp_path, {"a": 1})
    open(os.path.join(partial, "model.safetensors"), "wb").close()
    events = []
    real_sync, real_write = os.fdatasync, output.write_all
    monkeypatch.setattr(os, "fdatasync", lambda fd: (events.append("sync"), real_sync(fd))[1])
    monkeypatch.setattr(output, "write_all", lambda fd, data: (events.append("record"), real_write(fd, data))[1])
    with Manifest(partial, interval=3600) as m:
        m.record("a", 0)
        m.record("a", 1)
        assert events == []  # batched
    assert events == ["sync", "record"]


def test_background_batches_are_synced_before_they_are_recorded(tmp_path, monkeypatch):
    """With a batch made durable on the manifest's own thread, every batch still follows an
    fdatasync of the shards, batches stay in order and none is lost at close."""
    plan = {"a": 400}
    partial = _partial(tmp_path, plan)
    open(os.path.join(partial, "model.safetensors"), "wb").close()
    events = []
    real_sync, real_write = os.fdatasync, output.write_all
    monkeypatch.setattr(os, "fdatasync", lambda fd: (events.append("sync"), real_sync(fd))[1])
    monkeypatch.setattr(output, "write_all", lambda fd, data: (events.append(data), real_write(fd, data))[1])
    with Manifest(partial, interval=0) as m:
        for i in range(400):
            m.record("a", i)
    batches = [e for e in events if e != "sync"]
    assert len(batches) >= 2  # some went in the background
    for i, e in enumerate(events):
        if e != "sync":
            assert events[i - 1] == "sync"
    lines = b"".join(batches).decode().splitlines()
    assert [json.loads(line)[1] for line in lines] == list(range(400))
    assert read_manifest(os.path.join(partial, WORK_DIR, MANIFEST), plan) == {("a", i) for i in range(400)}


def test_a_failed_background_batch_fails_the_run(tmp_path, monkeypatch):
    partial = _partial(tmp_path, {"a": 10})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "sync_outputs", lambda folder: full(0))
    with pytest.raises(OutputError) as e:
        with Manifest(partial, interval=0) as m:
            for i in range(10):
                m.record("a", i)
    assert e.value.exit_code == 4 and "\n" not in str(e.value)


def test_run_state_is_written_atomically(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    write_atomic(str(path), b'{"new": 1}')
    assert path.read_text() == '{"new": 1}' and os.listdir(tmp_path) == ["state.json"]


# --- the command line on damaged state ------------------------------------------------------------


@pytest.fixture
def interrupted(tmp_path, monkeypatch):
    """A real OUT.partial: a run stopped by a write failure after its run state was written."""
    base = write_model(tmp_path / "in" / "base", tensors(0))
    ft = write_model(tmp_path / "in" / "ft", {k: v + 1 for k, v in tensors(0).items()})
    cfg = config(tmp_path / "c.yml", base, ft)
    code, lines, _ = run("merge", cfg, tmp_path / "ref", "-q")
    assert code == 0, lines
    with monkeypatch.context() as m:
        m.setattr("dppa_stream.merge_pass.copy_model_files", _disk_full)
        code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    one_line_error(code, lines, 4, "--resume")
    assert (tmp_path / "out.partial" / WORK_DIR / "run.json").exists()
    return tmp_path, cfg


def _disk_full(*a, **k):
    raise OutputError("tokenizer.json: write failed (No space left on device)")


@pytest.mark.parametrize("damage", ["truncated", "empty", "not-an-object", "bad-plan"])
def test_damaged_run_json_is_exit_4_with_the_way_out(interrupted, damage):
    tmp_path, cfg = interrupted
    rj = tmp_path / "out.partial" / WORK_DIR / "run.json"
    text = rj.read_text()
    saved = json.loads(text)
    rj.write_text({"truncated": text[: len(text) // 2], "empty": "", "not-an-object": "[1, 2]",
                   "bad-plan": json.dumps({**saved, "unit_bytes": "x"})}[damage])
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume")
    one_line_error(code, lines, 4, "--overwrite", "out.partial")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--overwrite")  # the way out works
    assert code == 0, lines
    same_tree(tmp_path / "ref", tmp_path / "out")


def test_resume_with_overwrite_starts_over_when_state_is_damaged(interrupted):
    tmp_path, cfg = interrupted
    (tmp_path / "out.partial" / WORK_DIR / "run.json").write_text("{")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume", "--overwrite")
    assert code == 0, lines
    same_tree(tmp_path / "ref", tmp_path / "out")


def test_damaged_manifest_middle_via_cli(interrupted):
    tmp_path, cfg = interrupted
    mf = tmp_path / "out.partial" / WORK_DIR / MANIFEST
    names = list(tensors(0))
    mf.write_text(json.dumps([names[0], 0]) + "\n" + "GARBAGE\n" + json.dumps([names[1], 0]) + "\n")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume")
    one_line_error(code, lines, 4, "--overwrite", "damaged")


def test_resume_after_write_failure_is_byte_identical(interrupted):
    tmp_path, cfg = interrupted
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume")
    assert code == 0, lines
    same_tree(tmp_path / "ref", tmp_path / "out")


# --- the statistics store --------------------------------------------------------------------------


def _summary(n=100):
    return Summary(n, np.bincount(np.arange(n) % 7, minlength=HIST_BINS).astype(np.int64), np.zeros(256, np.int64))


def _store(tmp_path):
    path = str(tmp_path / "stats.zarr")
    StatsStore(path).put({("a", Abs(0)): _summary(), ("b", Abs(1)): _summary(50)})
    return path


def _round_files(path):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if "round-" in d)


def test_store_round_trip(tmp_path):
    path = _store(tmp_path)
    got = StatsStore(path).get("a", Abs(0))
    assert got is not None and got.numel == 100


@pytest.mark.parametrize("damage", ["truncate-chunk", "delete-chunk", "garbage-metadata", "garbage-group"])
def test_damaged_store_is_exit_4_with_the_way_out(tmp_path, damage):
    path = _store(tmp_path)
    chunks = [f for f in _round_files(path) if not f.endswith("zarr.json")]
    meta = [f for f in _round_files(path) if f.endswith("zarr.json")]
    if damage == "truncate-chunk":
        os.truncate(chunks[0], os.path.getsize(chunks[0]) // 2)
    elif damage == "delete-chunk":
        for c in chunks:
            os.remove(c)
    elif damage == "garbage-metadata":
        open(meta[0], "w").write('{"zarr_format": 3, "node_type": "arr')
    else:
        open(os.path.join(path, "zarr.json"), "w").write("\0\0\0")
    store = StatsStore(path)  # opened on first use
    with pytest.raises(OutputError) as e:
        store.get("a", Abs(0))
    msg = str(e.value)
    assert e.value.exit_code == 4 and "\n" not in msg and "--overwrite" in msg and "stats.zarr" in msg


def test_uncommitted_round_is_ignored(tmp_path):
    path = _store(tmp_path)
    store = StatsStore(path)
    arr = store.group.create_array(name="round-0001", data=np.arange(10), overwrite=True)  # a write cut short
    assert "index" not in arr.attrs
    again = StatsStore(path)
    assert again.get("b", Abs(1)) is not None
    again.put({("c", Abs(2)): _summary(9)})  # and later rounds still save and load
    assert StatsStore(path).get("c", Abs(2)).numel == 9


def test_store_write_failure_is_exit_4(tmp_path, monkeypatch):
    path = _store(tmp_path)
    store = StatsStore(path)

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(store.group), "create_array", full)
    with pytest.raises(OutputError) as e:
        store.put({("d", Abs(3)): _summary()})
    assert "No space left" in str(e.value) and "--resume" in str(e.value)
