"""Merge methods by name."""

from .base import MergeMethod, Param, REQUIRED
from .dppa import DP, DPPA
from .gta import DareLinear, DareTies, Linear, Magnitude, TaskArithmetic, Ties

METHODS: dict[str, type[MergeMethod]] = {
    m.name: m for m in (Linear, TaskArithmetic, Ties, DareLinear, DareTies, Magnitude, DP, DPPA)
}

__all__ = ["METHODS", "MergeMethod", "Param", "REQUIRED"]
