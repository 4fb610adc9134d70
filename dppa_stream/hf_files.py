"""The non-weight files of a Hugging Face model folder: config, tokenizer, model card."""

from __future__ import annotations

import json
import os
import shutil

from . import __version__

# Copied verbatim from the base model when present (the list mergekit copies).
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "video_preprocessor_config.json", "preprocessor_config.json",
)
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def copy_model_files(src_folder: str | None, out: str, out_dtype: str | None, layers: int | None = None) -> list[str]:
    """Copy config.json (dtype set to the output dtype; the layer count set to `layers` when slices
    changed it) and tokenizer files; returns names copied."""
    copied = []
    if not src_folder:
        return copied
    cfg_path = os.path.join(src_folder, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if layers is not None and isinstance(cfg, dict):
            key = next((k for k in LAYER_COUNT_KEYS if k in cfg), LAYER_COUNT_KEYS[0])
            cfg[key] = layers
        if out_dtype and isinstance(cfg, dict):
            name = TORCH_DTYPE_NAMES[out_dtype]
            if "dtype" in cfg:
                cfg["dtype"] = name
            if "torch_dtype" in cfg or "dtype" not in cfg:
                cfg["torch_dtype"] = name
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        copied.append("config.json")
    for name in TOKENIZER_FILES:
        p = os.path.join(src_folder, name)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(out, name))
            copied.append(name)
    return copied


def write_model_card(out: str, cfg, method_summary: str, base: str | None, models: list[str]) -> None:
    """README.md with the method, the inputs and the exact config, plus the config file itself."""
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- dppa-stream",
        f"- {cfg.merge_method}",
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with [dppa-stream](https://pypi.org/project/dppa-stream/) {__version__} using "
        f"**{cfg.merge_method}**: {method_summary}.",
        "",
        "## Inputs",
        "",
    ]
    if base:
        lines.append(f"- base: `{base}`")
    lines += [f"- `{m}`" for m in models]
    lines += ["", "## Configuration", "", "```yaml", cfg.text.rstrip("\n"), "```", ""]
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "dppa_stream_config.yml"), "w", encoding="utf-8") as f:
        f.write(cfg.text)
