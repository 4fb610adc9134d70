"""LoRA adapters (issue 19): `BASE+ADAPTER` inputs against peft's own merge_and_unload, and
`extract-lora` against float64 SVDs, with adapters made and loaded by the `peft` library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from dppa_stream.config import parse_config  # noqa: E402
from dppa_stream.errors import InputError  # noqa: E402
from dppa_stream.extract_lora import ExtractOptions, extract  # noqa: E402
from dppa_stream.pipeline import MergeOptions, merge  # noqa: E402

from .reference import load_model  # noqa: E402
from .reference_quant import dequant_fp8, quant_fp8, save_checkpoint  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _config() -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False, attn_implementation="eager")


def _base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(_config())


def _adapter(folder: str, seed: int, **kw) -> str:
    """A real peft adapter on the base, with nonzero B (peft initialises it to zero)."""
    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS, modules_to_save=["lm_head"],
               rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 3})
    cfg.update(kw)
    model = get_peft_model(_base(), LoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding" in n or "modules_to_save" in n or "lora_A" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _save_perturbed(model, seed: int, folder: str) -> str:
    """Save a peft model whose LoRA factors all get noise (peft initialises B to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)
    return folder


def _merged(adapter: str) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload of the adapter onto the base (float32): the reference."""
    model = PeftModel.from_pretrained(_base(), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def lset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = str(root / "base")
    _base().save_pretrained(base)
    paths = {"root": root, "base": base,
             "a1": _adapter(str(root / "a1"), 1), "a2": _adapter(str(root / "a2"), 2),
             "rs": _adapter(str(root / "rs"), 3, use_rslora=True, modules_to_save=None)}
    for name in ("a1", "a2"):  # the adapted models written in full by peft
        full = str(root / f"full_{name}")
        model = PeftModel.from_pretrained(_base(), paths[name]).merge_and_unload()
        model.save_pretrained(full)
        paths[f"full_{name}"] = full
    return paths


def _run(text: str, out, **kw) -> dict[str, torch.Tensor]:
    merge(parse_config(text), str(out), MergeOptions(quiet=True, overwrite=True, **kw))
    return load_model(str(out))


def _close(got: dict, want: dict, tol=2e-6):
    assert set(got) == set(want)
    for k in want:
        a, b = got[k].float(), want[k].float()
        assert a.shape == b.shape, k
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), (k, err)


# --- adapters as inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a1", "rs"])
def test_linear_of_base_plus_adapter_equals_merge_and_unload(lset, tmp_path, name):
    """Embeddings, rank/alpha patterns, modules_to_save (a1) and rsLoRA's alpha / sqrt(r) (rs)."""
    text = f"merge_method: linear\nmodels:\n  - model: {lset['base']}+{lset[name]}\n    parameters: {{weight: 1.0}}\n" \
           "dtype: float32\n"
    got = _run(text, tmp_path / "out")
    want = _merged(lset[name])
    base = load_model(lset["base"])
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert "model.embed_tokens.weight" in changed and "model.layers.1.mlp.down_proj.weight" in changed
    assert ("lm_head.weight" in changed) == (name == "a1")
    _close(got, want)


def test_ties_of_two_adapters_equals_ties_of_the_models_written_in_full(lset, tmp_path):
    cfg = ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {m1}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
           "  - model: {m2}\n    parameters: {{weight: 0.5, density: 0.4}}\ndtype: float32\n")
    b = lset["base"]
    got = _run(cfg.format(base=b, m1=f"{b}+{lset['a1']}", m2=f"{b}+{lset['a2']}"), tmp_path / "a")
    want = _run(cfg.format(base=b, m1=lset["full_a1"], m2=lset["full_a2"]), tmp_path / "b")
    _close(got, want, 1e-6)


def test_adapter_inputs_are_byte_identical_whatever_the_unit_size(lset, tmp_path):
    text = (f"merge_method: dare_ties\nbase_model: {lset['base']}\nmodels:\n"
            f"  - model: {lset['base']}+{lset['a1']}\n    parameters: {{weight: 0.7, density: 0.5}}\n"
            f"  - model: {lset['base']}+{lset['a2']}\n    parameters: {{weight: 0.5, density: 0.6}}\ndtype: bfloat16\n")
    outs = []
    for i, unit in enumerate((None, 1 << 12)):
        merge(parse_config(text), str(tmp_path / f"o{i}"), MergeOptions(quiet=True, unit_bytes=unit, seed=3))
        outs.append(open(tmp_path / f"o{i}" / "model.safetensors", "rb").read())
    assert outs[0] == outs[1]


def test_dp_statistics_see_the_adapted_weights(lset, tmp_path):
    """DPPA's statistics of `base+adapter` are those of the adapted model written out, not the base's."""
    from dppa_stream import stats_report

    b = lset["base"]
    full = tmp_path / "full"
    _run(f"merge_method: linear\nmodels:\n  - model: {b}+{lset['a1']}\n    parameters: {{weight: 1.0}}\n"
         "dtype: float32\n", full)
    text = ("merge_method: dppa\nbase_model: {b}\nmodels:\n  - model: {m}\n    parameters: {{weight: 1.0}}\n"
            "dtype: float32\n")

    def stats(m):
        js = stats_report.collect_stats(parse_config(text.format(b=b, m=m)), MergeOptions(quiet=True)).to_json()
        for m in js["models"]:
            m.pop("path")
        return json.dumps(js["models"], sort_keys=True, default=str)

    got = stats(f"{b}+{lset['a1']}")
    assert got == stats(str(full))
    assert got != stats(lset["base"] + "+" + lset["rs"])


def test_fp8_base_with_an_adapter(lset, tmp_path):
    """A block-FP8 base: its rows dequantized, the delta added; written FP8 like the base, or plain."""
    sd = load_model(lset["base"])
    stored, deq = {}, {}
    for n, x in sd.items():
        if x.dim() == 2 and ".layers." in n:
            codes, s = quant_fp8(x.float(), (-(-x.shape[0] // 16), -(-x.shape[1] // 16)), (16, 16))
            stored[n], stored[n + "_scale_inv"] = codes, s
            deq[n] = dequant_fp8(codes, s, (16, 16))
        else:
            stored[n] = deq[n] = x
    cfg = json.load(open(os.path.join(lset["base"], "config.json")))
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [16, 16]}
    fp8 = save_checkpoint(str(tmp_path / "fp8"), stored, config=cfg)
    plain = str(tmp_path / "deq")
    save_checkpoint(plain, deq, config=json.load(open(os.path.join(lset["base"], "config.json"))))
    text = ("merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
            "out_dtype: float32\n")
    got = _run(text.format(m=f"{fp8}+{lset['rs']}"), tmp_path / "a")
    want = _run(text.format(m=f"{plain}+{lset['rs']}"), tmp_path / "b")
    _close(got, want, 1e-6)
    q = _run(text.replace("out_dtype: float32\n", "").format(m=f"{fp8}+{lset['rs']}"), tmp_path / "c")
    assert q["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn


def _broken(lset, tmp_path, name, edit=None, tensors=None) -> str:
    folder = tmp_path / name
    folder.mkdir()
    cfg = json.load(open(os.path.join(lset["a1"], "adapter_config.json")))
    if edit:
        cfg.update(edit)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    sd = load_file(os.path.join(lset["a1"], "adapter_model.safetensors"))
    if tensors:
        sd = tensors(sd)
    save_file(sd, str(folder / "adapter_model.safetensors"))
    return str(folder)


@pytest.mark.parametrize("case, needle", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"lora_bias": True}, "bias"),
    (lambda sd: {("base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight" if "layers.0.self_attn.q_proj.lora_A" in k
                  else "base_model.model.model.layers.0.self_attn.zz_proj.lora_B.weight" if "layers.0.self_attn.q_proj.lora_B" in k
                  else k): v for k, v in sd.items()}, "zz_proj' matches no tensor"),
    (lambda sd: {k: v for k, v in sd.items() if "layers.1.self_attn.q_proj.lora_B" not in k}, "has no lora_B"),
])
def test_adapters_we_cannot_apply_are_refused_in_one_line(lset, tmp_path, case, needle):
    folder = _broken(lset, tmp_path, "bad", case if isinstance(case, dict) else None,
                     case if callable(case) else None)
    (tmp_path / "c.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {lset['base']}+{folder}\n"
                                    "    parameters: {weight: 1.0}\n")
    res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", str(tmp_path / "c.yml"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3 and len(res.stderr.splitlines()) == 1, res.stderr
    assert needle in res.stderr and not os.path.exists(tmp_path / "out")


def test_a_plus_inside_a_path_is_split_where_an_adapter_is(lset, tmp_path):
    import shutil

    base = str(tmp_path / "my+base")
    shutil.copytree(lset["base"], base)
    ad = str(tmp_path / "ad+x")
    shutil.copytree(lset["a1"], ad)
    cfg = parse_config(f"merge_method: linear\nmodels:\n  - model: {base}+{ad}\n    parameters: {{weight: 1.0}}\n")
    from dppa_stream.lora import split_key

    assert split_key(cfg.models[0].path) == (base, ad)


# --- extraction -------------------------------------------------------------------------------------


def _svd(delta: torch.Tensor):
    return torch.linalg.svd(delta.double(), full_matrices=False)


@pytest.fixture(scope="module")
def eset(lset, tmp_path_factory):
    """A fine-tune whose 2-D weights all moved (full rank deltas) and a norm changed."""
    root = tmp_path_factory.mktemp("ex")
    base = load_model(lset["base"])
    g = torch.Generator().manual_seed(7)
    ft = {}
    for k, v in base.items():
        ft[k] = v + 0.01 * torch.randn(v.shape, generator=g) if v.dim() == 2 or k == "model.norm.weight" else v
    path = str(root / "ft")
    save_checkpoint(path, ft, config=json.load(open(os.path.join(lset["base"], "config.json"))))
    return {"ft": path, "base": lset["base"], "sd_ft": ft, "sd_base": base, "root": root}


def _factors(out: str) -> tuple[dict, dict]:
    return load_file(os.path.join(out, "adapter_model.safetensors")), json.load(open(os.path.join(out, "adapter_config.json")))


def test_full_rank_extraction_reproduces_the_delta_and_peft_loads_it(eset, tmp_path):
    out = str(tmp_path / "ad")
    res = extract(eset["ft"], eset["base"], out, ExtractOptions(rank=128, embeddings=True))
    assert abs(res.energy - 1) < 1e-12
    sd, cfg = _factors(out)
    assert cfg["modules_to_save"] == ["model.norm"]
    model = PeftModel.from_pretrained(_base(), out)
    merged = model.merge_and_unload().state_dict()
    for k, want in eset["sd_ft"].items():
        assert (merged[k] - want).abs().max().item() < 2e-6, k
    ids = torch.arange(20).reshape(2, 10)
    full = LlamaForCausalLM(_config())
    full.load_state_dict(eset["sd_ft"])
    with torch.no_grad():
        a = PeftModel.from_pretrained(_base(), out)(ids).logits
        b = full(ids).logits
    assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("exact_below", [1 << 22, 0])
def test_low_rank_matches_a_float64_svd(eset, tmp_path, exact_below):
    rank = 6
    out = str(tmp_path / "ad")
    res = extract(eset["ft"], eset["base"], out, ExtractOptions(rank=rank, exact_below=exact_below, power_iters=3))
    sd, cfg = _factors(out)
    name = "model.layers.1.mlp.up_proj"
    delta = eset["sd_ft"][name + ".weight"] - eset["sd_base"][name + ".weight"]
    u, s, vh = _svd(delta)
    rep = next(t for t in res.tensors if t.name == name + ".weight")
    tol = 1e-9 if exact_below else 2e-2  # the randomized SVD on a flat (random) spectrum: its hardest case
    assert rep.rank == rank and torch.allclose(torch.tensor(rep.top[:rank], dtype=torch.float64), s[:rank], rtol=tol)
    assert abs(rep.kept / rep.energy - (s[:rank] ** 2).sum().item() / (s ** 2).sum().item()) < tol
    got = sd[f"base_model.model.{name}.lora_B.weight"].double() @ sd[f"base_model.model.{name}.lora_A.weight"].double()
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    err, opt = (delta.double() - got).norm().item(), (delta.double() - best).norm().item()
    if exact_below:
        assert (got - best).abs().max().item() < 1e-6
    else:
        assert err <= opt * 1.01
    assert "lm_head" in cfg["modules_to_save"] and "model.embed_tokens" in cfg["modules_to_save"]


def test_extraction_is_byte_identical_whatever_the_memory_limit(eset, tmp_path):
    outs = []
    for i, limit in enumerate((None, 330 << 20)):
        out = str(tmp_path / f"ad{i}")
        extract(eset["ft"], eset["base"], out, ExtractOptions(rank=5, exact_below=0, memory_limit=limit))
        outs.append(open(os.path.join(out, "adapter_model.safetensors"), "rb").read())
    assert outs[0] == outs[1]


def test_extract_lora_cli(eset, tmp_path):
    out, js = tmp_path / "ad", tmp_path / "e.json"
    res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "extract-lora", eset["ft"], eset["base"],
                          str(out), "--rank", "4", "--energy", "0.5", "--json", str(js), "--plot", str(tmp_path / "e.png")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "overall:" in res.stderr and os.path.getsize(tmp_path / "e.png") > 1000
    data = json.loads(js.read_text())
    assert 0 < data["energy_kept"] < 1 and all(t["rank"] <= 4 for t in data["tensors"])
    again = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "extract-lora", eset["ft"], eset["base"],
                            str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 4 and "--overwrite" in again.stderr and len(again.stderr.splitlines()) == 1


def test_extracting_from_base_plus_adapter_recovers_the_adapter(lset, tmp_path):
    """FINETUNED may itself be BASE+ADAPTER: its deltas are the adapter's, of rank <= 8 (embeddings and
    lm_head saved whole)."""
    out = str(tmp_path / "ad")
    res = extract(f"{lset['base']}+{lset['a1']}", lset["base"], out, ExtractOptions(rank=8))
    assert res.energy > 1 - 1e-9
    got = PeftModel.from_pretrained(_base(), out).merge_and_unload().state_dict()
    _close({k: got[k] for k in got}, _merged(lset["a1"]), 1e-5)


def test_mismatched_or_identical_models_are_refused(eset, lset, tmp_path):
    with pytest.raises(InputError, match="tensor names differ"):
        extract(lset["a1"] + "/adapter_model.safetensors", eset["base"], str(tmp_path / "x"), ExtractOptions())
    with pytest.raises(InputError, match="no tensor differs"):
        extract(eset["base"], eset["base"], str(tmp_path / "x"), ExtractOptions())
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.partial")


# --- mergekit 0.1.5 on the same YAML ----------------------------------------------------------------


def _mergekit_python():
    env = os.environ.get("MERGEKIT_VENV")
    default = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-mergekit")
    venv = env or (default if os.path.isdir(default) else None)
    return os.path.join(venv, "bin", "python") if venv else None


@pytest.mark.skipif(_mergekit_python() is None, reason="mergekit 0.1.5 not available: set MERGEKIT_VENV")
def test_mergekit_gives_the_same_tensors(lset, tmp_path):
    """mergekit merges each adapter into a cached full model with peft, then merges; we never
    write the adapted model, and get the same tensors (float32 rounding)."""
    b = lset["base"]
    configs = {
        "linear": f"merge_method: linear\nmodels:\n  - model: {b}+{lset['a1']}\n    parameters: {{weight: 1.0}}\n"
                  "dtype: float32\n",
        "ties": f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {b}+{lset['a1']}\n"
                "    parameters: {weight: 0.7, density: 0.5}\n"
                f"  - model: {b}+{lset['rs']}\n    parameters: {{weight: 0.5, density: 0.4}}\ndtype: float32\n",
    }
    jobs = []
    for name, text in configs.items():
        (tmp_path / f"{name}.yml").write_text(text)
        jobs.append({"config": str(tmp_path / f"{name}.yml"), "out": str(tmp_path / f"mk_{name}"), "seed": 0,
                     "lora_merge_cache": str(tmp_path / "lora_cache")})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    driver = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mergekit_driver.py")
    proc = subprocess.run([_mergekit_python(), driver, str(tmp_path / "jobs.json"), str(tmp_path / "res.json")],
                          capture_output=True, text=True, timeout=600)
    res = json.loads((tmp_path / "res.json").read_text())
    assert proc.returncode == 0 and "broken" not in res, (proc.stderr[-2000:], res)
    for name, text in configs.items():
        job = next(j for j in res["jobs"] if j["out"].endswith("mk_" + name))
        assert job["ok"], job["error"]
        ours = _run(text, tmp_path / f"ours_{name}")
        _close(ours, load_model(job["out"]), 2e-6)


# --- examples ------------------------------------------------------------------------------------------

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "lora")


def test_the_examples_run(lset, eset, tmp_path):
    import shutil

    (tmp_path / "models").mkdir()
    (tmp_path / "adapters").mkdir()
    shutil.copytree(lset["base"], tmp_path / "models" / "base")
    shutil.copytree(eset["ft"], tmp_path / "models" / "ft1")
    shutil.copytree(lset["a1"], tmp_path / "adapters" / "math-lora")
    shutil.copytree(lset["a2"], tmp_path / "adapters" / "code-lora")
    text = open(os.path.join(EXAMPLES, "ties_adapters.yml")).read().replace("./", str(tmp_path) + "/")
    merge(parse_config(text), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(["sh", os.path.join(EXAMPLES, "extract.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert os.path.isfile(tmp_path / "adapters" / "ft1-lora" / "adapter_model.safetensors")
    assert json.loads((tmp_path / "adapters" / "ft1-lora-energy.json").read_text())["energy_kept"] > 0.5


def test_a_merged_vocabulary_reads_embedding_rows_through_the_adapter(tmp_path):
    """`tokenizer_source: union` remaps embedding rows: an adapted input's rows come with its delta."""
    from transformers import AutoTokenizer

    from .vocab_models import vocab_set

    m = vocab_set(str(tmp_path / "v"), names=("base", "ft1"))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(m["ft1"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "lm_head"]))
    ad = _save_perturbed(model, 5, str(tmp_path / "ad"))
    full = str(tmp_path / "full")
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(m["ft1"]), ad).merge_and_unload().save_pretrained(full)
    AutoTokenizer.from_pretrained(m["ft1"]).save_pretrained(full)
    text = ("merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {f}\n    parameters: {{weight: 0.7}}\n"
            "tokenizer_source: union\ndtype: float32\n")
    got = _run(text.format(b=m["base"], f=f"{m['ft1']}+{ad}"), tmp_path / "a", unit_bytes=1 << 10)
    want = _run(text.format(b=m["base"], f=full), tmp_path / "b")
    assert got["model.embed_tokens.weight"].shape[0] > load_model(m["base"])["model.embed_tokens.weight"].shape[0]
    _close(got, want, 1e-6)


def test_hub_ids_in_the_cache_name_a_base_and_its_adapter(lset, tmp_path, monkeypatch):
    """`org/base+org/lora` as mergekit writes it: both found in the Hugging Face cache."""
    from .test_hub import cache_model

    cache = str(tmp_path / "hf-cache")
    os.makedirs(cache)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    cache_model(cache, "org/base", lset["base"])
    cache_model(cache, "org/lora", lset["a1"])
    text = "merge_method: linear\nmodels:\n  - model: {m}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    got = _run(text.format(m="org/base+org/lora"), tmp_path / "a")
    _close(got, _merged(lset["a1"]))
    with pytest.raises(InputError, match="org/none.*neither a local adapter folder nor an adapter in the"):
        parse_config(text.format(m="org/base+org/none"))


def test_fan_in_fan_out_on_gpt2_conv1d(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]: peft's delta is (B A)ᵀ (fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))

    base = str(tmp_path / "base")
    gpt2().save_pretrained(base)
    model = get_peft_model(gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                              fan_in_fan_out=True))
    ad = _save_perturbed(model, 1, str(tmp_path / "ad"))
    want = {k: v.detach().clone() for k, v in PeftModel.from_pretrained(gpt2(), ad).merge_and_unload().state_dict().items()}
    got = _run(f"merge_method: linear\nmodels:\n  - model: {base}+{ad}\n    parameters: {{weight: 1.0}}\ndtype: float32\n",
               tmp_path / "out")
    name = "transformer.h.1.attn.c_attn.weight"
    assert not torch.equal(want[name], load_model(base)[name])
    _close({k: got[k] for k in got}, {k: want[k] for k in got})


def test_a_base_downloaded_with_download_takes_a_local_adapter(lset, tmp_path):
    """`org/base+./adapter` with the base not in the cache: --download fetches the base, then the
    adapter applies to it."""
    from .fake_hub import FakeHub

    cache = str(tmp_path / "hf-cache")
    os.makedirs(cache)
    text = f"merge_method: linear\nmodels:\n  - model: org/base+{lset['a1']}\n    parameters: {{weight: 1.0}}\ndtype: float32\n"
    (tmp_path / "c.yml").write_text(text)
    with FakeHub() as fake:
        fake.add("org/base", lset["base"])
        env = dict(os.environ, HF_ENDPOINT=fake.url, HF_HUB_CACHE=cache, HF_HUB_DISABLE_PROGRESS_BARS="1")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # other test modules set them at import
            env.pop(k, None)
        res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", str(tmp_path / "c.yml"),
                              str(tmp_path / "out"), "-q", "--download"], capture_output=True, text=True, timeout=300,
                             env=env)
    assert res.returncode == 0, res.stderr
    _close(load_model(str(tmp_path / "out")), _merged(lset["a1"]))


def test_a_factor_with_nan_is_refused(lset, tmp_path):
    def poison(sd):
        k = next(k for k in sd if k.endswith("layers.0.self_attn.q_proj.lora_B.weight"))
        sd[k] = sd[k].clone()
        sd[k][3, 1] = float("nan")
        return sd

    folder = _broken(lset, tmp_path, "nan", None, poison)
    text = f"merge_method: linear\nmodels:\n  - model: {lset['base']}+{folder}\n    parameters: {{weight: 1.0}}\n"
    with pytest.raises(InputError, match="q_proj.lora_B.weight.*1 NaN/Inf"):
        merge(parse_config(text), str(tmp_path / "out"), MergeOptions(quiet=True))
    assert not os.path.exists(tmp_path / "out")
