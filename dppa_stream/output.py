"""The output folder's life cycle: where it may go, OUT.partial and its run state (fingerprint,
work-unit plan, manifest of finished units), resume, and publishing the finished folder.

Work happens in OUT.partial; OUT appears only when complete. A partial output is continued only
by a run with the same fingerprint (config, seed, output options, inputs' sizes and mtimes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

from . import __version__
from .errors import OutputError

log = logging.getLogger("dppa_stream")

WORK_DIR = ".dppa-stream"


def fingerprint(cfg, inputs, seed: int, shard_size: int) -> str:
    """Identity of a run's output: config, seed, output options and the inputs' headers/sizes."""
    h = hashlib.sha256()
    h.update(cfg.text.encode())
    h.update(json.dumps([seed, shard_size, __version__]).encode())
    for ck in inputs.all:
        for f in ck.files:
            st = os.stat(f)
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def check_output(out: str, inputs, overwrite: bool) -> None:
    """Refuse outputs that could touch an input: the same folder, inside one, or containing one
    (replacing such a folder with --overwrite would delete the input)."""
    real = os.path.realpath(out)
    for ck in inputs.all:
        paths = [os.path.realpath(ck.folder)] if ck.folder else [os.path.realpath(ck.path)]
        paths += [os.path.realpath(f) for f in ck.files]
        for p in paths:
            if real == p or p.startswith(real + os.sep):
                raise OutputError(f"{out}: the output would contain or replace the input {p}")
        if ck.folder and real.startswith(os.path.realpath(ck.folder) + os.sep):
            raise OutputError(f"{out}: the output folder must not be inside the input folder {ck.folder}")
    if os.path.exists(out) and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"{out}: exists and is not a folder")
    parent = os.path.dirname(real) or "."
    if not os.path.isdir(parent):
        raise OutputError(f"{out}: parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{out}: parent folder {parent} is not writable")


def prepare_partial(partial: str, fp: str, resume: bool, overwrite: bool, plan: dict) -> tuple[set, dict]:
    """Create OUT.partial for a fresh run, or validate it for --resume. Returns the finished units
    and the work-unit plan (rows per unit, per tensor) they belong to.

    A partial output is only continued when its fingerprint (config, seed, shard size, inputs'
    sizes and mtimes, version) matches; otherwise it is refused, never silently mixed."""
    work = os.path.join(partial, WORK_DIR)
    run_json = os.path.join(work, "run.json")
    if os.path.exists(partial):
        if not os.path.isfile(run_json):
            raise OutputError(f"{partial}: exists and was not made by dppa-stream; remove it")
        if resume:
            with open(run_json) as f:
                saved = json.load(f)
            if saved.get("fingerprint") != fp or set(saved.get("rows_per_unit", {})) != set(plan):
                raise OutputError(f"{partial}: was made with a different config or different inputs; "
                                  "remove it or pass --overwrite to start over")
            done = read_manifest(os.path.join(work, "done.txt"))
            log.info("resuming %s: %d units already written", partial, len(done))
            return done, saved["rows_per_unit"]
        if not overwrite:
            raise OutputError(f"{partial}: holds an interrupted run; pass --resume to continue it or --overwrite to start over")
        shutil.rmtree(partial)
    try:
        os.makedirs(work)
        with open(run_json, "w") as f:
            json.dump({"fingerprint": fp, "version": __version__, "rows_per_unit": plan}, f)
    except OSError as e:
        raise OutputError(f"{partial}: cannot create the output folder ({e.strerror})") from None
    return set(), plan


def read_manifest(path: str) -> set:
    done = set()
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if line.endswith("\n") and len(parts) == 2 and parts[1].isdigit():
                    done.add((parts[0], int(parts[1])))
    return done


class Manifest:
    """Appends finished units to OUT.partial/.dppa-stream/done.txt."""

    def __init__(self, partial: str):
        self._f = open(os.path.join(partial, WORK_DIR, "done.txt"), "a")

    def record(self, tensor: str, index: int) -> None:
        self._f.write(f"{tensor}\t{index}\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def publish(partial: str, out: str) -> None:
    """Move the finished output into place; an old output is replaced only now."""
    old = None
    if os.path.exists(out):
        old = out + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(out, old)
    os.rename(partial, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
