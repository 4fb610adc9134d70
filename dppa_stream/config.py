"""The merge config: mergekit-style YAML, validated into a `MergeConfig` with one-line errors.

Errors name the key and, when the value came from YAML, its line. mergekit features we do not
support yet (slices, tokenizer surgery, per-tensor filters and gradients) are refused by name.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from fractions import Fraction

import yaml

from .errors import UsageError, printable, short
from .methods import METHODS, REQUIRED, Param

TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
UNSUPPORTED = {
    "slices": "layer slices (frankenmerges) are not supported; list whole models under 'models:'",
    "modules": "per-module configs are not supported; list whole models under 'models:'",
    "tokenizer_source": "tokenizer merging is not supported; the base model's tokenizer is copied",
    "tokenizer": "tokenizer merging is not supported; the base model's tokenizer is copied",
    "chat_template": "chat templates are not set by dppa-stream; the base model's tokenizer files are copied",
}
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "fp32": "F32", "fp16": "F16", "bf16": "BF16"}
MAX_CONFIG_BYTES = 1 << 20  # a merge config is a few hundred bytes; this bounds /dev/zero and friends
MAX_CONFIG_VALUES = 100_000  # values after YAML aliases are expanded: refuses alias bombs
MAX_NUMBER = 1e15  # parameters are weights, densities and factors; beyond this is a typo or an attack
MAX_SIZE = 1 << 60  # 1 EiB


@dataclass
class ModelSpec:
    path: str
    params: dict


@dataclass
class MergeConfig:
    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict = field(default_factory=dict)
    dtype: str | None = None  # safetensors name: F32/F16/BF16
    out_dtype: str | None = None
    text: str = ""  # the YAML as written, for the model card
    source: str = "<config>"

    def method(self, seed: int = 0):
        """Instantiate the merge method with resolved global and per-model parameters."""
        cls = METHODS[self.merge_method]
        return cls(self.resolved_globals(), [self.resolved_model(m) for m in self.models], seed)

    def resolved_globals(self) -> dict:
        cls = METHODS[self.merge_method]
        return {k: self.parameters.get(k, p.default) for k, p in cls.global_params.items()}

    def resolved_model(self, m: ModelSpec) -> dict:
        cls = METHODS[self.merge_method]
        out = {}
        for k, p in cls.model_params.items():
            v = m.params.get(k, self.parameters.get(k, p.default))
            if v is REQUIRED:
                raise UsageError(f"{self.source}: models[{m.path}].parameters.{k} is required for {self.merge_method}")
            out[k] = v
        return out

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype


class _Loader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (in `.lines`)."""


class _LineDict(dict):
    lines: dict


def _construct_mapping(loader, node):
    loader.flatten_mapping(node)
    d = _LineDict()
    d.lines = {}
    for k_node, v_node in node.value:
        key = loader.construct_object(k_node, deep=True)
        try:
            hash(key)
        except TypeError:
            key = [key]  # unhashable: refused just below
        if isinstance(key, (list, dict)):
            raise UsageError(f"line {k_node.start_mark.line + 1}: a key must be a plain value, not a {type(key).__name__}")
        if key in d:
            raise UsageError(f"line {k_node.start_mark.line + 1}: duplicate key {short(key)}")
        d[key] = loader.construct_object(v_node, deep=True)
        d.lines[key] = k_node.start_mark.line + 1
    return d


def _construct_int(loader, node):
    """YAML integers, refusing ones Python will not convert (over 4300 digits) with their line."""
    try:
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    except ValueError:
        raise UsageError(f"line {node.start_mark.line + 1}: an integer of {len(str(node.value))} characters "
                         "is not a parameter value") from None


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _where(src: str, d, key) -> str:
    line = getattr(d, "lines", {}).get(key)
    return f"{src}:{line}" if line else src


def _unknown(src, d, key, allowed, ctx):
    hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
    extra = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(sorted(allowed))})"
    return UsageError(f"{_where(src, d, key)}: unknown key {ctx}{short(key)}{extra}")


def load_config(path: str) -> MergeConfig:
    """Read and validate a YAML config file: a regular file of at most 1 MiB (a FIFO must not
    block us, /dev/zero must not fill memory)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"{path}: cannot read config ({e.strerror})") from None
    except ValueError:
        raise UsageError(f"{path}: not a valid file name") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path}: the config must be a regular file (not a folder, FIFO or device)")
        raw = b""
        while len(raw) <= MAX_CONFIG_BYTES:
            block = os.read(fd, MAX_CONFIG_BYTES + 1 - len(raw))
            if not block:
                break
            raw += block
    except OSError as e:
        raise UsageError(f"{path}: cannot read config ({e.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise UsageError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; not a merge config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: config is not UTF-8 text") from None
    return parse_config(text, path)


def _count_values(data, budget: int) -> None:
    """Refuse configs that expand to more than `budget` values (YAML alias bombs): aliases share
    one object, so this walk counts each reference, and stops as soon as the budget is spent."""
    stack, seen = [data], 0
    while stack:
        v = stack.pop()
        seen += 1
        if seen > budget:
            raise UsageError(f"expands to more than {budget} values (YAML aliases?); not a merge config")
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def parse_config(text: str, source: str = "<config>") -> MergeConfig:
    if len(text) > MAX_CONFIG_BYTES:
        raise UsageError(f"{source}: larger than {MAX_CONFIG_BYTES} characters; not a merge config")
    try:
        data = yaml.load(text, Loader=_Loader)
        _count_values(data, MAX_CONFIG_VALUES)
    except UsageError as e:
        msg = str(e)
        raise UsageError(f"{source}:{msg[5:]}" if msg.startswith("line ") else f"{source}: {msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{source}{line}: YAML syntax error: {problem}") from None
    except RecursionError:
        raise UsageError(f"{source}: YAML nested too deeply; not a merge config") from None
    except (ValueError, OverflowError) as e:  # int('9' * 5000) inside the YAML constructor
        raise UsageError(f"{source}: YAML value cannot be read ({printable(str(e), 80)})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{source}: the config must be a YAML mapping with 'merge_method' and 'models'")
    for key in data:
        if key in UNSUPPORTED:
            raise UsageError(f"{_where(source, data, key)}: {key!r}: {UNSUPPORTED[key]}")
        if key not in TOP_KEYS:
            raise _unknown(source, data, key, TOP_KEYS, "")
    method = data.get("merge_method")
    if method is None:
        raise UsageError(f"{source}: 'merge_method' is required (one of: {', '.join(sorted(METHODS))})")
    if not isinstance(method, str) or method not in METHODS:
        hint = difflib.get_close_matches(str(method), sorted(METHODS), n=1)
        more = f"did you mean {hint[0]!r}?" if hint else f"choose one of: {', '.join(sorted(METHODS))}"
        raise UsageError(f"{_where(source, data, 'merge_method')}: unknown merge_method {short(method)}; {more}")
    cls = METHODS[method]
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise UsageError(f"{_where(source, data, 'base_model')}: base_model must be a path")
    if cls.needs_base and not base:
        raise UsageError(f"{source}: merge_method {method!r} needs a 'base_model'")
    base_path = _path(base, _where(source, data, "base_model"), "base_model") if base else None

    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise UsageError(f"{_where(source, data, 'parameters')}: 'parameters' must be a mapping")
    allowed_global = set(cls.global_params) | set(cls.model_params)
    for k, v in params.items():
        if k not in allowed_global:
            raise _unknown(source, params, k, allowed_global, "parameters.")
        _check_value(source, params, k, v, {**cls.model_params, **cls.global_params}[k], f"parameters.{k}")

    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise UsageError(f"{_where(source, data, 'models')}: 'models' must be a non-empty list of {{model: PATH}} entries")
    models: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(models_raw):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("model"), str):
            raise UsageError(f"{source}: models[{i}] needs a 'model: PATH' entry")
        for k in entry:
            if k not in ("model", "parameters"):
                raise _unknown(source, entry, k, {"model", "parameters"}, f"models[{i}].")
        path = _path(entry["model"], _where(source, entry, "model"), f"models[{i}].model")
        mparams = entry.get("parameters") or {}
        if not isinstance(mparams, dict):
            raise UsageError(f"{_where(source, entry, 'parameters')}: models[{i}].parameters must be a mapping")
        if path == base_path and cls.needs_base:
            if mparams:
                raise UsageError(f"{_where(source, entry, 'model')}: models[{i}] is the base model; it takes no parameters")
            continue  # mergekit configs often list the base among the models
        if path in seen:
            raise UsageError(f"{_where(source, entry, 'model')}: models[{i}] repeats models[{seen[path]}] ({entry['model']})")
        seen[path] = i
        for k, v in mparams.items():
            if k not in cls.model_params:
                what = "is a global parameter; set it under top-level 'parameters'" if k in cls.global_params else None
                if what:
                    raise UsageError(f"{_where(source, mparams, k)}: models[{i}].parameters.{k} {what}")
                raise _unknown(source, mparams, k, set(cls.model_params), f"models[{i}].parameters.")
            _check_value(source, mparams, k, v, cls.model_params[k], f"models[{i}].parameters.{k}")
        models.append(ModelSpec(path, dict(mparams)))
    if not models:
        raise UsageError(f"{source}: 'models' lists no model besides the base")

    dtypes = {}
    for key in ("dtype", "out_dtype"):
        v = data.get(key)
        if v is not None and (not isinstance(v, str) or v not in DTYPE_NAMES):
            raise UsageError(f"{_where(source, data, key)}: {key} {short(v)} is not one of float32, float16, bfloat16")
        dtypes[key] = DTYPE_NAMES[v] if v else None
    cfg = MergeConfig(method, models, base_path, dict(params), dtypes["dtype"], dtypes["out_dtype"], text, source)
    models_params = [cfg.resolved_model(m) for m in cfg.models]  # required parameters present
    problem = cls.check_params(cfg.resolved_globals(), models_params)
    if problem:
        raise UsageError(f"{source}: {problem}")
    return cfg


def _norm(p: str) -> str:
    return os.path.abspath(os.path.expanduser(p))


def _path(p: str, where: str, key: str) -> str:
    """A model path from the config: a usable file name (no NUL byte, no lone surrogate)."""
    try:
        if not p or "\0" in p:
            raise ValueError
        os.fsencode(p)
    except (ValueError, UnicodeEncodeError):
        raise UsageError(f"{where}: {key} {short(p)} is not a usable path") from None
    return _norm(p)


def _bad_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return not (math.isfinite(float(v)) and abs(v) <= MAX_NUMBER)
    except OverflowError:
        return True


def _check_value(src, d, key, value, spec: Param, name: str) -> None:
    kinds = spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)
    if isinstance(value, (list, dict)) and type(value) not in kinds:
        raise UsageError(
            f"{_where(src, d, key)}: {name}: per-tensor filters and layer gradients are not supported yet; use a single value"
        )
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        want = " or ".join(dict.fromkeys("number" if k in (int, float) else k.__name__ for k in kinds))
        raise UsageError(f"{_where(src, d, key)}: {name} must be a {want}, not {short(value)}")
    if any(_bad_number(v) for v in (value if isinstance(value, list) else [value])):
        raise UsageError(f"{_where(src, d, key)}: {name} = {short(value)} must be finite, within +-{MAX_NUMBER:g}")
    if spec.check:
        problem = spec.check(value)
        if problem:
            raise UsageError(f"{_where(src, d, key)}: {name} = {short(value)} {problem}")


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?))?(b?)\s*$", re.I)


def parse_size(text: str | int, what: str = "size") -> int:
    """'5GB' -> 5e9, '1GiB' -> 2**30, '500M' -> 5e8, plain integers are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.match(text) if isinstance(text, str) and len(text) < 1000 else None
        if not m:
            raise UsageError(f"{what} {short(text, 60)} is not a size like 5GB, 1.5GiB or 500M")
        num, unit, binary, _ = m.groups()
        power = "kmgt".find(unit.lower()) + 1 if unit else 0
        value = int(Fraction(num) * (1024 if binary else 1000) ** power)  # exact: no float overflow
    if value <= 0:
        raise UsageError(f"{what} {short(text, 60)} must be positive")
    if value > MAX_SIZE:
        raise UsageError(f"{what} {short(text, 60)} is too large (at most 1 EiB)")
    return value
