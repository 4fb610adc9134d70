"""Quantized checkpoints and mixed dtypes, end to end against the independent reference
(reference_quant.py dequantizes and requantizes; reference.py and reference_dppa.py merge): block,
per-channel and per-tensor FP8 and MXFP4 in, merged by several methods, out in the reference's
format (fresh scales) or as plain weights; the requantization loss report; chunking and resume
invariance; and the formats that are refused."""

from __future__ import annotations

import json
import math
import os
from fractions import Fraction

import pytest
import torch

from dppa_stream.checkpoint import Checkpoint
from dppa_stream.checkpoint.reader import close_all
from dppa_stream.config import load_config
from dppa_stream.errors import InputError
from dppa_stream.pipeline import MergeOptions, merge

from .crash_at import crash_run
from .reference import load_model, reference_merge
from .reference_dppa import dppa_merge
from .reference_quant import dequant_fp8, dequant_mxfp4, loss, quant_fp8, quant_mxfp4, save_checkpoint
from .test_hostile_cli import one_line_error, run

H, I, V = 48, 80, 37  # not multiples of the blocks used below


# --- tiny models in each format --------------------------------------------------------------------

def _llama(seed: int, base: dict | None = None, drift: float = 0.05) -> dict[str, torch.Tensor]:
    """A two-layer Llama-shaped float32 state dict; a fine-tune of `base` when given (heavy-tailed
    deltas). Block (16, 16) of up_proj and all of layer 1's k_proj are zero in every model: zero
    blocks, and zero merged blocks."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for layer in range(2):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (24, H),
                       p + "mlp.up_proj.weight": (I, H), p + "mlp.down_proj.weight": (H, I),
                       p + "input_layernorm.weight": (H,)})
    out = {}
    for n, s in shapes.items():
        if base is None:
            x = torch.randn(s, generator=g) * 0.05 + (1.0 if "norm" in n else 0.0)
        else:
            z = torch.randn(s, generator=g)
            x = base[n] + drift * 0.05 * z / (torch.randn(s, generator=g).abs() + 0.3)
        if n.endswith("up_proj.weight"):
            x[16:32, 16:32] = 0
        if n == "model.layers.1.self_attn.k_proj.weight":
            x[:] = 0
        out[n] = x
    return out


BLOCK = (16, 16)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


def _ct_config(strategy: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                             "strategy": strategy}}},
            "ignore": ["lm_head"]}


FORMATS = {
    # name: (quantization_config, scale suffix, scale shape of a [R, C] weight, scale dtype, input_scale)
    "fp8_block": (FP8_CONFIG, "_scale_inv", lambda r, c: (-(-r // 16), -(-c // 16)), torch.float32, False),
    "fp8_block_e5m2": (dict(FP8_CONFIG, fmt="e5m2"), "_scale_inv", lambda r, c: (-(-r // 16), -(-c // 16)),
                       torch.float32, False),
    "fp8_block_bf16": ({"quant_method": "fp8", "fmt": "e4m3"}, "_scale_inv", lambda r, c: (-(-r // 128), -(-c // 128)),
                       torch.bfloat16, False),
    "fp8_channel": (_ct_config("channel"), "_scale", lambda r, c: (r, 1), torch.float32, True),
    "fp8_tensor": (_ct_config("tensor"), "_scale", lambda r, c: (1,), torch.float32, True),
}


def _block_of(fmt: str) -> tuple[int, int]:
    return BLOCK if fmt.startswith("fp8_block") and fmt != "fp8_block_bf16" else (128, 128)


def _fp8_of(fmt: str) -> str:
    return "F8_E5M2" if fmt.endswith("e5m2") else "F8_E4M3"


def _quantize_llama(sd: dict, fmt: str, seed: int) -> dict[str, torch.Tensor]:
    config, suffix, sshape, sdtype, input_scale = FORMATS[fmt]
    out = {}
    for n, x in sd.items():
        if x.dim() == 2 and ".layers." in n:
            codes, s = quant_fp8(x, sshape(*x.shape), _block_of(fmt), _fp8_of(fmt), scale_dtype=sdtype)
            out[n], out[n + suffix] = codes, s
            if input_scale:
                out[n[:-len("weight")] + "input_scale"] = torch.tensor([0.01 * (seed + 1)])
        else:
            out[n] = x.to(torch.bfloat16)
    return out


def _hf_llama(quant: dict | None) -> dict:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": 2, "vocab_size": V, "torch_dtype": "bfloat16"}
    if quant:
        cfg["quantization_config"] = quant
    return cfg


def _scales_apart(name: str) -> int:
    """Weights in shard 0, their scales (and everything else) in shard 1."""
    return 0 if name.endswith(".weight") and "layers" in name else 1


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Cached tiny sets: sets(fmt) -> [base, ft1, ft2] folders, each weight's scale in another shard."""
    root = tmp_path_factory.mktemp("quant")
    cache = {}

    def make(fmt: str):
        if fmt not in cache:
            base = _llama(0)
            models = [base, _llama(1, base), _llama(2, base, drift=0.2)]
            if fmt == "mxfp4":
                cache[fmt] = _gpt_oss_set(str(root / fmt))
            else:
                cache[fmt] = [save_checkpoint(str(root / fmt / f"m{i}"), _quantize_llama(m, fmt, i), 2,
                                              _hf_llama(FORMATS[fmt][0]), _scales_apart)
                              for i, m in enumerate(models)]
        return cache[fmt]

    return make


# gpt-oss: experts stored as MXFP4 (transformers' [E, H, 2I] and [E, I, H], stored transposed)
OSS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=90, sliding_window=8,
           layer_types=["sliding_attention", "full_attention"])


def _gpt_oss_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(**OSS, attn_implementation="eager"))


def _gpt_oss_set(folder: str) -> list[str]:
    model = _gpt_oss_model()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base["model.layers.0.mlp.experts.down_proj"][1, :32] = 0  # a zero group in every model
    g = torch.Generator().manual_seed(5)
    conf = dict(model.config.to_dict(), torch_dtype="bfloat16",
                quantization_config={"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]})
    paths = []
    for i, drift in enumerate((0.0, 0.05, 0.3)):
        sd = {}
        for k, v in base.items():
            x = v + drift * v.std() * torch.randn(v.shape, generator=g) if drift else v
            if k.endswith("mlp.experts.down_proj"):
                x[1, :32] = 0
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                sd[k + "_blocks"], sd[k + "_scales"] = quant_mxfp4(x.float())
            else:
                sd[k] = x.to(torch.bfloat16)
        paths.append(save_checkpoint(os.path.join(folder, f"m{i}"), sd, 3, conf))
    return paths


# --- the reference side -----------------------------------------------------------------------------

def dequantized(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's logical tensors as float32 (reference dequantization)."""
    sd = load_model(path)
    with open(os.path.join(path, "config.json")) as f:
        qc = json.load(f).get("quantization_config") or {}
    block = tuple(qc.get("weight_block_size") or (128, 128))
    out = {}
    for n, x in sd.items():
        if n.endswith("_blocks"):
            out[n[:-7]] = dequant_mxfp4(x, sd[n[:-7] + "_scales"])
        elif x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale = sd.get(n + "_scale_inv", sd.get(n + "_scale"))
            out[n] = dequant_fp8(x, scale, block)
        elif not n.endswith(("_scales", "_scale_inv", "_scale", "input_scale")):
            out[n] = x.float()
    return out


def write_dequantized(paths: list[str], folder: str) -> list[str]:
    """Float32 copies of the inputs (what the reference merges read)."""
    return [save_checkpoint(os.path.join(folder, f"f32-{i}"), dequantized(p)) for i, p in enumerate(paths)]


def requantize_like(merged: dict, ref_path: str, fmt: str) -> dict[str, torch.Tensor]:
    """The reference's storage of merged float32 tensors: quantized ones in the reference's format
    with fresh scales, the rest in the reference's dtype."""
    ref = load_model(ref_path)
    out = {}
    for n, m in merged.items():
        if n + "_blocks" in ref:
            out[n + "_blocks"], out[n + "_scales"] = quant_mxfp4(m)
        elif n in ref and ref[n].dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            suffix = "_scale_inv" if n + "_scale_inv" in ref else "_scale"
            s = ref[n + suffix]
            out[n], out[n + suffix] = quant_fp8(m, tuple(s.shape), _block_of(fmt), _fp8_of(fmt), scale_dtype=s.dtype)
            if n[:-len("weight")] + "input_scale" in ref:
                out[n[:-len("weight")] + "input_scale"] = ref[n[:-len("weight")] + "input_scale"]
        else:
            out[n] = m.to(ref[n].dtype)
    return out


def assert_same(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        g = got[n]
        assert g.dtype == w.dtype and g.shape == w.shape, (n, g.dtype, w.dtype, g.shape, w.shape)
        assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)), n


def _cfg(tmp_path, method: str, paths: list[str], extra: str = "", weights=(0.6, 0.8), params=None) -> str:
    base, *fts = paths
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for p, w in zip(fts, weights):
        mp = dict(params or {}, weight=w) if method not in ("slerp", "iso_c", "tsv_m") else {}
        lines += [f"  - model: {p}"] + ([f"    parameters: {json.dumps(mp)}"] if mp else [])
    text = "\n".join(lines) + "\n" + extra
    path = tmp_path / f"{method}.yml"
    path.write_text(text)
    return str(path)


METHODS = {  # method: config additions
    "task_arithmetic": "",
    "ties": "parameters: {density: 0.5}\n",
    "linear": "",
    "dppa": "parameters: {pruning_rates: [0.9, 0.8], amplification: [1.8, 1.0]}\n",
    "slerp": "parameters: {t: 0.3}\n",
    "iso_c": "",
    "tsv_m": "",
}


def _reference(method: str, f32: list[str], tmp_path) -> dict:
    """The merge of float32 inputs: from the independent references where there is one (task
    arithmetic, TIES, linear; DPPA on dense linears), else dppa-stream's own merge of the float32
    copies (the method code the rest of the suite checks against mergekit and references)."""
    b, fts = load_model(f32[0]), [load_model(p) for p in f32[1:]]
    if method == "task_arithmetic":
        return reference_merge("task_arithmetic", f32[0], f32[1:], [0.6, 0.8])
    if method == "ties":
        return reference_merge("ties", f32[0], f32[1:], [0.6, 0.8], densities=[0.5, 0.5])
    if method == "linear":  # inputs [ft1, ft1, ft2]: ft1 is the reference, not a base
        return reference_merge("linear", None, f32[1:], [0.6, 0.8])
    if method == "dppa" and not any(x.dim() == 3 for x in b.values()):
        return dppa_merge(b, fts, [0.9, 0.8], [[1.8, 1.0]] * 2, [0.6, 0.8], out_dtype=torch.float32)
    cfg = _cfg(tmp_path, method, f32, METHODS[method] + "out_dtype: float32\n")
    merge(load_config(cfg), str(tmp_path / "f32-out"), MergeOptions(quiet=True))
    return load_model(str(tmp_path / "f32-out"))


def _linear_cfg(tmp_path, paths):
    """linear with the base as one more input (weights: base 0, fine-tunes 0.6 and 0.8)."""
    text = (f"merge_method: linear\nmodels:\n  - model: {paths[1]}\n    parameters: {{weight: 0.6}}\n"
            f"  - model: {paths[2]}\n    parameters: {{weight: 0.8}}\n")
    (tmp_path / "linear.yml").write_text(text)
    return str(tmp_path / "linear.yml")


# --- merges equal the reference -----------------------------------------------------------------------

CASES = [(fmt, m) for fmt in ("fp8_block", "mxfp4") for m in METHODS] + \
        [(fmt, m) for fmt in ("fp8_block_bf16", "fp8_channel", "fp8_tensor") for m in ("task_arithmetic", "ties")] + \
        [("fp8_block_e5m2", "task_arithmetic")]


@pytest.mark.parametrize("fmt,method", CASES)
def test_quantized_merge_equals_reference(tmp_path, sets, fmt, method):
    paths = sets(fmt)
    if method == "linear":
        paths = [paths[1], paths[1], paths[2]]  # the reference is the first model
        cfg = _linear_cfg(tmp_path, paths)
    else:
        if method == "slerp":
            paths = [paths[0], paths[2]]  # one model besides the base
        cfg = _cfg(tmp_path, method, paths, METHODS[method])
    res = merge(load_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True))
    f32 = write_dequantized(paths, str(tmp_path / "ref"))
    want = _reference(method, f32, tmp_path)
    assert_same(load_model(str(tmp_path / "out")), requantize_like(want, paths[0], fmt))
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["quantization_config"] == json.load(open(os.path.join(paths[0], "config.json")))[
            "quantization_config"]
    _check_loss(res.requantization, want, f32, paths, fmt)


def _check_loss(report: dict, merged: dict, f32: list[str], paths: list[str], fmt: str):
    """The report equals the reference's loss over every requantized tensor (per fine-tune: the
    elements it changed)."""
    requant = dequantized_dict(requantize_like(merged, paths[0], fmt), paths[0])
    ref, fts = load_model(f32[0]), [load_model(p) for p in f32[1:]]
    keys = [None if p == paths[0] else p for p in paths[1:]]
    totals = {k: [0, 0, 0, Fraction(0), Fraction(0)] for k in ["all", *filter(None, keys)]}
    for n in requant:
        if n not in ref or not _quantized_name(n, paths[0]):
            continue

        def rows(x):  # the loss sums' rows: the logical tensor's last axis
            return x.reshape(-1, x.shape[-1])

        for key, sel in [("all", None)] + [(k, rows(ft[n] != ref[n])) for k, ft in zip(keys, fts) if k]:
            for i, v in enumerate(loss(rows(merged[n].float()), rows(requant[n]), rows(ref[n]), sel)):
                totals[key][i] += v
    for key, (n, changed, vanished, err, delta) in totals.items():
        got = report["all"] if key == "all" else report["models"][key]
        assert (got["elements"], got["changed"], got["vanished"]) == (n, changed, vanished), key
        assert got["relative_l2_loss"] == math.sqrt(err / delta), key  # the same sums, exactly


def _quantized_name(name: str, ref_path: str) -> bool:
    return Checkpoint.open(ref_path).tensors[name].dtype in ("F8_E4M3", "F8_E5M2", "MXFP4")


def dequantized_dict(stored: dict, ref_path: str) -> dict:
    folder = ref_path + "-tmp-requant"
    save_checkpoint(folder, stored, 1, json.load(open(os.path.join(ref_path, "config.json"))))
    try:
        return dequantized(folder)
    finally:
        import shutil

        shutil.rmtree(folder)


@pytest.mark.parametrize("fmt", ["fp8_block", "fp8_channel", "mxfp4"])
def test_plain_output_mode(tmp_path, sets, fmt):
    """out_dtype: plain weights, companions gone, quantization_config removed."""
    paths = sets(fmt)
    cfg = _cfg(tmp_path, "ties", paths, METHODS["ties"] + "out_dtype: bfloat16\n")
    res = merge(load_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert res.requantization is None
    want = _reference("ties", write_dequantized(paths, str(tmp_path / "ref")), tmp_path)
    assert_same(load_model(str(tmp_path / "out")), {n: m.to(torch.bfloat16) for n, m in want.items()})
    with open(tmp_path / "out" / "config.json") as f:
        assert "quantization_config" not in json.load(f)


@pytest.mark.parametrize("fmt", ["fp8_block", "mxfp4"])
def test_quantized_output_is_chunk_and_thread_invariant(tmp_path, sets, fmt):
    paths = sets(fmt)
    cfg = load_config(_cfg(tmp_path, "dppa", paths, METHODS["dppa"]))
    outs = []
    for i, (unit, sched) in enumerate([(None, "threads:1"), (1, "threads:2"), (20_000, "threads:2")]):
        res = merge(cfg, str(tmp_path / f"out{i}"), MergeOptions(quiet=True, unit_bytes=unit, scheduler=sched))
        outs.append((load_model(str(tmp_path / f"out{i}")), res.requantization, res.units))
    assert outs[1][2] > outs[0][2]  # the small unit size did split tensors
    for got, report, _ in outs[1:]:
        assert_same(got, outs[0][0])
        assert report == outs[0][1]


def test_units_hold_whole_blocks(tmp_path, sets):
    """The smallest unit of a block-FP8 tensor is one band of 16-row blocks (whole experts for
    MXFP4), whatever --unit-size asks."""
    from dppa_stream.pipeline import session

    for fmt, want in (("fp8_block", 16), ("mxfp4", 1)):
        cfg = load_config(_cfg(tmp_path, "task_arithmetic", sets(fmt)))
        with session(cfg, MergeOptions(quiet=True, unit_bytes=1)) as s:
            for t, units in s.units.items():
                e = s.inputs.entry(t)
                if e.dtype in ("F8_E4M3", "MXFP4") and len(e.shape) >= 2:
                    assert all(u.flat_start % (want * e.row_numel) == 0 for u in units), t
                    assert units[0].numel == min(want, e.rows) * e.row_numel, t


def test_a_unit_of_whole_experts_must_fit_the_memory_limit(tmp_path):
    """An MXFP4 unit holds whole experts: when one expert does not fit a task's share of
    --memory-limit, the run is refused before anything is read (exit 2, naming the tensor)."""
    from dppa_stream.errors import UsageError
    from dppa_stream.units import PROCESS_BASELINE, TASK_OVERHEAD

    x = torch.randn(2, 512, 512) * 0.01  # one expert: 256 Ki elements, ~5.3 MiB with 3 inputs and the output
    models = []
    for i in range(3):
        blocks, scales = quant_mxfp4(x + 0.001 * i)
        models.append(save_checkpoint(str(tmp_path / f"m{i}"), {"mlp.experts.w_blocks": blocks, "mlp.experts.w_scales": scales},
                                      1, {"quantization_config": {"quant_method": "mxfp4"}}))
    cfg = load_config(_cfg(tmp_path, "task_arithmetic", models))
    tight = MergeOptions(quiet=True, scheduler="threads:1", memory_limit=PROCESS_BASELINE + TASK_OVERHEAD + (5 << 20))
    with pytest.raises(UsageError) as e:
        merge(cfg, str(tmp_path / "out"), tight)
    assert "'mlp.experts.w'" in str(e.value) and "--memory-limit" in str(e.value)
    assert not (tmp_path / "out.partial").exists()
    merge(cfg, str(tmp_path / "out"), MergeOptions(quiet=True, scheduler="threads:1", memory_limit=PROCESS_BASELINE + TASK_OVERHEAD + (6 << 20)))


def test_resume_keeps_the_loss_report(tmp_path, sets):
    """A run killed half-way and resumed writes the same bytes and reports the same loss."""
    paths = sets("fp8_block")
    cfg = _cfg(tmp_path, "task_arithmetic", paths)
    code, _, _ = run("merge", cfg, tmp_path / "whole", "-q", "--json", tmp_path / "whole.json", "--unit-size", "1")
    assert code == 0
    killed = crash_run("units:6", "merge", cfg, tmp_path / "out", "-q", "--unit-size", "1", "--scheduler", "threads:1")
    assert killed.returncode != 0 and (tmp_path / "out.partial").exists()
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q", "--resume", "--unit-size", "1", "--json",
                         tmp_path / "resumed.json")
    assert code == 0, lines
    whole, resumed = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "resumed.json"))
    assert resumed["resumed_units"] >= 6
    assert resumed["requantization"] == whole["requantization"]
    assert_same(load_model(str(tmp_path / "out")), load_model(str(tmp_path / "whole")))


# --- mixed dtypes and formats ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A bf16 base with an fp16 and an fp32 fine-tune, and an FP8 fine-tune of the same base."""
    root = tmp_path_factory.mktemp("mixed")
    base = _llama(0)
    fts = [_llama(1, base), _llama(2, base, drift=0.2)]
    cfg = _hf_llama(None)
    return [save_checkpoint(str(root / "bf16"), {n: x.to(torch.bfloat16) for n, x in base.items()}, 1, cfg),
            save_checkpoint(str(root / "fp16"), {n: x.to(torch.float16) for n, x in fts[0].items()}, 2, cfg),
            save_checkpoint(str(root / "fp32"), fts[1], 1, cfg),
            save_checkpoint(str(root / "fp8"), _quantize_llama(fts[1], "fp8_block", 2), 2, _hf_llama(FP8_CONFIG))]


@pytest.mark.parametrize("method", list(METHODS))
def test_mixed_dtypes_merge(tmp_path, mixed, method):
    paths = mixed[:3] if method != "slerp" else [mixed[0], mixed[2]]
    cfg = _linear_cfg(tmp_path, paths) if method == "linear" else _cfg(tmp_path, method, paths, METHODS[method])
    merge(load_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True))
    f32 = write_dequantized(paths, str(tmp_path / "ref"))
    want = _reference(method, f32, tmp_path)
    ref_dtype = torch.float16 if method == "linear" else torch.bfloat16  # the first input's (linear: ft1's)
    assert_same(load_model(str(tmp_path / "out")), {n: m.to(ref_dtype) for n, m in want.items()})


def test_bf16_base_with_fp8_finetune(tmp_path, mixed):
    """A plain reference keeps its dtype; an FP8 fine-tune is decoded with its scales."""
    paths = [mixed[0], mixed[1], mixed[3]]
    cfg = _cfg(tmp_path, "task_arithmetic", paths, "dtype: float32\n")
    res = merge(load_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert res.requantization is None
    want = reference_merge("task_arithmetic", *_split(write_dequantized(paths, str(tmp_path / "ref"))), [0.6, 0.8])
    assert_same(load_model(str(tmp_path / "out")), want)


def _split(paths):
    return paths[0], paths[1:]


# --- gpt-oss in transformers ----------------------------------------------------------------------------

def test_gpt_oss_bf16_output_loads_in_transformers(tmp_path, sets):
    """The bf16 output of an MXFP4 merge loads with GptOssForCausalLM.from_pretrained (experts under
    transformers' names and orientation) and computes the logits of a model holding the reference
    merge of the reference-dequantized inputs."""
    transformers = pytest.importorskip("transformers")
    paths = sets("mxfp4")
    cfg = _cfg(tmp_path, "task_arithmetic", paths, "out_dtype: bfloat16\n")
    merge(load_config(cfg), str(tmp_path / "out"), MergeOptions(quiet=True))
    got = transformers.GptOssForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    want = reference_merge("task_arithmetic", *_split(write_dequantized(paths, str(tmp_path / "ref"))), [0.6, 0.8])
    model = _gpt_oss_model()
    for p in model.parameters():  # parameters only, as from_pretrained does (buffers stay float32)
        p.data = p.data.to(torch.bfloat16)
    model.load_state_dict({n: w.to(torch.bfloat16) for n, w in want.items()})
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), model.state_dict().values()))
    ids = torch.tensor([[1, 7, 42, 3, 88, 15, 9, 60, 2, 31, 5]])
    with torch.no_grad():
        assert got.dtype == torch.bfloat16
        assert torch.equal(got(ids).logits, model(ids).logits)


def test_gpt_oss_mxfp4_output_loads_in_transformers(tmp_path, sets):
    """The default output of an MXFP4 merge (blocks and fresh exponents, quantization_config kept)
    loads with transformers' MXFP4 support (dequantized) into the reference's requantized merge."""
    transformers = pytest.importorskip("transformers")
    paths = sets("mxfp4")
    merge(load_config(_cfg(tmp_path, "task_arithmetic", paths)), str(tmp_path / "out"), MergeOptions(quiet=True))
    got = transformers.GptOssForCausalLM.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager", quantization_config=transformers.Mxfp4Config(dequantize=True))
    merged = reference_merge("task_arithmetic", *_split(write_dequantized(paths, str(tmp_path / "ref"))), [0.6, 0.8])
    save_checkpoint(str(tmp_path / "want"), requantize_like(merged, paths[0], "mxfp4"), 1,
                    json.load(open(os.path.join(paths[0], "config.json"))))
    got_sd = got.state_dict()
    for n, w in dequantized(str(tmp_path / "want")).items():
        assert torch.equal(got_sd[n], w.to(torch.bfloat16)), n


def test_fp8_output_loads_in_transformers(tmp_path):
    """The FP8 output (the reference's format, fresh scales, quantization_config kept) loads with
    transformers' own FP8 support (dequantized, on CPU) and computes the logits of a model holding
    the reference's requantized merge."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, attn_implementation="eager")
    torch.manual_seed(0)
    base = {k: v.detach().clone() for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(3)
    conf = dict(config.to_dict(), torch_dtype="bfloat16", quantization_config=FP8_CONFIG)
    paths = []
    for i in range(3):
        sd = {}
        for k, v in base.items():
            x = v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if i else v
            if x.dim() == 2 and ".layers." in k:
                sd[k], sd[k + "_scale_inv"] = quant_fp8(x, (x.shape[0] // 16, x.shape[1] // 16), BLOCK)
            else:
                sd[k] = x.to(torch.bfloat16)
        paths.append(save_checkpoint(str(tmp_path / f"m{i}"), sd, 2, conf))
    merge(load_config(_cfg(tmp_path, "task_arithmetic", paths)), str(tmp_path / "out"), MergeOptions(quiet=True))
    got = transformers.LlamaForCausalLM.from_pretrained(
        str(tmp_path / "out"), attn_implementation="eager",
        quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
    merged = reference_merge("task_arithmetic", *_split(write_dequantized(paths, str(tmp_path / "ref"))), [0.6, 0.8])
    stored = requantize_like(merged, paths[0], "fp8_block")
    save_checkpoint(str(tmp_path / "want"), stored, 1, conf)
    want_sd = {n: w.to(torch.bfloat16) for n, w in dequantized(str(tmp_path / "want")).items()}
    model = transformers.LlamaForCausalLM(config)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    model.load_state_dict(want_sd)
    got_sd = got.state_dict()
    assert all(torch.equal(got_sd[n], w) for n, w in want_sd.items())
    ids = torch.tensor([[1, 7, 42, 3, 33, 15, 9, 60]])
    with torch.no_grad():
        assert torch.equal(got(ids).logits, model(ids).logits)


# --- refused and damaged inputs ------------------------------------------------------------------------

def _folder(tmp_path, name, tensors, quant=None):
    return save_checkpoint(str(tmp_path / name), tensors, 1, _hf_llama(quant))


def _refused_at_open(path, *needles):
    with pytest.raises(InputError) as e:
        Checkpoint.open(path)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


W = torch.zeros(32, 32)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "nvfp4", "modelopt", "hqq", "gguf", "not-a-method"])
def test_other_quant_methods_are_refused(tmp_path, method):
    path = _folder(tmp_path, "m", {"model.layers.0.mlp.up_proj.weight": W}, {"quant_method": method})
    _refused_at_open(path, "config.json", repr(method), "not supported")


@pytest.mark.parametrize("tensors,needles", [
    ({"x.qweight": torch.zeros(4, 8, dtype=torch.int32), "x.qzeros": torch.zeros(1, 8, dtype=torch.int32),
      "x.scales": torch.zeros(1, 32, dtype=torch.float16)}, ["GPTQ"]),
    ({"x.weight": torch.zeros(16, 1, dtype=torch.uint8), "x.weight.absmax": torch.zeros(1),
      "x.weight.quant_state.bitsandbytes__nf4": torch.zeros(8, dtype=torch.uint8)}, ["bitsandbytes"]),
    ({"x.weight": torch.zeros(8, 4, dtype=torch.uint8), "x.weight_scale": torch.zeros(8, 1).to(torch.float8_e4m3fn),
      "x.weight_scale_2": torch.zeros(())}, ["NVFP4"]),
    ({"x.weight_packed": torch.zeros(8, 2, dtype=torch.int32), "x.weight_scale": torch.zeros(8, 1)},
     ["compressed-tensors"]),
])
def test_packed_integer_tensors_are_refused(tmp_path, tensors, needles):
    _refused_at_open(_folder(tmp_path, "m", tensors), "cannot be merged as numbers", *needles)


def test_compressed_tensors_int4_is_refused(tmp_path):
    quant = dict(_ct_config("group"), format="pack-quantized")
    _refused_at_open(_folder(tmp_path, "m", {"a": W}, quant), "pack-quantized")
    quant = _ct_config("channel")
    quant["config_groups"]["group_0"]["weights"].update(num_bits=4, type="int")
    _refused_at_open(_folder(tmp_path, "m2", {"a": W}, quant), "4-bit")


@pytest.mark.parametrize("tensors,needles", [
    ({"a.weight": W.to(torch.float8_e4m3fn)}, ["without a scale"]),
    ({"a.weight": W, "a.weight_scale_inv": torch.ones(2, 2)}, ["looks like an FP8 scale", "not FP8"]),
    ({"b.weight_scale_inv": torch.ones(2, 2)}, ["looks like an FP8 scale", "there is no"]),
    ({"a.weight": W.to(torch.float8_e4m3fn), "a.weight_scale_inv": torch.ones(3, 2)}, ["[3, 2]", "needs [2, 2]"]),
    ({"a.weight": W.to(torch.float8_e4m3fn), "a.weight_scale_inv": torch.ones(2, 2, dtype=torch.int32)},
     ["scales stored as I32"]),
    ({"e_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8)}, ["without their scales"]),
    ({"e_blocks": torch.zeros(2, 4, 1, 8, dtype=torch.uint8), "e_scales": torch.zeros(2, 4, 1, dtype=torch.uint8)},
     ["[experts, rows, groups, 16]"]),
])
def test_inconsistent_quantized_tensors_are_refused(tmp_path, tensors, needles):
    quant = {"quant_method": "mxfp4"} if any(n.startswith("e_") for n in tensors) else FP8_CONFIG
    quant = dict(quant, weight_block_size=[16, 16]) if quant is FP8_CONFIG else quant
    _refused_at_open(_folder(tmp_path, "m", tensors, quant), *needles)


@pytest.mark.parametrize("fmt,bad", [("fp8_block", float("nan")), ("fp8_block", float("inf")),
                                     ("fp8_channel", float("-inf")), ("mxfp4", 255)])
def test_nonfinite_scales_are_bad_input(tmp_path, sets, fmt, bad):
    """A NaN or infinite scale: exit 3, one line naming the file and the scale tensor, nothing left."""
    paths = list(sets(fmt))
    sd = load_model(paths[1])
    name = next(n for n in sorted(sd) if n.endswith(("_scale_inv", "weight_scale", "_scales")) and "layers.1" in n)
    s = sd[name]
    if s.dtype == torch.uint8:
        s.view(-1)[3] = bad
    else:
        s.view(-1)[-1] = bad
    conf = json.load(open(os.path.join(paths[1], "config.json")))
    paths[1] = save_checkpoint(str(tmp_path / "damaged"), sd, 1, conf)
    cfg = _cfg(tmp_path, "task_arithmetic", paths)
    code, lines, _ = run("merge", cfg, tmp_path / "out", "-q")
    one_line_error(code, lines, 3, os.path.join(paths[1], "model.safetensors"), repr(name), "NaN/Inf scale")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_catalogue_is_logical(sets):
    """Companions fold into their weight: same names and shapes as the plain model's."""
    close_all()
    fp8, plain = Checkpoint.open(sets("fp8_channel")[0]), Checkpoint.open(sets("fp8_block")[0])
    assert list(fp8.tensors) == list(plain.tensors)
    assert {n: e.shape for n, e in fp8.tensors.items()} == {n: e.shape for n, e in plain.tensors.items()}
    q = fp8.tensors["model.layers.0.mlp.up_proj.weight"]
    assert q.dtype == "F8_E4M3" and q.block == (1, H) and [p.name for p in q.extras] == [
        "model.layers.0.mlp.up_proj.input_scale"]
    oss = Checkpoint.open(sets("mxfp4")[0]).tensors
    e = oss["model.layers.0.mlp.experts.gate_up_proj"]
    assert e.dtype == "MXFP4" and e.shape == (4, 64, 192)
    assert not any(n.endswith(("_blocks", "_scales", "_scale", "_scale_inv")) for n in oss)
