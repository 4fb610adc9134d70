"""Class 1, data loss: nothing may ever delete or modify anything the tool did not create in this
run. --overwrite replaces OUT only once the new output is complete, through a fresh folder it
creates itself; OUT.old (folder or file, even an input) is never touched."""

import os

import pytest

from dppa_stream.errors import InputError, OutputError
from dppa_stream.output import prepare_partial, publish, removed_on_bad_input

from .test_hostile_cli import config, digest, one_line_error, run, tensors, tiny_pair, write_model


def _listing(folder):
    return sorted(os.listdir(folder))


def test_overwrite_keeps_an_input_named_out_old(tmp_path):
    """The base model lives in OUT.old: --overwrite must not destroy it."""
    base = write_model(tmp_path / "out.old", tensors(0))
    ft = write_model(tmp_path / "ft", {k: v + 1 for k, v in tensors(0).items()})
    cfg = config(tmp_path / "c.yml", base, ft)
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "previous.txt").write_text("old output")
    before = digest(base)
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--overwrite", "-q")
    assert code == 0, lines
    assert digest(base) == before
    assert not (tmp_path / "out" / "previous.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert _listing(tmp_path) == ["c.yml", "ft", "out", "out.old"]  # nothing moved aside is left


def test_overwrite_with_a_file_named_out_old(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    os.makedirs(tmp_path / "out")
    (tmp_path / "out.old").write_text("not ours")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--overwrite", "-q")
    assert code == 0, lines
    assert (tmp_path / "out.old").read_text() == "not ours"
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_overwrite_replaces_a_symlinked_out_without_touching_its_target(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    os.makedirs(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    os.symlink(tmp_path / "elsewhere", tmp_path / "out")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--overwrite", "-q")
    assert code == 0, lines
    assert not os.path.islink(tmp_path / "out") and (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"


def test_out_partial_that_is_an_input_is_refused(tmp_path):
    base = write_model(tmp_path / "out.partial", tensors(0))
    os.makedirs(tmp_path / "out.partial" / ".dppa-stream")
    (tmp_path / "out.partial" / ".dppa-stream" / "run.json").write_text('{"fingerprint": "x"}')
    ft = write_model(tmp_path / "ft", {k: v + 1 for k, v in tensors(0).items()})
    cfg = config(tmp_path / "c.yml", base, ft)
    before = digest(tmp_path / "out.partial")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--overwrite", "-q")
    one_line_error(code, lines, 4, "input")
    assert digest(tmp_path / "out.partial") == before and not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_never_replaced(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    (tmp_path / "out").write_text("a file")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "--overwrite", "-q")
    one_line_error(code, lines, 2, "is a file")  # the command line refuses it before anything runs
    assert (tmp_path / "out").read_text() == "a file"


def test_partial_not_made_by_us_is_never_removed(tmp_path):
    base, ft = tiny_pair(tmp_path)
    cfg = config(tmp_path / "c.yml", base, ft)
    os.makedirs(tmp_path / "out.partial")
    (tmp_path / "out.partial" / "mine.txt").write_text("user data")
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", *extra)
        one_line_error(code, lines, 4, "out.partial")
        assert (tmp_path / "out.partial" / "mine.txt").read_text() == "user data"


# --- publish() itself ------------------------------------------------------------------------------


def _finished(tmp_path, name="out.partial"):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "model.safetensors").write_text("new")
    return str(tmp_path / name)


def test_publish_puts_the_old_output_back_when_the_swap_fails(tmp_path, monkeypatch):
    partial = _finished(tmp_path)
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "model.safetensors").write_text("old")
    real_rename = os.rename

    def rename(a, b):
        if str(a) == partial:
            raise OSError(5, "Input/output error")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OutputError) as e:
        publish(partial, str(tmp_path / "out"))
    assert "\n" not in str(e.value) and partial in str(e.value)
    assert (tmp_path / "out" / "model.safetensors").read_text() == "old"
    assert _listing(tmp_path) == ["out", "out.partial"]


def test_publish_without_overwrite_never_replaces_an_out_that_appeared(tmp_path):
    partial = _finished(tmp_path)
    os.makedirs(tmp_path / "out")
    with pytest.raises(OutputError):
        publish(partial, str(tmp_path / "out"), overwrite=False)
    assert os.path.isdir(partial) and _listing(tmp_path / "out") == []


def test_publish_leaves_every_old_named_sibling_alone(tmp_path):
    partial = _finished(tmp_path)
    os.makedirs(tmp_path / "out")
    os.makedirs(tmp_path / "out.old" / "x")
    (tmp_path / ".out.replaced-keep").write_text("looks like ours, is not")
    publish(partial, str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").read_text() == "new"
    assert _listing(tmp_path) == [".out.replaced-keep", "out", "out.old"]


def test_only_a_partial_created_in_this_run_is_removed_on_bad_input(tmp_path):
    fresh = str(tmp_path / "a.partial")
    with pytest.raises(InputError), removed_on_bad_input(fresh):
        prepare_partial(fresh, "fp", False, False, {"unit_bytes": 1})
        raise InputError("bad input")
    assert not os.path.exists(fresh)
    old = tmp_path / "b.partial" / ".dppa-stream"
    os.makedirs(old)
    (old / "run.json").write_text('{"fingerprint": "fp", "unit_bytes": 1}')
    with pytest.raises(InputError), removed_on_bad_input(str(tmp_path / "b.partial")):
        prepare_partial(str(tmp_path / "b.partial"), "fp", True, False, {"unit_bytes": 1})  # resumed, not created
        raise InputError("bad input")
    assert old.exists()
    with pytest.raises(OutputError), removed_on_bad_input(fresh):  # disk full: kept for --resume
        prepare_partial(fresh, "fp", False, False, {"unit_bytes": 1})
        raise OutputError("disk full")
    assert os.path.exists(fresh)
