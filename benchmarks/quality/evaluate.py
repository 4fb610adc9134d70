"""Exact-match accuracy of a checkpoint folder on one domain, by batched greedy decoding.

As a command (this is what `dppa-stream search --eval-cmd` runs):

    python benchmarks/quality/evaluate.py --model DIR --domain add --split val [--n 100]

prints the accuracy (a fraction in [0, 1]) as its last line. Importing torch and transformers
costs a few seconds per process, which would dominate a factor search of tiny models, so when
the environment names an evaluation server (`DPPA_QUALITY_EVAL_SOCKET`, set by run.py, which
serves from a thread of its own process with the model already built) the command only forwards
the request over a Unix socket and prints the answer. Without the variable it evaluates locally;
both paths run the same `Evaluator.accuracy`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading

SOCKET_ENV = "DPPA_QUALITY_EVAL_SOCKET"


class Evaluator:
    """Keeps one model instance per shape and reloads weights into it for every folder."""

    def __init__(self, n_val: int = 100, n_test: int = 200, batch: int = 256):
        self.n = {"val": n_val, "test": n_test}
        self.batch = batch
        self._models = {}
        self._lock = threading.Lock()
        self.calls = 0

    def _model(self, folder: str):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from .model import load_weights

        with open(os.path.join(folder, "config.json")) as f:
            cfg_dict = json.load(f)
        key = json.dumps({k: cfg_dict.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "intermediate_size", "vocab_size", "max_position_embeddings")})
        if key not in self._models:
            cfg = LlamaConfig(**{k: v for k, v in cfg_dict.items() if k not in ("dtype", "torch_dtype", "architectures")})
            cfg._attn_implementation = "sdpa"
            self._models[key] = LlamaForCausalLM(cfg).float().eval()
        model = self._models[key]
        weights = {k: v.float() for k, v in load_weights(folder).items()}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise ValueError(f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            finite = all(torch.isfinite(v).all() for v in weights.values())
        return model, finite

    def accuracy(self, folder: str, domain: str, split: str) -> float:
        from . import tasks

        with self._lock:
            self.calls += 1
            model, finite = self._model(folder)
            data = tasks.eval_set(domain, split, self.n[split])
            if not finite:
                return 0.0
            preds = greedy(model, [p for p, _ in data], tasks.MAX_ANSWER[domain] + 1, self.batch)
            return sum(p == a for p, (_, a) in zip(preds, data)) / len(data)

    def accuracies(self, folder: str, domains, split: str) -> dict[str, float]:
        return {d: self.accuracy(folder, d, split) for d in domains}


def greedy(model, prompts: list[str], max_new: int, batch: int = 256) -> list[str]:
    """Batched greedy decoding with a KV cache; prompts are left-padded within a batch."""
    import torch

    from . import tasks

    out = []
    for s in range(0, len(prompts), batch):
        chunk = [[tasks.BOS_ID] + tasks.encode(p) for p in prompts[s:s + batch]]
        T = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), T), tasks.PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, T - len(c):] = torch.tensor(c)
            mask[i, T - len(c):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        gen = []
        done = torch.zeros(len(chunk), dtype=torch.bool)
        cache_arg = _cache_kwarg(model)
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            for step in range(max_new):
                nxt = res.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, tasks.EOS_ID), nxt)
                gen.append(nxt)
                done |= nxt == tasks.EOS_ID
                if bool(done.all()) or step == max_new - 1:
                    break
                mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=torch.long)], dim=1)
                pos = pos[:, -1:] + 1
                past = res["cache"] if "cache" in res else res["past_key_values"]
                res = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                            **{cache_arg: past})
        gen = torch.stack(gen, dim=1)
        out.extend(tasks.decode(row) for row in gen.tolist())
    return out


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept both."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------
# The evaluation server (a thread of run.py) and its client (the --eval-cmd process)


class EvalServer:
    """Answers {"model", "domain", "split"} requests, one JSON line each, on a Unix socket."""

    def __init__(self, evaluator: Evaluator, path: str):
        self.evaluator, self.path = evaluator, path
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    req = json.loads(_read_line(conn))
                    score = self.evaluator.accuracy(req["model"], req["domain"], req["split"])
                    reply = {"score": score}
                except Exception as e:  # reported to the client, which exits non-zero
                    reply = {"error": f"{type(e).__name__}: {e}"}
                conn.sendall((json.dumps(reply) + "\n").encode())

    def close(self):
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


def _read_line(conn) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf.decode()


def ask_server(path: str, model: str, domain: str, split: str) -> float:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall((json.dumps({"model": os.path.abspath(model), "domain": domain, "split": split}) + "\n").encode())
        reply = json.loads(_read_line(s))
    if "error" in reply:
        raise SystemExit(f"evaluation failed: {reply['error']}")
    return reply["score"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--n", type=int, default=None, help="examples (default: 100 val / 200 test)")
    args = ap.parse_args(argv)
    path = os.environ.get(SOCKET_ENV)
    if path and args.n is None:
        score = ask_server(path, args.model, args.domain, args.split)
    else:
        ev = Evaluator()
        if args.n:
            ev.n[args.split] = args.n
        score = ev.accuracy(args.model, args.domain, args.split)
    print(f"accuracy {args.domain}/{args.split}: {score:.6f}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script path: make the package importable
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        __package__ = "benchmarks.quality"
        import benchmarks.quality  # noqa: F401
    sys.exit(main())
