"""Pass 2: merge every work unit and write it at its final byte offset, then finalise the folder.

Each task reads its unit's rows, plans the tensor itself when the method is local and the
tensor is this one unit (statistics from the rows already in memory), runs the method's kernel
straight into an output buffer and writes it with one positional write into the pre-laid-out
shard; a quantized output tensor is encoded first (targets.py), its scales written beside it.
Finished units go to the manifest, so `--resume` skips them.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from . import kernels
from .checkpoint import Placement, ShardLayout, write_rows
from .hf_files import copy_model_files, write_model_card
from .methods.base import Catalogue, TensorInfo
from .inputs import verify_unchanged
from .output import MANIFEST, WORK_DIR, Manifest, read_manifest_extras, release_reserve
from .statistics import check_nonfinite, drive, inline
from .targets import RequantLoss, Target, output_targets, tensor_scale, write_quantized, writes_quantized
from .units import UnitInputs, UnitRows, scratch


def merge_task(method, inp: UnitInputs, plan, folder: str, target: Target, places: tuple[Placement, ...],
               check_finite: bool = True) -> tuple[int, list | None]:
    """Merge one unit and write it at its final place; returns (bytes written, the loss partial of
    a requantized unit or None). `plan` is the tensor's plan, or its TensorInfo when the task plans
    it (a local method's one-unit tensor)."""
    u = inp.unit
    rows = UnitRows(inp)
    if not rows.is_float:  # integer buffers: copied from the base (or the first model) unchanged
        return write_rows(folder, places[0], u.row_start, rows.raw[0]), None
    if target.ref is None:
        out = _merged(method, rows, plan, target.dtype, check_finite)
        return write_rows(folder, places[0], u.row_start, out), None
    merged = _merged(method, rows, plan, "F32", check_finite).view(np.float32)
    return write_quantized(target, folder, places, u.flat_start, u.flat_start + u.numel, merged, rows)


def _merged(method, rows: UnitRows, plan, dtype: str, check_finite: bool) -> np.ndarray:
    """The unit merged into this thread's output buffer, as bit patterns of `dtype`."""
    u = rows.inp.unit
    if isinstance(plan, TensorInfo):  # plan it here, from the rows in memory
        plan = drive(method, Catalogue({u.tensor: plan}, None), [u.tensor], inline(rows, check_finite)).tensors[u.tensor]
    out = scratch("out", u.numel * np.dtype(kernels.CONTAINER[dtype]).itemsize).view(kernels.CONTAINER[dtype])
    bad = method.merge_unit(rows, plan, out, kernels.CODES[dtype])
    if check_finite:
        check_nonfinite(rows, bad)
    return out


def amax_task(method, inp: UnitInputs, plan, check_finite: bool = True) -> float:
    """The largest finite |merged value| of one unit (a per-tensor FP8 scale needs the tensor's)."""
    return float(kernels.max_abs(_merged(method, UnitRows(inp), plan, "F32", check_finite).view(np.float32)))


def tensor_scales(session, plans: dict, targets: dict[str, Target]) -> tuple[dict[str, Target], int]:
    """Targets with their per-tensor FP8 scales chosen, and the bytes read: a pass that merges
    those tensors (only) and keeps each one's largest finite |value|."""
    wanted = [t for t, tg in targets.items() if tg.needs_amax]
    if not wanted:
        return targets, 0
    calls, sizes, groups = [], [], []
    shared = session.executor.share(session.method)
    for t in wanted:
        for u in session.units[t]:
            inp = UnitInputs(u, *session.inputs.entries(t))
            calls.append((shared, inp, plans.get(t, session.catalogue.tensors[t]), session.check_finite))
            sizes.append(inp.nbytes)
            groups.append(t)
    with session.progress.phase("amax", sum(sizes)) as step:
        amax = session.executor.map_reduce(amax_task, calls, sizes, groups, max, step)
    return {t: tensor_scale(tg, amax[t]) if t in amax else tg for t, tg in targets.items()}, sum(sizes)


def write_output(cfg, out: str, session, plans: dict, done: set, shard_size: int) -> tuple[int, int, dict | None]:
    """Merge every unit not yet `done` into pre-laid-out shards under OUT.partial, record each
    finished unit in the manifest, then finalise (shards synced, index, config, tokenizer, card).
    Returns (bytes written, bytes read, the requantization loss report or None)."""
    inputs, method = session.inputs, session.method
    partial = out + ".partial"
    ref = inputs.reference
    targets, amax_read = tensor_scales(session, plans, output_targets(inputs, cfg.out_dtype, cfg.dtype))
    layout = ShardLayout([spec for t in inputs.names for spec in targets[t].specs()], shard_size)
    if done:
        layout.check_preallocated(partial)
    else:
        layout.preallocate(partial)

    loss = RequantLoss()
    paths = {f: ck.path for ck in inputs.all for f in ck.files}
    keys = {t: _loss_keys(inputs.outputs[t], paths) for t in inputs.names if targets[t].ref is not None}
    for (t, _), partial_loss in read_manifest_extras(os.path.join(partial, WORK_DIR, MANIFEST)).items():
        if t in keys and partial_loss is not None:
            loss.add(t, partial_loss, keys[t])
    calls, sizes = [], []
    shared = session.executor.share(method)
    infos = session.catalogue.tensors
    for t in inputs.names:
        places = tuple(layout.placements[name] for name, _, _ in targets[t].specs())
        for u in session.units[t]:
            if (t, u.index) in done:
                continue
            inp = UnitInputs(u, *inputs.entries(t))
            calls.append((shared, inp, plans.get(t, infos[t]), partial, targets[t], places, session.check_finite))
            sizes.append(inp.nbytes)
    with Manifest(partial) as manifest:
        def record(i, result):
            u = calls[i][1].unit
            manifest.record(u.tensor, u.index, result[1])
            if result[1] is not None:
                loss.add(u.tensor, result[1], keys[u.tensor])

        with session.progress.phase("merge", sum(sizes)) as step:
            results = session.executor.map(merge_task, calls, sizes, step, record)

    release_reserve(partial)
    layout.finish(partial)
    copy_model_files(ref.folder, partial, cfg.output_dtype, inputs.config, inputs.vocab.files if inputs.vocab else None,
                     keep_quantization=writes_quantized(targets))
    shown = cfg.shown.get
    write_model_card(partial, cfg, method.describe(), shown(cfg.base_model, cfg.base_model) if cfg.base_model else None,
                     [shown(m.path, m.path) for m in cfg.models])
    verify_unchanged(inputs)
    shutil.rmtree(os.path.join(partial, WORK_DIR))
    return sum(r[0] for r in results), amax_read + sum(sizes), loss.to_json()


def _loss_keys(out, paths: dict[str, str]) -> list:
    """What each input row of a tensor's units reports as, in the loss: row 0 (the reference)
    is every element ("all"); every other row the path of its model (`paths`: file -> model)."""
    rows = ([out.base] if out.base is not None else []) + list(out.models)
    return ["all"] + [paths.get(e.file, e.file) for e in rows[1:]]
