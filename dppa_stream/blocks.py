"""Which tensors are the transformer-block linears that DP prunes, for any Hugging Face architecture.

The reference DPPA code prunes the `nn.Linear` weights found by a module walk of
`model.model.layers[i]`. A streaming merger only sees tensor names and shapes, so this module
rebuilds that set from them (and from config.json where it helps):

- **Stacks.** A block is `<prefix>.<stack>.<N>.` with `<stack>` one of `layers`, `h`, `layer`,
  `block`, `blocks` and `<prefix>` anything (or nothing: GPT2Model's `h.0.`). The outermost such
  occurrence in a name wins (T5's `encoder.block.3.layer.1.DenseReluDense.wi.weight` is block 3 of
  stack `encoder.block`). A stack is named by its full prefix, so an encoder and a decoder, or a
  vision tower and a language model, keep separate blocks.
- **Linears.** Every tensor with >= 2 dimensions inside a block, except biases (names ending in
  `bias`, 2-D `*_bias` expert biases included), norms (`norm`, `ln_*`, `layer_norm` in the module
  path), embedding tables (`embed`, T5's `relative_attention_bias`, ...) and MoE routers.
- **Fused experts.** A 3-D `[E, a, b]` tensor under an `experts` module (or whose first dimension is
  config.json's expert count) is E linears, expert e being the flat element span
  `[e*a*b, (e+1)*a*b)`, which is what the reference would see as Mixtral's per-expert `nn.Linear`.
  A 2-D tensor under an `experts` module without a per-expert index (DBRX's `[E*f, d]`) is split the
  same way when config.json gives E and divides its first dimension. Other >= 3-D weights (conv
  kernels) are one linear each.
- **Routers** (`router` modules; `gate`/`gating`/`wg` modules of `[E, hidden]` in a MoE block;
  shared-expert gates) are not pruned and are reported separately: see docs/architectures.md.

`linear_filter` (a regex) overrides the detection: see `find_blocks`.

Pass only floating-point tensors (quantised blocks and scales are not weights DP can prune).
This module does not import torch and handles 100k names in about half a second on a slow
machine: the per-name work is one regex search plus a cached classification of the name's
in-block suffix.
"""

from __future__ import annotations

import gc
import re
from collections import Counter
from itertools import compress
from operator import itemgetter, not_
from dataclasses import dataclass
from math import prod

__all__ = ["Linear", "Stack", "BlockMap", "find_blocks", "STACK_NAMES", "KINDS"]

STACK_NAMES = ("layers", "h", "layer", "block", "blocks")
KINDS = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down", "fc_in", "fc_out",
         "expert_gate_up", "expert_down", "expert", "attn", "mlp", "other")

# Leftmost match = outermost stack. The block must have something under it (`h.0.` not `h.0`).
_STACK_RE = re.compile(r"(?:^|\.)(?:" + "|".join(STACK_NAMES) + r")\.([0-9]+)\.")
# A name's head up to and including `_STACK_RE`'s leftmost match (`model.layers.7.`), else "": the
# prefix grows a whole `segment.` at a time, shortest first, and the match always succeeds
_HEAD_RE = re.compile(r"(?:(?:[^.]*\.)*?(?:" + "|".join(STACK_NAMES) + r")\.[0-9]+\.)?")
_INDEXED_RE = re.compile(r"(?:^|\.)([^.]+)\.([0-9]+)\.")  # any `<name>.<int>.`: for suggestions
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_ROUTER_LEAVES = {"gate", "gating", "wg", "router", "gate_network"}


@dataclass(frozen=True, slots=True)
class Linear:
    """One DP linear: a whole 2-D weight, one expert of a fused expert tensor, or a conv kernel."""

    tensor: str  # the tensor's full name
    stack: str  # e.g. "model.layers", "encoder.block", "h"
    block: int  # block index inside the stack
    span: tuple[int, int]  # flat element range [start, stop) inside the tensor
    shape: tuple[int, int]  # the 2-D matrix of this linear
    kind: str  # one of KINDS, for plots
    label: str  # short human label, e.g. "self_attn.q_proj" or "mlp.experts.gate_up_proj[3]"

    @property
    def numel(self) -> int:
        return self.span[1] - self.span[0]


@dataclass
class Stack:
    name: str
    blocks: list[int]


@dataclass
class BlockMap:
    linears: list[Linear]
    stacks: list[Stack]
    routers: list[str]

    def by_tensor(self) -> dict[str, list[Linear]]:
        out: dict[str, list[Linear]] = {}
        for lin in self.linears:
            out.setdefault(lin.tensor, []).append(lin)
        return out

    def by_block(self) -> dict[tuple[str, int], list[Linear]]:
        out: dict[tuple[str, int], list[Linear]] = {}
        for lin in self.linears:
            out.setdefault((lin.stack, lin.block), []).append(lin)
        return out

    def block_key(self, linear: Linear) -> tuple[str, int]:
        return (linear.stack, linear.block)


# -- classification of the in-block suffix ----------------------------------------------------

def _expert_counts(config) -> frozenset[int]:
    """Every expert count config.json states, nested configs (text_config, ffn_config, ...) included."""
    found: set[int] = set()

    def walk(d, depth):
        if not isinstance(d, dict) or depth > 4:
            return
        for k, v in d.items():
            if k in _EXPERT_KEYS and isinstance(v, int) and not isinstance(v, bool) and v > 0:
                found.add(v)
            elif isinstance(v, dict):
                walk(v, depth + 1)

    walk(config, 0)
    return frozenset(found)


def _modules(label: str) -> tuple[list[str], str]:
    """Module path and leaf module of an in-block suffix: `mlp.up_proj.weight` -> (["mlp", "up_proj"],
    "up_proj"); a bare parameter (`mlp.experts.gate_up_proj`, `attn.in_proj_weight`) is its own leaf."""
    parts = label.split(".")
    if len(parts) > 1 and parts[-1] == "weight":
        parts = parts[:-1]
    leaf = parts[-1]
    if leaf.endswith("_weight"):
        leaf = leaf[: -len("_weight")]
    return parts, leaf


def _is_norm(part: str) -> bool:
    p = part.lower()
    return "norm" in p or p == "ln" or p.startswith("ln_") or (p.startswith("ln") and p[2:].isdigit())


def _is_embedding(part: str) -> bool:
    p = part.lower()
    return "embed" in p or p in ("wte", "wpe") or "relative_attention" in p or "rel_pos" in p or p.endswith("_bias")


def _is_experts(part: str) -> bool:
    """A routed-experts container (`experts`, `routed_experts`); not DeepSeek's `shared_experts`."""
    return part.endswith("experts") and not part.startswith("shared")


def _in_experts(parts: list[str]) -> bool:
    return any(_is_experts(p) for p in parts)


def _router_by_name(parts: list[str], leaf: str) -> str | None:
    """'yes' for an unambiguous router name, 'maybe' for a `gate`-like leaf that needs MoE context."""
    low = [p.lower() for p in parts]
    if "router" in low or "routers" in low or any(p.endswith("_router") for p in low):
        return "yes"
    lf = leaf.lower()
    if "expert" in lf and lf.endswith("gate"):  # Qwen2-MoE shared_expert_gate [1, hidden]
        return "yes"
    if lf in _ROUTER_LEAVES and not _in_experts(parts[:-1]):
        return "maybe"
    return None


_Q = {"q_proj", "query", "q", "wq", "q_lin", "to_q", "q_a_proj", "q_b_proj"}
_K = {"k_proj", "key", "k", "wk", "k_lin", "to_k"}
_V = {"v_proj", "value", "v", "wv", "v_lin", "to_v"}
_O = {"o_proj", "out_proj", "o", "out_lin", "to_out", "dense_out"}
_QKV = {"qkv_proj", "qkv", "c_attn", "query_key_value", "wqkv", "w_pack", "in_proj", "to_qkv"}
_GATE = {"gate_proj", "w1", "wi_0", "gate"}
_UP = {"up_proj", "w3", "wi_1", "up"}
_GATE_UP = {"gate_up_proj", "gate_up", "w12"}
_DOWN = {"down_proj", "w2", "down"}
_FC_IN = {"fc1", "c_fc", "fc_in", "dense_h_to_4h", "lin1", "ffn_up"}
_FC_OUT = {"fc2", "fc_out", "dense_4h_to_h", "lin2", "ffn_down"}
_MLP_CTX = ("mlp", "ffn", "feed_forward", "densereludense", "intermediate", "output", "moe", "expert")


def _kind(parts: list[str], leaf: str) -> str:
    ctx = [p.lower() for p in parts[:-1]]
    lf = leaf.lower()
    attn = any("attn" in p or "attention" in p for p in ctx)
    if lf == "wi":
        base = "fc_in"
    elif lf in _QKV:
        base = "qkv"
    elif lf in _Q:
        base = "q"
    elif lf in _K:
        base = "k"
    elif lf in _V:
        base = "v"
    elif lf in _O:
        base = "o"
    elif lf in ("wo", "c_proj", "proj", "dense"):  # attention output, or the MLP's output
        if attn:
            base = "o"
        elif lf == "wo":  # T5's DenseReluDense.wo
            base = "fc_out"
        elif lf == "dense":
            base = "fc_in" if "intermediate" in ctx else "fc_out" if "output" in ctx else "mlp"
        else:
            base = "fc_out" if lf == "c_proj" else ("mlp" if any(c in p for p in ctx for c in _MLP_CTX) else "other")
    elif lf in _GATE_UP:
        base = "gate_up"
    elif lf in _GATE:
        base = "gate"
    elif lf in _UP:
        base = "up"
    elif lf in _DOWN:
        base = "down"
    elif lf in _FC_IN:
        base = "fc_in"
    elif lf in _FC_OUT:
        base = "fc_out"
    elif attn:
        base = "attn"
    elif any(c in p for p in ctx for c in _MLP_CTX):
        base = "mlp"
    else:
        base = "other"
    if _in_experts(parts[:-1]):
        if base in ("gate", "up", "gate_up", "fc_in"):
            return "expert_gate_up"
        if base in ("down", "fc_out"):
            return "expert_down"
        return "expert"
    return base


def _category(label: str) -> tuple[str, str]:
    """(category, kind) of an in-block suffix, before its shape is looked at. category: "skip" (bias,
    norm, embedding), "router" (an unambiguous router name), "gate?" (a `gate`-like leaf: a router
    only in a MoE block) or "linear"."""
    parts, leaf = _modules(label)
    kind = _kind(parts, leaf)
    if label.endswith("bias") or any(_is_norm(p) or _is_embedding(p) for p in parts):
        return ("skip", kind)
    r = _router_by_name(parts, leaf)
    if r == "yes":
        return ("router", kind)
    if r == "maybe":
        return ("gate?", kind)
    return ("linear", kind)


def _expert_split(label: str, shape: tuple[int, ...], counts: frozenset[int]) -> int:
    """How many experts a tensor holds fused (0: it is one linear)."""
    parts = label.split(".")
    at = next((i for i, p in enumerate(parts) if _is_experts(p)), None)
    if len(shape) >= 3 and (at is not None or (len(shape) == 3 and shape[0] in counts)):
        return shape[0]
    if len(shape) == 2 and at is not None and counts:
        if not (at + 1 < len(parts) and parts[at + 1].isdigit()):  # not a per-expert `experts.N.` tensor
            for e in sorted(counts, reverse=True):
                if e > 1 and shape[0] % e == 0:
                    return e
    return 0


def _template(label: str, shape: tuple[int, ...], kind: str, counts: frozenset[int]) -> tuple:
    """(kind, ((span, matrix shape, label), ...)) of a tensor's linears: one, or one per fused expert."""
    e = _expert_split(label, shape, counts)
    show = label[: -len(".weight")] if label.endswith(".weight") else label
    if not e:
        mat = (shape[0], prod(shape[1:]))
        return kind, (((0, mat[0] * mat[1]), mat, show),)
    mat = (shape[0] // e, shape[1]) if len(shape) == 2 else (shape[1], prod(shape[2:]))
    size = mat[0] * mat[1]
    if kind in ("gate", "up", "gate_up", "fc_in"):
        kind = "expert_gate_up"
    elif kind in ("down", "fc_out"):
        kind = "expert_down"
    elif not kind.startswith("expert"):
        kind = "expert"
    return kind, tuple(((i * size, (i + 1) * size), mat, f"{show}[{i}]") for i in range(e))


# -- the entry point ----------------------------------------------------------------------------

def find_blocks(tensors: dict[str, tuple[int, ...]], config: dict | None = None,
                linear_filter: str | None = None) -> BlockMap:
    """Find the block linears DP prunes from tensor names and shapes (dict order is kept).

    `config` is config.json as a dict; its expert count (`num_local_experts`, `num_experts`,
    `n_routed_experts`, `moe_num_experts`, nested configs included) identifies routers and fused
    expert tensors. Without it, names decide.

    `linear_filter` overrides the detection: every tensor with >= 2 dimensions whose name matches
    (re.search) is a linear, exclusions included (the filter is taken literally). Group 1, if it
    matched, is the block index and must be a decimal integer; the stack is the part of the name
    before it (`encoder.block.3.` -> `encoder.block`). Without group 1 the name's detected block is
    used, else block 0 of a stack named by the filter pattern itself. Fused experts are split the
    same way in both modes.

    Order: stacks by first appearance, then block, then tensor (dict order), then expert.
    Raises ValueError (one line, with example names and a suggested `linear_filter`) when nothing
    is found.
    """
    # Building ~100k small objects triggers the cyclic GC over and over (over half the run time);
    # nothing here makes cycles, so pause it.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _find_blocks(tensors, config, linear_filter)
    finally:
        if paused:
            gc.enable()


def _find_blocks(tensors, config, linear_filter) -> BlockMap:
    counts = _expert_counts(config)
    search = _STACK_RE.search

    # Pass 1: the block of each >= 2-D name (outermost stack), and which blocks hold experts (the
    # context that makes a `gate` leaf a router when config.json gives no expert count).
    items: list[tuple[str, tuple[int, ...], tuple[str, int, int] | None]] = []
    moe_blocks: set[tuple[str, int]] = set()
    for name, shape in tensors.items():
        m = search(name)
        w = None
        if m is not None:
            w = (name[: m.start(1) - 1], int(m.group(1)), m.end())
            if "expert" in name:
                moe_blocks.add(w[:2])
        if len(shape) >= 2:
            items.append((name, tuple(map(int, shape)), w))

    categories: dict[str, tuple[str, str]] = {}
    templates: dict[tuple, tuple] = {}

    def category(label: str) -> tuple[str, str]:
        c = categories.get(label)
        if c is None:
            c = categories[label] = _category(label)
        return c

    def is_router(stack: str, block: int, shape: tuple[int, ...], cat: str) -> bool:
        if cat == "router":
            return True
        if cat != "gate?":
            return False
        return shape[0] in counts if counts else (stack, block) in moe_blocks

    groups: dict[str, dict[int, list[Linear]]] = {}  # stack -> block -> linears, in dict order
    routers: list[str] = []

    def emit(name, stack, block, label, shape, kind):
        t = templates.get((label, shape))
        if t is None:
            t = templates[(label, shape)] = _template(label, shape, kind, counts)
        kind, parts = t
        blocks = groups.get(stack)
        if blocks is None:
            blocks = groups[stack] = {}
        out = blocks.get(block)
        if out is None:
            out = blocks[block] = []
        for span, mat, lab in parts:
            out.append(Linear(name, stack, block, span, mat, kind, lab))

    if linear_filter is None:
        for name, shape, w in items:
            if w is None:
                continue
            stack, block, at = w
            label = name[at:]
            cat, kind = category(label)
            if cat == "skip":
                continue
            if cat != "linear" and is_router(stack, block, shape, cat):
                routers.append(name)
                continue
            emit(name, stack, block, label, shape, kind)
    else:
        rx = re.compile(linear_filter)
        for name, shape, w in items:
            m = rx.search(name)
            if m is None:  # not a linear; still report the routers detection sees
                if w is not None and is_router(w[0], w[1], shape, category(name[w[2]:])[0]):
                    routers.append(name)
                continue
            g = m.group(1) if rx.groups >= 1 else None
            if g is not None:
                if not (g.isascii() and g.isdigit()):
                    raise ValueError(f"linear_filter '{linear_filter}': group 1 must be a decimal block index, "
                                     f"got {g!r} in tensor {name!r}")
                stack, block, label = name[: m.start(1)].rstrip("."), int(g), name[m.end(1):].lstrip(".")
            elif w is not None:
                stack, block, label = w[0], w[1], name[w[2]:]
            else:
                stack, block, label = linear_filter, 0, name
            label = label or name
            emit(name, stack, block, label, shape, category(label)[1])

    if not groups:
        raise ValueError(_nothing_found(tensors, linear_filter))
    linears: list[Linear] = []
    stacks: list[Stack] = []
    for stack, blocks in groups.items():
        order = sorted(blocks)
        stacks.append(Stack(stack, order))
        for b in order:
            linears.extend(blocks[b])
    return BlockMap(linears, stacks, routers)


def _nothing_found(tensors, linear_filter) -> str:
    multi = [n for n, sh in tensors.items() if len(sh) >= 2]
    head = (f"no tensor with >= 2 dimensions matches linear_filter '{linear_filter}'" if linear_filter is not None
            else "no transformer-block linear found (no weight with >= 2 dimensions in a "
                 "`<prefix>.(layers|h|layer|block|blocks).<N>.` block, biases, norms, embeddings and routers aside)")
    if not multi:
        return f"{head}; no tensor has >= 2 dimensions, so DP has nothing to prune"
    stacks: Counter = Counter()
    first: dict[str, list[str]] = {}
    for n in multi:
        m = _INDEXED_RE.search(n)
        if m:
            stacks[m.group(1)] += 1
            first.setdefault(m.group(1), []).append(n)
    if stacks:
        comp = max(stacks, key=lambda s: (stacks[s], -list(first).index(s)))
        examples = first[comp][:3]
        suggestion = r"(?:^|\.)" + re.escape(comp) + r"\.(\d+)\."
    else:
        examples = multi[:3]
        parts = [n.split(".") for n in examples]
        common = []
        for column in zip(*parts):
            if len(set(column)) != 1:
                break
            common.append(column[0])
        common = common[: min(len(p) for p in parts) - 1]
        suggestion = ("^" + re.escape(".".join(common)) + r"\.") if common else \
            "^(?:" + "|".join(re.escape(n) for n in examples) + ")$"
    return (f"{head}; tensors with >= 2 dimensions include {', '.join(repr(e) for e in examples)}; "
            f"set linear_filter (group 1 = block index), e.g. linear_filter: '{suggestion}'")


def layer_positions(names) -> list[float]:
    """mergekit's t of every tensor, in the order of `names`: layer i of a stack of L layers gets
    i/(L-1) (1 for a one-layer stack); tensors outside the stacks (embeddings, final norms, heads)
    get 0.

    Per distinct head, not per name: an MoE layer repeats its head for every expert's tensors
    (`_heads`); the rest is per head `<stack>.<N>.` (a few hundred)."""
    from .params import layer_position

    heads = _heads(names)
    where = {}  # head -> (stack, index)
    layers: dict[str, int] = {}
    for head in dict.fromkeys(heads):
        if head:
            m = _STACK_RE.search(head)
            stack, index = head[: m.start(1) - 1], int(m.group(1))
            where[head] = stack, index
            layers[stack] = max(layers.get(stack, 0), index + 1)
    t = {head: layer_position(index, layers[stack]) for head, (stack, index) in where.items()}
    t[""] = 0.0
    return list(map(t.__getitem__, heads))


def _heads(names) -> list[str]:
    """`_HEAD_RE`'s match of every name, the regex run once per distinct start of a name rather
    than per name (the starts taken and looked up in C). A head found within a name's first k
    characters is the name's own: the regex tries heads shortest first, and a shorter one needs
    only characters a longer one covers. The names whose start holds no head are tried on a
    longer start, at last whole (embeddings, norms, output heads: a few)."""
    names = list(names)
    starts = list(map(itemgetter(slice(24)), names))
    found = {p: _HEAD_RE.match(p).group() for p in set(starts)}
    heads = list(map(found.__getitem__, starts))
    left = list(compress(range(len(names)), map(not_, heads)))
    for k in (48, None):
        if not left:
            break
        starts = [names[i][:k] for i in left]
        found = {p: _HEAD_RE.match(p).group() for p in set(starts)}
        keep = []
        for i, p in zip(left, starts):
            if found[p]:
                heads[i] = found[p]
            else:
                keep.append(i)
        left = keep
    return heads
