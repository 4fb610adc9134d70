"""Merge methods by name."""

from .base import MergeMethod, Param, REQUIRED
from .dppa import DP, DPPA
from .gta import DELTA_METHODS, Linear
from .isoc import IsoC
from .interp import ArceeFusion, Karcher, ModelStock, Multislerp, Nearswap, Nuslerp, Passthrough, Slerp
from .selective import Ram, RamPlusTl, Sce
from .tsvm import TsvM

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (Linear, *DELTA_METHODS, Slerp, Nuslerp, Multislerp, Karcher, ModelStock, Nearswap,
                        ArceeFusion, Passthrough, Sce, Ram, RamPlusTl, DP, DPPA, IsoC, TsvM)
}

__all__ = ["METHODS", "MergeMethod", "Param", "REQUIRED"]
