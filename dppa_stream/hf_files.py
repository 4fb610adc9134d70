"""The non-weight files of a Hugging Face model folder: config, tokenizer, model card."""

from __future__ import annotations

import json
import os

from . import __version__
from .checkpoint.reader import Stamp, open_regular, read_json_file, resolve_inside
from .errors import InputError
from .output import write_failed

# Copied verbatim from the base model when present (the list mergekit copies).
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "video_preprocessor_config.json", "preprocessor_config.json",
)
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MODEL_FILES = ("config.json", *TOKENIZER_FILES)
COPY_BLOCK = 1 << 20


def vet_model_files(folder: str | None) -> list[tuple[str, Stamp]]:
    """The files `copy_model_files` will copy from `folder`, checked now, before any tensor is read:
    each resolved under the symlink policy (inside the model folder or its Hugging Face cache
    repository), a regular file, and config.json a JSON object. Returns (name, stamp) pairs."""
    out: list[tuple[str, Stamp]] = []
    for name in MODEL_FILES if folder else ():
        where = os.path.join(folder, name)
        if not os.path.lexists(where):
            continue
        full = resolve_inside(folder, name, where)
        fd, st = open_regular(full, where)
        try:
            out.append((name, Stamp.take(full, fd, st)))
        finally:
            os.close(fd)
        if name == "config.json":
            _config_text(full, where, None)  # parses and writes back now, not after the merge
    return out


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _config_text(path: str, where: str, out_dtype: str | None, layers: int | None = None,
                 keep_quantization: bool = True) -> str:
    """config.json with its dtype set to the output dtype (and its layer count to `layers`;
    without its quantization_config when nothing is written quantized), as the text we write."""
    cfg = read_json_file(path, where)
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: not a JSON object")
    if not keep_quantization:
        cfg.pop("quantization_config", None)
        cfg.pop("compression_config", None)
    if layers is not None:
        cfg[next((k for k in LAYER_COUNT_KEYS if k in cfg), LAYER_COUNT_KEYS[0])] = layers
    if out_dtype:
        dt = TORCH_DTYPE_NAMES[out_dtype]
        if "dtype" in cfg:
            cfg["dtype"] = dt
        if "torch_dtype" in cfg or "dtype" not in cfg:
            cfg["torch_dtype"] = dt
    try:
        return json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    except (TypeError, ValueError, RecursionError) as e:
        raise InputError(f"{where}: cannot be written back as JSON ({type(e).__name__})") from None


def _write(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise write_failed(path, e) from None


def _copy(src: str, where: str, dst: str) -> None:
    """Copy a vetted file in blocks (a regular file: checked again when opened)."""
    fd, _ = open_regular(src, where)
    try:
        with open(dst, "wb") as f:
            while True:
                try:
                    block = os.read(fd, COPY_BLOCK)
                except OSError as e:
                    raise InputError(f"{where}: cannot read ({e.strerror})") from None
                if not block:
                    break
                try:
                    f.write(block)
                except OSError as e:
                    raise write_failed(dst, e) from None
    except OSError as e:
        raise write_failed(dst, e) from None
    finally:
        os.close(fd)


def copy_model_files(src_folder: str | None, out: str, out_dtype: str | None, layers: int | None = None,
                     keep_quantization: bool = True) -> list[str]:
    """Copy config.json (dtype set to the output dtype; its layer count set to `layers` when slices
    changed it; its quantization_config dropped unless `keep_quantization`) and tokenizer files;
    returns names copied. The files are vetted again here (`vet_model_files`), so nothing outside
    the model is read."""
    copied = []
    for name, stamp in vet_model_files(src_folder):
        where, dst = os.path.join(src_folder, name), os.path.join(out, name)
        if name == "config.json":
            _write(dst, _config_text(stamp.path, where, out_dtype, layers, keep_quantization).encode())
        else:
            _copy(stamp.path, where, dst)
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
    _write(os.path.join(out, "README.md"), "\n".join(lines).encode("utf-8", "surrogateescape"))
    _write(os.path.join(out, "dppa_stream_config.yml"), cfg.text.encode("utf-8", "surrogateescape"))
