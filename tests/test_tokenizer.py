"""Vocabulary merging (`tokenizer:` / `tokenizer_source:` / `chat_template:`), checked against the
independent reference in reference_vocab.py: the output tokenizer's vocabulary, every vocabulary
tensor's rows (own rows, the base's, a donor's, means, zeros, configured sources, padding), the
merge on top of them, config.json's vocab_size, and the same bytes whatever the work-unit size or
thread count (embedding rows are gathered per unit, across unit boundaries)."""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from dppa_stream.config import parse_config  # noqa: E402
from dppa_stream.errors import InputError, UsageError  # noqa: E402
from dppa_stream.pipeline import MergeOptions, merge  # noqa: E402
from dppa_stream.tokenizer import CHAT_TEMPLATES, is_vocab_tensor  # noqa: E402

from .reference import gta, load_model  # noqa: E402
from .reference_vocab import union_vocab, vocab_of, vocab_rows  # noqa: E402
from .vocab_models import vocab_set  # noqa: E402

VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {dt: vocab_set(str(root / str(dt).removeprefix("torch.")), dt) for dt in (torch.float32, torch.bfloat16)}


def _merge(tmp_path, text: str, name: str = "out", **opts) -> str:
    out = str(tmp_path / name)
    merge(parse_config(text, str(tmp_path / "cfg.yml")), out, MergeOptions(quiet=True, **opts))
    return out


def _ta(base: str, fts: list[tuple[str, float]], extra: str = "") -> str:
    body = "".join(f"  - model: {p}\n    parameters: {{weight: {w}}}\n" for p, w in fts)
    return f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{body}{extra}"


def _expected(paths: list[str], weights: list[float], out_vocab, base: int = 0, tokens=None, pad=None) -> dict:
    """task_arithmetic of the inputs (base first) with every vocabulary tensor remapped first."""
    loaded = [load_model(p) for p in paths]
    vocabs = [vocab_of(p) for p in paths]
    out = {}
    for name in loaded[0]:
        xs = [m[name] for m in loaded]
        if is_vocab_tensor(name):
            xs = vocab_rows(out_vocab, vocabs, xs, base, tokens, pad)
        b = xs[0].float()
        out[name] = gta(b, [x.float() - b for x in xs[1:]], weights, False, False, 1.0).to(xs[0].dtype)
    return out


def _same(out: str, expected: dict) -> None:
    got = load_model(out)
    assert set(got) == set(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name], want), f"{name}: {(got[name].float() - want.float()).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("unit", [None, 200], ids=["whole", "rows-split"])
def test_union_matches_reference(models, tmp_path, dtype, unit):
    m = models[dtype]
    fts = [(m["ft1"], 0.5), (m["ft2"], 0.7), (m["ft4"], 0.3)]
    out = _merge(tmp_path, _ta(m["base"], fts, "tokenizer_source: union\n"), unit_bytes=unit)
    want_vocab = union_vocab(m["base"], [m["ft1"], m["ft2"], m["ft4"]])
    assert vocab_of(out) == want_vocab
    # the cases the rows cover: base rows for ft4's missing 't', ft1's own 'uv', means of <a>/<b>
    assert {"t", "uv", "<a>", "<b>"} <= set(want_vocab) and "t" not in vocab_of(m["ft4"])
    _same(out, _expected([m["base"], m["ft1"], m["ft2"], m["ft4"]], [0.5, 0.7, 0.3], want_vocab))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == len(want_vocab)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok.get_vocab())


def test_tokens_force_zero_model_token_and_padding(models, tmp_path):
    m = models[torch.float32]
    cfg = _ta(m["base"], [(m["ft1"], 0.5), (m["ft3"], 0.7)], f"""tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<a>": {{source: {m['ft1']}, force: true}}
    "c": {{source: {{kind: zero}}, force: true}}
    "<new>": {{source: {{kind: model_token, model: {m['ft3']}, token: "d"}}}}
    "b": {{source: {{kind: model_token, model: {m['base']}, token_id: 5}}, force: true}}
    "e": {{}}
""")
    out = _merge(tmp_path, cfg, unit_bytes=300)
    want_vocab = union_vocab(m["base"], [m["ft1"], m["ft3"]])
    want_vocab["<new>"] = len(want_vocab)
    assert vocab_of(out) == want_vocab
    d_in_ft3 = vocab_of(m["ft3"])["d"]
    tokens = {"<a>": {"source": ("model", 1), "force": True}, "c": {"source": ("zero",), "force": True},
              "<new>": {"source": ("row", 2, d_in_ft3)}, "b": {"source": ("row", 0, 5), "force": True}}
    _same(out, _expected([m["base"], m["ft1"], m["ft3"]], [0.5, 0.7], want_vocab, 0, tokens, pad=8))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vocab_size"] == 32  # 26 tokens padded to a multiple of 8


def test_source_base_drops_a_finetunes_extra_rows(models, tmp_path):
    m = models[torch.bfloat16]
    out = _merge(tmp_path, _ta(m["base"], [(m["ft1"], 1.0)], "tokenizer_source: base\n"), unit_bytes=200)
    want_vocab = vocab_of(m["base"])
    assert vocab_of(out) == want_vocab
    _same(out, _expected([m["base"], m["ft1"]], [1.0], want_vocab))


def test_source_model_and_linear_with_the_base_as_an_input(models, tmp_path):
    m = models[torch.float32]
    cfg = (f"merge_method: linear\nbase_model: {m['base']}\nmodels:\n  - model: {m['ft2']}\n    parameters: {{weight: 0.4}}\n"
           f"  - model: {m['ft4']}\n    parameters: {{weight: 0.6}}\n  - model: {m['base']}\n    parameters: {{weight: 1.0}}\n"
           f"tokenizer_source: {m['ft2']}\n")
    out = _merge(tmp_path, cfg)
    want_vocab = vocab_of(m["ft2"])
    assert vocab_of(out) == want_vocab
    paths = [m["ft2"], m["ft4"], m["base"]]
    loaded, vocabs = [load_model(p) for p in paths], [vocab_of(p) for p in paths]
    got = load_model(out)
    for name in VOCAB:  # the base (input 2) still gives its rows to the inputs that lack a token
        xs = vocab_rows(want_vocab, vocabs, [x[name] for x in loaded], 2)
        want = (0.4 * xs[0] + 0.6 * xs[1] + 1.0 * xs[2]) / 2.0
        assert torch.allclose(got[name], want, rtol=1e-6, atol=1e-7), name


def test_tied_embeddings(tmp_path):
    m = vocab_set(str(tmp_path / "tied"), torch.float32, tie=True, names=("base", "ft1", "ft2"))
    assert "lm_head.weight" not in load_model(m["base"])
    out = _merge(tmp_path, _ta(m["base"], [(m["ft1"], 0.5), (m["ft2"], 0.5)], "tokenizer_source: union\n"))
    want_vocab = union_vocab(m["base"], [m["ft1"], m["ft2"]])
    _same(out, _expected([m["base"], m["ft1"], m["ft2"]], [0.5, 0.5], want_vocab))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.get_output_embeddings().weight.shape[0] == len(want_vocab)


def test_slices_take_embeddings_from_the_first_slice_and_the_head_from_the_last(models, tmp_path):
    m = models[torch.float32]
    cfg = (f"merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {m['ft1']}, layer_range: [0, 2]}}\n"
           f"  - sources:\n      - {{model: {m['ft4']}, layer_range: [1, 2]}}\ntokenizer_source: union\n")
    out = _merge(tmp_path, cfg)
    want_vocab = union_vocab(m["ft1"], [m["ft4"]])
    assert vocab_of(out) == want_vocab
    got = load_model(out)
    for name, path in (("model.embed_tokens.weight", m["ft1"]), ("lm_head.weight", m["ft4"])):
        # mergekit remaps with the inputs of that tensor only: tokens the one input lacks get zeros
        want = vocab_rows(want_vocab, [vocab_of(path)], [load_model(path)[name]], None)[0]
        assert torch.equal(got[name], want), name
    assert got["model.layers.2.mlp.up_proj.weight"].equal(load_model(m["ft4"])["model.layers.1.mlp.up_proj.weight"])


def test_same_bytes_whatever_the_units_and_threads(models, tmp_path):
    m = models[torch.bfloat16]
    cfg = _ta(m["base"], [(m["ft1"], 0.5), (m["ft2"], 0.7), (m["ft4"], 0.3)],
              "tokenizer:\n  source: union\n  pad_to_multiple_of: 16\n")
    a = _merge(tmp_path, cfg, "a")
    b = _merge(tmp_path, cfg, "b", unit_bytes=150, scheduler="threads:2")
    names = sorted(f for f in os.listdir(a) if f != "README.md")
    assert names == sorted(f for f in os.listdir(b) if f != "README.md")
    for f in names:
        assert filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False), f


def test_different_vocabularies_without_a_tokenizer_are_refused_naming_the_fix(models, tmp_path):
    m = models[torch.float32]
    with pytest.raises(InputError, match="vocabulary sizes differ.*tokenizer_source: union"):
        _merge(tmp_path, _ta(m["base"], [(m["ft1"], 1.0)]))


@pytest.mark.parametrize("extra, needle", [
    ("tokenizer_source: union\ntokenizer: {source: base}\n", "either 'tokenizer_source' or 'tokenizer'"),
    ("tokenizer: {source: union, pad_to_multiple_of: 0}\n", "pad_to_multiple_of must be a positive integer"),
    ("tokenizer: {source: union, pad: 8}\n", "unknown key tokenizer.'pad'"),
    ("tokenizer: {tokens: {x: {source: {kind: model_token, model: m}}}}\n", "exactly one of token_id and token"),
    ("tokenizer: {tokens: {x: {source: {kind: other}}}}\n", "must be a model, {kind: zero}"),
    ("tokenizer_source: [a]\n", "tokenizer_source must be union, base or a model"),
    ("chat_template: chat\n", "not auto, a known name"),
])
def test_config_errors(tmp_path, extra, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        parse_config(_ta("/m/base", [("/m/ft", 1.0)], extra), "cfg.yml")


def test_a_token_source_that_is_not_an_input_is_refused(models, tmp_path):
    m = models[torch.float32]
    cfg = _ta(m["base"], [(m["ft1"], 1.0)], f"tokenizer:\n  tokens:\n    \"<a>\": {{source: {m['ft2']}, force: true}}\n")
    with pytest.raises(UsageError, match="not one of the inputs"):
        _merge(tmp_path, cfg)


def test_chat_templates(models, tmp_path):
    m = models[torch.float32]
    fts = [(m["ft1"], 0.5), (m["ft2"], 0.5), (m["ft3"], 0.5)]
    from transformers import AutoTokenizer

    auto = _merge(tmp_path, _ta(m["base"], fts, "tokenizer_source: base\nchat_template: auto\n"), "auto")
    assert AutoTokenizer.from_pretrained(auto).chat_template == "{{ messages }} two"  # two of three models
    named = _merge(tmp_path, _ta(m["base"], [(m["ft3"], 1.0)], "chat_template: chatml\n"), "named")  # no tokenizer block
    tok = AutoTokenizer.from_pretrained(named)
    assert tok.chat_template == CHAT_TEMPLATES["chatml"] and tok.get_vocab() == vocab_of(m["base"])
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


CONVERSATIONS = [
    [{"role": "user", "content": " Hello there "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    [{"role": "system", "content": "S"}, {"role": "user_context", "content": "ctx"}, {"role": "user", "content": "do"}],
]


def test_named_chat_templates_render_like_mergekits():
    """Our Jinja for each name renders every conversation exactly as mergekit 0.1.5's file does;
    except that mergekit's exaone file leaks its own indentation and line breaks into the prompt
    (it has no whitespace control), so for exaone only the text without whitespace must agree."""
    from .test_mergekit_parity import MK_FROM, MK_PYTHON

    if MK_PYTHON is None:
        pytest.skip(MK_FROM)
    code = "import importlib.resources as r, json, mergekit._data.chat_templates as t; print(json.dumps(" \
           "{p.name[:-6]: p.read_text() for p in r.files(t).iterdir() if p.name.endswith('.jinja')}))"
    theirs = json.loads(subprocess.run([MK_PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert set(theirs) == set(CHAT_TEMPLATES)
    from .vocab_models import tokenizer

    tok = tokenizer()
    for name, template in CHAT_TEMPLATES.items():
        for conv in CONVERSATIONS:
            for gen in (False, True):
                def render(t):
                    try:
                        return tok.apply_chat_template(conv, chat_template=t, tokenize=False, add_generation_prompt=gen)
                    except Exception as e:  # mistral refuses some role orders: both must refuse
                        return type(e).__name__
                ours, want = render(template), render(theirs[name])
                if name == "exaone":
                    ours, want = re.sub(r"\s+", "", ours), re.sub(r"\s+", "", want)
                assert ours == want, (name, conv, gen)


def test_cli_hint_for_different_vocabularies(models, tmp_path):
    m = models[torch.float32]
    cfg = tmp_path / "c.yml"
    cfg.write_text(_ta(m["base"], [(m["ft2"], 1.0)]))
    res = subprocess.run([sys.executable, "-m", "dppa_stream.cli.main", "merge", str(cfg), str(tmp_path / "o"), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 3 and len(res.stderr.splitlines()) == 1, res.stderr
    assert "tokenizer_source: union" in res.stderr and not (tmp_path / "o.partial").exists()


def test_tokenizer_files_linking_outside_the_model_are_refused(models, tmp_path):
    """The symlink policy holds for the files transformers reads too: nothing outside a model is read."""
    import shutil

    m = models[torch.float32]
    ft = tmp_path / "ft"
    shutil.copytree(m["ft1"], ft)
    secret = tmp_path / "secret.json"
    secret.write_text((ft / "tokenizer.json").read_text())
    (ft / "tokenizer.json").unlink()
    (ft / "tokenizer.json").symlink_to(secret)
    with pytest.raises(InputError, match="points outside the checkpoint folder"):
        _merge(tmp_path, _ta(m["base"], [(str(ft), 1.0)], "tokenizer_source: union\n"))
