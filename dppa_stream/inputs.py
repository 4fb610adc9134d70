"""Opening the checkpoints a config names, checking that they agree, and deciding where every
output tensor comes from.

Only headers are read here, and catalogues are logical (a quantized weight is one tensor whatever
its stored parts, checkpoint/quant.py): names and shapes must agree, dtypes and formats of
real-valued tensors need not. With `models:`, output tensor t is t of the base and of every model.
With `slices:` (mergekit's frankenmerges and merged slices), output layers are numbered
consecutively across slices and output layer k of a slice reads layer `layer_range[0] + i` of each
source; embeddings come from the first slice's sources and the final norm and head from the last
slice's, as mergekit 0.1.5 does. Downstream code sees one `Output` per tensor: its input entries,
the parameter specs that apply to it and its layer position t.

Hub models not in the cache are downloaded here (with `download`): their config, tokenizer files
and safetensors headers first, so that every check below runs on the whole set before the weights
are fetched. With a tokenizer in the config, the output vocabulary is built here and the inputs of
every vocabulary tensor (embeddings, heads) are replaced by remapped ones (`tokenizer`); slice
merges get their output config.json here (layer count and per-layer lists, `hf_files`), so a set
that cannot make a loadable model is refused before anything is written.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

from . import hub, lora, tokenizer
from .blocks import layer_positions
from .checkpoint import Checkpoint, TensorEntry
from .config import MergeConfig
from .errors import InputError, UsageError, printable, short
from .hf_files import layered_config, output_config, vet_model_files

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|block|blocks)\.([0-9]+)\.")
_LONG_NUMBER = re.compile(r"(?:^|\.)([0-9]{10,})(?:\.|$)")  # a layer or expert number of 10+ digits
_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_SHAPE_DTYPE = attrgetter("shape", "dtype")
_PRE = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "shared.")


class Output(NamedTuple):
    """Where one output tensor comes from, and what parameters apply to it. A named tuple: one
    per tensor (tens of thousands in an MoE model), built in C by `_whole` (no Python call each)."""

    name: str
    base: TensorEntry | None
    models: tuple[TensorEntry, ...]
    specs: tuple[dict, ...]  # each model's own parameter specs (models[i].parameters or sources[j].parameters)
    slice_params: dict  # the slice's parameter specs ({} with `models:`)
    t: float  # layer position in its slice (0 outside the layers)
    paths: tuple[str, ...] = ()  # the model of each input entry (base first), for vocabulary remaps
    base_model: str | None = None  # the base_model that applies (also when the method merges it as an input)

    @property
    def entry(self) -> TensorEntry:
        """The entry whose dtype and shape the output has."""
        return self.base or self.models[0]


@dataclass
class Inputs:
    """The opened, mutually validated checkpoints and every output tensor's sources."""

    checkpoints: list[Checkpoint]
    donor: Checkpoint  # config.json and tokenizer files come from here (the base_model, else the first model)
    names: list[str]  # output order
    outputs: dict[str, Output]
    layers: int | None = None  # the output's layer count when slices renumber layers
    models: list[Checkpoint] = field(default_factory=list)
    model_files: list = field(default_factory=list)  # (name, Stamp) of the config/tokenizer files copied
    vocab: tokenizer.Vocabulary | None = None  # the output tokenizer, when the config builds one
    config: dict | None = None  # the output config.json (before its dtype is set), when it is not the donor's
    targets: dict = field(default_factory=dict, repr=False)  # (out_dtype, dtype) -> targets.output_targets
    classes: object = field(default=None, repr=False)  # (outputs, count, units.Classes): units.tensor_classes
    # every output tensor's inputs come from checkpoints opened from one index and headers (`Checkpoint.layout`:
    # fine-tunes written like their base), so each model's entries repeat the reference's dtype, shape and kind
    one_layout: bool = False

    @property
    def reference(self) -> Checkpoint:
        return self.donor

    @property
    def all(self) -> list[Checkpoint]:
        return self.checkpoints

    def entry(self, tensor: str) -> TensorEntry:
        return self.outputs[tensor].entry

    def entries(self, tensor: str):
        """(base entry or None, each model's entry) of one output tensor."""
        out = self.outputs[tensor]
        return out.base, out.models


def open_inputs(cfg: MergeConfig, download: bool = False, quiet: bool = True) -> Inputs:
    """Open and check every checkpoint the config names (downloading pending Hub models first,
    when allowed) and decide where every output tensor comes from."""
    if cfg.pending:
        if not download:
            raise next(iter(cfg.pending.values())).missing()
        remotes = hub.prepare(list(cfg.pending.values()), quiet)
        cfg.resolve({k: r.folder for k, r in remotes.items()})
        fetching = {r.folder: r for r in remotes.values() if r.ref.weights}
        checked = _open(cfg, lambda p: hub.remote_checkpoint(fetching[p]) if p in fetching else Checkpoint.open(p), False)
        hub.download_weights(list(fetching.values()), quiet)
        return _open(cfg, functools.partial(Checkpoint.open, known={}), True, checked)
    return _open(cfg, functools.partial(Checkpoint.open, known={}), True)


def _open(cfg: MergeConfig, open_checkpoint, read_rows: bool, checked: Inputs | None = None) -> Inputs:
    """Everything `open_inputs` does, with checkpoints from `open_checkpoint`; without
    `read_rows`, nothing but headers and side files is read (the check before a download).
    `checked`: that check's result, whose tokenizer and config are reused (same files)."""
    opened: dict[str, Checkpoint] = {}
    named: set = set()  # the layouts whose names were checked (a fine-tune repeating one has those names)

    def ck(path: str) -> Checkpoint:
        if path not in opened:
            adapted = lora.split_key(path)  # BASE+ADAPTER: the base with a LoRA adapter applied
            if adapted:
                opened[path] = lora.open_adapted(ck(adapted[0]), adapted[1])
            else:
                c = opened[path] = open_checkpoint(path)
                if c.layout is None or c.layout not in named:
                    _checked_names(c)
                    named.add(c.layout)
        return opened[path]

    inputs = _sliced(cfg, ck, checked) if cfg.slices else _whole(cfg, ck)
    base = cfg.base_model or cfg.donor or cfg.model_paths()[0]
    inputs.vocab = checked.vocab if checked else tokenizer.build(cfg, {p: ck(p) for p in cfg.model_paths()}, base)
    del ck  # `ck` calls itself: a cycle that would keep what it opened with (every header read, the layouts
    # fine-tunes were relocated from) alive until a full collection, which a run (its bookkeeping frozen)
    # makes only at exit
    if inputs.vocab is not None and cfg.tokenizer is not None:
        _remap_vocabulary(cfg, inputs, read_rows)
        inputs.config = output_config(inputs.donor.read_config(), inputs.config, inputs.vocab.rows)
    return inputs


def _checked_names(ck: Checkpoint) -> Checkpoint:
    """Refuse a tensor name whose layer or expert number has 10 or more digits: no model has a
    billion layers, and Python will not even read a number of 4300 digits."""
    digits_as_zeros = "\n".join(ck.tensors).encode("utf-8", "surrogatepass").translate(_ZEROS)
    if b"0" * 10 not in digits_as_zeros:  # no 10 digits in a row: one scan for the usual checkpoint
        return ck
    for name in ck.tensors:
        m = _LONG_NUMBER.search(name)
        if m:
            raise InputError(f"{ck.path}: tensor {short(name)} has a {len(m.group(1))}-digit number where a layer or "
                             "expert index belongs; this is not a model checkpoint")
    return ck


def _whole(cfg: MergeConfig, ck) -> Inputs:
    base = ck(cfg.base_model) if cfg.base_model else None
    models = [ck(m.path) for m in cfg.models]
    ref = base or models[0]
    vocab = cfg.tokenizer is not None
    for other in models if base else models[1:]:
        _check_same(ref, other, vocab)
    names = list(ref.tensors)
    t = layer_positions(names)
    paths = ((cfg.base_model,) if base else ()) + tuple(m.path for m in cfg.models)
    specs, base_model = tuple(m.params for m in cfg.models), cfg.base_model or cfg.donor
    # a column at a time (map and zip run in C): tens of thousands of tensors in an MoE model
    def column(c: Checkpoint):  # a checkpoint of ref's layout lists the same names in the same order
        same = c is ref or (c.layout is not None and c.layout is ref.layout)
        return c.tensors.values() if same else map(c.tensors.__getitem__, names)

    bases = column(base) if base else repeat(None)
    inputs = zip(*map(column, models)) if models else repeat(())
    outputs = dict(zip(names, map(tuple.__new__, repeat(Output), zip(
        names, bases, inputs, repeat(specs), repeat({}), t, repeat(paths), repeat(base_model)))))
    donor = ck(cfg.donor) if cfg.donor else ref
    inputs = Inputs(list({id(c): c for c in (ck(p) for p in cfg.model_paths())}.values()), donor, names, outputs,
                    None, models, vet_model_files(donor.folder))
    inputs.one_layout = ref.layout is not None and all(c.layout is ref.layout for c in models)
    return inputs


def _remap_vocabulary(cfg: MergeConfig, inputs: Inputs, read_rows: bool) -> None:
    """Replace the inputs of every vocabulary tensor by their rows on the output vocabulary."""
    for name in inputs.names:
        out = inputs.outputs[name]
        if not tokenizer.is_vocab_tensor(name) or not out.entry.shape:
            continue
        entries = ((out.base,) if out.base else ()) + out.models
        base = out.paths.index(out.base_model) if out.base_model in out.paths else None
        new = tokenizer.remap_inputs(name, entries, out.paths, inputs.vocab, cfg.tokenizer, base)
        if read_rows:
            tokenizer.compute_rows(new)
        n = 1 if out.base else 0
        inputs.one_layout = False
        inputs.outputs[name] = out._replace(base=new[0] if out.base else None, models=new[n:])


def verify_unchanged(inputs: Inputs) -> None:
    """Refuse to publish if any input file changed since it was catalogued (replaced, rewritten in
    place even with the same size and mtime): the output would match neither version."""
    stamps = [s for ck in inputs.all for s in ck.stamps.values()] + [s for _, s in inputs.model_files]
    stamps += inputs.vocab.stamps if inputs.vocab else []
    for stamp in stamps:
        why = stamp.changed()
        if why:
            raise InputError(f"{stamp.path}: changed while the merge was running ({why}); nothing was published, "
                             "rerun the merge once the inputs are final")


def _check_same(ref: Checkpoint, other: Checkpoint, vocab: bool = False) -> None:
    if ref.layout is not None and other.layout is ref.layout:
        return  # the same index and headers: the same names, shapes and dtypes
    if list(ref.tensors) == list(other.tensors) and \
            list(map(_SHAPE_DTYPE, ref.tensors.values())) == list(map(_SHAPE_DTYPE, other.tensors.values())):
        return  # the usual case, compared a column at a time
    a, b = set(ref.tensors), set(other.tensors)
    if a != b:
        missing, extra = sorted(a - b), sorted(b - a)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(printable(n, 80) for n in missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} extra (e.g. {', '.join(printable(n, 80) for n in extra[:3])})")
        raise InputError(f"{other.path}: tensor names differ from {ref.path}: {'; '.join(parts)}")
    theirs = other.tensors
    for name, e in ref.tensors.items():
        o = theirs[name]
        if o.shape != e.shape or o.dtype != e.dtype:  # else nothing to check
            _check_pair(ref, e, other, o, vocab)


def _check_pair(ref: Checkpoint, e: TensorEntry, other: Checkpoint, o: TensorEntry, vocab: bool = False) -> None:
    """Two inputs of one output tensor must agree in logical shape (with a tokenizer in the config,
    vocabulary tensors may differ in rows: they are remapped). Real-valued tensors may differ in
    dtype and format (they are decoded to float32 and merged); integer tensors may not (they are
    copied)."""
    rows_only = (o.shape[1:] == e.shape[1:] and len(o.shape) == len(e.shape) >= 1
                 and tokenizer.is_vocab_tensor(e.name) and tokenizer.is_vocab_tensor(o.name))
    if o.shape != e.shape and not (vocab and rows_only):
        hint = ("; the vocabulary sizes differ: add `tokenizer_source: union` (or `base`, or a model) to the config to "
                "merge them" if rows_only else "")
        raise InputError(f"{other.path}: tensor {short(o.name)} has shape {list(o.shape)} but {ref.path} has "
                         f"{list(e.shape)}{'' if o.name == e.name else ' for ' + short(e.name)}{hint}")
    if o.dtype != e.dtype and not (o.real and e.real):
        raise InputError(f"{other.path}: tensor {short(o.name)} is {o.dtype} but {ref.path} has {e.dtype}")


@dataclass
class _Layout:
    """A checkpoint's tensors split into its layer stack (index -> template -> entry) and the rest."""

    stack: str
    layers: dict[int, dict[str, TensorEntry]]
    rest: dict[str, TensorEntry]


def _layout(ck: Checkpoint) -> _Layout:
    stacks = set()
    layers: dict[int, dict[str, TensorEntry]] = {}
    rest = {}
    for name, e in ck.tensors.items():
        m = _LAYER.search(name)
        if m is None:
            rest[name] = e
            continue
        stacks.add(name[:m.start(1)])
        template = name[:m.start(1)] + "\0" + name[m.end(1):]
        layers.setdefault(int(m.group(1)), {})[template] = e
    if len(stacks) != 1:
        found = ", ".join(sorted(s.rstrip(".") for s in stacks)) or "none"
        raise UsageError(f"{ck.path}: slices need a model with one stack of layers; found {found}")
    return _Layout(stacks.pop(), layers, rest)


def _sliced(cfg: MergeConfig, ck, checked: Inputs | None = None) -> Inputs:
    layouts: dict[str, _Layout] = {}

    def layout(path: str) -> _Layout:
        if path not in layouts:
            layouts[path] = _layout(ck(path))
        return layouts[path]

    outputs: dict[str, Output] = {}
    layer_names: list[str] = []
    layer_sources: list[tuple[str, int]] = []  # each output layer's (model, layer): its config entries
    first = last = None
    out_layer = 0
    vocab = cfg.tokenizer is not None
    for s, sl in enumerate(cfg.slices):
        sources = ([sl.base] if sl.base else []) + sl.sources
        count = None
        for src in sources:
            lay = layout(src.path)
            a, b = src.layer_range
            if not (0 <= a < b <= len(lay.layers)) or any(i not in lay.layers for i in range(a, b)):
                raise UsageError(f"{cfg.source}: slices[{s}]: layer_range {[a, b]} of {src.path} is outside its "
                                 f"{len(lay.layers)} layers")
            if count not in (None, b - a):
                raise UsageError(f"{cfg.source}: slices[{s}]: every source must have the same number of layers "
                                 f"({count} and {b - a})")
            count = b - a
        lead = layout(sources[0].path)
        paths = tuple(src.path for src in sources)
        for i in range(count):
            layer_sources.append((sources[0].path, sources[0].layer_range[0] + i))
            templates = lead.layers[sources[0].layer_range[0] + i]
            for template, e in templates.items():
                name = template.replace("\0", str(out_layer + i))
                entries = []
                for src in sources:
                    other = layout(src.path).layers[src.layer_range[0] + i]
                    if template not in other:
                        raise InputError(f"{src.path}: layer {src.layer_range[0] + i} has no tensor like "
                                         f"{template.replace(chr(0), str(sources[0].layer_range[0] + i))!r}")
                    _check_pair(ck(sources[0].path), e, ck(src.path), other[template])
                    entries.append(other[template])
                base = entries.pop(0) if sl.base else None
                t = i / (count - 1) if count > 1 else 1.0
                outputs[name] = Output(name, base, tuple(entries), tuple(src.params for src in sl.sources), sl.params, t,
                                       paths, sl.base_model)
                layer_names.append(name)
        out_layer += count
        first = first or sl
        last = sl
    pre, post = [], []
    for sl, names in ((first, pre), (last, post)):
        sources = ([sl.base] if sl.base else []) + sl.sources
        lead = layout(sources[0].path)
        for name, e in lead.rest.items():
            is_pre = any(p in name for p in _PRE)
            if is_pre != (names is pre):
                continue
            entries = []
            for src in sources:
                rest = layout(src.path).rest
                if name not in rest:
                    raise InputError(f"{src.path}: has no tensor {name!r}")
                _check_pair(ck(sources[0].path), e, ck(src.path), rest[name], vocab)
                entries.append(rest[name])
            base = entries.pop(0) if sl.base else None
            outputs[name] = Output(name, base, tuple(entries), tuple(src.params for src in sl.sources), sl.params, 0.0,
                                   tuple(src.path for src in sources), sl.base_model)
            names.append(name)
    donor = ck(cfg.base_model or cfg.donor or cfg.slices[0].sources[0].path)
    checkpoints = list({id(c): c for c in (ck(p) for p in layouts)}.values())
    inputs = Inputs(checkpoints, donor, pre + layer_names + post, outputs, out_layer, [], vet_model_files(donor.folder))
    inputs.config = checked.config if checked else layered_config(donor, [(ck(p), layer) for p, layer in layer_sources])
    return inputs
