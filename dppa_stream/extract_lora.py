"""`extract-lora`: a PEFT LoRA adapter that turns BASE into (approximately) FINETUNED, in bounded
memory.

Every 2-D weight whose delta Δ = FINETUNED − BASE is not zero gets a truncated SVD, Δ ≈ U S Vᵀ,
written as B = U √S, A = √S Vᵀ with lora_alpha = r (scale 1). A tensor of at most `exact_below`
elements is read whole (float64) and decomposed exactly (LAPACK). A bigger one is never held
whole: a randomized range finder (Halko, Martinsson & Tropp 2011) reads it in row blocks —
Y = Δ Ω, then `power_iters` rounds of Z = Δᵀ Q, Y = Δ Z, then B = Qᵀ Δ and a small SVD — with Ω
seeded by the tensor's name. Every product is summed in one fixed order (kernels/lora.py), so the
adapter is byte-identical whatever the memory limit and the row blocks it implies; only
`exact_below` (a fixed number, not the memory) picks the path. Each pass reads both models' rows
once: 2 + 2·power_iters passes over a big tensor.

As in mergekit-extract-lora, embeddings and the output head are saved whole (`modules_to_save`)
unless `embeddings` (then embeddings get peft's LoRA embedding factors, Δ = (B A)ᵀ, and the head
a plain LoRA), as is any module named by `save_modules` and any changed tensor that is not a 2-D
weight (norms, biases; `skip_undecomposable` drops them). Unchanged tensors get nothing. What the rank keeps of each delta's energy
(squared Frobenius norm) is reported per tensor and overall. The adapter is written into
OUT.partial and renamed to OUT when complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import InputError, OutputError, UsageError, printable, short

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_EMBED = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "embeddings")


@dataclass
class ExtractOptions:
    rank: int = 128  # the maximum rank of any module (mergekit's --max-rank)
    sv_epsilon: float = 0.0  # keep only singular values above this (mergekit's --sv-epsilon)
    energy: float | None = None  # the smallest rank that keeps this fraction of the delta's energy (capped at rank)
    embeddings: bool = False  # LoRA on embeddings and the output head (else they are saved whole)
    save_modules: tuple[str, ...] = ()
    skip_undecomposable: bool = False  # changed tensors that are not 2-D weights: dropped, not saved whole
    memory_limit: int | None = None
    exact_below: int = 1 << 22  # elements: exact SVD at or below, randomized above
    power_iters: int = 2
    oversample: int = 10
    seed: int = 0
    dtype: str = "F32"  # factors as stored
    overwrite: bool = False
    quiet: bool = True


@dataclass
class TensorReport:
    name: str
    kind: str  # lora | embedding | saved | unchanged
    shape: tuple[int, ...]
    rank: int = 0
    energy: float = 0.0  # ||Δ||² (float64)
    kept: float = 0.0  # of it, what the rank keeps (Σ s_i² over the kept singular values)
    method: str = ""  # exact | randomized
    top: list = field(default_factory=list)  # the largest singular values (up to 8)

    @property
    def fraction(self) -> float:
        return self.kept / self.energy if self.energy > 0 else 1.0


@dataclass
class ExtractResult:
    out: str
    tensors: list[TensorReport]
    seconds: float
    bytes_read: int
    params: int  # elements of the models' decomposed tensors

    @property
    def energy(self) -> float:
        """The fraction of all low-rank targets' delta energy the adapter keeps."""
        low = [t for t in self.tensors if t.kind in ("lora", "embedding")]
        total = sum(t.energy for t in low)
        return sum(t.kept for t in low) / total if total > 0 else 1.0

    def table(self) -> str:
        rows = [f"{'tensor':60s} {'kind':9s} {'rank':>5s} {'energy kept':>11s}"]
        for t in self.tensors:
            if t.kind == "unchanged":
                continue
            kept = f"{100 * t.fraction:10.3f}%" if t.kind in ("lora", "embedding") else f"{'whole':>11s}"
            rows.append(f"{printable(t.name, 60):60s} {t.kind:9s} {t.rank if t.rank else '-':>5} {kept}")
        n = sum(t.kind in ("lora", "embedding") for t in self.tensors)
        rows.append(f"overall: {100 * self.energy:.3f}% of the delta energy of {n} low-rank tensors kept; "
                    f"{sum(t.kind == 'saved' for t in self.tensors)} saved whole, "
                    f"{sum(t.kind == 'unchanged' for t in self.tensors)} unchanged; {self.seconds:.1f} s")
        return "\n".join(rows)

    def to_json(self) -> dict:
        return {"out": self.out, "energy_kept": self.energy, "seconds": round(self.seconds, 3),
                "bytes_read": self.bytes_read, "params": self.params,
                "tensors": [{"name": t.name, "kind": t.kind, "shape": list(t.shape), "rank": t.rank,
                             "energy": t.energy, "energy_kept": t.fraction if t.kind in ("lora", "embedding") else None,
                             "method": t.method or None, "top_singular_values": t.top} for t in self.tensors]}


# --- reading ------------------------------------------------------------------------------------

class _Reader:
    """Float32 rows of a tensor of both models, and the bytes read."""

    def __init__(self):
        self.bytes = 0

    def rows(self, entry, r0: int, r1: int) -> np.ndarray:
        from .sources import source

        cols = max(1, entry.row_numel)
        out = np.empty((r1 - r0) * cols, np.float32)
        source(entry).decode(r0 * cols, r1 * cols, out)
        self.bytes += (r1 - r0) * cols * entry.nbytes // max(1, entry.numel)
        return out.reshape(r1 - r0, cols)


def _embedding(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and any(p in _EMBED for p in parts[-3:-1])


def _module_of(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _saved(module: str, save: tuple[str, ...]) -> bool:
    return any(module == s or module.endswith("." + s) for s in save)


def _seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogatepass")).digest()[:8], "little")


def _pick_rank(s: np.ndarray, total: float, opts: ExtractOptions) -> int:
    r = min(opts.rank, int(np.count_nonzero(s > 0)))
    if opts.sv_epsilon > 0:
        r = min(r, int(np.count_nonzero(s > opts.sv_epsilon)))
    if opts.energy is not None and total > 0:
        cum = np.cumsum(s.astype(np.float64) ** 2)
        r = min(r, int(np.searchsorted(cum, opts.energy * total * (1 - 1e-12))) + 1)
    return max(r, 1 if len(s) and s[0] > 0 else 0)


# --- decomposition ------------------------------------------------------------------------------

def _exact(ft, base, reader: _Reader, block: int):
    from . import kernels

    rows, cols = ft.shape
    d = np.empty((rows, cols), np.float64)
    total, bad = 0.0, 0
    for r0 in range(0, rows, block):
        r1 = min(rows, r0 + block)
        total, b = kernels.delta_rows(reader.rows(ft, r0, r1), reader.rows(base, r0, r1), d[r0:r1], total)
        bad += b
    if bad:
        raise InputError(f"{ft.file}: tensor {short(ft.name)} has {bad} NaN/Inf values in its delta from the base")
    if total == 0:
        return None, None, None, 0.0
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    return u, s, vt, total


def _randomized(ft, base, reader: _Reader, block: int, rank: int, opts: ExtractOptions):
    from . import kernels

    rows, cols = ft.shape
    k = min(rank + opts.oversample, rows, cols)
    omega = np.random.Generator(np.random.PCG64(_seed(ft.name, opts.seed))).standard_normal((cols, k))
    scratch = np.empty((min(block, rows), cols), np.float64)

    def delta(r0, r1, want_total=None):
        d = scratch[:r1 - r0]
        t, bad = kernels.delta_rows(reader.rows(ft, r0, r1), reader.rows(base, r0, r1), d, want_total or 0.0)
        if bad:
            raise InputError(f"{ft.file}: tensor {short(ft.name)} has {bad} NaN/Inf values in its delta from the base")
        return d, t

    def times(m):  # Δ m, and ||Δ||²
        y = np.empty((rows, m.shape[1]), np.float64)
        total = 0.0
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            d, total = delta(r0, r1, total)
            kernels.rows_times(d, m, y[r0:r1])
        return y, total

    def t_times(q):  # Δᵀ q
        z = np.zeros((cols, q.shape[1]), np.float64)
        for r0 in range(0, rows, block):
            r1 = min(rows, r0 + block)
            d, _ = delta(r0, r1)
            kernels.add_rows_t(d, q[r0:r1], z)
        return z

    y, total = times(omega)
    if total == 0:
        return None, None, None, 0.0
    for _ in range(opts.power_iters):
        q, _ = np.linalg.qr(y)
        z, _ = np.linalg.qr(t_times(q))
        y, _ = times(z)
    q, _ = np.linalg.qr(y)
    b = t_times(q).T  # Qᵀ Δ: [k, cols]
    ub, s, vt = np.linalg.svd(b, full_matrices=False)
    return q @ ub, s, vt, total


# --- writing ------------------------------------------------------------------------------------

class _Writer:
    """Tensors appended to a data file as they are made; the safetensors file is assembled at
    the end (header, then the data copied in chunks): nothing is held but one tensor."""

    def __init__(self, folder: str, dtype: str):
        self.folder, self.dtype = folder, dtype
        self.data = open(os.path.join(folder, WEIGHTS + ".data"), "wb")
        self.header: dict = {}
        self.at = 0

    def add(self, name: str, values: np.ndarray, dtype: str | None = None) -> None:
        self.add_blocks(name, values.shape, [values], dtype)

    def add_blocks(self, name: str, shape: tuple, blocks, dtype: str | None = None) -> None:
        """A tensor of `shape` from consecutive row blocks (float32 or float64 arrays), stored as
        `dtype` (rounded to nearest even)."""
        from . import kernels

        dtype = dtype or self.dtype
        start = self.at
        for values in blocks:
            x = np.ascontiguousarray(values, np.float32).reshape(-1)
            bits = np.empty(x.size, kernels.CONTAINER[dtype])
            kernels.narrow_block(x, x.size, bits, 0, kernels.CODES[dtype])
            self.data.write(bits.tobytes())
            self.at += bits.nbytes
        self.header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, self.at]}

    def finish(self) -> None:
        self.data.close()
        head = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        src = os.path.join(self.folder, WEIGHTS + ".data")
        with open(os.path.join(self.folder, WEIGHTS), "wb") as f, open(src, "rb") as g:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            shutil.copyfileobj(g, f, 16 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.remove(src)


# --- the command --------------------------------------------------------------------------------

def open_model(text: str, what: str):
    """A model named on the command line: a path, a cached Hub ID, or BASE+ADAPTER."""
    from . import hub, lora
    from .checkpoint import Checkpoint

    got = hub.locate(text, what, "model")
    if got.pending is not None:
        raise got.pending.missing()
    parts = lora.split_key(got.path)
    if parts:
        return lora.open_adapted(Checkpoint.open(parts[0]), parts[1])
    return Checkpoint.open(got.path)


def extract(finetuned: str, base: str, out: str, opts: ExtractOptions) -> ExtractResult:
    from .inputs import _check_same
    from .tokenizer import is_vocab_tensor
    from .memory import default_budget
    from .durable import write_atomic
    from .output import publish
    from .units import unit_budget

    t0 = time.perf_counter()
    if opts.rank < 1:
        raise UsageError(f"--rank {opts.rank}: must be at least 1")
    ft_ck, base_ck = open_model(finetuned, "FINETUNED"), open_model(base, "BASE")
    _check_same(base_ck, ft_ck)
    budget = unit_budget(opts.memory_limit or default_budget(), 1, 1)
    out = os.path.abspath(out)
    for ck in (ft_ck, base_ck):
        for f in ck.files:
            if os.path.realpath(f).startswith(os.path.realpath(out) + os.sep):
                raise OutputError(f"{out}: the output would contain the input {f}")
    if os.path.lexists(out) and not opts.overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    partial = out + ".partial"
    if os.path.lexists(partial):
        if not opts.overwrite:
            raise OutputError(f"{partial}: exists (an interrupted run?); pass --overwrite to replace it")
        shutil.rmtree(partial)
    try:
        os.makedirs(partial)
    except OSError as e:
        raise OutputError(f"{partial}: cannot create ({e.strerror})") from None
    writer = _Writer(partial, opts.dtype)
    reader = _Reader()
    reports: list[TensorReport] = []
    targets, ranks, saved_modules = [], {}, set()
    params = 0
    try:
        for name, fe in ft_ck.tensors.items():
            be = base_ck.tensors[name]
            rep = TensorReport(name, "unchanged", tuple(fe.shape))
            reports.append(rep)
            if not fe.real:
                continue
            module, param = _module_of(name)
            two_d = len(fe.shape) == 2 and param == "weight"
            emb = two_d and _embedding(name)
            vocab = two_d and (emb or is_vocab_tensor(name))
            if not two_d and opts.skip_undecomposable and not _saved(module, opts.save_modules):
                continue
            whole = _saved(module, opts.save_modules) or not two_d or (vocab and not opts.embeddings)
            rows = fe.rows
            cols = max(1, fe.row_numel)
            block = max(1, min(rows, budget // (cols * 24)))  # f32 rows of both + the float64 delta
            if whole:
                changed = False
                for r0 in range(0, rows, block):
                    r1 = min(rows, r0 + block)
                    if not np.array_equal(reader.rows(fe, r0, r1), reader.rows(be, r0, r1)):
                        changed = True
                        break
                if changed or _saved(module, opts.save_modules):
                    rep.kind = "saved"
                    saved_modules.add(module)
                    keep = fe.dtype if fe.dtype in ("F32", "BF16", "F16") else "F32"
                    writer.add_blocks(PREFIX + name, fe.shape, (reader.rows(fe, r0, min(rows, r0 + block))
                                                               for r0 in range(0, rows, block)), keep)
                continue
            params += fe.numel
            if fe.numel <= opts.exact_below:
                need = 8 * fe.numel * 4 + 24 * cols * block
                if need > budget:
                    raise UsageError(f"tensor {short(name)}: an exact SVD needs {need / 2**20:.0f} MiB, more than the "
                                     f"{budget / 2**20:.0f} MiB a task may use; raise --memory-limit or lower --exact-below")
                u, s, vt, total = _exact(fe, be, reader, block)
                rep.method = "exact"
            else:
                k = min(opts.rank + opts.oversample, rows, cols)
                sketch = 8 * k * (3 * rows + 3 * cols)  # Y, Q, U = Q·Ub [rows, k]; Ω, Z, Vt [.., cols]
                if sketch + 24 * cols > budget:
                    raise UsageError(f"tensor {short(name)}: the randomized SVD at rank {k} needs "
                                     f"{(sketch + 24 * cols) / 2**20:.0f} MiB, more than the {budget / 2**20:.0f} MiB "
                                     "a task may use; raise --memory-limit or lower --rank")
                block = max(1, min(block, (budget - sketch) // (cols * 24)))
                u, s, vt, total = _randomized(fe, be, reader, block, opts.rank, opts)
                rep.method = "randomized"
            if total == 0:
                rep.method = ""
                continue
            r = _pick_rank(s, total, opts)
            rep.kind, rep.rank, rep.energy = ("embedding" if emb else "lora"), r, total
            rep.kept = float(np.sum(s[:r].astype(np.float64) ** 2))
            rep.top = [float(x) for x in s[:8]]
            root = np.sqrt(s[:r])
            left, right = u[:, :r] * root, root[:, None] * vt[:r]  # Δ ≈ left @ right
            if emb:  # Δ = (B A)ᵀ: A = leftᵀ [r, vocab], B = rightᵀ [dim, r]
                writer.add(f"{PREFIX}{module}.lora_embedding_A", left.T)
                writer.add(f"{PREFIX}{module}.lora_embedding_B", right.T)
            else:
                writer.add(f"{PREFIX}{module}.lora_A.weight", right)
                writer.add(f"{PREFIX}{module}.lora_B.weight", left)
            targets.append(module)
            ranks[module] = r
        if not targets and not saved_modules:
            raise InputError(f"{finetuned}: no tensor differs from {base}; there is no adapter to extract")
        writer.finish()
        top = max(ranks.values(), default=opts.rank)
        pattern = {m: r for m, r in ranks.items() if r != top}
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(targets), "modules_to_save": sorted(saved_modules) or None,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True,
        }
        write_atomic(os.path.join(partial, CONFIG), (json.dumps(config, indent=2) + "\n").encode())
    except BaseException:
        writer.data.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(partial, out, opts.overwrite)
    return ExtractResult(out, reports, time.perf_counter() - t0, reader.bytes, params)


def plot(result: ExtractResult, path: str) -> None:
    """A PNG of the energy each low-rank tensor keeps, in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low = [t for t in result.tensors if t.kind in ("lora", "embedding")]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(range(len(low)), [100 * t.fraction for t in low], ".", ms=4)
    ax.set_xlabel("tensor (model order)")
    ax.set_ylabel("delta energy kept (%)")
    ax.set_title(f"extract-lora: {100 * result.energy:.2f}% overall")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

