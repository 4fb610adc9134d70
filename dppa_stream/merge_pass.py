"""Pass 2: merge every work unit and write it at its final byte offsets, then finalise the folder.

Each task runs its work unit's units in order: it reads a unit's values, plans the tensor itself
when the method is local and the tensor is this one unit (statistics from the values already in
memory), runs the method's kernel straight into an output buffer and writes it with one positional
write into the pre-laid-out shard; a quantized output tensor is encoded first (targets.py), its
scales written beside it. Consecutive whole small tensors of a local method go as one batch
(`units.BatchRows`, `MergeMethod.merge_batch`): one read per input and one write per run of
tensors stored back to back, one planning and kernel call for all of them, so an MoE checkpoint's
tens of thousands of small tensors cost about what the same numbers fused into a few hundred do.
What is done per tensor (finding the batches, their reads and writes, the task's arguments, the
output layout) maps C functions over columns of the tensors rather than running Python per tensor.
Finished work units go to the manifest (with the requantization loss of their units), so
`--resume` skips them.
"""

from __future__ import annotations

import math
import os
import shutil
from itertools import accumulate, repeat
from operator import attrgetter, is_, sub

import numpy as np

from . import kernels
from .checkpoint import DTYPE_SIZES, FLOAT_DTYPES, ShardLayout, TensorEntry, write_rows
from .checkpoint.writer import Places, file_offsets, write_runs
from .hf_files import copy_model_files, write_model_card
from .methods.base import Catalogue, Infos, TensorInfo
from .inputs import verify_unchanged
from .output import MANIFEST, WORK_DIR, Manifest, read_manifest_extras, release_reserve
from .statistics import check_nonfinite, drive, inline
from .targets import RequantLoss, Target, class_targets, tensor_scale, write_quantized
from .units import (BATCH_MAX_NUMEL, BatchRows, Items, UnitInputs, UnitRows, batch_key, batch_spans,
                    frozen_bookkeeping, key_codes, run_bounds, scratch)


def merge_task(method, inp: UnitInputs, plan, folder: str, target: Target, place,
               check_finite: bool = True) -> tuple[int, list | None]:
    """Merge one unit and write it at its final place (`place`: the tensor's Placement, or for a
    quantized target the tuple of its parts'); returns (bytes written, the loss partial of a
    requantized unit or None). `plan` is the tensor's plan, or its TensorInfo when the task plans
    it (a local method's one-unit tensor)."""
    u = inp.unit
    rows = UnitRows(inp)
    if not rows.is_float:  # integer buffers: copied from the base (or the first model) unchanged
        return write_rows(folder, place, u.flat_start, rows.raw[0]), None
    if target.ref is None:
        out = _merged(method, rows, plan, target.dtype, check_finite)
        return write_rows(folder, place, u.flat_start, out), None
    merged = _merged(method, rows, plan, "F32", check_finite).view(np.float32)
    return write_quantized(target, folder, place, u.flat_start, u.flat_start + u.numel, merged, rows)


def _merged(method, rows: UnitRows, plan, dtype: str, check_finite: bool) -> np.ndarray:
    """The unit merged into this thread's output buffer, as bit patterns of `dtype`."""
    u = rows.inp.unit
    if isinstance(plan, TensorInfo):  # plan it here, from the rows in memory
        rows.keep_della_masks()
        plan = drive(method, Catalogue({u.tensor: plan}, None), [u.tensor], inline(rows, check_finite)).tensors[u.tensor]
    out = scratch("out", u.numel * np.dtype(kernels.CONTAINER[dtype]).itemsize).view(kernels.CONTAINER[dtype])
    bad = method.merge_unit(rows, plan, out, kernels.CODES[dtype])
    if check_finite:
        check_nonfinite(rows, bad)
    return out


def merge_work(method, work, plans, folder: str, targets: tuple, places,
               check_finite: bool) -> tuple[int, list | None]:
    """Dask task: merge every unit of a work unit (`plans`, `targets`, `places`: one per unit, as
    `merge_task` takes them; `plans` as `Infos` columns where this task plans every unit, `places`
    as `Places` columns, or a tuple where some are quantized);
    returns (bytes written, [[tensor, loss partial], ...] of its requantized units or None).
    Consecutive whole small tensors that a local method plans here, or that were planned before
    pass 2 as one whole part (DPPA's), run as one batch (`merge_batch`); every other unit on its
    own (`merge_task`)."""
    written, losses = 0, []
    items = work.items
    spans, inputs = _batch_spans(method, items, plans, targets)
    i = 0
    for lo, hi in spans + [(len(items), len(items))]:
        for i in range(i, lo):
            nbytes, loss = merge_task(method, items[i], plans[i], folder, targets[i], places[i], check_finite)
            written += nbytes
            if loss is not None:
                losses.append([items.tensors[i], loss])
        if hi > lo:
            batch = BatchRows(items[lo:hi], inputs and [col[lo:hi] for col in inputs])
            written += merge_batch(method, batch, Infos.of(plans[lo:hi]) if method.local else plans[lo:hi], folder,
                                   targets[lo].dtype, places[lo:hi], check_finite)
        i = hi
    return written, losses or None


_DTYPE, _REF = attrgetter("dtype"), attrgetter("ref")
_NBYTES = attrgetter("nbytes")


def _batch_spans(method, items: Items, plans: tuple, targets: tuple) -> tuple[list[tuple[int, int]], list | None]:
    """The batches of a work unit as item ranges [lo, hi): runs of consecutive items with one
    `_batch_key`, cut at BATCH_MAX_ITEMS items and BATCH_MAX_BYTES of rows and output; and the
    items' entries per input (base first) where they were gathered here (else None).

    A work unit whose inputs are all plain in one float dtype, whose plans are made here and
    whose targets are plain in one dtype (an MoE checkpoint's many small tensors) is checked on
    columns, the same conditions as `_batch_key`'s (they then differ only by size); any other
    item by item."""
    if not method.local and not hasattr(method, "merge_planned_batch"):
        return [], None
    n = len(items)
    uniform = _uniform(method, items, plans, targets)
    if uniform is None:
        whole = repeat(True) if method.local else plans.whole(list(map(sub, items.stops, items.starts)))
        keys = list(map(_batch_key, repeat(method), items, plans, targets, whole))
        held = [0 if k is None else stop * _per_element(k) for stop, k in zip(items.stops, keys)]
        return batch_spans(key_codes(keys), held), None
    inputs, key, planned = uniform
    dtype, models, has_base = key[0]
    start, stop = np.array(items.starts, np.int64), np.array(items.stops, np.int64)
    stored = np.fromiter(map(_NBYTES, inputs[int(has_base)]), np.int64, n)
    ok = planned & (start == 0) & (stop <= BATCH_MAX_NUMEL) & (stop * DTYPE_SIZES[dtype] == stored)
    return batch_spans(ok.astype(np.int64), (stop * _per_element(key)).tolist()), inputs


def _uniform(method, items: Items, plans: tuple, targets: tuple) -> tuple | None:
    """For a work unit that `_batch_spans` checks on columns: (the items' entries per input, the
    key of those that batch, which plans a batch can take); None for any other."""
    count = len(items.models[0])
    if set(map(len, items.models)) != {count}:
        return None
    inputs = items.per_input()
    has_base = len(inputs) > count
    if any(set(map(type, col)) != {TensorEntry} for col in inputs) or \
            not has_base and set(map(type, items.bases)) != {type(None)}:
        return None
    dtypes = set().union(*(map(_DTYPE, col) for col in inputs))
    out = set(map(_DTYPE, targets))
    if len(dtypes) != 1 or len(out) != 1 or set(map(_REF, targets)) != {None} or not dtypes <= FLOAT_DTYPES:
        return None
    if not method.local:  # plans made before pass 2 (`DPUnitPlans`): those of one part, the whole tensor
        planned = plans.whole(list(map(sub, items.stops, items.starts)))
        return inputs, ((dtypes.pop(), count, has_base), out.pop()), planned
    kinds = {TensorInfo} if isinstance(plans, Infos) else set(map(type, plans))
    planned = True if kinds == {TensorInfo} else np.fromiter(map(is_, map(type, plans), repeat(TensorInfo)), np.bool_,
                                                             len(plans))
    return inputs, ((dtypes.pop(), count, has_base), out.pop()), planned


def _per_element(key: tuple) -> int:
    """Bytes a batch holds per element of items with this `_batch_key`: rows and output."""
    (dtype, models, has_base), out = key
    return (models + has_base) * DTYPE_SIZES[dtype] + DTYPE_SIZES[out]


def _batch_key(method, inp: UnitInputs, plan, target: Target, whole: bool) -> tuple | None:
    """A unit joins a batch when it is a whole small float tensor read raw (`units.batch_key`),
    planned in this task (a local method's one-unit tensor: `plan` is its TensorInfo) or before
    pass 2 as one part, the whole tensor (`whole`: `DPUnitPlans.whole`), and written plain;
    consecutive ones with equal keys share one."""
    if target.ref is not None or not (type(plan) is TensorInfo if method.local else whole):
        return None
    key = batch_key(inp)
    return None if key is None else (key, target.dtype)


def merge_batch(method, batch: BatchRows, plans, folder: str, dtype: str, places, check_finite: bool) -> int:
    """Merge a batch into this thread's output buffer and write it with one positional write per
    run of tensors laid out back to back in one shard; returns bytes written. `plans`: a local
    method's `Infos` (`MergeMethod.merge_batch` plans them), else the plans made before pass 2
    (`merge_planned_batch`)."""
    container = kernels.CONTAINER[dtype]
    starts = batch.starts
    out = scratch("out", int(starts[-1]) * np.dtype(container).itemsize).view(container)
    if method.local:
        bad = method.merge_batch(batch, plans, out, kernels.CODES[dtype], check_finite)
    else:
        bad = method.merge_planned_batch(batch, plans, out, kernels.CODES[dtype])
    if check_finite and bad.any():  # found again tensor by tensor, for the one-line error naming it
        for k in range(len(batch.items)):
            rows = batch.rows(k)
            check_nonfinite(rows, [kernels.count_nonfinite(rows.src[i], kernels.CODES[rows.dtype]) if n else 0
                                   for i, n in enumerate(bad)])
    data = out.view(np.uint8)
    at = starts * out.itemsize  # byte offsets of the items in `data`
    files, offsets = file_offsets(places)
    bounds = run_bounds(offsets, np.diff(at), files)
    at = at.tolist()
    return write_runs(folder, [(places[i], data[at[i]:at[j]]) for i, j in zip(bounds, bounds[1:])])


def unit_plans(plans, names: list[str], infos):
    """The plans of a work unit's tensors `names` made before pass 2: DPPA's as arrays cut from its
    report (`DPPlans.unit`), any other looked up tensor by tensor; a tensor without one gets its
    info from `infos` (its task plans it)."""
    if hasattr(plans, "unit"):
        return plans.unit(names, infos)
    return tuple(map(plans.get, names, infos))


def amax_work(method, work, plans: tuple, check_finite: bool) -> dict[str, float]:
    """Dask task: per tensor of a work unit, the largest finite |merged value| of its units there
    (a per-tensor FP8 scale needs the tensor's)."""
    out: dict[str, float] = {}
    for inp, plan in zip(work.items, plans):
        m = float(kernels.max_abs(_merged(method, UnitRows(inp), plan, "F32", check_finite).view(np.float32)))
        out[inp.unit.tensor] = max(out.get(inp.unit.tensor, m), m)
    return out


def tensor_scales(session, plans: dict, targets: list[Target]) -> tuple[list[Target], int]:
    """Class targets (`targets.class_targets`) with their per-tensor FP8 scales chosen, and the
    bytes read: a pass that merges those tensors (only) and keeps each one's largest finite
    |value|. Only a class of its own (`units.Classes.alone`) may have a `Target.ref`. A tensor
    held in one unit is not in this pass: its unit finds the scale from its own merged values
    (`targets.write_quantized`), the same bytes without merging it twice."""
    c = session.classes
    count = session.units.count  # units per class
    wanted = {c.names[j]: c.of[j] for j in c.alone if targets[c.of[j]].needs_amax and count[c.of[j]] > 1}
    if not wanted:
        return targets, 0
    from .units import pack

    per_element = session.needs[0]
    items = [UnitInputs(u, *session.inputs.entries(t)) for t in session.inputs.names if t in wanted
             for u in session.units[t]]
    works = pack(items, [i.unit.numel * per_element[i.unit.tensor] for i in items], session.unit_bytes)
    shared = session.executor.share(session.method)
    infos = session.catalogue.tensors
    calls = ((shared, w, unit_plans(plans, w.items.tensors, [infos[t] for t in w.items.tensors]),
              session.check_finite) for w in works)
    amax: dict[str, float] = {}

    def seen(_, result):
        for t, m in result.items():
            amax[t] = max(amax.get(t, m), m)

    with session.progress.phase("amax", sum(w.nbytes for w in works)) as step:
        session.executor.map(amax_work, calls, [w.nbytes for w in works], step, seen)
    targets = list(targets)
    for t, k in wanted.items():
        if t in amax:
            targets[k] = tensor_scale(targets[k], amax[t])
    return targets, sum(w.nbytes for w in works)


def _layout(c, targets: list[Target], shard_size: int) -> tuple[ShardLayout, list]:
    """The output shards, and per tensor (output order) where it goes: its Placement, or for a
    quantized one the tuple of its parts' (what `merge_task` takes). Plain tensors are laid out as
    columns (their classes' shape and target each); a quantized tensor is a class of its own."""
    quantized = [j for j in c.alone if targets[c.of[j]].ref is not None]
    if not quantized:
        dtypes = [tg.dtype for tg in targets]
        layout = ShardLayout.of_columns(c.names, c.column(dtypes), c.shapes, shard_size, c.column(
            [math.prod(c.shapes[i]) * DTYPE_SIZES[d] for i, d in zip(c.first, dtypes)]))
        return layout, layout.places
    specs = [tg.specs(t) for t, tg in zip(c.names, c.column(targets))]
    layout = ShardLayout([s for parts in specs for s in parts], shard_size)
    places, at = [], 0
    for j, parts in enumerate(specs):
        places.append(layout.places[at] if targets[c.of[j]].ref is None else tuple(layout.places[at:at + len(parts)]))
        at += len(parts)
    return layout, places


def write_output(cfg, out: str, session, plans: dict, done: set, shard_size: int) -> tuple[int, int, dict | None]:
    """Merge every work unit not yet `done` into pre-laid-out shards under OUT.partial, record each
    finished one in the manifest, then finalise (shards synced, index, config, tokenizer, card).
    Returns (bytes written, bytes read, the requantization loss report or None)."""
    inputs, method = session.inputs, session.method
    partial = out + ".partial"
    ref = inputs.reference
    c = session.classes
    targets, amax_read = tensor_scales(session, plans, class_targets(inputs, cfg.out_dtype, cfg.dtype))
    quantized = [c.names[j] for j in c.alone if targets[c.of[j]].ref is not None]
    plain = not quantized
    with frozen_bookkeeping():  # the layout's columns, kept for the run like the session's bookkeeping
        layout, places = _layout(c, targets, shard_size)
    if done:
        layout.check_preallocated(partial)
    else:
        layout.preallocate(partial)

    loss = RequantLoss()
    paths = {f: ck.path for ck in inputs.all for f in ck.files}
    keys = {t: _loss_keys(inputs.outputs[t], paths) for t in quantized}

    def add_losses(losses):
        for t, partial_loss in losses or ():
            if t in keys:
                loss.add(t, partial_loss, keys[t])

    for losses in read_manifest_extras(os.path.join(partial, WORK_DIR, MANIFEST)).values():
        add_losses(losses)
    shared = session.executor.share(method)
    # per tensor in output order, each work unit's a slice: its items are consecutive units (an item
    # per tensor, but for the units of a split one: `item_of`, the tensor of each item)
    infos, tgs, units = session.catalogue.infos, c.column(targets), session.units
    item_of = None if not units.split else np.repeat(np.arange(len(c.names)), c.column(units.count)).tolist()
    works = session.work_units
    starts = list(accumulate((len(w.items) for w in works), initial=0))
    todo = [k for k, w in enumerate(works) if w.key not in done] if done else range(len(works))

    def call(k):  # slices of the per-tensor columns: an MoE work unit has thousands of tensors
        w, a, b = works[k], starts[k], starts[k + 1]
        if item_of is None:
            names, got, tg, where = c.names[a:b], infos[a:b], tgs[a:b], places[a:b]
        else:
            at = item_of[a:b]
            names, got, tg, where = (list(map(col.__getitem__, at)) for col in (c.names, infos, tgs, places))
        if plans:
            got = unit_plans(plans, names, got)
        elif not isinstance(got, Infos):
            got = tuple(got)
        return shared, w, got, partial, tuple(tg), \
            where if isinstance(where, Places) else tuple(where), session.check_finite

    # a generator: each work unit's plans are made (or looked up) as it starts (`Executor.map`)
    calls = map(call, todo)
    sizes = [works[k].nbytes for k in todo]
    written = []
    with Manifest(partial) as manifest:
        def record(i, result):
            written.append(result[0])
            manifest.record(*works[todo[i]].key, result[1])
            add_losses(result[1])

        with session.progress.phase("merge", sum(sizes)) as step:
            session.executor.map(merge_work, calls, sizes, step, record)

    release_reserve(partial)
    layout.finish(partial)
    copy_model_files(ref.folder, partial, cfg.output_dtype, inputs.config, inputs.vocab.files if inputs.vocab else None,
                     keep_quantization=not plain)
    shown = cfg.shown.get
    write_model_card(partial, cfg, method.describe(), shown(cfg.base_model, cfg.base_model) if cfg.base_model else None,
                     [shown(m.path, m.path) for m in cfg.models])
    verify_unchanged(inputs)
    shutil.rmtree(os.path.join(partial, WORK_DIR))
    return sum(written), amax_read + sum(sizes), loss.to_json()


def _loss_keys(out, paths: dict[str, str]) -> list:
    """What each input row of a tensor's units reports as, in the loss: row 0 (the reference)
    is every element ("all"); every other row the path of its model (`paths`: file -> model)."""
    rows = ([out.base] if out.base is not None else []) + list(out.models)
    return ["all"] + [paths.get(e.file, e.file) for e in rows[1:]]
