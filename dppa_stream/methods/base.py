"""What a merge method is: declared parameters, the statistics it needs, a pure plan, a kernel.

A method never sees files, Dask or other methods. The driver (`statistics.drive`) asks it which
statistics it needs (`statistics`, called round after round with what is known so far), then for
its `plan`: small, picklable per-tensor decisions. Pass 2 calls `merge_unit` with one work unit's
raw rows and that tensor's plan; it runs a fused kernel straight into the output buffer. Whole
small tensors of a local method go to `merge_batch` many at a time.

Methods whose decisions for a tensor depend only on that tensor's statistics are `local`: a tensor
held in a single work unit is then planned inside its pass-2 task, from rows already in memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A declared parameter: default (or REQUIRED), accepted type, and range check."""

    default: Any
    kind: type | tuple = float
    check: Any = None  # callable(value) -> error text or None
    doc: str = ""
    per_tensor: bool = True  # may vary by tensor (gradients, filter lists); else one value for the model


def density_check(v):
    return None if 0 < v <= 1 else "must be in (0, 1]"


# not frozen: built once per tensor (tens of thousands in an MoE model), never changed, and a
# frozen dataclass's __init__ costs ~1 us more each (its dict fields make it unhashable either way)
@dataclass(slots=True)
class TensorInfo:
    """One output tensor as planning sees it: dtype and shape, and the parameter values that
    apply to it (shared ones, and one dict per fine-tune) after gradients and filters."""

    name: str
    dtype: str
    shape: tuple
    globals: dict
    models: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Infos(Sequence):
    """TensorInfos kept as columns (name, dtype, shape, globals, models of each): a TensorInfo is
    made only where one is asked for, and a slice stays columns. Pass 2 hands each work unit a
    slice; a batch of an MoE checkpoint's small tensors reads its parameters from the columns
    (`ParamSets`), so no TensorInfo is made for them."""

    __slots__ = ("names", "dtypes", "shapes", "globals", "models")

    def __init__(self, names: list[str], dtypes: list[str], shapes: list[tuple], globals: list[dict],
                 models: list[tuple]):
        self.names, self.dtypes, self.shapes, self.globals, self.models = names, dtypes, shapes, globals, models

    @classmethod
    def of(cls, infos) -> "Infos":
        """The columns of a sequence of TensorInfos (or Infos as they are)."""
        if isinstance(infos, Infos):
            return infos
        return cls(*(list(map(attrgetter(f), infos)) for f in ("name", "dtype", "shape", "globals", "models")))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return Infos(self.names[k], self.dtypes[k], self.shapes[k], self.globals[k], self.models[k])
        return TensorInfo(self.names[k], self.dtypes[k], self.shapes[k], self.globals[k], self.models[k])

    def __iter__(self):
        return map(TensorInfo, self.names, self.dtypes, self.shapes, self.globals, self.models)


class Catalogue:
    """What planning may know about the inputs: the output tensors (`tensors`: name ->
    TensorInfo) in output order, and the reference checkpoint's config.json.

    Made from columns (`of_columns`: the names and their `Infos`, in output order), the dict is
    made the first time planning asks for it: a local method plans most tensors inside their
    pass-2 tasks, which get their TensorInfos as slices of the columns (`infos`)."""

    __slots__ = ("_tensors", "config", "names", "_infos")

    def __init__(self, tensors: dict, config: dict | None):
        self._tensors, self.config, self.names, self._infos = tensors, config, None, None

    @classmethod
    def of_columns(cls, names: list[str], infos: Infos, config: dict | None) -> "Catalogue":
        cat = cls(None, config)
        cat.names, cat._infos = names, infos
        return cat

    @property
    def tensors(self) -> dict:
        if self._tensors is None:
            self._tensors = dict(zip(self.names, self._infos))
        return self._tensors

    @property
    def infos(self) -> Sequence:
        """The TensorInfos in output order (`Infos` where the catalogue was made from columns)."""
        if self._infos is None:
            self._infos = list(self._tensors.values())
        return self._infos


@dataclass
class Plan:
    """A method's decisions: per tensor, what pass 2 needs; and what it reports to the user."""

    tensors: dict[str, Any] = field(default_factory=dict)
    report: Any = None


class MergeMethod:
    """Base class: declares parameters; subclasses say what to gather, plan and run."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    needs_base: ClassVar[bool] = True  # a base_model is required
    base_optional: ClassVar[bool] = False  # a base_model is used when given (nuslerp, multislerp)
    base_is_input: ClassVar[bool] = False  # the base_model is merged as one more model (linear, karcher)
    inputs: ClassVar[tuple] = (1, None)  # fewest and most models besides the base
    local: ClassVar[bool] = True
    global_params: ClassVar[dict[str, Param]] = {}
    model_params: ClassVar[dict[str, Param]] = {}

    def __init__(self, params: dict, model_params: list[dict], seed: int, has_base: bool = True):
        self.params = params
        self.mparams = model_params
        self.seed = seed
        self.has_base = has_base

    @classmethod
    def check_params(cls, params: dict, models: list[dict]) -> str | None:
        """Checks across parameters, run when the config is parsed (so a bad config fails before
        any tensor is read): the problem as one line, or None. `params` and each of `models` are
        the specs as written (defaults not filled in)."""
        return None

    def statistics(self, catalogue: Catalogue, tensors: list[str], got) -> dict[str, list]:
        """Statistics still needed to plan `tensors`, given the results `got` so far."""
        out = {}
        for t in tensors:
            need = self.tensor_statistics(catalogue.tensors[t], got.of(t))
            if need:
                out[t] = need
        return out

    def plan(self, catalogue: Catalogue, tensors: list[str], got) -> Plan:
        return Plan({t: self.tensor_plan(catalogue.tensors[t], got.of(t)) for t in tensors})

    def unit_multiple(self, shape: tuple) -> int:
        """Elements that a work-unit boundary inside a tensor of this shape must be a multiple of:
        one row along the last dimension, which every elementwise and row-wise kernel accepts."""
        return shape[-1] if shape else 1

    def tensor_statistics(self, info: TensorInfo, got) -> list:
        return []

    def task_bytes(self, shape: tuple, models: int) -> int:
        """Memory a task holds for a tensor of this shape beyond its unit's rows (a Gram matrix, a
        projection), counted against --memory-limit before any tensor is read."""
        return 0

    def held_bytes(self, shape: tuple, models: int) -> int:
        """Memory the run holds until pass 2 for a tensor of this shape planned in pass 1 (its
        statistics and plan), beyond the per-tensor bookkeeping `units.state_bytes` counts."""
        return 0

    def tensor_plan(self, info: TensorInfo, got) -> Any:
        return None

    def merge_unit(self, rows, plan, out: np.ndarray, out_code: int) -> np.ndarray:
        """Merge one unit's rows into `out` (bit patterns of the output dtype); returns the NaN/Inf
        count seen per input."""
        raise NotImplementedError

    def merge_batch(self, batch, infos: Infos, out: np.ndarray, out_code: int, check_finite: bool) -> np.ndarray:
        """Merge a batch of whole small tensors (`units.BatchRows`, a local method's; `infos`: their
        `Infos`, whose columns a family reads as they are, `infos[k]` item k's TensorInfo) into
        `out` (bit patterns of the output dtype, item k at columns batch.starts[k]:starts[k+1], as
        in `batch.src`); returns the NaN/Inf count seen per input.
        This default plans and merges item by item (what pass 2 does for a lone tensor); a family
        overrides it to plan the batch with arrays and run one kernel call."""
        from ..statistics import drive, inline

        bad = np.zeros(batch.src.shape[0], np.int64)
        for k, info in enumerate(infos):
            rows = batch.rows(k)
            plan = drive(self, Catalogue({info.name: info}, None), [info.name], inline(rows, check_finite))
            bad += self.merge_unit(rows, plan.tensors[info.name], out[batch.starts[k]:batch.starts[k + 1]], out_code)
        return bad

    def describe(self) -> str:
        return self.summary


_GLOBALS, _MODELS = attrgetter("globals"), attrgetter("models")


class ParamSets:
    """The sets of parameter values of a batch's tensors (`infos`), for per-tensor arrays made once
    per set (`of`). Tensors share their `globals` and `models` objects (`MergeConfig.params_of`
    keeps one copy of each set of values), so thousands of an MoE checkpoint's tensors have a
    handful, and an array built row by row in Python cost more than merging them."""

    def __init__(self, infos):
        n = len(infos)
        columns = (infos.globals, infos.models) if isinstance(infos, Infos) else \
            (list(map(_GLOBALS, infos)), list(map(_MODELS, infos)))
        by_globals, by_models = (list(map(id, c)) for c in columns)
        if len(set(by_globals)) == 1 == len(set(by_models)):
            self.sets, self.index = [infos[0]], np.zeros(n, np.intp)
            return
        keys = list(zip(by_globals, by_models))
        first = {k: infos[i] for k, i in dict(zip(keys, range(n))).items()}  # a tensor of each set
        code = {k: i for i, k in enumerate(first)}
        self.sets, self.index = list(first.values()), np.fromiter(map(code.__getitem__, keys), np.intp, n)

    def of(self, value, dtype) -> np.ndarray:
        """`value(info)` of every tensor, tensor k's in row k; `value` may read only an info's
        `globals` and `models`."""
        return np.array([value(info) for info in self.sets], dtype)[self.index]


def same_rows(*arrays: np.ndarray) -> bool:
    """Whether every row (first axis) of each array holds the same bytes as its first row. A batch
    whose tensors all merge with one row of weights or kernel records is then one span to the
    kernel, element for element the same work: a segment per tensor cost two worker threads 10-50%
    more kernel time (task arithmetic on the unfused MoE set, in windows of a shared machine)."""
    for a in arrays:
        if len(a) > 1:
            rows = np.ascontiguousarray(a).view(np.uint8).reshape(len(a), -1)
            if not (rows == rows[0]).all():
                return False
    return True


def torch_order_sum(values) -> np.float32:
    """The float32 sum of a few scalars in the order torch's `tensor.sum()` adds them on a CPU
    (four interleaved partial sums for up to 7 values, in sequence for 8), so divisors computed
    here equal mergekit's bit for bit. Beyond 8 values: in sequence."""
    vals = [np.float32(v) for v in values]
    if len(vals) >= 8:
        total = np.float32(0.0)
        for v in vals:
            total = np.float32(total + v)
        return total
    part = [np.float32(0.0)] * 4
    whole = len(vals) // 4
    for r in range(whole):
        for k in range(4):
            part[k] = np.float32(part[k] + vals[4 * r + k])
    for v in vals[4 * whole:]:
        part[0] = np.float32(part[0] + v)
    for k in range(1, 4):
        part[0] = np.float32(part[0] + part[k])
    return np.float32(np.float32(0.0) + part[0])
