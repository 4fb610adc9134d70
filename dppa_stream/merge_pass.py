"""Pass 2: merge every work unit and write it at its final byte offsets, then finalise the folder.

Each task runs its work unit's units in order: it reads a unit's raw values, plans the tensor
itself when the method is local and the tensor is this one unit (statistics from the values
already in memory), runs the method's kernel straight into an output buffer and writes it with one
positional write into the pre-laid-out shard. Finished work units go to the manifest, so
`--resume` skips them.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from . import kernels
from .checkpoint import FLOAT_DTYPES, Placement, ShardLayout, write_rows
from .hf_files import copy_model_files, write_model_card
from .methods.base import Catalogue, TensorInfo
from .inputs import verify_unchanged
from .output import WORK_DIR, Manifest, release_reserve
from .statistics import check_nonfinite, drive, inline
from .units import UnitInputs, UnitRows, scratch


def output_dtypes(inputs, out_dtype: str | None) -> dict[str, str]:
    """Per tensor, the dtype written: `out_dtype` (or `dtype`) for float tensors, else unchanged."""
    return {t: (out_dtype or inputs.entry(t).dtype) if inputs.entry(t).dtype in FLOAT_DTYPES else inputs.entry(t).dtype
            for t in inputs.names}


def merge_task(method, inp: UnitInputs, plan, folder: str, place: Placement, out_dtype: str,
               check_finite: bool = True) -> int:
    """Merge one unit and write it at its final place; returns bytes written. `plan` is the
    tensor's plan, or its TensorInfo when the task plans it (a local method's one-unit tensor)."""
    u = inp.unit
    rows = UnitRows(inp)
    if not rows.is_float:  # integer buffers: copied from the base (or the first model) unchanged
        return write_rows(folder, place, u.flat_start, rows.raw[0])
    if isinstance(plan, TensorInfo):  # plan it here, from the rows in memory
        plan = drive(method, Catalogue({u.tensor: plan}, None), [u.tensor], inline(rows, check_finite)).tensors[u.tensor]
    out = scratch("out", u.numel * np.dtype(kernels.CONTAINER[out_dtype]).itemsize).view(kernels.CONTAINER[out_dtype])
    bad = method.merge_unit(rows, plan, out, kernels.CODES[out_dtype])
    if check_finite:
        check_nonfinite(rows, bad)
    return write_rows(folder, place, u.flat_start, out)


def merge_work(method, work, plans: tuple, folder: str, places: tuple, out_dtypes: tuple, check_finite: bool) -> int:
    """Dask task: merge every unit of a work unit (`plans`, `places`, `out_dtypes`: one per unit);
    returns bytes written."""
    return sum(merge_task(method, inp, plan, folder, place, out_dtype, check_finite)
               for inp, plan, place, out_dtype in zip(work.items, plans, places, out_dtypes))


def write_output(cfg, out: str, session, plans: dict, done: set, shard_size: int) -> tuple[int, int]:
    """Merge every work unit not yet `done` into pre-laid-out shards under OUT.partial, record each
    finished one in the manifest, then finalise (shards synced, index, config, tokenizer, card).
    Returns (bytes written, bytes read)."""
    inputs, method = session.inputs, session.method
    partial = out + ".partial"
    ref = inputs.reference
    out_dtypes = output_dtypes(inputs, cfg.output_dtype)
    layout = ShardLayout([(t, out_dtypes[t], inputs.entry(t).shape) for t in inputs.names], shard_size)
    if done:
        layout.check_preallocated(partial)
    else:
        layout.preallocate(partial)

    shared = session.executor.share(method)
    infos = session.catalogue.tensors
    works = [w for w in session.work_units if w.key not in done]
    calls = [(shared, w, tuple(plans.get(i.unit.tensor, infos[i.unit.tensor]) for i in w.items), partial,
              tuple(layout.placements[i.unit.tensor] for i in w.items),
              tuple(out_dtypes[i.unit.tensor] for i in w.items), session.check_finite) for w in works]
    sizes = [w.nbytes for w in works]
    written = []
    with Manifest(partial) as manifest:
        def record(i, nbytes):
            written.append(nbytes)
            manifest.record(*works[i].key)

        with session.progress.phase("merge", sum(sizes)) as step:
            session.executor.map(merge_work, calls, sizes, step, record)

    release_reserve(partial)
    layout.finish(partial)
    copy_model_files(ref.folder, partial, cfg.output_dtype, inputs.layers)
    write_model_card(partial, cfg, method.describe(), cfg.base_model, [m.path for m in cfg.models])
    verify_unchanged(inputs)
    shutil.rmtree(os.path.join(partial, WORK_DIR))
    return sum(written), sum(sizes)
