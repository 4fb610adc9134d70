"""The non-weight files of a Hugging Face model folder: config, tokenizer, model card.

config.json is the donor's (the base model's, else the first model's) with its dtype set to the
output dtype. A slice merge (frankenmerge) changes the layers, so `layered_config` rewrites the
layer count and every per-layer setting: output layer k takes the entries of the source layer it
came from, from that model's config. Per-layer settings are lists sized by the layer count
(`layer_types`, `mlp_layer_types`, per-layer rope thetas or head counts, ...; `PER_LAYER` plus any
list whose key names layers), lists of layer indices (`mlp_only_layers`, `full_attn_idxs`, ...;
`LAYER_INDICES`), one-character-per-layer strings (`hybrid_override_pattern`) and the patterns
transformers derives such lists from (Gemma's sliding-window pattern, MoE's first dense layers, a
hybrid model's attention period, ...). The last kind is handled by transformers itself, in a
child process (`hf_child`): it reads every source config, the lists it derives are written out
explicitly, and the output config must load in transformers and give every output layer the
settings of its source layer, or the merge is refused before anything is written. For a model
type transformers does not know, only the explicit lists are rewritten (with a warning).
"""

from __future__ import annotations

import json
import logging
import os

from . import __version__
from .checkpoint.reader import Stamp, open_regular, read_json_file, resolve_inside
from .errors import InputError, UsageError
from .durable import write_failed

log = logging.getLogger("dppa_stream")

# The tokenizer's own files (copied from the base model when present: the list mergekit copies);
# when the config builds a tokenizer, the files transformers saves replace them.
TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "merges.txt", "vocab.json", "vocab.txt", "chat_template.jinja", "chat_template.json",
)
# Other files a model needs at inference, always copied from the donor.
SIDE_FILES = ("generation_config.json", "video_preprocessor_config.json", "preprocessor_config.json")
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MODEL_FILES = ("config.json", *TOKENIZER_FILES, *SIDE_FILES)
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


def _config_text(path: str, where: str, out_dtype: str | None, config: dict | None = None,
                 keep_quantization: bool = True) -> str:
    """config.json (or `config`, the one computed for this output) with its dtype set to the
    output dtype, and without its quantization_config when nothing is written quantized, as the
    text we write."""
    cfg = read_json_file(path, where) if config is None else json.loads(json.dumps(config))
    if not isinstance(cfg, dict):
        raise InputError(f"{where}: not a JSON object")
    if not keep_quantization:
        cfg.pop("quantization_config", None)
        cfg.pop("compression_config", None)
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


def copy_model_files(src_folder: str | None, out: str, out_dtype: str | None, config: dict | None = None,
                     tokenizer_files: dict[str, bytes] | None = None, keep_quantization: bool = True) -> list[str]:
    """Write config.json (`config` if given, else the donor's; dtype set to the output dtype; its
    quantization_config dropped unless `keep_quantization`) and copy the donor's side files and
    tokenizer files, or write `tokenizer_files` (a tokenizer the config built) instead of the
    latter; returns the names written. The donor's files are vetted again here
    (`vet_model_files`), so nothing outside the model is read."""
    copied = []
    for name, stamp in vet_model_files(src_folder):
        where, dst = os.path.join(src_folder, name), os.path.join(out, name)
        if name == "config.json":
            _write(dst, _config_text(stamp.path, where, out_dtype, config, keep_quantization).encode())
        elif tokenizer_files is None or name not in TOKENIZER_FILES:
            _copy(stamp.path, where, dst)
        else:
            continue
        copied.append(name)
    for name, data in sorted((tokenizer_files or {}).items()):
        _write(os.path.join(out, name), data)
        copied.append(name)
    return copied


def output_config(donor_config: dict | None, layered: dict | None, vocab_rows: int | None) -> dict | None:
    """The output's config.json before its dtype is set: the slice layout's (`layered`) or the
    donor's, with vocab_size set to the output vocabulary's rows; None when it is the donor's as is."""
    if vocab_rows is None or donor_config is None:
        return layered
    cfg = json.loads(json.dumps(layered if layered is not None else donor_config))
    text = cfg.get("text_config")
    if "vocab_size" not in cfg and isinstance(text, dict) and "vocab_size" in text:
        text["vocab_size"] = vocab_rows
    else:
        cfg["vocab_size"] = vocab_rows
    return cfg


# --- per-layer settings of slice merges ----------------------------------------------------------

# Lists with one entry per layer, by name (any other list whose key contains "layer" and whose
# length is the layer count is treated the same way).
PER_LAYER = ("layer_types", "mlp_layer_types", "indexer_types", "attention_types", "block_types", "layers_block_type",
             "layer_rope_theta", "no_rope_layers", "num_attention_heads_per_layer", "num_key_value_heads_per_layer",
             "sliding_window_per_layer", "intermediate_size", "swa_layers", "mtp_layer_types")
# Lists of layer indices.
LAYER_INDICES = ("mlp_only_layers", "full_attn_idxs", "attn_layer_indices", "moe_layers", "hybrid_layer_ids",
                 "cross_attention_layers", "kv_source_layers", "dense_layers", "global_attn_layers")
# Strings with one character per layer.
LAYER_STRINGS = ("hybrid_override_pattern",)
# Integers the modeling code turns into a per-layer choice (MoE or dense MLP): key -> whether
# layer i of a config with value v is dense. transformers does not derive a list from these, so
# a stack of layers must keep every layer's choice; only `first_k_dense_replace` can be re-set.
LAYER_PATTERNS = {
    "first_k_dense_replace": lambda v, i: i < v,
    "decoder_sparse_step": lambda v, i: v <= 0 or (i + 1) % v != 0,
    "moe_layer_freq": lambda v, i: v <= 0 or i % v != 0,
}


def _layer_dict(cfg: dict) -> tuple[dict, str] | None:
    """The (sub-)config that holds the layer count, and its key: the top level, else text_config."""
    for d in (cfg, cfg.get("text_config"), cfg.get("llm_config"), cfg.get("language_config")):
        if isinstance(d, dict):
            key = next((k for k in LAYER_COUNT_KEYS if isinstance(d.get(k), int) and not isinstance(d.get(k), bool)), None)
            if key:
                return d, key
    return None


def _per_layer(key: str, value, layers: int) -> bool:
    return (isinstance(value, list) and len(value) == layers and key not in LAYER_INDICES
            and (key in PER_LAYER or "layer" in key or key.endswith("_types")))


def relayer(donor: dict, sources: list[tuple[dict, int]], where: str = "config.json") -> dict:
    """`donor` with its layer count and per-layer settings following the output layers: output
    layer k takes the entries of layer sources[k][1] in config sources[k][0]. UsageError when a
    source config lacks a setting the output needs."""
    out = json.loads(json.dumps(donor))
    found = _layer_dict(out)
    if found is None:
        out[LAYER_COUNT_KEYS[0]] = len(sources)
        return out
    d, count_key = found
    d[count_key] = len(sources)
    subs = []
    for cfg, layer in sources:
        sub = _layer_dict(cfg)
        if sub is None:
            raise UsageError(f"{where}: a source model's config.json has no layer count")
        subs.append((sub[0], sub[0][sub[1]], layer))
    old = _layer_dict(donor)
    keys = dict.fromkeys(k for sub, n, _ in [(old[0], old[0][old[1]], 0), *subs] for k, v in sub.items()
                         if _per_layer(k, v, n) or (k in LAYER_STRINGS and isinstance(v, str) and len(v) == n)
                         or (k in LAYER_INDICES and isinstance(v, list)))
    for key in keys:
        missing = [n for sub, n, _ in subs if key not in sub]
        if missing:
            raise UsageError(f"{where}: {key} is per layer but one of the slices' models has no {key} in its config.json; "
                             "these models cannot be stacked into one config")
        if key in LAYER_INDICES:
            d[key] = [k for k, (sub, _, layer) in enumerate(subs) if layer in set(sub[key] or ())]
            continue
        values = []
        for sub, n, layer in subs:
            v = sub[key]
            if not (isinstance(v, (list, str)) and len(v) == n):
                raise UsageError(f"{where}: {key} of a slices' model has {len(v) if isinstance(v, (list, str)) else 'no'} "
                                 f"entries but the model has {n} layers")
            values.append(v[layer])
        d[key] = "".join(values) if key in LAYER_STRINGS else values
    for key, dense in LAYER_PATTERNS.items():
        _keep_pattern(d, key, dense, subs, where)
    return out


def _keep_pattern(d: dict, key: str, dense, subs: list, where: str) -> None:
    """Check that every output layer keeps its source layer's choice under an integer pattern
    (`LAYER_PATTERNS`); re-set `first_k_dense_replace` when the dense layers are still the first ones."""
    if not isinstance(d.get(key), int) or isinstance(d.get(key), bool):
        return
    want = []
    for sub, _, layer in subs:
        v = sub.get(key)
        if not isinstance(v, int) or isinstance(v, bool):
            raise UsageError(f"{where}: {key} sets which layers are MoE layers, but one of the slices' models has no {key}")
        want.append(dense(v, layer))
    if [dense(d[key], k) for k in range(len(subs))] == want:
        return
    if key == "first_k_dense_replace" and want == sorted(want, reverse=True):
        d[key] = sum(want)
        return
    raise UsageError(f"{where}: {key} = {d[key]} cannot give the stacked layers their MoE/dense kinds (by layer, dense: "
                     f"{''.join('D' if w else 'M' for w in want)}); stack the layers so that the pattern holds")


def layered_config(donor, sources: list[tuple[object, int]]) -> dict | None:
    """The config.json of a slice merge (see the module docstring): `donor` and the source
    `Checkpoint`s with their layer per output layer. None when the output's layers are the
    donor's own, in order, or there is no config.json."""
    base = donor.read_config()
    if base is None:
        return None
    found = _layer_dict(base)
    if found and found[0][found[1]] == len(sources) and all(ck is donor and layer == k
                                                             for k, (ck, layer) in enumerate(sources)):
        return None
    configs = {}
    for ck, _ in sources:
        if ck.path not in configs:
            cfg = ck.read_config()
            if cfg is None:
                raise UsageError(f"{ck.path}: has no config.json; slices that stack its layers need it for the output's "
                                 "per-layer settings")
            configs[ck.path] = (cfg, ck.folder)
    from .hf_child import run_child

    order = list(configs)
    where = os.path.join(donor.folder, "config.json")
    res = run_child("config", {"donor": base, "where": where, "folders": [configs[p][1] for p in order],
                               "configs": [configs[p][0] for p in order],
                               "layers": [[order.index(ck.path), layer] for ck, layer in sources]},
                    f"{donor.path}/config.json")
    if "refused" in res:  # the slices the config asks for: a usage error, like `relayer`'s
        raise UsageError(res["refused"])
    if "unknown" in res:
        log.warning("transformers does not know this model type (%s); only the per-layer lists config.json spells out "
                    "are rewritten for the slices", res["unknown"])
        return relayer(base, [(configs[ck.path][0], layer) for ck, layer in sources], where)
    return res["config"]


def child_check_config(p: dict) -> dict:
    """In the child process: the slice merge's config.json, built from each source config as
    transformers reads it (the per-layer lists it derives written out explicitly), and checked by
    loading it back: it must load, and give every output layer its source layer's settings."""
    import tempfile

    from transformers import AutoConfig

    derived, settable = [], []
    try:
        for folder in p["folders"]:
            lists, attrs = _derived(AutoConfig.from_pretrained(folder))
            derived.append(lists)
            settable.append(attrs)
    except (ValueError, KeyError) as e:  # a model type this transformers does not know
        return {"unknown": str(e).splitlines()[0][:300]}
    configs = [_explicit(raw, attrs) for raw, attrs in zip(p["configs"], settable)]
    try:
        out = relayer(p["donor"], [(configs[i], layer) for i, layer in p["layers"]], p["where"])
    except UsageError as e:
        return {"refused": str(e)}
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(out, f)
        try:
            got = _derived(AutoConfig.from_pretrained(tmp))[0]
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return {"refused": f"{p['where']}: transformers cannot load the config.json these slices make ({why})"}
    for key in dict.fromkeys(k for lists in derived for k in lists):
        want = [derived[i].get(key, [None] * (layer + 1))[layer] for i, layer in p["layers"]]
        if got.get(key) != want:
            return {"refused": f"{p['where']}: {key}: the config.json these slices make gives the output layers "
                               f"{got.get(key)} in transformers, but their source layers have {want}; this stack of "
                               "layers cannot be described by this model type's config"}
    return {"config": out}


def _derived(config) -> tuple[dict, dict]:
    """The per-layer lists transformers holds for a config's text model, by name: all of them
    (attributes and properties, such as a hybrid model's `layers_block_type`), and those that are
    plain attributes (which a config.json can set)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = next((getattr(text, k) for k in LAYER_COUNT_KEYS if isinstance(getattr(text, k, None), int)), None)
    if n is None:
        return {}, {}
    attrs = set(text.to_dict())
    props = {k for k in dir(type(text)) if isinstance(getattr(type(text), k, None), property)}
    lists = {}
    for key in sorted(attrs | props):
        if key.startswith("_"):
            continue
        try:
            v = getattr(text, key)
        except Exception:
            continue
        v = list(v) if isinstance(v, tuple) else v
        if _per_layer(key, v, n) and all(isinstance(x, (str, int, float, bool, type(None))) for x in v):
            lists[key] = v
    return lists, {k: v for k, v in lists.items() if k in attrs and k not in props}


def _explicit(raw: dict, lists: dict) -> dict:
    """A raw config with the per-layer lists transformers derives for it (from a pattern, say)
    written out, so that they follow the layers when the layers are stacked."""
    cfg = json.loads(json.dumps(raw))
    found = _layer_dict(cfg)
    if found is not None:
        for key, v in lists.items():
            found[0].setdefault(key, v)
    return cfg


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
