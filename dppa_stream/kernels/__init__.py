"""Fused per-element loops, compiled by numba: the only code that touches every element.

`core`: widening and narrowing, the counter RNG, the threshold rule, the delta family's
statistics, linear combinations. `delta`: the delta family's merge kernel (`gta`), its record
interface and its sparsifiers. `more`: exact products (Gram matrices), row-wise statistics and
combinations, and the kernels of DELLA, SCE, RAM, nearswap and Arcee fusion. `formats`: decoding
and encoding quantized storage (FP8 with scales, MXFP4) and the requantization loss.
"""

from .core import *  # noqa: F401,F403
from .core import _F16_TO_F32  # noqa: F401
from .delta import *  # noqa: F401,F403
from .more import *  # noqa: F401,F403
from .formats import *  # noqa: F401,F403
from .lora import *  # noqa: F401,F403
