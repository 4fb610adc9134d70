"""dppa-stream: out-of-core, Dask-scheduled merging of fine-tuned LLM checkpoints (DPPA, TIES, DARE, ...)."""

__version__ = "0.1.0"

__all__ = ["merge", "stats", "__version__"]


def __getattr__(name: str):
    """`merge` and `stats` are imported on first use, so `import dppa_stream` (and the CLI's
    `--help`) does not pay for numba, numpy and Dask."""
    if name in ("merge", "stats"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dppa_stream' has no attribute {name!r}")
