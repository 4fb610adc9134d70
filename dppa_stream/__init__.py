"""dppa-stream: out-of-core, Dask-scheduled merging of fine-tuned LLM checkpoints (DPPA, TIES, DARE, ...)."""

__version__ = "0.1.0"

from .api import merge, stats  # noqa: E402

__all__ = ["merge", "stats", "__version__"]
