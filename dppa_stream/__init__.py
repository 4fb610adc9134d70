"""dppa-stream: out-of-core, Dask-scheduled merging of fine-tuned LLM checkpoints (DPPA, TIES, DARE, ...)."""

__version__ = "0.1.0"

from .api import merge  # noqa: E402

__all__ = ["merge", "__version__"]
