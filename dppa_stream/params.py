"""Parameter values as mergekit writes them, and their value for one tensor.

A parameter may be given as
- a scalar (`density: 0.5`);
- a gradient, a list of scalars interpolated linearly over the layers (`t: [0, 0.5, 1]`): at
  position t in [0, 1] the value is (1-f)·v[i] + f·v[i+1] with i = int(t·(L-1)), f = t·(L-1) - i;
  non-numeric lists pick v[int(t·(L-1))];
- a filter list, `[{filter: self_attn, value: 0.3}, {value: 0.5}]`: the first entry whose filter
  is a substring of the tensor name (or is missing or `*`) gives the value, itself a scalar or a
  gradient; when none matches, the next scope (model, then global, then the default) decides.

t is the tensor's layer position inside its slice: layer i of L gets i/(L-1) (a one-layer slice
gets 1); tensors outside the layer stack (embeddings, final norm, lm_head) get 0, as in mergekit
0.1.5. Parameters whose type is itself a list (DPPA's `pruning_rates`, `amplification`) take a
plain list as their value, not as a gradient.
"""

from __future__ import annotations

import math

MISSING = object()


def is_filter_list(value) -> bool:
    """A list of {filter, value} entries (or one such entry on its own, as mergekit allows)."""
    return isinstance(value, dict) or (isinstance(value, list) and bool(value) and all(isinstance(e, dict) for e in value))


def _entries(value) -> list:
    return [value] if isinstance(value, dict) else value


def forms(value, list_valued: bool) -> list:
    """Every scalar (or, for list-valued parameters, every list) a value spec contains, to validate."""
    if is_filter_list(value):
        out = []
        for entry in _entries(value):
            out.extend(forms(entry.get("value"), list_valued))
        return out
    if isinstance(value, list) and not list_valued:
        return list(value)
    return [value]


def check_shape(value, list_valued: bool) -> str | None:
    """What is wrong with the form of a value spec (not with its scalars), or None."""
    if is_filter_list(value):
        for i, entry in enumerate(_entries(value)):
            extra = set(entry) - {"filter", "value"}
            if extra:
                return f"filter entry {i} has unknown key(s) {sorted(extra)} (use 'filter' and 'value')"
            if "value" not in entry:
                return f"filter entry {i} needs a 'value'"
            f = entry.get("filter")
            if f is not None and not isinstance(f, str):
                return f"filter entry {i}: 'filter' must be a string (a substring of tensor names)"
            inner = entry["value"]
            if is_filter_list(inner):
                return f"filter entry {i}: a value cannot be another filter list"
            if isinstance(inner, list) and not list_valued and any(isinstance(v, (list, dict)) for v in inner):
                return f"filter entry {i}: a gradient holds plain values"
        return None
    if isinstance(value, list) and not list_valued:
        if any(isinstance(v, (list, dict)) for v in value):
            return "a gradient is a list of plain values"
    return None


def resolve(value, tensor: str, t: float, list_valued: bool = False):
    """The value of a spec for one tensor at layer position t, or MISSING when a filter list has
    no entry for this tensor (or a gradient is empty)."""
    if is_filter_list(value):
        for entry in _entries(value):
            f = entry.get("filter")
            if f is None or f == "*" or f in tensor:
                return resolve(entry["value"], tensor, t, list_valued)
        return MISSING
    if isinstance(value, list) and not list_valued:
        return gradient(value, t)
    return value


def gradient(values: list, t: float):
    """A gradient's value at t (mergekit's interpolation, in float64)."""
    if not values:
        return MISSING
    scaled = t * (len(values) - 1)
    i = int(scaled)
    j = min(len(values) - 1, i + 1)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[min(i, len(values) - 1)]
    frac = scaled - i
    return (1 - frac) * values[i] + frac * values[j]


def layer_position(index: int, count: int) -> float:
    """t of layer `index` among `count` layers of a slice."""
    return index / (count - 1) if count > 1 else 1.0


def finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)
