"""Fused per-element loops, compiled by numba: the only code that touches every element.

`core`: widening and narrowing, the counter RNG, the threshold rule, the delta family's
statistics, linear combinations. `delta`: the delta family's merge kernel (`gta`), its record
interface and its sparsifiers. `more`: exact products (Gram matrices), row-wise statistics and
combinations, and the kernels of DELLA, SCE, RAM, nearswap and Arcee fusion (and their forms
over a batch of small whole tensors, one segment of columns each). `formats`: decoding
and encoding quantized storage (FP8 with scales, MXFP4) and the requantization loss. `lora`:
adding a LoRA adapter's product to rows as they are read.

The names of all five are this package's, loaded on first use (PEP 562): the methods name
kernels at import, and parsing a config (which imports the methods) must not import numba.
"""

from __future__ import annotations

from .codes import *  # noqa: F401,F403 - the integer codes, without numba

_MODULES = ("core", "delta", "more", "formats", "lora")  # later ones' names win, as their star imports did


def __getattr__(name: str):
    import importlib

    g = globals()
    for m in _MODULES:
        mod = importlib.import_module(f".{m}", __name__)
        g.update({k: v for k, v in vars(mod).items() if k in getattr(mod, "__all__", ()) or
                  (not hasattr(mod, "__all__") and not k.startswith("_"))})
    g["_F16_TO_F32"] = g["core"]._F16_TO_F32
    g.pop("__getattr__", None)  # everything is loaded: plain attribute lookups from now on
    if name not in g:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return g[name]
