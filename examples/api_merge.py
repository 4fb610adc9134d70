"""Merge through the Python API: generate small demo checkpoints, then merge them with DPPA and TIES.

    python examples/api_merge.py

A config can be a dict in the same schema as the YAML files next to this script (or YAML text,
a YAML file path, or a parsed `MergeConfig`); options are those of the CLI's `merge` command.
"""

import os
import tempfile

import dppa_stream
from dppa_stream.synthetic import write_llama_set


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # a Llama-shaped base and two fine-tunes (a few MB each), written as Hugging Face folders
        base, ft1, ft2 = write_llama_set(os.path.join(tmp, "models"))

        dppa = {
            "merge_method": "dppa",
            "base_model": base,
            "models": [
                {"model": ft1, "parameters": {"weight": 1.0, "amplification": [1.8, 0.0]}},
                {"model": ft2, "parameters": {"weight": 1.0, "amplification": [1.8, 0.0]}},
            ],
            "parameters": {"pruning_rates": [0.9, 0.8], "lamda": 0.08},
            "dtype": "bfloat16",
        }
        ties = {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.3}} for m in (ft1, ft2)],
        }
        for name, config in (("dppa", dppa), ("ties", ties)):
            result = dppa_stream.merge(config, os.path.join(tmp, f"merged-{name}"), quiet=True)
            print(f"{name}: {result.summary_line()}")
            print(f"{name}: files {', '.join(sorted(os.listdir(result.out)))}")


if __name__ == "__main__":
    main()
