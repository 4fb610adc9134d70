"""What a merge method is: parameters, per-(model, tensor) sparsifiers, and a chunk kernel.

A method is a small, picklable object. The pipeline asks it for each model's sparsifier on each
tensor (whose statistics it gathers), optionally lets it plan across tensors (`plan`, used by
DPPA), and calls `merge` on float32 chunks. Kernels are elementwise over a chunk, so any
chunking gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .sparsify import Sparsifier

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A declared parameter: default (or REQUIRED), accepted type, and range check."""

    default: Any
    kind: type | tuple = float
    check: Any = None  # callable(value) -> error text or None
    doc: str = ""


def density_check(v):
    return None if 0 < v <= 1 else "must be in (0, 1]"


class MergeMethod:
    """Base class: declares parameters; subclasses define sparsifiers and the chunk kernel."""

    name: ClassVar[str]
    needs_base: ClassVar[bool] = True
    global_params: ClassVar[dict[str, Param]] = {}
    model_params: ClassVar[dict[str, Param]] = {}
    summary: ClassVar[str] = ""
    # How deltas are formed: "float32" (ft - base in fp32) or "bfloat16" (that, rounded to bf16).
    delta_dtype: ClassVar[str] = "float32"

    def __init__(self, params: dict, model_params: list[dict], seed: int):
        self.params = params
        self.mparams = model_params
        self.seed = seed

    @classmethod
    def check_params(cls, globals: dict, models: list[dict]) -> str | None:
        """Checks across parameters, run when the config is parsed (so a bad config fails before
        any tensor is read): the problem as text, or None. `globals` and each of `models` are
        resolved parameter dicts."""
        return None

    def sparsifier(self, model: int, tensor: str) -> Sparsifier:
        return Sparsifier()

    def plan(self, engine) -> dict[str, Any]:
        """Cross-tensor planning before pass 2 (after per-model sparsifier statistics). Returns
        extra per-tensor data handed to `merge` as `extra`; most methods need none."""
        return {}

    def merge(self, base: torch.Tensor | None, deltas: list[torch.Tensor], inputs: list[torch.Tensor] | None,
              tensor: str, extra: Any) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return self.summary

