"""The output folder's life cycle: where it may go, OUT.partial and its run state (fingerprint,
work-unit plan, manifest of finished work units), disk space, resume, and publishing the result.

Work happens in OUT.partial; OUT appears only when complete. A partial output is continued only
by a run with the same fingerprint (config, seed, output options, inputs' identities).

Rules (SECURITY.md): nothing is deleted or renamed that this tool did not create, except an
existing OUT (with --overwrite, only once the new output is complete) and a stale OUT.partial
holding our run state (with --overwrite). Run state is written atomically (write, fsync,
rename); a unit is listed as done only after its bytes are on disk; damaged state is exit 4
with the way out.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

from . import __version__, durable
from .checkpoint.format import DTYPE_SIZES
from .checkpoint.reader import model_roots
from .durable import fsync_dir, write_all, write_atomic, write_failed
from .errors import InputError, OutputError, UsageError, short

log = logging.getLogger("dppa_stream")

WORK_DIR = ".dppa-stream"
RUN_STATE = "run.json"
MANIFEST = "done.txt"
RESERVE_DIR = "reserve"  # placeholder files holding the space of what is written last
MANIFEST_INTERVAL = 1.0  # seconds between manifest batches (each costs an fdatasync of the shards)

_created: set[str] = set()  # OUT.partial folders this process created (and so may remove again)


def _state_error(path: str, partial: str, problem: str) -> OutputError:
    return OutputError(f"{path}: {problem}; the run state of {partial} is damaged: remove {partial} "
                       "or pass --overwrite to start over")


def fingerprint(cfg, inputs, seed: int, shard_size: int) -> str:
    """Identity of a run's output: config, seed, output options and each input file's identity
    (path, size, mtime, inode, ctime: a file rewritten in place between runs changes it)."""
    h = hashlib.sha256()
    h.update(cfg.text.encode("utf-8", "surrogateescape"))
    h.update(json.dumps([seed, shard_size, __version__]).encode())
    for ck in inputs.all:
        for f in ck.files:
            try:
                st = os.stat(f)
            except OSError as e:
                raise InputError(f"{f}: cannot read ({e.strerror})") from None
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_ctime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output(out: str, inputs, overwrite: bool) -> None:
    """Refuse outputs that could touch an input: OUT or OUT.partial being, containing or lying
    inside an input (its folder, its Hugging Face cache repository, or any weight file)."""
    real = os.path.realpath(out)
    partial = os.path.realpath(out + ".partial")
    for ck in inputs.all:
        roots = list(model_roots(ck.folder)) if ck.folder else [os.path.realpath(ck.path)]
        files = [os.path.realpath(f) for f in ck.files]
        for mine in (real, partial):
            for p in roots + files:
                if _inside(p, mine):
                    raise OutputError(f"{out}: the output would contain or replace the input {p}")
            for r in roots:
                if _inside(mine, r) and ck.folder:
                    raise OutputError(f"{out}: the output folder must not be inside the input folder {r}")
    if os.path.lexists(out) and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputError(f"{out}: exists and is not a folder")
    p = out + ".partial"
    if os.path.lexists(p) and (os.path.islink(p) or not os.path.isdir(p)):
        raise OutputError(f"{p}: exists and is not a folder made by dppa-stream; remove it")
    parent = os.path.dirname(real) or "."
    if not os.path.isdir(parent):
        raise OutputError(f"{out}: parent folder {parent} does not exist; create it first (or choose another OUT)")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: parent folder {parent} is not writable")


# --- disk space ---------------------------------------------------------------------------------


@dataclass
class Space:
    """Bytes a run will write: shards (pre-allocated by the layout), small files written at the
    end (reserved now as placeholder files: name -> bytes), and state that grows during the run
    (statistics, manifest; checked, not reserved)."""

    shards: int
    final: dict
    state: int

    @property
    def total(self) -> int:
        return self.shards + sum(self.final.values()) + self.state


def space_needed(inputs, cfg, model_files: list | None = None) -> Space:
    """Estimate what the run writes (from headers alone)."""
    from .hf_files import TOKENIZER_FILES
    from .targets import class_targets
    from .units import tensor_classes

    targets = class_targets(inputs, cfg.out_dtype, cfg.dtype)
    c = tensor_classes(inputs)
    counts = c.counts()
    # every tensor's name is in the manifest, and in the shards' headers unless it is stored quantized (the
    # names of its parts are); the rest is the same for every tensor of a class
    named = len("".join(c.names).encode())
    shards, state = named, named
    for k, i in enumerate(c.first):
        name, e, target = c.names[i], c.refs[i], targets[k]
        numel = e.numel
        if target.ref is None:  # one stored tensor, of the entry's shape
            one = numel * DTYPE_SIZES[target.dtype] + 96
        else:
            one = target.stored_bytes + sum(len(n.encode()) + 96 for n, _, _ in target.specs(name)) - len(name.encode())
        shards += one * counts[k]
        held = 64 + (1024 * (1 + numel // (1 << 20)) if target.ref is not None else 0)
        if e.real:  # a statistics record per model, and manifest lines (a requantized unit's carry its loss)
            held += len(c.models[i]) * (min(numel, 1 << 15) * 4 + 2048)
        state += held * counts[k]
    card = 4096 + 2 * len(cfg.text.encode("utf-8", "surrogateescape")) + sum(len(m.path) + 8 for m in inputs.all)
    final = {"README.md": card, "dppa_stream_config.yml": len(cfg.text.encode("utf-8", "surrogateescape")),
             "model.safetensors.index.json": 4096 + named + 48 * len(c.names)}
    made = getattr(inputs, "vocab", None)
    made = made.files if made is not None else {}
    for name, stamp in (model_files if model_files is not None else getattr(inputs, "model_files", [])):
        size = stamp.identity[3]
        if name == "config.json":  # re-indented, and maybe given per-layer lists
            final[name] = 2 * size + 4096 + len(json.dumps(getattr(inputs, "config", None) or {}))
        elif not (made and name in TOKENIZER_FILES):
            final[name] = size
    for name, data in made.items():
        final[name] = len(data)
    return Space(shards, final, state)


def _check_free(folder: str, need: int) -> None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise OutputError(f"{folder}: needs about {need / 1e6:.1f} MB of free disk space but the disk has "
                          f"{free / 1e6:.1f} MB; free space (then rerun, with --resume if OUT.partial exists) "
                          "or write elsewhere")


def reserve(partial: str, space: Space, resumed: bool) -> None:
    """Check the free space for everything still to be written and hold the space of the files
    written last, so a full disk fails now, not at the end after hours of work."""
    rdir = os.path.join(partial, WORK_DIR, RESERVE_DIR)
    held = 0
    if os.path.isdir(rdir):
        held = sum(os.path.getsize(os.path.join(rdir, f)) for f in os.listdir(rdir))
    shards = 0 if resumed else space.shards
    _check_free(partial, shards + sum(space.final.values()) + space.state - held)
    try:
        os.makedirs(rdir, exist_ok=True)
        for i, size in enumerate(space.final.values()):
            path = os.path.join(rdir, f"{i:03d}")
            with open(path, "ab") as f:
                if size > 0:
                    try:
                        os.posix_fallocate(f.fileno(), 0, size)
                    except OSError as e:
                        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                            raise
                        f.truncate(size)
    except OSError as e:
        raise OutputError(f"{partial}: cannot reserve {sum(space.final.values()) / 1e6:.1f} MB for the tokenizer, "
                          f"config and model card ({e.strerror}); free space, then rerun with --resume") from None


def release_reserve(folder: str) -> None:
    """Give back the reserved space right before the final small files are written."""
    shutil.rmtree(os.path.join(folder, WORK_DIR, RESERVE_DIR), ignore_errors=True)


# --- run state ----------------------------------------------------------------------------------

def _load_run_state(run_json: str, partial: str) -> dict:
    try:
        with open(run_json, "rb") as f:
            saved = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise _state_error(run_json, partial, f"cannot read ({e.strerror})") from None
    except (ValueError, RecursionError):
        raise _state_error(run_json, partial, "not valid JSON (a torn write?)") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), str):
        raise _state_error(run_json, partial, "no fingerprint")
    return saved


def _check_plan(saved: dict, run_json: str, partial: str) -> dict:
    """The saved work-unit plan: the unit size it was made with (the plan follows from it, the
    inputs and the config, which the fingerprint pins)."""
    ub = saved.get("unit_bytes")
    if not isinstance(ub, int) or isinstance(ub, bool) or ub <= 0:
        raise _state_error(run_json, partial, "malformed work-unit plan")
    return {"unit_bytes": ub}


def prepare_partial(partial: str, fp: str, resume: bool, overwrite: bool, plan: dict, names: set | None = None,
                    space: Space | None = None) -> tuple[set, dict]:
    """Create OUT.partial for a fresh run, or validate it for --resume. Returns the finished work
    units (named by their first unit: (tensor, unit index)) and the work-unit plan they belong to
    (`{"unit_bytes": N}`). `names`: the output's tensors, which manifest records must name. With
    `space`, check the free disk space and reserve what is written last.

    A partial output is only continued when its fingerprint (config, seed, shard size, inputs'
    identities, version) matches; otherwise it is refused, never silently mixed."""
    work = os.path.join(partial, WORK_DIR)
    run_json = os.path.join(work, RUN_STATE)
    if os.path.lexists(partial):
        ours = os.path.isdir(work) and not os.path.islink(partial)
        if not ours or (not os.path.lexists(run_json) and not overwrite):
            raise OutputError(f"{partial}: exists and was not made by dppa-stream (or holds no run state); remove it")
        if resume:
            try:
                done, saved = _resume(partial, fp, names)
            except OutputError:  # damaged or another run's state: --overwrite (if given) starts over
                if not overwrite:
                    raise
                log.info("%s cannot be resumed; starting over (--overwrite)", partial)
            else:
                if space is not None:
                    reserve(partial, space, resumed=True)
                return done, saved
        if not overwrite:
            raise OutputError(f"{partial}: holds an interrupted run; pass --resume to continue it or --overwrite to start over")
        try:
            shutil.rmtree(partial)  # ours (it holds our run state) and --overwrite asks for a fresh start
        except OSError as e:
            raise OutputError(f"{partial}: cannot remove the stale partial output ({e.strerror})") from None
    if space is not None:
        _check_free(os.path.dirname(os.path.abspath(partial)), space.total)  # before creating anything
    try:
        os.makedirs(work)
    except OSError as e:
        raise OutputError(f"{partial}: cannot create the output folder ({e.strerror})") from None
    _created.add(os.path.realpath(partial))
    try:
        write_atomic(run_json, json.dumps({"fingerprint": fp, "version": __version__, **plan}).encode())
    except OutputError as e:  # without its run state the folder cannot be resumed: remove it (ours, empty)
        shutil.rmtree(partial, ignore_errors=True)
        raise OutputError(f"{str(e).split('; ')[0]}; nothing was kept: free space or fix the cause, then rerun the same "
                          "command") from None
    if space is not None:
        reserve(partial, space, resumed=False)
    return set(), plan


def _resume(partial: str, fp: str, names: set | None) -> tuple[set, dict]:
    """The finished work units and plan of a partial output whose run state matches this run."""
    work = os.path.join(partial, WORK_DIR)
    run_json = os.path.join(work, RUN_STATE)
    saved = _load_run_state(run_json, partial)
    if saved["fingerprint"] != fp:
        raise OutputError(f"{partial}: was made with a different config or different inputs; "
                          "remove it or pass --overwrite to start over")
    plan = _check_plan(saved, run_json, partial)
    done = read_manifest(os.path.join(work, MANIFEST), names)
    log.info("resuming %s: %d work units already written", partial, len(done))
    return done, plan


def _record(line: bytes, names: set | None, extra: bool = False):
    """(tensor, unit) from one manifest line (with `extra`: and what the work unit reported, or
    None), or None if the line is damaged."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if (isinstance(rec, list) and len(rec) in (2, 3) and isinstance(rec[0], str) and isinstance(rec[1], int)
            and not isinstance(rec[1], bool) and rec[1] >= 0 and (names is None or rec[0] in names)):
        return (rec[0], rec[1], rec[2] if len(rec) == 3 else None) if extra else (rec[0], rec[1])
    return None


def _manifest_lines(data: bytes) -> tuple[list[bytes], int]:
    """Complete lines, and the length of the part worth keeping: a torn tail (no newline, or a
    damaged last line) is dropped."""
    lines = data.split(b"\n")
    lines.pop()  # after the last newline: empty, or the torn tail of an interrupted write
    keep = sum(len(line) + 1 for line in lines)
    if lines and _record(lines[-1], None) is None:
        keep -= len(lines.pop()) + 1
    return lines, keep


def read_manifest(path: str, names: set | None = None) -> set:
    """Finished work units, each named by its first unit: one JSON array [tensor, unit index] per
    line, so no tensor name can forge a record. A damaged last line is a torn write and ignored;
    damage before it is refused."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise _state_error(path, os.path.dirname(os.path.dirname(path)), f"cannot read ({e.strerror})") from None
    done = set()
    for i, line in enumerate(_manifest_lines(data)[0]):
        rec = _record(line, names)
        if rec is None:
            raise _state_error(path, os.path.dirname(os.path.dirname(path)), f"line {i + 1} is damaged")
        done.add(rec)
    return done


def read_manifest_extras(path: str) -> dict:
    """(tensor, unit) -> what each finished unit reported (a requantized unit's loss partial, else
    None), from a manifest `read_manifest` has already accepted."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise _state_error(path, os.path.dirname(os.path.dirname(path)), f"cannot read ({e.strerror})") from None
    out = {}
    for line in _manifest_lines(data)[0]:
        rec = _record(line, None, extra=True)
        if rec is not None:
            out[rec[:2]] = rec[2]
    return out


def sync_outputs(folder: str) -> None:
    """fdatasync every shard in `folder`: the bytes the workers wrote reach the disk."""
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)


class Manifest:
    """Appends finished work units to OUT.partial/.dppa-stream/done.txt, in batches: every second
    the shards are synced (fdatasync), then the batch is appended and fsynced. A work unit is
    listed only once its bytes are durable, so --resume after a crash or power loss never skips
    lost data.

    A batch is made durable on a thread of its own: `record` runs in the scheduler's thread, and an
    fdatasync there (a second's worth of writes: 0.1 s here, seconds on a big merge) would leave
    every worker that finishes meanwhile without a next task. One batch at a time, in order."""

    def __init__(self, partial: str, interval: float = MANIFEST_INTERVAL):
        self.partial, self.interval = partial, interval
        self.path = os.path.join(partial, WORK_DIR, MANIFEST)
        self._pending: list[str] = []
        self._recorded = 0
        self._last = time.monotonic()
        self._writer: threading.Thread | None = None
        self._error: OutputError | None = None
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            size = os.fstat(self._fd).st_size
            keep = _manifest_lines(os.pread(self._fd, size, 0))[1] if size else 0
            if keep != size:  # drop a torn tail, or the next record would be glued onto it
                os.ftruncate(self._fd, keep)
                os.fsync(self._fd)
        except OSError as e:
            raise write_failed(self.path, e) from None

    def record(self, tensor: str, index: int, extra=None) -> None:
        """List a finished unit, with what it reported (`extra`, JSON: kept for --resume)."""
        self._check()
        self._pending.append(json.dumps([tensor, index] if extra is None else [tensor, index, extra]) + "\n")
        self._recorded += 1
        if durable.fault_hook is not None:  # crash tests: every unit durable at once, then maybe die
            self.flush()
            durable.fault_point("units", self._recorded)
        elif time.monotonic() - self._last >= self.interval and not (self._writer and self._writer.is_alive()):
            batch, self._pending = self._pending, []
            self._last = time.monotonic()
            self._writer = threading.Thread(target=self._write_in_background, args=(batch,), daemon=True,
                                            name="dppa-stream-manifest")
            self._writer.start()

    def _write(self, batch: list[str]) -> None:
        try:
            sync_outputs(self.partial)
            write_all(self._fd, "".join(batch).encode())
            os.fsync(self._fd)
        except OSError as e:
            raise write_failed(self.path, e) from None

    def _write_in_background(self, batch: list[str]) -> None:
        try:
            self._write(batch)
        except OutputError as e:
            self._error = e

    def _check(self) -> None:
        """Raise a background batch's write failure in the caller's thread."""
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Make every recorded unit durable now (after the batch in flight, if any)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        self._check()
        if self._pending:
            self._write(self._pending)
            self._pending.clear()
        self._last = time.monotonic()

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        try:
            self.close()
        except OutputError:
            if exc_type is None:
                raise  # else: keep the error that ended the run


# --- the end of a run ---------------------------------------------------------------------------


def publish(partial: str, out: str, overwrite: bool = True) -> None:
    """Move the finished output into place. An existing OUT is first moved into a fresh folder
    that this call creates (never an existing OUT.old), and removed only after the new output is
    in place; if anything fails, OUT is put back."""
    parent = os.path.dirname(os.path.abspath(out))
    aside = None
    try:
        if os.path.lexists(out):
            if not overwrite:
                raise OutputError(f"{out}: appeared while the merge was running; pass --overwrite to replace it "
                                  f"(the finished output is kept in {partial})")
            aside = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.replaced-", dir=parent)
            os.rename(out, os.path.join(aside, "old"))
        try:
            os.rename(partial, out)
        except OSError:
            if aside:
                os.rename(os.path.join(aside, "old"), out)
                os.rmdir(aside)
                aside = None
            raise
    except OSError as e:
        raise OutputError(f"{out}: cannot move the finished output into place ({e.strerror}); it is complete in {partial}") from None
    with contextlib.suppress(OSError):
        fsync_dir(parent)  # the rename is durable
    if aside:
        old = os.path.join(aside, "old")
        try:
            if os.path.islink(old) or not os.path.isdir(old):
                os.remove(old)
            else:
                shutil.rmtree(old)
            os.rmdir(aside)
        except OSError as e:
            log.warning("could not remove the replaced output %s (%s)", short(aside), e.strerror)


@contextlib.contextmanager
def removed_on_bad_input(partial: str):
    """Wrap one run: if it ends with a usage or input error, OUT.partial is removed when this run
    created it (so nothing is left behind and the corrected rerun just works); a partial that an
    earlier run made and this run only resumed is never removed."""
    real = os.path.realpath(partial)
    _created.discard(real)  # only what is created inside this block counts
    try:
        yield
    except (InputError, UsageError):
        if real in _created:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        _created.discard(real)
