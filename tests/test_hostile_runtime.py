"""Class 7, late failures: a run that ends with a usage or input error leaves nothing behind that
it created (a partial made by an earlier run and only resumed is kept); an input rewritten in
place during the run is detected before publishing (exit 3, nothing published)."""

import os

import pytest

from dppa_stream.checkpoint.reader import Stamp, open_regular
from dppa_stream.errors import OutputError

from .test_hostile_cli import config, one_line_error, run, tensors, write_model


def _nan_pair(tmp_path):
    base = write_model(tmp_path / "in" / "base", tensors(0))
    ft_sd = {k: v + 1 for k, v in tensors(0).items()}
    ft_sd["model.layers.1.mlp.up_proj.weight"][2, 1] = float("nan")
    ft = write_model(tmp_path / "in" / "ft", ft_sd)
    return config(tmp_path / "c.yml", base, ft)


def test_input_error_mid_run_leaves_nothing_and_the_rerun_just_works(tmp_path):
    cfg = _nan_pair(tmp_path)
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    one_line_error(code, lines, 3, "NaN/Inf", "--allow-nonfinite")
    assert os.listdir(tmp_path) == ["c.yml", "in"] or sorted(os.listdir(tmp_path)) == ["c.yml", "in"]
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--allow-nonfinite")
    assert code == 0, lines


def test_a_resumed_partial_is_kept_on_input_error(tmp_path, monkeypatch):
    cfg = _nan_pair(tmp_path)
    with monkeypatch.context() as m:  # the first run stops (disk full) before any unit is written
        def full(self, folder):
            raise OutputError(f"{folder}: write failed (No space left on device)")

        m.setattr("dppa_stream.merge_pass.ShardLayout.preallocate", full)
        code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--allow-nonfinite")
    one_line_error(code, lines, 4, "--resume")
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume")  # forgot --allow-nonfinite
    one_line_error(code, lines, 3, "NaN/Inf")
    assert (tmp_path / "out.partial" / ".dppa-stream" / "run.json").exists(), "the earlier run's partial was removed"
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume", "--allow-nonfinite")
    assert code == 0, lines


@pytest.mark.parametrize("keep_mtime", [True, False])
def test_input_rewritten_in_place_during_the_run_is_not_published(tmp_path, monkeypatch, keep_mtime):
    base = write_model(tmp_path / "in" / "base", tensors(0))
    ft = write_model(tmp_path / "in" / "ft", {k: v + 1 for k, v in tensors(0).items()})
    cfg = config(tmp_path / "c.yml", base, ft)
    shard = os.path.join(ft, "model.safetensors")
    import dppa_stream.merge_pass as merge_pass

    real = merge_pass.write_model_card

    def rewrite_then_card(*a, **k):  # same size, other values, mtime optionally set back
        st = os.stat(shard)
        data = bytearray(open(shard, "rb").read())
        data[-8:] = bytes(8)
        with open(shard, "r+b") as f:
            f.write(data)
        if keep_mtime:
            os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.path.getsize(shard) == st.st_size
        return real(*a, **k)

    monkeypatch.setattr(merge_pass, "write_model_card", rewrite_then_card)
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    one_line_error(code, lines, 3, "model.safetensors", "changed while the merge was running")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_stamp_sees_a_same_size_rewrite_with_the_old_mtime(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 1024)
    fd, st = open_regular(str(p))
    stamp = Stamp.take(str(p), fd, st)
    os.close(fd)
    assert stamp.changed() is None
    with open(p, "r+b") as f:
        f.seek(128 * 1024)
        f.write(b"\xff" * 16)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(p) == st.st_size and os.stat(p).st_mtime_ns == st.st_mtime_ns
    assert stamp.changed() is not None


def test_replaced_input_between_runs_is_not_resumed(tmp_path, monkeypatch):
    base = write_model(tmp_path / "in" / "base", tensors(0))
    ft = write_model(tmp_path / "in" / "ft", {k: v + 1 for k, v in tensors(0).items()})
    cfg = config(tmp_path / "c.yml", base, ft)
    with monkeypatch.context() as m:
        def full(*a, **k):
            raise OutputError("config.json: write failed (No space left on device)")

        m.setattr("dppa_stream.merge_pass.copy_model_files", full)
        code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    assert code == 4
    shard = os.path.join(ft, "model.safetensors")
    st = os.stat(shard)
    data = bytearray(open(shard, "rb").read())
    data[-2:] = b"\x7f\x7f"
    with open(shard, "r+b") as f:
        f.write(data)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime tells
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume")
    one_line_error(code, lines, 4, "different config or different inputs")
