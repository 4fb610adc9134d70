"""Planning decided once per class of tensors (`units.tensor_classes`) gives what deciding tensor
by tensor gives: targets, unit needs, units, work units (their items, boundaries and bytes), the
space estimate and the catalogue, on inputs that mix dtypes and formats (an FP8 fine-tune or base)
and hold an integer tensor; and `pack` against its plain loop."""

from __future__ import annotations

import math
import os
import shutil
import pickle
import random

import pytest
import torch

from dppa_stream.checkpoint import DTYPE_SIZES, TensorEntry
from dppa_stream.checkpoint.quant import Quantized
from dppa_stream.config import load_config
from dppa_stream.inputs import open_inputs
from dppa_stream.output import space_needed
from dppa_stream.pipeline import Session
from dppa_stream.sources import align, memory_per_element
from dppa_stream.targets import Target, output_targets
from dppa_stream.units import Unit, UnitInputs, WorkUnit, pack, split_tensor

from .reference_quant import save_checkpoint
from .test_quant import FP8_CONFIG, _cfg, _hf_llama, _llama, _quantize_llama


def _pack_loop(items, sizes, unit_bytes):
    """`pack`'s rule, item by item: a work unit ends before the item that would overflow it."""
    out, cur, held = [], [], 0
    for item, size in zip(items, sizes):
        if cur and held + size > unit_bytes:
            out.append(cur)
            cur, held = [], 0
        cur.append(item)
        held += size
    return out + ([cur] if cur else [])


def test_pack_matches_the_plain_loop():
    rng = random.Random(5)
    for _ in range(300):
        n = rng.randrange(0, 60)
        sizes = [rng.choice([0, 1, 3, 7, 10, 25, 100]) for _ in range(n)]
        unit = rng.choice([1, 10, 20, 64])
        nbytes = [rng.randrange(0, 1000) for _ in range(n)]
        items = [UnitInputs(Unit(f"t{i}", i % 3, i, 2 * i), None, ()) for i in range(n)]
        got = pack(items, sizes, unit, nbytes)
        want = _pack_loop(list(range(n)), sizes, unit)
        assert [list(w.items) for w in got] == [[items[i] for i in w] for w in want]
        assert [w.nbytes for w in got] == [sum(nbytes[i] for i in w) for w in want]
        assert [w.key for w in got] == [(f"t{w[0]}", w[0] % 3) for w in want]


def _entry(name: str, k: int, file: str = "/m/a.safetensors") -> TensorEntry:
    return TensorEntry(name, "BF16", (2, k + 1), file, 8 + 100 * k, 4 * (k + 1), (1, k % 2, 3, 4))


@pytest.mark.parametrize("case", ["plain", "no base", "no models", "mixed kinds", "models of other counts"])
def test_work_units_pickle_as_they_are(case):
    """A work unit travels to a cluster's workers as columns (`Items.__reduce__`) and arrives
    equal, its entries plain TensorEntry of the same fields, whatever its inputs hold."""
    n = 7
    bases = [_entry(f"t{k}", k, "/b/x.safetensors") for k in range(n)]
    models = [(_entry(f"t{k}", k), _entry(f"t{k}", k, "/c/y.safetensors")) for k in range(n)]
    if case == "no base":
        bases = [None] * n
    elif case == "no models":
        models = [()] * n
    elif case == "mixed kinds":
        bases[3] = None
        models[2] = (models[2][0], "not an entry")
    elif case == "models of other counts":
        models[4] = models[4][:1]
    items = [UnitInputs(Unit(f"t{k}", k % 2, k, 3 * k + 1), b, m) for k, b, m in zip(range(n), bases, models)]
    (work,) = pack(items, [1] * n, 1 << 20, [0] * n)
    back = pickle.loads(pickle.dumps(work))
    assert back == work and back.key == work.key and list(back.items) == items
    assert [tuple(map(type, (i.base, *i.models))) for i in back.items] == \
        [tuple(map(type, (i.base, *i.models))) for i in items]


FP32 = {"lm_head.weight", "model.layers.1.self_attn.q_proj.weight"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A bf16 base (with an int64 tensor), an fp16 fine-tune whose lm_head and one q_proj are
    stored fp32 (the embedding and the other q_proj have their shapes), and an FP8 fine-tune."""
    root = tmp_path_factory.mktemp("classes")
    base = _llama(0)
    fts = [_llama(1, base), _llama(2, base, drift=0.2)]
    extra = {"model.layers.0.counts": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    cfg = _hf_llama(None)
    fp16 = {n: x.to(torch.float32 if n in FP32 else torch.float16) for n, x in fts[0].items()}
    bf16 = {n: x.to(torch.bfloat16) for n, x in base.items()}
    return [save_checkpoint(str(root / "bf16"), {**bf16, **extra}, 1, cfg),
            save_checkpoint(str(root / "fp16"), {**fp16, **extra}, 2, cfg),
            save_checkpoint(str(root / "fp8"), {**_quantize_llama(fts[1], "fp8_block", 2), **extra}, 2,
                            _hf_llama(FP8_CONFIG))]


def _reference(inputs, cfg, method, unit_bytes):
    """Targets, needs, units and work units decided tensor by tensor (the rules of
    targets.py and pipeline.py written out)."""
    targets, needs, units, items, sizes, nbytes = {}, {}, {}, [], [], []
    for t in inputs.names:
        out = inputs.outputs[t]
        e = out.entry
        entries = ((out.base,) if out.base is not None else ()) + out.models
        if not e.real:
            tg = (e.shape, e.dtype, None)
        elif isinstance(e, Quantized):
            tg = (e.shape, cfg.out_dtype, None) if cfg.out_dtype else (e.shape, e.dtype, e)
        else:
            tg = (e.shape, cfg.out_dtype or cfg.dtype or e.dtype, None)
        targets[t] = tg
        out_bytes = DTYPE_SIZES[tg[1]] if tg[2] is None else (9 if tg[2].format == "mxfp4" else 5)
        per, a = memory_per_element(entries) + out_bytes, math.lcm(align(entries), Target(*tg).align)
        needs[t] = (per, a)
        numel = math.prod(e.shape)
        us = units[t] = split_tensor(t, numel, len(e.shape), math.lcm(method.unit_multiple(e.shape), a), per,
                                     unit_bytes)
        for u in us:
            item = UnitInputs(u, out.base, out.models)
            items.append(item)
            sizes.append(u.numel * per)
            nbytes.append(item.nbytes)
    works = [WorkUnit(tuple(w), sum(i.nbytes for i in w)) for w in _pack_loop(items, sizes, unit_bytes)]
    return targets, needs, units, works


@pytest.mark.parametrize("method,extra", [("task_arithmetic", "dtype: bfloat16\n"),
                                          ("ties", "parameters: {density: 0.5}\n"), ("iso_c", "out_dtype: float32\n")])
@pytest.mark.parametrize("fp8", [None, "fine-tune", "base"])
@pytest.mark.parametrize("unit_bytes", [2048, 40_000, 64 << 20])
def test_planning_per_class_is_planning_per_tensor(tmp_path, mixed, method, extra, fp8, unit_bytes):
    paths = {None: mixed[:2], "fine-tune": mixed, "base": [mixed[2], mixed[0], mixed[1]]}[fp8]
    cfg = load_config(_cfg(tmp_path, method, paths, extra))
    inputs = open_inputs(cfg)
    m = cfg.method(0)
    entries = [e for o in inputs.outputs.values() for e in ((o.base,) if o.base else ()) + o.models]
    assert any(isinstance(e, Quantized) for e in entries) == (fp8 is not None)
    assert any(type(e) is TensorEntry for e in entries) and len({e.dtype for e in entries}) >= 4 - (fp8 is None)
    s = Session(cfg, inputs, m, None, unit_bytes, None, 1 << 30)
    targets, needs, units, works = _reference(inputs, cfg, m, unit_bytes)
    got = output_targets(inputs, cfg.out_dtype, cfg.dtype)
    assert list(got) == inputs.names
    assert {t: (g.shape, g.dtype, g.ref) for t, g in got.items()} == targets
    assert s.needs == ({t: v[0] for t, v in needs.items()}, {t: v[1] for t, v in needs.items()})
    assert {t: list(us) for t, us in s.units.items()} == units and list(s.units) == inputs.names
    assert s.work_units == works
    assert len(s.work_units) > (1 if unit_bytes < 64 << 20 else 0)
    assert s.split_tensors == [t for t, us in units.items() if len(us) > 1]
    infos = s.catalogue.tensors
    params_of = cfg.params_of()
    for t in inputs.names:
        out = inputs.outputs[t]
        glob, models = params_of(t, out.t, None, out.models, out.slice_params)
        assert (infos[t].name, infos[t].dtype, infos[t].shape, infos[t].globals, infos[t].models) == \
            (t, out.entry.dtype, out.entry.shape, glob, models)
    shards = state = 0
    for t in inputs.names:
        out, tg = inputs.outputs[t], got[t]
        e, named = out.entry, len(t.encode())
        shards += math.prod(e.shape) * DTYPE_SIZES[tg.dtype] + named + 96 if tg.ref is None else \
            tg.stored_bytes + sum(len(n.encode()) + 96 for n, _, _ in tg.specs(t))
        if e.real:
            state += len(out.models) * (min(math.prod(e.shape), 1 << 15) * 4 + 2048)
        state += 64 + named + (1024 * (1 + math.prod(e.shape) // (1 << 20)) if tg.ref is not None else 0)
    space = space_needed(inputs, cfg)
    assert (space.shards, space.state) == (shards, state)
    assert space.final["model.safetensors.index.json"] == 4096 + sum(len(n.encode()) + 48 for n in inputs.names)


@pytest.fixture(scope="module")
def alike(tmp_path_factory):
    """Base and two fine-tunes written alike (one index and shard headers, byte for byte), once
    in mixed dtypes with an integer tensor, once FP8 with its scales: `Inputs.one_layout`."""
    root = tmp_path_factory.mktemp("alike")
    base = _llama(0)
    extra = {"model.layers.0.counts": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    sets = {}
    for kind in ("mixed", "fp8"):
        paths = []
        for k, sd in enumerate([base, _llama(1, base), _llama(2, base, drift=0.2)]):
            if kind == "fp8":
                tensors, cfg = _quantize_llama(sd, "fp8_block", 0), _hf_llama(FP8_CONFIG)
            else:
                tensors, cfg = {n: x.to(torch.float32 if n in FP32 else torch.bfloat16) for n, x in sd.items()}, \
                    _hf_llama(None)
            paths.append(save_checkpoint(str(root / f"{kind}{k}"), {**tensors, **extra}, 2, cfg))
        sets[kind] = paths
    return sets


@pytest.mark.parametrize("kind", ["mixed", "fp8"])
@pytest.mark.parametrize("method,extra", [("task_arithmetic", "dtype: bfloat16\n"),
                                          ("ties", "parameters: {density: 0.5}\n")])
def test_planning_of_inputs_laid_out_alike(tmp_path, alike, kind, method, extra):
    """Fine-tunes laid out like their base are classed on the reference's column alone
    (`Inputs.one_layout`): the same classes as checking every column, and the same plan as
    deciding tensor by tensor."""
    cfg = load_config(_cfg(tmp_path, method, alike[kind], extra))
    inputs = open_inputs(cfg)
    assert inputs.one_layout
    assert any(isinstance(o.entry, Quantized) for o in inputs.outputs.values()) == (kind == "fp8")
    unit_bytes = 40_000
    s = Session(cfg, inputs, cfg.method(0), None, unit_bytes, None, 1 << 30)
    c = s.classes
    every = open_inputs(cfg)
    every.one_layout = False
    full = Session(cfg, every, cfg.method(0), None, unit_bytes, None, 1 << 30).classes
    assert (c.of, c.first, c.alone) == (full.of, full.first, full.alone)
    assert len(c.first) > 3
    _, _, units, works = _reference(inputs, cfg, cfg.method(0), unit_bytes)
    assert {t: list(us) for t, us in s.units.items()} == units
    assert s.work_units == works


def test_a_fine_tune_laid_out_otherwise_is_checked_column_by_column(tmp_path, alike):
    """One tensor of another dtype in a fine-tune: its layout is its own, and that tensor's
    class differs from its twin's in the base-only classing."""
    base, ft1, ft2 = alike["mixed"]
    other = str(tmp_path / "other")
    shutil.copytree(ft2, other)
    shard = os.path.join(other, "model-00001-of-00002.safetensors")
    from safetensors.torch import load_file, save_file
    tensors = load_file(shard)
    name = next(n for n, x in sorted(tensors.items()) if x.dtype == torch.bfloat16 and x.dim() == 2)
    tensors[name] = tensors[name].to(torch.float16)
    save_file(tensors, shard, {"format": "pt"})
    cfg = load_config(_cfg(tmp_path, "task_arithmetic", [base, ft1, other]))
    inputs = open_inputs(cfg)
    assert not inputs.one_layout
    c = Session(cfg, inputs, cfg.method(0), None, 40_000, None, 1 << 30).classes
    i = inputs.names.index(name)
    twins = [j for j in range(len(inputs.names)) if j != i and c.shapes[j] == c.shapes[i] and
             c.dtypes[j] == c.dtypes[i] and inputs.outputs[inputs.names[j]].models[1].dtype == "BF16"]
    assert twins and all(c.of[j] != c.of[i] for j in twins)
