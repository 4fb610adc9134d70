"""Tiny Llama models with tiny tokenizers (built with the `tokenizers` library) whose vocabularies
differ the ways fine-tunes' do: special tokens added by a chat fine-tune, a new regular token, a
token missing, more rows than tokens. Saved with transformers, as a user's models are."""

from __future__ import annotations

import os

import torch

WORDS = list("abcdefghijklmnopqrst")  # 20 regular tokens after <s> and </s>

# name -> (seed, regular tokens added, regular tokens dropped, special tokens added, chat template)
MODELS = {
    "base": (0, (), (), (), None),
    "ft1": (1, ("uv",), (), ("<a>", "<b>"), "{{ messages }} one"),
    "ft2": (2, (), (), ("<a>", "<b>"), "{{ messages }} two"),
    "ft3": (3, (), (), (), "{{ messages }} two"),
    "ft4": (4, (), ("t",), ("<a>",), None),  # lacks a base token; shares <a> with ft1, ft2
}


def tokenizer(extra=(), dropped=(), added=(), template=None):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in WORDS if w not in dropped] + list(extra)
    tok = Tokenizer(models.BPE(vocab={w: i for i, w in enumerate(["<s>", "</s>"] + words)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    for a in added:
        tok.add_tokens([AddedToken(a, special=True)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if template:
        out.chat_template = template
    return out


def write_model(folder: str, seed: int, extra=(), dropped=(), added=(), template=None, dtype=torch.float32,
                tie: bool = False, padding_rows: int = 0) -> str:
    """A 2-layer Llama (hidden 16) with its tokenizer; `padding_rows` more embedding rows than tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer(extra, dropped, added, template)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok.get_vocab()) + padding_rows, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # rows of different models must differ clearly
            p.add_(torch.randn(p.shape) * 0.05)
    model.to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def vocab_set(root: str, dtype=torch.float32, tie: bool = False, names=tuple(MODELS)) -> dict[str, str]:
    out = {}
    for name in names:
        seed, extra, dropped, added, template = MODELS[name]
        out[name] = write_model(os.path.join(root, name), seed, extra, dropped, added, template, dtype, tie)
    return out
