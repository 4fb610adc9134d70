"""Class 6, disk full: space for everything the run writes is checked (and for the files written
last, reserved) at the start; any write failure, wherever it happens, is exit 4 and --resume
then finishes the same output."""

import os
import resource
from collections import namedtuple

import pytest

from dppa_stream import output
from dppa_stream.output import RESERVE_DIR, WORK_DIR, Space, prepare_partial, release_reserve

from .test_hostile_cli import cli, config, one_line_error, proc_error, run, same_tree, tensors, write_model


@pytest.fixture
def with_big_tokenizer(tmp_path):
    """A small model whose tokenizer.json (3 MB) is larger than its shards, and a reference output."""
    base = write_model(tmp_path / "in" / "base", tensors(0))
    with open(os.path.join(base, "tokenizer.json"), "w") as f:
        f.write('{"model": "' + "x" * 3_000_000 + '"}')
    ft = write_model(tmp_path / "in" / "ft", {k: v + 1 for k, v in tensors(0).items()})
    cfg = config(tmp_path / "c.yml", base, ft, method="dppa", params="{amplification: [1.8, 1.0]}")
    code, lines, _ = run("merge", cfg, tmp_path / "ref", "-q")
    assert code == 0, lines
    return tmp_path, cfg


def _limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_tokenizer_that_does_not_fit_fails_at_the_start_then_resumes(with_big_tokenizer):
    tmp_path, cfg = with_big_tokenizer
    res = cli("merge", cfg, tmp_path / "out", "-q", preexec_fn=_limit)
    proc_error(res, 4, "--resume")
    assert not (tmp_path / "out").exists()
    work = tmp_path / "out.partial" / WORK_DIR
    assert not (work / "stats.zarr").exists(), "should fail before pass 1, not at the end"
    res = cli("merge", cfg, tmp_path / "out", "-q", "--resume")
    assert res.returncode == 0, res.stderr
    same_tree(tmp_path / "ref", tmp_path / "out")


def test_too_little_free_space_fails_before_anything_is_written(with_big_tokenizer, monkeypatch):
    tmp_path, cfg = with_big_tokenizer
    fake = namedtuple("statvfs", "f_bavail f_frsize")(1000, 1024)  # 1 MB free
    monkeypatch.setattr(os, "statvfs", lambda p: fake)
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    one_line_error(code, lines, 4, "free disk space")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_statistics_store_that_does_not_fit_is_exit_4_and_resumable(with_big_tokenizer, monkeypatch):
    tmp_path, cfg = with_big_tokenizer
    import zarr

    with monkeypatch.context() as m:
        def full(*a, **k):
            raise OSError(28, "No space left on device")

        m.setattr(zarr.Group, "create_array", full)
        code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    one_line_error(code, lines, 4, "stats.zarr", "--resume")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume")
    assert code == 0, lines
    same_tree(tmp_path / "ref", tmp_path / "out")


def test_disk_full_anywhere_in_finalising_is_exit_4_and_resumable(with_big_tokenizer, monkeypatch):
    """Even a write we do not wrap (the shard index) surfaces as exit 4, not an internal error."""
    tmp_path, cfg = with_big_tokenizer
    from dppa_stream.checkpoint import ShardLayout

    with monkeypatch.context() as m:
        def full(self, folder):
            raise OSError(28, "No space left on device", os.path.join(folder, "model.safetensors.index.json"))

        m.setattr(ShardLayout, "finish", full)
        code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    one_line_error(code, lines, 4, "No space left", "--resume")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume")
    assert code == 0, lines
    same_tree(tmp_path / "ref", tmp_path / "out")


def test_reserve_holds_the_final_files_and_is_released(tmp_path):
    partial = str(tmp_path / "out.partial")
    space = Space(shards=1000, final={"tokenizer.json": 50_000, "README.md": 4096}, state=10)
    prepare_partial(partial, "fp", False, False, {"unit_bytes": 1}, space=space)
    rdir = os.path.join(partial, WORK_DIR, RESERVE_DIR)
    sizes = sorted(os.path.getsize(os.path.join(rdir, f)) for f in os.listdir(rdir))
    assert sizes == [4096, 50_000]
    assert sum(os.stat(os.path.join(rdir, f)).st_blocks * 512 for f in os.listdir(rdir)) >= 54_096  # allocated
    release_reserve(partial)
    assert not os.path.exists(rdir)


def test_space_estimate_covers_what_a_merge_writes(with_big_tokenizer):
    tmp_path, cfg = with_big_tokenizer
    from dppa_stream.config import load_config
    from dppa_stream.inputs import open_inputs

    space = output.space_needed(open_inputs(load_config(cfg)), load_config(cfg))
    written = sum(os.path.getsize(os.path.join(tmp_path / "ref", f)) for f in os.listdir(tmp_path / "ref"))
    assert space.shards + sum(space.final.values()) >= written
