"""The merge config: mergekit-style YAML, validated into a `MergeConfig` with one-line errors.

Errors name the key and, when the value came from YAML, its line. mergekit features we do not
support yet (`modules:`) are refused by name. Model strings (paths, Hub IDs, cache folders) are
resolved by `hub.locate`; Hub models not in the cache stay pending in `MergeConfig.pending` until
`inputs.open_inputs` downloads them (or says how to).
"""

from __future__ import annotations

import difflib
import math
import os
import stat
from dataclasses import dataclass, field
from operator import attrgetter

import yaml

from . import hub
from .errors import UsageError, printable, short
from .methods import METHODS, REQUIRED, Param
from .params import MISSING, check_shape, forms, is_filter_list, resolve
from .tokenizer import TokenizerSpec, parse_chat_template, parse_tokenizer

TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template"}
UNSUPPORTED = {
    "modules": "per-module configs are not supported; list whole models under 'models:'",
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
class SourceSpec:
    """One source of a slice: a model's layers [layer_range[0], layer_range[1])."""

    path: str
    layer_range: tuple[int, int]
    params: dict


@dataclass
class SliceSpec:
    """One output slice: its models (the base, if any, apart), and its own parameters."""

    sources: list[SourceSpec]
    base: SourceSpec | None
    params: dict
    base_model: str | None = None  # the slice's base_model (also when the method merges it as an input)


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
    slices: list[SliceSpec] | None = None  # `slices:` configs (frankenmerges, merged slices)
    donor: str | None = None  # the base_model when it is merged as an input: config.json and tokenizer come from it
    tokenizer: TokenizerSpec | None = None  # `tokenizer:` / `tokenizer_source:`: build the output vocabulary
    chat_template: str | None = None  # `chat_template:` as written (a name, `auto` or Jinja)
    pending: dict[str, hub.HubRef] = field(default_factory=dict)  # Hub models to download: key (their path) -> ref
    shown: dict[str, str] = field(default_factory=dict)  # model path -> the string the config gave for it

    def resolve(self, folders: dict[str, str]) -> None:
        """Replace pending Hub models' keys by the folders they were downloaded to."""
        def f(p):
            from .lora import key, split_key

            parts = split_key(p)  # BASE+ADAPTER: the base may be the pending one
            return key(folders.get(parts[0], parts[0]), parts[1]) if parts else folders.get(p, p)

        self.base_model = f(self.base_model) if self.base_model else None
        self.donor = f(self.donor) if self.donor else None
        for m in self.models:
            m.path = f(m.path)
        for sl in self.slices or []:
            sl.base_model = f(sl.base_model) if sl.base_model else None
            for src in sl.sources + ([sl.base] if sl.base else []):
                src.path = f(src.path)
        if self.tokenizer is not None:
            self.tokenizer = self.tokenizer.resolved(f)
        self.shown = {f(p): text for p, text in self.shown.items()}
        self.pending = {k: r for k, r in self.pending.items() if k not in folders}

    def model_paths(self) -> list[str]:
        """Every model the merge reads, once each: the base (or donor) first, then in config order."""
        paths = [p for p in (self.base_model, self.donor) if p]
        paths += [m.path for m in self.models]
        for sl in self.slices or []:
            paths += ([sl.base.path] if sl.base else []) + [src.path for src in sl.sources]
        return list(dict.fromkeys(paths))

    def method(self, seed: int = 0):
        """Instantiate the merge method with its model-wide parameters (those that cannot vary by
        tensor); everything else reaches it per tensor (`tensor_params`)."""
        cls = METHODS[self.merge_method]
        glob = {k: self.parameters.get(k, p.default) for k, p in cls.global_params.items() if not p.per_tensor}
        models = [{k: self._model_value(m, k, p, "", 0.0) for k, p in cls.model_params.items() if not p.per_tensor}
                  for m in self.models]
        return cls(glob, models, seed, bool(self.base_model))

    def tensor_params(self, tensor: str, t: float, specs: tuple | None = None, inputs: list[str] | None = None,
                      slice_params: dict | None = None) -> tuple[dict, tuple[dict, ...]]:
        """Shared and per-model parameter values for one output tensor at layer position t.
        Per-model values come from the model's (or slice source's) own specs, then the slice's,
        then the global ones, matching filters against the model's input tensor name (`inputs`);
        shared values from the slice's, then the global ones, matching the output name, as
        mergekit 0.1.5 does. `specs` defaults to the `models:` entries' parameters."""
        cls = METHODS[self.merge_method]
        scopes = [slice_params or {}, self.parameters]
        glob = {}
        for k, p in cls.global_params.items():
            glob[k] = self._value(scopes, k, p, tensor, t, None)
        models = []
        for i, own in enumerate(specs if specs is not None else [m.params for m in self.models]):
            name = inputs[i] if inputs else tensor
            models.append({k: self._value([own, *scopes], k, p, name, t, i) for k, p in cls.model_params.items()})
        return glob, tuple(models)

    def params_of(self):
        """`tensor_params` for many tensors: a function with its arguments, whose results are cached
        by what they depend on (the layer position, the parameter dicts that apply, and which of
        the config's filters each matched name contains), one copy of each set of values (most
        tensors share theirs; repr tells 1, 1.0 and True apart). Resolving every tensor of an MoE
        model afresh was a second of start-up."""
        filters = sorted(self._filters())
        cache, same = {}, {}

        def of(tensor: str, t: float, specs: tuple | None, entries: tuple, slice_params: dict | None):
            """`tensor_params` of a tensor whose models' input `entries` are given (their names
            are matched against the filters)."""
            matched = tuple([f in n for n in (tensor, *(e.name for e in entries)) for f in filters]) if filters else ()
            key = (t, None if specs is None else tuple(map(id, specs)), id(slice_params) if slice_params else 0,
                   len(entries), matched)
            got = cache.get(key)
            if got is None:
                got = self.tensor_params(tensor, t, specs, [e.name for e in entries], slice_params)
                got = cache[key] = same.setdefault(repr(got), got)
            return got

        return of

    def params_all(self, outputs: list) -> tuple[list[dict], list[tuple[dict, ...]]]:
        """`tensor_params` of every `inputs.Output` in `outputs` (the same objects `params_of`
        gives), as two columns: the shared values, and the per-model ones. Without filters in a
        `models:` config the values depend on the layer position alone: resolved once per
        position, not tensor by tensor."""
        of = self.params_of()
        if self.slices or self._filters():
            got = [of(o.name, o.t, o.specs if self.slices else None, o.models, o.slice_params) for o in outputs]
            return [g[0] for g in got], [g[1] for g in got]
        keys = list(map(attrgetter("t"), outputs))  # every output has a model entry per `models:` entry
        firsts = dict(zip(reversed(keys), reversed(outputs)))  # the first output at each position
        got = {k: of(o.name, o.t, None, o.models, o.slice_params) for k, o in firsts.items()}
        if len(got) == 1:  # one position (no layers, or no gradients that vary)
            glob, models = next(iter(got.values()))
            return [glob] * len(keys), [models] * len(keys)
        shared, per_model = {k: v[0] for k, v in got.items()}, {k: v[1] for k, v in got.items()}
        return list(map(shared.__getitem__, keys)), list(map(per_model.__getitem__, keys))

    def _filters(self) -> set[str]:
        """Every filter string of the config's parameter values ("*" and none match every name)."""
        scopes = [self.parameters] + [m.params for m in self.models]
        for sl in self.slices or []:
            scopes += [sl.params] + [src.params for src in sl.sources + ([sl.base] if sl.base else [])]
        found = set()
        for scope in scopes:
            for value in scope.values():
                if is_filter_list(value):
                    found.update(e.get("filter") for e in ([value] if isinstance(value, dict) else value))
        return found - {None, "*"}

    def _value(self, scopes: list[dict], key: str, p, tensor: str, t: float, model: int | None):
        list_valued = list in _kinds(p)
        for spec in scopes:
            if key in spec:
                v = resolve(spec[key], tensor, t, list_valued)
                if v is not MISSING:
                    return v
        if p.default is REQUIRED:
            who = "parameters" if model is None else f"models[{model}].parameters"
            raise UsageError(f"{self.source}: {who}.{key} is required for {self.merge_method}"
                             + (f" (no value for tensor {tensor!r})" if tensor else ""))
        return p.default

    def _model_value(self, m: ModelSpec, key: str, p, tensor: str, t: float):
        return self._value([m.params, self.parameters], key, p, tensor, t, 0)

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
    """A merge config from YAML text: every problem is one UsageError line naming the file, the
    line and the key. The checks are hand-written, not a pydantic model: pydantic reports a
    location path and its own wording, and mapping that back to YAML lines and these messages
    (which the tests and users rely on) would cost more code than the checks themselves."""
    data = _load_yaml(text, source)
    method, cls = _check_top(source, data)
    refs = _Models()
    base = data.get("base_model")
    base_path = refs.path(base, _where(source, data, "base_model"), "base_model") if base else None
    params = _global_params(source, data, cls)
    if "models" in data and "slices" in data:
        raise UsageError(f"{source}: give either 'models:' (whole models) or 'slices:' (layer ranges), not both")
    slices = None
    if "slices" in data:
        slices = _parse_slices(source, data, cls, method, base_path, refs)
        models = [ModelSpec(p, {}) for p in dict.fromkeys(src.path for sl in slices for src in sl.sources)]
        donor = None
        if cls.base_is_input:
            base_path, donor = None, base_path
    else:
        models, base_path, donor = _parse_models(source, data, cls, method, base_path, refs)
    dtype, out_dtype = (_dtype(source, data, key) for key in ("dtype", "out_dtype"))
    cfg = MergeConfig(method, models, base_path, dict(params), dtype, out_dtype, text, source, slices, donor,
                      _tokenizer(source, data, refs), _chat(source, data), refs.pending, refs.shown)
    _check_required(source, cfg, cls)
    return cfg


def _load_yaml(text: str, source: str):
    """The YAML document, bounded in size and value count; syntax errors name their line."""
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
    return data


def _check_top(source: str, data: dict):
    """The top-level keys, the method (name, class) and what it needs of the base model."""
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
    if cls.needs_base and not base and "slices" not in data:
        raise UsageError(f"{source}: merge_method {method!r} needs a 'base_model'")
    return method, cls


def _global_params(source: str, data: dict, cls) -> dict:
    """The top-level `parameters:` (the method's own, and model parameters as defaults)."""
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise UsageError(f"{_where(source, data, 'parameters')}: 'parameters' must be a mapping")
    allowed = {**cls.model_params, **cls.global_params}
    for k, v in params.items():
        if k not in allowed:
            raise _unknown(source, params, k, set(allowed), "parameters.")
        _check_value(source, params, k, v, allowed[k], f"parameters.{k}")
    return params


def _dtype(source: str, data: dict, key: str) -> str | None:
    v = data.get(key)
    if v is not None and (not isinstance(v, str) or v not in DTYPE_NAMES):
        raise UsageError(f"{_where(source, data, key)}: {key} {short(v)} is not one of float32, float16, bfloat16")
    return DTYPE_NAMES[v] if v else None


def _tokenizer(source: str, data: dict, refs):
    if "tokenizer_source" in data and "tokenizer" in data:
        raise UsageError(f"{_where(source, data, 'tokenizer')}: give either 'tokenizer_source' or 'tokenizer', not both")
    key = "tokenizer" if "tokenizer" in data else "tokenizer_source"
    if key not in data:
        return None
    return parse_tokenizer(data.get(key), key, lambda d, k: _where(source, data if d is None else d, k), refs.path)


def _chat(source: str, data: dict):
    if data.get("chat_template") is None:
        return None
    return parse_chat_template(data["chat_template"], _where(source, data, "chat_template"))


def _check_required(source: str, cfg: MergeConfig, cls) -> None:
    """Required parameters are given somewhere (model, slice or top level), and the method's own
    cross-parameter checks pass."""
    method, slices = cfg.merge_method, cfg.slices
    owners = [(f"models[{m.path}]", m.params, {}) for m in cfg.models] if not slices else \
        [(f"slices[{s}].sources[{j}] ({src.path})", src.params, sl.params) for s, sl in enumerate(slices)
         for j, src in enumerate(sl.sources)]
    for who, own, slice_params in owners:
        for k, p in cls.model_params.items():
            if p.default is REQUIRED and k not in own and k not in slice_params and k not in cfg.parameters:
                raise UsageError(f"{source}: {who}.parameters.{k} is required for {method}")
    for k, p in cls.global_params.items():
        if p.default is REQUIRED and k not in cfg.parameters and not all(k in sl.params for sl in slices or [SliceSpec([], None, {})]):
            raise UsageError(f"{source}: parameters.{k} is required for {method}")
    problem = cls.check_params(cfg.parameters, [m.params for m in cfg.models])
    if problem:
        raise UsageError(f"{source}: {problem}")


def _parse_models(source, data, cls, method, base_path, refs):
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
        path = refs.path(entry["model"], _where(source, entry, "model"), f"models[{i}].model")
        mparams = _model_params(source, entry, cls, f"models[{i}]")
        if path == base_path and not cls.base_is_input:
            if mparams:
                raise UsageError(f"{_where(source, entry, 'model')}: models[{i}] is the base model; it takes no parameters")
            continue  # mergekit configs often list the base among the models
        if path in seen:
            raise UsageError(f"{_where(source, entry, 'model')}: models[{i}] repeats models[{seen[path]}] ({entry['model']})")
        seen[path] = i
        models.append(ModelSpec(path, mparams))
    donor = None
    if cls.base_is_input and base_path:  # linear, karcher, passthrough: the base is one more input (last)
        if base_path not in seen:
            models.append(ModelSpec(base_path, {}))
        base_path, donor = None, base_path  # ... whose config.json and tokenizer are still the ones copied
    if not models:
        raise UsageError(f"{source}: 'models' lists no model besides the base")
    _check_count(source, cls, method, len(models), "")
    return models, base_path, donor


def _model_params(source, entry, cls, where: str) -> dict:
    """A model's (or slice source's) parameters, validated."""
    mparams = entry.get("parameters") or {}
    if not isinstance(mparams, dict):
        raise UsageError(f"{_where(source, entry, 'parameters')}: {where}.parameters must be a mapping")
    for k, v in mparams.items():
        if k not in cls.model_params:
            if k in cls.global_params:
                raise UsageError(f"{_where(source, mparams, k)}: {where}.parameters.{k} is a global parameter; "
                                 "set it under top-level (or slice) 'parameters'")
            raise _unknown(source, mparams, k, set(cls.model_params), f"{where}.parameters.")
        _check_value(source, mparams, k, v, cls.model_params[k], f"{where}.parameters.{k}")
    return dict(mparams)


def _check_count(source, cls, method, n: int, where: str) -> None:
    low, high = cls.inputs
    if n < low or (high is not None and n > high):
        want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        raise UsageError(f"{source}: {where}merge_method {method!r} takes {want} model(s) besides the base, not {n}")


def _parse_slices(source, data, cls, method, base_path, refs) -> list[SliceSpec]:
    """mergekit's `slices:`: each with `sources` (model + layer_range [+ parameters]), optional
    `parameters` and `base_model`. A base must be one of the slice's sources (mergekit does not add it)."""
    if not cls.local:
        raise UsageError(f"{_where(source, data, 'slices')}: slices are not supported for {method} (its densities "
                         "are normalised across a whole model); list whole models under 'models:'")
    raw = data["slices"]
    if not isinstance(raw, list) or not raw:
        raise UsageError(f"{_where(source, data, 'slices')}: 'slices' must be a non-empty list of {{sources: [...]}}")
    out = []
    for s, sl in enumerate(raw):
        where = f"slices[{s}]"
        if not isinstance(sl, dict):
            raise UsageError(f"{source}: {where} must be a mapping with 'sources'")
        for k in sl:
            if k not in ("sources", "parameters", "base_model", "residual_weight"):
                raise _unknown(source, sl, k, {"sources", "parameters", "base_model"}, f"{where}.")
        params = sl.get("parameters") or {}
        if not isinstance(params, dict):
            raise UsageError(f"{_where(source, sl, 'parameters')}: {where}.parameters must be a mapping")
        allowed = {**cls.model_params, **cls.global_params}
        for k, v in params.items():
            if k not in allowed:
                raise _unknown(source, params, k, set(allowed), f"{where}.parameters.")
            _check_value(source, params, k, v, allowed[k], f"{where}.parameters.{k}")
        base = sl.get("base_model", base_path)
        if base is not None and not isinstance(base, str):
            raise UsageError(f"{_where(source, sl, 'base_model')}: {where}.base_model must be a path")
        base = refs.path(base, _where(source, sl, "base_model"), f"{where}.base_model") if base else None
        sources_raw = sl.get("sources")
        if not isinstance(sources_raw, list) or not sources_raw:
            raise UsageError(f"{_where(source, sl, 'sources')}: {where}.sources must be a non-empty list")
        sources, base_src = [], None
        for j, e in enumerate(sources_raw):
            sw = f"{where}.sources[{j}]"
            if not isinstance(e, dict) or not isinstance(e.get("model"), str):
                raise UsageError(f"{source}: {sw} needs 'model: PATH' and 'layer_range: [START, END]'")
            for k in e:
                if k not in ("model", "layer_range", "parameters"):
                    raise _unknown(source, e, k, {"model", "layer_range", "parameters"}, f"{sw}.")
            lr = e.get("layer_range")
            if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                    for x in lr) or not 0 <= lr[0] < lr[1]):
                raise UsageError(f"{_where(source, e, 'layer_range') if 'layer_range' in e else source}: "
                                 f"{sw}.layer_range must be [START, END] with 0 <= START < END")
            spec = SourceSpec(refs.path(e["model"], _where(source, e, "model"), f"{sw}.model"), (lr[0], lr[1]),
                              _model_params(source, e, cls, sw))
            if base and spec.path == base and not cls.base_is_input:
                base_src = spec
                continue
            sources.append(spec)
        if cls.needs_base and base_src is None:
            raise UsageError(f"{source}: {where}: merge_method {method!r} needs its base model "
                             + (f"{base} among the slice's sources" if base else "(set base_model)"))
        _check_count(source, cls, method, len(sources), f"{where}: ")
        out.append(SliceSpec(sources, base_src, dict(params), base))
    return out


def _norm(p: str) -> str:
    """The folder (or pending Hub key) a model string names: what two strings must share to be
    the same model."""
    return hub.locate(p, "", "model").path


class _Models:
    """The model strings of one config, each resolved by `hub.locate`: which Hub models are still
    to be downloaded, and the string each path was given as (for messages and the model card)."""

    def __init__(self):
        self.pending: dict[str, hub.HubRef] = {}
        self.shown: dict[str, str] = {}

    def path(self, p: str, where: str, key: str, weights: bool = True) -> str:
        """A model string from the config: a usable name (no NUL byte, no lone surrogate), resolved."""
        try:
            if not p or "\0" in p:
                raise ValueError
            os.fsencode(p)
        except (ValueError, UnicodeEncodeError):
            raise UsageError(f"{where}: {key} {short(p)} is not a usable path") from None
        got = hub.locate(p, where, key, weights)
        if got.pending is not None:
            old = self.pending.get(got.pending.key)  # BASE+ADAPTER: the base is pending
            if old is None or (got.pending.weights and not old.weights):
                self.pending[got.pending.key] = got.pending
        self.shown.setdefault(got.path, p)
        return got.path


def _bad_number(v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return not (math.isfinite(float(v)) and abs(v) <= MAX_NUMBER)
    except OverflowError:
        return True


def _as_text(v, kinds: tuple) -> str:
    """Why a number came as text: quoted, or written as YAML 1.1 (PyYAML, as mergekit) does not
    read a float (1e-3: its floats need a '.' and a signed exponent); say how to write it."""
    if not isinstance(v, str) or float not in kinds or len(v) > 40:
        return ""
    try:
        x = float(v.replace("_", ""))
        unquoted = yaml.safe_load(v)
    except (ValueError, yaml.YAMLError):
        return ""
    if not math.isfinite(x):
        return ""
    if isinstance(unquoted, (int, float)) and not isinstance(unquoted, bool):
        return f" (a quoted number is text: write {v.strip()} without quotes)"
    import numpy as np

    text = repr(x) if 1e-4 <= abs(x) < 1e6 or x == 0 else np.format_float_scientific(x, trim="0")
    return f" (YAML reads {v} as text; write {text})"


def _kinds(spec: Param) -> tuple:
    return spec.kind if isinstance(spec.kind, tuple) else (spec.kind,)


def _check_value(src, d, key, value, spec: Param, name: str) -> None:
    """A value spec: a plain value, a gradient or a filter list (see params.py), each of whose
    values has the parameter's type and passes its check. Model-wide parameters take plain values."""
    kinds = _kinds(spec)
    list_valued = list in kinds
    plain = not (isinstance(value, list) and not list_valued) and not isinstance(value, dict)
    if not spec.per_tensor and not plain:
        raise UsageError(f"{_where(src, d, key)}: {name} is one value for the whole model; gradients and filter "
                         "lists are not accepted for it")
    problem = check_shape(value, list_valued)
    if problem:
        raise UsageError(f"{_where(src, d, key)}: {name}: {problem}")
    for v in forms(value, list_valued):
        ok = isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds)
        if not ok:
            want = " or ".join(dict.fromkeys("number" if k in (int, float) else k.__name__ for k in kinds))
            raise UsageError(f"{_where(src, d, key)}: {name} must be a {want}, not {short(v)}{_as_text(v, kinds)}")
        if any(_bad_number(x) for x in (v if isinstance(v, list) else [v])):
            raise UsageError(f"{_where(src, d, key)}: {name} = {short(v)} must be finite, within +-{MAX_NUMBER:g}")
        if spec.check:
            problem = spec.check(v)
            if problem:
                raise UsageError(f"{_where(src, d, key)}: {name} = {short(v)} {problem}")


def parse_size(text: str | int, what: str = "size") -> int:
    """'5GB' -> 5e9, '1GiB' -> 2**30, '500M' -> 5e8, plain integers are bytes: dask's
    `parse_bytes` (imported here: dask costs 0.3 s at start-up), which must see a number first."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        from dask.utils import parse_bytes

        try:
            if not isinstance(text, str) or len(text) > 100 or not text.strip()[:1].isdigit():
                raise ValueError
            value = parse_bytes(text)
        except (ValueError, OverflowError):
            raise UsageError(f"{what} {short(text, 60)} is not a size like 5GB, 1.5GiB or 500M") from None
    if value <= 0:
        raise UsageError(f"{what} {short(text, 60)} must be positive")
    if value > MAX_SIZE:
        raise UsageError(f"{what} {short(text, 60)} is too large (at most 1 EiB)")
    return value
