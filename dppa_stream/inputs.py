"""Opening the checkpoints a config names and checking that they agree with each other.

Only headers are read here: the result is a catalogue of every input's tensors (name, dtype,
shape, file, byte range) and the output tensor order, which everything downstream plans from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .checkpoint import Checkpoint
from .config import MergeConfig
from .errors import InputError, printable, short
from .hf_files import vet_model_files


@dataclass
class Inputs:
    """The opened, mutually validated checkpoints and the output tensor list."""

    base: Checkpoint | None
    models: list[Checkpoint]
    names: list[str]  # output order: the reference checkpoint's storage order
    model_files: list = field(default_factory=list)  # (name, Stamp) of the config/tokenizer files copied

    @property
    def reference(self) -> Checkpoint:
        return self.base or self.models[0]

    def entries(self, tensor: str):
        """(base entry or None, each model's entry) of one tensor."""
        return (self.base.tensors[tensor] if self.base else None), tuple(m.tensors[tensor] for m in self.models)

    @property
    def all(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models


def open_inputs(cfg: MergeConfig) -> Inputs:
    base = Checkpoint.open(cfg.base_model) if cfg.base_model else None
    models = [Checkpoint.open(m.path) for m in cfg.models]
    ref = base or models[0]
    names = list(ref.tensors)
    for ck in models if base else models[1:]:
        _check_same(ref, ck)
    return Inputs(base, models, names, vet_model_files(ref.folder))


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
        o = other.tensors[name]
        if o.shape != e.shape:
            hint = " (vocabulary sizes differ?)" if "embed" in name or "lm_head" in name else ""
            raise InputError(f"{other.path}: tensor {short(name)} has shape {list(o.shape)} but {ref.path} has {list(e.shape)}{hint}")
        if o.dtype != e.dtype:
            raise InputError(f"{other.path}: tensor {short(name)} is {o.dtype} but {ref.path} has {e.dtype}")
