"""The Python API: what the CLI calls, usable from scripts and notebooks."""

from __future__ import annotations

from .config import MergeConfig, load_config, parse_config
from .pipeline import MergeOptions, MergeResult
from .pipeline import merge as _merge


def merge(config: str | MergeConfig | dict, out: str, **options) -> MergeResult:
    """Merge the checkpoints a config names into the folder `out`.

    `config` is a YAML file path, YAML text, a dict in the same schema, or a `MergeConfig`.
    Options are those of `MergeOptions` (memory_limit, scheduler, shard_size, seed, overwrite, ...).
    Raises `dppa_stream.errors.DppaError` with a one-line message on bad input.
    BLAS runs one thread during the merge (as under the CLI; Iso-C/TSV-M need it for determinism,
    see methods/isoc.py) and gets back its thread count after, so the caller's numpy is unchanged.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        return _merge(_config(config), out, MergeOptions(**options))


def _config(config) -> MergeConfig:
    if isinstance(config, dict):
        import yaml

        return parse_config(yaml.safe_dump(config, sort_keys=False), "<dict>")
    if isinstance(config, str):
        # YAML text has a newline; anything else is a path (a missing one gets "cannot read config")
        return parse_config(config) if "\n" in config else load_config(config)
    return config


def stats(config: str | MergeConfig | dict, **options):
    """Run pass 1 of a dp/dppa config and return a `StatsResult` (per-model DP reports)."""
    from .stats_report import collect_stats

    return collect_stats(_config(config), MergeOptions(**options))
