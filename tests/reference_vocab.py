"""Independent in-memory reference for vocabulary merging, written from mergekit 0.1.5's semantics
(its tokenizer/build.py and tokenizer/embed.py, as docs/mergekit.md describes them): the output
vocabulary of `source: union`, and every input's embedding rows on it, with whole tensors and
plain loops. Does not import dppa_stream."""

from __future__ import annotations

import torch


def union_vocab(base_dir: str, other_dirs: list[str]) -> dict[str, int]:
    """The base tokenizer's vocabulary, then the regular tokens the other models add (model by
    model, by id), then every model's added tokens it still lacks (in the same order)."""
    from transformers import AutoTokenizer

    toks = [AutoTokenizer.from_pretrained(d) for d in [base_dir, *other_dirs]]
    out = dict(toks[0].get_vocab())
    added = {info.content for t in toks for info in t.added_tokens_decoder.values()}
    for t in toks[1:]:
        for text, _ in sorted(t.get_vocab().items(), key=lambda kv: kv[1]):
            if text not in out and text not in added:
                out[text] = len(out)
    for t in toks:
        for _, info in sorted(t.added_tokens_decoder.items()):
            if info.content not in out:
                out[info.content] = len(out)
    return out


def vocab_of(folder: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def vocab_rows(out_vocab: dict[str, int], vocabs: list[dict[str, int]], tensors: list[torch.Tensor],
               base: int | None, tokens: dict | None = None, pad: int | None = None) -> list[torch.Tensor]:
    """Each input's tensor on the output vocabulary, in its own dtype.

    For output token t and input i: i's own row for t if i has t (and t is not `force`d); else t's
    default row: from `tokens[t]["source"]` if given (("model", i): input i's row for t;
    ("row", i, r): row r of input i; ("zero",)), else the only input that has t, zeros if none has
    it, the base's row if the base has it, or the float32 mean of the rows of the inputs that have
    it, summed in input order. Rows past the vocabulary (`pad`): the mean of the input's rows."""
    tokens = tokens or {}
    size = len(out_vocab)
    rows = -(-size // pad) * pad if pad else size
    shape = tensors[0].shape[1:]
    outs = [torch.zeros((rows, *shape), dtype=torch.float32) for _ in tensors]

    def own(i: int, text: str) -> torch.Tensor:
        return tensors[i][vocabs[i][text]].float()

    for text, j in out_vocab.items():
        has = [i for i, v in enumerate(vocabs) if text in v]
        spec = tokens.get(text, {})
        source = spec.get("source")
        if source is None:
            if len(has) == 1:
                default = own(has[0], text)
            elif not has:
                default = torch.zeros(shape)
            elif base is not None and base in has:
                default = own(base, text)
            else:
                acc = torch.zeros(shape)
                for i in has:
                    acc = acc + own(i, text)
                default = acc / len(has)
        elif source[0] == "zero":
            default = torch.zeros(shape)
        elif source[0] == "model":
            default = own(source[1], text)
        else:
            default = tensors[source[1]][source[2]].float()
        default = default.to(tensors[0].dtype).float()  # stored in the checkpoints' dtype
        for i in range(len(tensors)):
            outs[i][j] = own(i, text) if i in has and not spec.get("force") else default
    for o in outs:
        if rows > size:
            o[size:] = o[:size].double().mean(0).float().to(tensors[0].dtype).float()
    return [o.to(tensors[0].dtype) for o in outs]
