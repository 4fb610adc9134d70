"""Opening the checkpoints a config names, checking that they agree, and deciding where every
output tensor comes from.

Only headers are read here. With `models:`, output tensor t is t of the base and of every model.
With `slices:` (mergekit's frankenmerges and merged slices), output layers are numbered
consecutively across slices and output layer k of a slice reads layer `layer_range[0] + i` of each
source; embeddings come from the first slice's sources and the final norm and head from the last
slice's, as mergekit 0.1.5 does. Downstream code sees one `Output` per tensor: its input entries,
the parameter specs that apply to it and its layer position t.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .blocks import layer_positions
from .checkpoint import Checkpoint, TensorEntry
from .config import MergeConfig
from .errors import InputError, UsageError, printable, short
from .hf_files import vet_model_files

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|block|blocks)\.([0-9]+)\.")
_PRE = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "shared.")


@dataclass(frozen=True, slots=True)
class Output:
    """Where one output tensor comes from, and what parameters apply to it."""

    name: str
    base: TensorEntry | None
    models: tuple[TensorEntry, ...]
    specs: tuple[dict, ...]  # each model's own parameter specs (models[i].parameters or sources[j].parameters)
    slice_params: dict  # the slice's parameter specs ({} with `models:`)
    t: float  # layer position in its slice (0 outside the layers)

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


def open_inputs(cfg: MergeConfig) -> Inputs:
    opened: dict[str, Checkpoint] = {}

    def ck(path: str) -> Checkpoint:
        if path not in opened:
            opened[path] = Checkpoint.open(path)
        return opened[path]

    if cfg.slices:
        return _sliced(cfg, ck)
    base = ck(cfg.base_model) if cfg.base_model else None
    models = [ck(m.path) for m in cfg.models]
    ref = base or models[0]
    for other in models if base else models[1:]:
        _check_same(ref, other)
    names = list(ref.tensors)
    t = layer_positions(names)
    outputs = {n: Output(n, base.tensors[n] if base else None, tuple(m.tensors[n] for m in models),
                         tuple(m.params for m in cfg.models), {}, t[n]) for n in names}
    donor = ck(cfg.donor) if cfg.donor else ref
    return Inputs(list(opened.values()), donor, names, outputs, None, models, vet_model_files(donor.folder))


def verify_unchanged(inputs: Inputs) -> None:
    """Refuse to publish if any input file changed since it was catalogued (replaced, rewritten in
    place even with the same size and mtime): the output would match neither version."""
    stamps = [s for ck in inputs.all for s in ck.stamps.values()] + [s for _, s in inputs.model_files]
    for stamp in stamps:
        why = stamp.changed()
        if why:
            raise InputError(f"{stamp.path}: changed while the merge was running ({why}); nothing was published, "
                             "rerun the merge once the inputs are final")


def _check_same(ref: Checkpoint, other: Checkpoint) -> None:
    a, b = set(ref.tensors), set(other.tensors)
    if a != b:
        missing, extra = sorted(a - b), sorted(b - a)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(printable(n, 80) for n in missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} extra (e.g. {', '.join(printable(n, 80) for n in extra[:3])})")
        raise InputError(f"{other.path}: tensor names differ from {ref.path}: {'; '.join(parts)}")
    for name, e in ref.tensors.items():
        _check_pair(ref, e, other, other.tensors[name])


def _check_pair(ref: Checkpoint, e: TensorEntry, other: Checkpoint, o: TensorEntry) -> None:
    if o.shape != e.shape:
        hint = " (vocabulary sizes differ?)" if "embed" in e.name or "lm_head" in e.name else ""
        raise InputError(f"{other.path}: tensor {short(o.name)} has shape {list(o.shape)} but {ref.path} has "
                         f"{list(e.shape)}{'' if o.name == e.name else ' for ' + short(e.name)}{hint}")
    if o.dtype != e.dtype:
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


def _sliced(cfg: MergeConfig, ck) -> Inputs:
    layouts: dict[str, _Layout] = {}

    def layout(path: str) -> _Layout:
        if path not in layouts:
            layouts[path] = _layout(ck(path))
        return layouts[path]

    outputs: dict[str, Output] = {}
    layer_names: list[str] = []
    first = last = None
    out_layer = 0
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
        for i in range(count):
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
                outputs[name] = Output(name, base, tuple(entries), tuple(src.params for src in sl.sources), sl.params, t)
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
                _check_pair(ck(sources[0].path), e, ck(src.path), rest[name])
                entries.append(rest[name])
            base = entries.pop(0) if sl.base else None
            outputs[name] = Output(name, base, tuple(entries), tuple(src.params for src in sl.sources), sl.params, 0.0)
            names.append(name)
    donor = ck(cfg.base_model or cfg.donor or cfg.slices[0].sources[0].path)
    checkpoints = list({id(c): c for c in (ck(p) for p in layouts)}.values())
    return Inputs(checkpoints, donor, pre + layer_names + post, outputs, out_layer, [], vet_model_files(donor.folder))
