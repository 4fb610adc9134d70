"""Output vocabularies and embedding rows, with mergekit 0.1.5's semantics.

A `tokenizer:` block (`source: union | base | MODEL`, `tokens:`, `pad_to_multiple_of:`) or the
older `tokenizer_source:` builds an output tokenizer; `chat_template:` sets its chat template.

1. **The output vocabulary** is built by transformers (`AutoTokenizer`), exactly as mergekit
   builds it, in a child process (`hf_child`) so the merge process never imports torch:
   the base model's tokenizer (the config's base model, else the first model), stripped of tokens
   at or above its config's `vocab_size`; for `union`, every other model's tokens it lacks are
   added after it (regular tokens, then each model's added tokens, first settings win); for `base`
   it is the base's; for a model, that model's. Then the `tokens:` keys it lacks are added, the chat
   template set, and the files `save_pretrained` writes are kept for the output folder. mergekit
   visits the models in the order of a Python set and each vocabulary in hash order, so where
   several models add tokens its token ids vary from run to run; we visit them in config order and
   each vocabulary by token id.
2. **For every model, a permutation**: output token id -> its row in that model (-1 if absent).
3. **Embedding rows** (every tensor indexed by token along its first axis: input embeddings,
   `lm_head`, ...; `is_vocab_tensor`). For output token j and input model i, the merge reads i's
   own row where i has the token (unless the token's config says `force`); otherwise the token's
   default row: the `tokens:` entry's source if given (a model's row for it, a given row of a model
   (`kind: model_token`), or zeros (`kind: zero`)); else, automatically, the row of the only model
   that has it, zeros if none has it, the base's row if the base has it, or else the mean of the
   rows of the models that have it. With `pad_to_multiple_of`, rows past the vocabulary are each
   model's mean row. Tied embeddings need nothing: there is no `lm_head` tensor to remap.
4. **Streaming**: a remapped input is a `RemappedEntry`, a tensor entry of the output's shape whose
   `remap.read(lo, hi, out)` fills a work unit's buffer for the flat element range [lo, hi) (whole
   rows) with positional reads of the source rows (one read per run of consecutive rows) and the
   few precomputed default rows. No embedding matrix is ever held whole.

Default rows that are computed (means) are computed in float32, in model order, as mergekit does
with `dtype: float32`, and stored in the checkpoints' dtype; the padding mean is accumulated in
float64 and rounded once (mergekit takes torch's float32 mean: the two agree to float32 rounding).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field, replace

from .checkpoint.format import TensorEntry
from .errors import InputError, UsageError, short

log = logging.getLogger("dppa_stream")

SOURCES = ("union", "base")
# Tensors indexed by token along their first axis, outside the block stacks: the names mergekit's
# architecture definitions give a vocabulary axis (input embeddings, output heads and their biases).
_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|tok_embeddings|wte|word_embeddings|embed_in|embed_out|lm_head|"
                    r"output|output_layer|vocab_projector|shared|embeddings)(?:\.linear|\.decoder)?\.(?:weight|bias)$")
_BLOCK = re.compile(r"\.[0-9]+\.")


def is_vocab_tensor(name: str) -> bool:
    """A tensor with one row per token (first axis): input embeddings, output heads, their biases."""
    return bool(_VOCAB.search(name)) and not _BLOCK.search("." + name)


# --- the config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default row comes from: `model` (that model's row for the token),
    `model_token` (row `token_id`, or the row of `token` in that model's own vocabulary) or `zero`."""

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenSpec:
    source: TokenSource | None  # None: the automatic rule
    force: bool = False  # use the default row even in models that have the token


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # "union", "base" or a model's path
    tokens: tuple[tuple[str, TokenSpec], ...] = ()  # in config order
    pad_to_multiple_of: int | None = None

    def resolved(self, f) -> "TokenizerSpec":
        """The spec with model paths mapped through `f` (pending Hub keys -> folders)."""
        def src(s):
            return replace(s, model=f(s.model)) if s is not None and s.model else s

        return TokenizerSpec(self.source if self.source in SOURCES else f(self.source),
                             tuple((t, replace(ts, source=src(ts.source))) for t, ts in self.tokens),
                             self.pad_to_multiple_of)


def parse_tokenizer(value, key: str, where, model_path) -> TokenizerSpec | None:
    """`tokenizer_source: union | base | MODEL` or `tokenizer: {source, tokens, pad_to_multiple_of}`,
    as mergekit 0.1.5 reads them. `where(mapping, key)` gives a key's config line, `model_path(text,
    where, key, weights)` resolves a model string."""
    here = where(None, key)
    if key == "tokenizer_source":
        if not isinstance(value, str) or not value:
            raise UsageError(f"{here}: tokenizer_source must be union, base or a model, not {short(value)}")
        return TokenizerSpec(value if value in SOURCES else model_path(value, here, key, False))
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UsageError(f"{here}: 'tokenizer' must be a mapping with source, tokens and pad_to_multiple_of")
    for k in value:
        if k not in ("source", "tokens", "pad_to_multiple_of"):
            raise UsageError(f"{where(value, k)}: unknown key tokenizer.{short(k)} (allowed: pad_to_multiple_of, "
                             "source, tokens)")
    source = value.get("source", "union")
    if not isinstance(source, str) or not source:
        raise UsageError(f"{where(value, 'source')}: tokenizer.source must be union, base or a model, not {short(source)}")
    if source not in SOURCES:
        source = model_path(source, where(value, "source"), "tokenizer.source", False)
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 < pad <= 1 << 20):
        raise UsageError(f"{where(value, 'pad_to_multiple_of')}: tokenizer.pad_to_multiple_of must be a positive "
                         f"integer, not {short(pad)}")
    tokens = value.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise UsageError(f"{where(value, 'tokens')}: tokenizer.tokens must map tokens to {{source, force}}")
    specs = []
    for tok, spec in tokens.items():
        w = where(tokens, tok)
        if not isinstance(tok, str) or not tok:
            raise UsageError(f"{w}: tokenizer.tokens: {short(tok)} is not a token (a string)")
        specs.append((tok, _token_spec(tok, spec or {}, w, where, model_path)))
    return TokenizerSpec(source, tuple(specs), pad)


def _token_spec(tok: str, spec, w: str, where, model_path) -> TokenSpec:
    name = f"tokenizer.tokens[{short(tok)}]"
    if not isinstance(spec, dict):
        raise UsageError(f"{w}: {name} must be a mapping with 'source' and/or 'force'")
    for k in spec:
        if k not in ("source", "force"):
            raise UsageError(f"{where(spec, k)}: unknown key {name}.{short(k)} (allowed: force, source)")
    force = spec.get("force", False)
    if not isinstance(force, bool):
        raise UsageError(f"{where(spec, 'force')}: {name}.force must be true or false")
    src = spec.get("source")
    if src is None:
        return TokenSpec(None, force)
    ws = where(spec, "source")
    if isinstance(src, str):
        return TokenSpec(TokenSource("model", model_path(src, ws, f"{name}.source")), force)
    if not isinstance(src, dict) or src.get("kind") not in ("model_token", "zero"):
        raise UsageError(f"{ws}: {name}.source must be a model, {{kind: zero}} or "
                         "{kind: model_token, model: MODEL, token_id: N | token: TEXT}")
    allowed = {"kind"} | ({"model", "token_id", "token"} if src["kind"] == "model_token" else set())
    for k in src:
        if k not in allowed:
            raise UsageError(f"{where(src, k)}: unknown key {name}.source.{short(k)} (allowed: {', '.join(sorted(allowed))})")
    if src["kind"] == "zero":
        return TokenSpec(TokenSource("zero"), force)
    model, tid, text = src.get("model"), src.get("token_id"), src.get("token")
    if not isinstance(model, str) or not model:
        raise UsageError(f"{ws}: {name}.source.model is required for kind: model_token")
    if (tid is None) == (text is None):
        raise UsageError(f"{ws}: {name}.source needs exactly one of token_id and token")
    if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < 1 << 40):
        raise UsageError(f"{ws}: {name}.source.token_id must be a non-negative integer, not {short(tid)}")
    if text is not None and not isinstance(text, str):
        raise UsageError(f"{ws}: {name}.source.token must be a string, not {short(text)}")
    return TokenSpec(TokenSource("model_token", model_path(model, where(src, "model"), f"{name}.source.model"), tid,
                                 text), force)


# Conversation formats for `chat_template: NAME` (mergekit's names). Each renders the format its
# name stands for; the Jinja text is ours (tests compare the rendered conversations with mergekit's).
CHAT_TEMPLATES = {
    "chatml": ("{%- for m in messages -%}{{- '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' -}}"
               "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"),
    "llama3": ("{%- for m in messages -%}{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
               "{{- '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ "
               "'<|eot_id|>\\n' -}}{%- endfor -%}"
               "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"),
    "mistral": ("{%- set turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages -%}"
                "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none -%}"
                "{{- bos_token -}}{%- for m in turns -%}"
                "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
                "{{- raise_exception('roles must alternate user, assistant, user, ... after an optional system message') -}}"
                "{%- endif -%}{%- if m['role'] == 'user' -%}"
                "{{- ' [INST] ' ~ (system ~ '\\n\\n' if loop.first and system is not none else '') ~ m['content'] ~ ' [/INST]' -}}"
                "{%- elif m['role'] == 'assistant' -%}{{- ' ' ~ m['content'] ~ eos_token -}}"
                "{%- else -%}{{- raise_exception('only user and assistant roles, after an optional system message') -}}"
                "{%- endif -%}{%- endfor -%}"),
    "alpaca": ("{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
               "{{- (systems | last).content | trim if systems else '' -}}{{- '\\n\\n' -}}"
               "{%- for m in messages -%}"
               "{%- set head = {'user': '### Instruction:', 'assistant': '### Response:', 'user_context': '### Input:'}"
               ".get(m['role']) -%}"
               "{%- if head -%}{{- head ~ '\\n' ~ (m['content'] | trim) -}}{{- '\\n\\n' if not loop.last else '' -}}"
               "{%- endif -%}{%- endfor -%}"
               "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\\n' -}}"
               "{%- endif -%}"),
    "exaone": ("{%- for m in messages -%}{%- if loop.first and m['role'] != 'system' -%}"
               "{{- '[|system|][|endofturn|]\\n' -}}{%- endif -%}"
               "{{- '[|' ~ m['role'] ~ '|]' ~ m['content'] ~ ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') -}}"
               "{%- endfor -%}{%- if add_generation_prompt -%}{{- '[|assistant|]' -}}{%- endif -%}"),
}


def parse_chat_template(value, where: str) -> str:
    """`chat_template:` checked as mergekit checks it: `auto`, a format name, or a Jinja template."""
    if not isinstance(value, str):
        raise UsageError(f"{where}: chat_template must be auto, a name ({', '.join(CHAT_TEMPLATES)}) or a Jinja template")
    named = len(value) < 256 and "\n" not in value and "{" not in value
    if value != "auto" and not (named and value in CHAT_TEMPLATES) and (len(value) < 20 or "{" not in value):
        raise UsageError(f"{where}: chat_template {short(value)} is not auto, a known name "
                         f"({', '.join(CHAT_TEMPLATES)}) or a Jinja template")
    return value


# --- the output vocabulary (built in the child process) -------------------------------------------


@dataclass
class Vocabulary:
    """The output tokenizer and how each model's rows map onto it."""

    size: int  # tokens in the output tokenizer
    rows: int  # output rows: size padded to pad_to_multiple_of
    perms: dict[str, "object"]  # model path -> int64 array [size]: the model's row for each output token, -1 absent
    token_ids: dict[str, int]  # `tokens:` keys -> output id
    lookups: dict[tuple[str, str], int]  # (model path, token text) of model_token sources -> that model's row
    files: dict[str, bytes] = field(default_factory=dict)  # the output tokenizer's files, as save_pretrained wrote them
    stamps: list = field(default_factory=list)  # the tokenizer files read, to check they did not change


def config_vocab_size(config: dict | None) -> int | None:
    """The vocabulary size a config.json declares (top level, or its text model's)."""
    if not isinstance(config, dict):
        return None
    v = config.get("vocab_size")
    if v is None and isinstance(config.get("text_config"), dict):
        v = config["text_config"].get("vocab_size")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def build(cfg, checkpoints: dict, base: str) -> Vocabulary | None:
    """Run the child that builds the output tokenizer (`cfg.tokenizer` and/or `cfg.chat_template`)
    and read back its result. `checkpoints`: path -> Checkpoint of every model the merge reads;
    `base`: the model whose tokenizer is the starting point. None when the config asks for neither."""
    import numpy as np

    from .checkpoint.reader import Stamp, open_regular, resolve_inside
    from .hf_child import run_child
    from .hf_files import TOKENIZER_FILES

    spec = cfg.tokenizer
    if spec is None and cfg.chat_template is None:
        return None
    models = list(checkpoints)
    if spec is not None and spec.source not in SOURCES and spec.source not in models:
        models.append(spec.source)  # a tokenizer source that is not merged: only its tokenizer is read
    folders = {}
    for m in models:
        ck = checkpoints.get(m)
        folder = ck.folder if ck is not None else m
        if folder is None:
            raise InputError(f"{m}: a bare safetensors file has no tokenizer; give its model folder to merge "
                             "vocabularies")
        folders[m] = folder
    stamps = []  # the files transformers will read, checked under the symlink policy first
    for folder in dict.fromkeys(folders.values()):
        for name in TOKENIZER_FILES:
            p = os.path.join(folder, name)
            if os.path.lexists(p):
                fd, st = open_regular(resolve_inside(folder, name, p), p)
                try:
                    stamps.append(Stamp.take(p, fd, st))
                finally:
                    os.close(fd)
    sizes = {m: config_vocab_size(checkpoints[m].read_config() if m in checkpoints else None) for m in models}
    with tempfile.TemporaryDirectory(prefix="dppa-stream-tokenizer-") as tmp:
        payload = {
            "base": folders[base], "models": [folders[m] for m in models], "sizes": [sizes[m] for m in models],
            "source": None if spec is None else (spec.source if spec.source in SOURCES else folders[spec.source]),
            "add_tokens": [t for t, _ in spec.tokens] if spec else [],
            "lookups": [[folders[ts.source.model], ts.source.token] for _, ts in (spec.tokens if spec else ())
                        if ts.source is not None and ts.source.kind == "model_token" and ts.source.token is not None],
            "chat_template": CHAT_TEMPLATES.get(cfg.chat_template, cfg.chat_template),
            "out": os.path.join(tmp, "out"), "perms": os.path.join(tmp, "perms.npy"),
        }
        res = run_child("tokenizer", payload)
        for w in res.get("warnings", []):
            log.warning("tokenizer: %s", w)
        files = {}
        for name in sorted(os.listdir(payload["out"])):
            with open(os.path.join(payload["out"], name), "rb") as f:
                files[name] = f.read()
        perms_all = np.load(payload["perms"]) if spec is not None else None
    if spec is None:
        return Vocabulary(0, 0, {}, {}, {}, files, stamps)
    size = int(res["size"])
    pad = spec.pad_to_multiple_of
    rows = -(-size // pad) * pad if pad else size
    perms = {m: perms_all[i] for i, m in enumerate(models)}
    lookups = {}
    for (folder, text), row in zip(payload["lookups"], res["lookups"]):
        model = next(m for m in models if folders[m] == folder)
        if row is None:
            raise UsageError(f"{cfg.source}: tokenizer.tokens: token {short(text)} is not in the vocabulary of {model}")
        lookups[(model, text)] = row
    return Vocabulary(size, rows, perms, dict(zip(payload["add_tokens"], res["token_ids"])), lookups, files, stamps)


def child_build(p: dict) -> dict:
    """In the child process: build the output tokenizer with transformers, as mergekit 0.1.5 does
    (see the module docstring), save it to p["out"] and the permutations to p["perms"]."""
    import numpy as np
    import tokenizers
    from transformers import AutoTokenizer

    warnings: list[str] = []
    sizes = dict(zip(p["models"], p["sizes"]))
    base = _stripped(p["base"], sizes.get(p["base"]), AutoTokenizer, tokenizers)
    loaded = {p["base"]: base}
    for m in p["models"]:
        if m in loaded:
            continue
        try:
            loaded[m] = AutoTokenizer.from_pretrained(m)
        except Exception as e:  # as mergekit: a model without a usable tokenizer shares the base's
            warnings.append(f"cannot load the tokenizer of {m} ({type(e).__name__}: {str(e)[:200]}); "
                            "assuming it is the base model's")
    if p["source"] is None:  # chat_template alone: the donor's tokenizer, re-saved with it
        out = AutoTokenizer.from_pretrained(p["base"])
    elif p["source"] == "base":
        out = base
    elif p["source"] == "union":
        out = _union(base, loaded, sizes, AutoTokenizer, warnings)
    else:
        out = AutoTokenizer.from_pretrained(p["source"])
    have = set(out.get_vocab())
    for tok in p["add_tokens"]:
        if tok not in have:
            out.add_tokens(tok)
            have.add(tok)
    if p["chat_template"]:
        template = p["chat_template"]
        if template == "auto":
            template = _plurality_template(p["models"], AutoTokenizer, warnings)
        if template:
            out.chat_template = template
    out.save_pretrained(p["out"], safe_serialization=True)
    if p["source"] is None:
        return {"warnings": warnings}
    vocab = out.get_vocab()
    originals = {m: t.get_vocab() for m, t in loaded.items()}  # (each get_vocab copies the whole vocabulary)
    perms = np.full((len(p["models"]), len(vocab)), -1, np.int64)
    for i, m in enumerate(p["models"]):
        own = originals.get(m) or originals[p["base"]]
        limit = sizes.get(m) or len(own)
        for tok, new in vocab.items():
            old = own.get(tok)
            if old is not None and old >= limit:
                warnings.append(f"{m}: token {tok!r} has id {old}, past its vocab_size {limit} (padding?); not used")
            elif old is not None:
                perms[i, new] = old
    np.save(p["perms"], perms)
    return {"size": len(vocab), "token_ids": [vocab[t] for t in p["add_tokens"]],
            "lookups": [originals.get(m, {}).get(text) for m, text in p["lookups"]], "warnings": warnings[:50]}


def _stripped(path: str, size: int | None, AutoTokenizer, tokenizers):
    """The base tokenizer without the tokens whose id is at or past the model's vocab_size (their
    rows do not exist); only BPE tokenizers can be stripped (mergekit's rule)."""
    tok = AutoTokenizer.from_pretrained(path, use_fast=True)
    vocab = tok.get_vocab()
    limit = size or len(vocab)
    unused = {t for t, i in vocab.items() if i >= limit}
    if not unused:
        return tok
    if not tok.is_fast:
        raise RuntimeError(f"{path}: its tokenizer has tokens past vocab_size {limit} and no fast version to strip them from")
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise RuntimeError(f"{path}: its {data['model']['type']} tokenizer has tokens past vocab_size {limit}; only BPE "
                           "tokenizers can be stripped of them")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < limit]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) and merge.count(" ") == 1 else merge
        if not isinstance(parts, list):
            raise RuntimeError(f"{path}: unexpected BPE merge {merge!r}")
        return not any(t in unused for t in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union(base, loaded: dict, sizes: dict, AutoTokenizer, warnings: list):
    """The base tokenizer plus every other model's tokens it lacks: regular tokens first (model by
    model, by id), then added tokens (first settings win)."""
    regular: dict[str, None] = {}
    added: dict[str, object] = {}
    for m, tok in loaded.items():
        limit = sizes.get(m) or tok.vocab_size
        for text, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < limit:
                regular.setdefault(text)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= limit:
                continue
            if info.content in added:
                if added[info.content] != info:
                    warnings.append(f"token {info.content!r} is added with different settings by several models; "
                                    "the first model's are used")
                continue
            added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a fresh copy: the base tokenizer itself stays as it is
        base.save_pretrained(tmp, legacy_format=False, safe_serialization=True)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    have = base.get_vocab()
    for text in regular:
        if text not in added and text not in have:
            out.add_tokens(text)
    for info in added.values():
        out.add_tokens(info)
    return out


def _plurality_template(models: list[str], AutoTokenizer, warnings: list) -> str | None:
    """`chat_template: auto`: the template most models share (ties: the first in config order)."""
    from collections import Counter

    found = []
    for m in models:
        try:
            t = AutoTokenizer.from_pretrained(m).chat_template
        except Exception as e:
            warnings.append(f"cannot load the tokenizer of {m} for chat_template: auto ({type(e).__name__})")
            continue
        if isinstance(t, dict):
            t = t.get("default")
        if t:
            found.append(t.strip())
    return Counter(found).most_common(1)[0][0] if found else None


# --- embedding rows ------------------------------------------------------------------------------


class RowRemap:
    """One input of a remapped tensor: for each output row, a source (an entry of the tensor's
    inputs and its row) or one of a few precomputed rows. `read` fills a unit's buffer."""

    def __init__(self, sources: tuple, src, row, row_numel: int, itemsize: int):
        self.sources = sources  # the tensor's input entries (as stored)
        self.src = src  # int8 [rows]: index into sources, or -1: row[j] indexes `made`
        self.row = row  # int64 [rows]
        self.row_numel, self.itemsize = row_numel, itemsize
        self.made = None  # uint8 [k, row bytes]: the computed rows (means, zeros), set by `compute_rows`
        self.made_plan: _Made | None = None  # what those rows are

    def read(self, lo: int, hi: int, out) -> None:
        """Output elements [lo, hi) (whole rows) of this input into the byte buffer `out`."""
        import numpy as np

        r0, r1 = lo // self.row_numel, hi // self.row_numel
        if r1 <= r0:
            return
        rb = self.row_numel * self.itemsize
        src, row = self.src[r0:r1], self.row[r0:r1]
        brk = np.flatnonzero((src[1:] != src[:-1]) | ((src[1:] >= 0) & (row[1:] != row[:-1] + 1))) + 1
        starts = [0, *brk.tolist()]
        for a, b in zip(starts, [*starts[1:], r1 - r0]):
            s = int(src[a])
            if s >= 0:
                _read(self.sources[s], int(row[a]) * self.row_numel, (int(row[a]) + b - a) * self.row_numel,
                      out[a * rb:b * rb])
            else:
                out[a * rb:b * rb] = self.made[row[a:b]].reshape(-1)


def _read(entry, lo: int, hi: int, buf) -> None:
    """An input's stored elements [lo, hi): raw bytes, or a LoRA-adapted input's rows (lora.py)."""
    if getattr(entry, "factors", None) is not None:
        from .sources import source

        source(entry).read_raw(lo, hi, buf)
    else:
        from .checkpoint import read_range

        read_range(entry, lo, hi, buf)


class RemappedEntry(TensorEntry):
    """A tensor entry of the output's shape whose rows are read through `remap` (UnitRows asks).
    `remap` lives in the instance's dict (a named tuple's subclass cannot add fields)."""

    remap: RowRemap | None

    def __new__(cls, name, dtype, shape, file, offset, nbytes, file_id=(), remap=None):
        self = tuple.__new__(cls, (name, dtype, shape, file, offset, nbytes, file_id))
        self.remap = remap
        return self


def remapped(entry: TensorEntry, rows: int, remap: RowRemap) -> RemappedEntry:
    """`entry` with `rows` rows along its first axis, read through `remap`."""
    return RemappedEntry(entry.name, entry.dtype, (rows, *entry.shape[1:]), entry.file, entry.offset,
                         rows * entry.row_numel * entry.itemsize, entry.file_id, remap)


@dataclass
class _Made:
    """The computed rows of one remapped tensor, in float32 until `compute_rows` stores them."""

    size: int  # rows of the vocabulary (the padding rows follow)
    means: list = field(default_factory=list)  # (made index, [(input, row), ...]): a token's mean row
    pads: list = field(default_factory=list)  # (made index, input): the input's mean row (padding)
    count: int = 0  # made rows; those neither a mean nor a padding row are zeros

    def add(self) -> int:
        self.count += 1
        return self.count - 1


def remap_inputs(name: str, entries: tuple, paths: tuple, vocab: Vocabulary, spec: TokenizerSpec,
                 base: int | None) -> tuple:
    """The entries of one vocabulary tensor's inputs remapped onto the output vocabulary (see the
    module docstring). `paths[i]` is the model of `entries[i]`; `base` the index of the base model
    among them, if it is one. Inputs that need no remap (same vocabulary, same rows) stay as they
    are. The computed rows are filled in by `compute_rows`."""
    import numpy as np

    size, rows = vocab.size, vocab.rows
    perms = np.stack([vocab.perms[p] for p in paths])
    for i, e in enumerate(entries):
        top = int(perms[i].max(initial=-1))
        if top >= e.rows:
            raise InputError(f"{e.file}: tensor {short(name)} has {e.rows} rows but the tokenizer of {paths[i]} has "
                             f"token id {top}; the checkpoint and its tokenizer do not match")
    present = perms >= 0
    force = np.zeros(size, bool)
    chosen: dict[int, TokenSource] = {}
    for tok, ts in spec.tokens:
        j = vocab.token_ids[tok]
        force[j] |= ts.force
        if ts.source is not None:
            chosen[j] = ts.source
    made = _Made(size)
    zero: list[int] = []
    default_src, default_row = np.full(size, -2, np.int64), np.zeros(size, np.int64)

    def made_row(j: int, k: int) -> None:
        default_src[j], default_row[j] = -1, k

    def zero_row(j: int) -> None:
        if not zero:
            zero.append(made.add())
        made_row(j, zero[0])

    for j in np.flatnonzero(~present.all(axis=0) | force).tolist():
        has = np.flatnonzero(present[:, j])
        source = chosen.get(j)
        if source is None:  # mergekit's automatic choice
            if len(has) == 1:
                default_src[j], default_row[j] = has[0], perms[has[0], j]
            elif len(has) == 0:
                zero_row(j)
            elif base is not None and present[base, j]:
                default_src[j], default_row[j] = base, perms[base, j]
            else:
                k = made.add()
                made.means.append((k, [(int(i), int(perms[i, j])) for i in has]))
                made_row(j, k)
        elif source.kind == "zero":
            zero_row(j)
        else:
            m = _input_of(source.model, paths, name, j, vocab)
            if source.kind == "model":
                if perms[m, j] < 0:
                    raise UsageError(f"tokenizer.tokens[{short(_token(vocab, j))}]: {source.model} has no such token "
                                     "to take its row from")
                row = int(perms[m, j])
            else:
                row = source.token_id if source.token_id is not None else vocab.lookups[(source.model, source.token)]
                if row >= entries[m].rows:
                    raise UsageError(f"tokenizer.tokens[{short(_token(vocab, j))}]: row {row} is past the "
                                     f"{entries[m].rows} rows of {short(name)} in {source.model}")
            default_src[j], default_row[j] = m, row
    out = []
    for i, e in enumerate(entries):
        src = np.full(rows, -1, np.int8)
        row = np.zeros(rows, np.int64)
        own = present[i] & ~force
        src[:size] = np.where(own, i, default_src)
        row[:size] = np.where(own, perms[i], default_row)
        if rows > size:
            k = made.add()
            made.pads.append((k, i))
            row[size:] = k
        if rows == e.rows and (src == i).all() and (row == np.arange(rows)).all():
            out.append(e)  # this input's rows are already the output's
            continue
        out.append(remapped(e, rows, RowRemap(tuple(entries), src, row, e.row_numel, e.itemsize)))
    for e in out:
        if isinstance(e, RemappedEntry):
            e.remap.made_plan = made
    return tuple(out)


def _input_of(model: str, paths: tuple, name: str, j: int, vocab: Vocabulary) -> int:
    if model not in paths:
        raise UsageError(f"tokenizer.tokens[{short(_token(vocab, j))}]: takes its row from {model}, which is not one of "
                         f"the inputs of tensor {short(name)}")
    return paths.index(model)


def _token(vocab: Vocabulary, j: int) -> str:
    return next((t for t, i in vocab.token_ids.items() if i == j), f"#{j}")


def compute_rows(entries: tuple) -> None:
    """Compute the rows a remapped tensor's inputs share (token means, zeros) and each input's
    padding mean, reading only the rows they need (the padding mean streams the input's rows in
    blocks of at most 8 MiB)."""
    import numpy as np

    from . import kernels

    remaps = [e.remap for e in entries if isinstance(e, RemappedEntry)]
    if not remaps:
        return
    plan: _Made = remaps[0].made_plan
    e0 = next(e for e in entries if isinstance(e, RemappedEntry))
    n, code, container = e0.row_numel, kernels.CODES[e0.dtype], kernels.CONTAINER[e0.dtype]
    made32 = np.zeros((plan.count, n), np.float32)
    raw = np.empty(n * e0.itemsize, np.uint8)

    def row32(entry, r: int):
        _read(entry, r * entry.row_numel, (r + 1) * entry.row_numel, raw)
        out = np.empty(n, np.float32)
        kernels.widen_block(raw.view(container), code, 0, n, out)
        return out

    sources = remaps[0].sources
    for k, parts in plan.means:  # as mergekit: a float32 sum in input order, divided by the count
        acc = np.zeros(n, np.float32)
        for i, r in parts:
            acc = acc + row32(sources[i], r)
        made32[k] = acc / np.float32(len(parts))
    made = np.empty((plan.count, n * e0.itemsize), np.uint8)
    for k in range(plan.count):
        kernels.narrow_block(made32[k], n, made[k].view(container), 0, code)
    for r in remaps:
        r.made = made
    size, row_bytes = plan.size, n * e0.itemsize
    block = max(1, (8 << 20) // max(1, row_bytes))
    for k, i in plan.pads:  # each input's mean over its remapped vocabulary rows
        total = np.zeros(n, np.float64)
        buf = np.empty(min(block, size) * row_bytes, np.uint8)
        wide = np.empty(min(block, size) * n, np.float32)
        for a in range(0, size, block):
            b = min(size, a + block)
            view = buf[:(b - a) * row_bytes]
            entries[i].remap.read(a * n, b * n, view)
            kernels.widen_block(view.view(container), code, 0, (b - a) * n, wide)
            total += wide[:(b - a) * n].reshape(b - a, n).sum(axis=0, dtype=np.float64)
        kernels.narrow_block((total / size).astype(np.float32), n, made[k].view(container), 0, code)
