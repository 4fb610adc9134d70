"""Synthetic tasks, the character vocabulary, and the fixed validation/test splits.

Every example is `<s>` TAG PROMPT `=` ANSWER `</s>`, one token per character. The loss is on the
answer and `</s>` only; decoding is greedy from the prompt up to `=`, and an answer is correct when
the decoded text equals ANSWER exactly.

Each task has two levels. The base model is trained on a *general mixture*: copying, the easy
level of every domain (short strings) and a little (`hard_share`, 2 % in the default plan) of the
hard level, so it is a weak generalist. A domain fine-tune teaches the hard level of one domain
(longer strings), which the base mostly gets wrong: fine-tuning has to move the weights to get it
right, as a real domain fine-tune does.

| domain | prompt → answer (hard level) | easy level (base mixture) |
|---|---|---|
| `rev` | `Rqmtvza=` → `azvtmq` (5…8 letters) | 1…4 letters |
| `sort` | `S5190362=` → `0123569` (5…8 digits) | 1…4 digits |
| `shift` | `Kqmtvzab=` → `rnuwabc` (each letter +1, z→a; 7…10 letters) | 1…4 letters |
| `add` | `A347+85=` → `432` (operands 0…999, at least one with 3 digits) | operands 0…99 |
| `count` | `Cb:abbcbdae=` → `3` (count a letter in 8…12 letters of a…e) | 1…6 letters |

The default plan uses `rev`, `sort` and `shift`. `add` and `count` are kept for experiments but
left out: within the CPU budget the 4-layer, 64-wide model never learned 3-digit addition, and
`count` fine-tunes were unstable at the high learning rate of the complex regime (and barely
learned in the simple one). `copy` (`P` tag, 1…8 characters) is only in the base mixture.
Validation and test sets are fixed (independent of the run seed), disjoint from each other, and
their prompts are excluded from all training data.
"""

from __future__ import annotations

import random

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
VOCAB = [PAD, BOS, EOS] + list("0123456789") + list("abcdefghijklmnopqrstuvwxyz") + list("+=:") + list("ARSCKP")
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
LETTERS = "abcdefghijklmnopqrstuvwxyz"

DOMAINS = ("add", "rev", "sort", "count", "shift")
# The longest answer per domain (plus one for </s>) bounds greedy decoding.
MAX_ANSWER = {"add": 4, "rev": 8, "sort": 8, "count": 2, "shift": 10, "copy": 8}
EVAL_SEED = {"val": 1_000_003, "test": 2_000_003}


def encode(text: str) -> list[int]:
    return [TOKEN_ID[c] for c in text]


def decode(ids) -> str:
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i in (PAD_ID, BOS_ID):
            continue
        out.append(VOCAB[i])
    return "".join(out)


def _digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(n))


def example(task: str, level: str, rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair; the prompt ends with '='."""
    hard = level == "hard"
    if task == "add":
        if hard:
            while True:
                a, b = rng.randint(0, 999), rng.randint(0, 999)
                if max(a, b) >= 100:
                    break
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"A{a}+{b}=", str(a + b)
    if task == "rev":
        n = rng.randint(5, 8) if hard else rng.randint(1, 4)
        s = "".join(rng.choice(LETTERS) for _ in range(n))
        return f"R{s}=", s[::-1]
    if task == "sort":
        n = rng.randint(5, 8) if hard else rng.randint(1, 4)
        s = _digits(rng, n)
        return f"S{s}=", "".join(sorted(s))
    if task == "count":
        n = rng.randint(8, 12) if hard else rng.randint(1, 6)
        s = "".join(rng.choice("abcde") for _ in range(n))
        c = rng.choice("abcde")
        return f"C{c}:{s}=", str(s.count(c))
    if task == "shift":
        n = rng.randint(7, 10) if hard else rng.randint(1, 4)
        s = "".join(rng.choice(LETTERS) for _ in range(n))
        return f"K{s}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)
    if task == "copy":
        n = rng.randint(1, 8)
        s = "".join(rng.choice(LETTERS + "0123456789") for _ in range(n))
        return f"P{s}=", s
    raise ValueError(f"unknown task {task!r}")


_EVAL_CACHE: dict = {}


def eval_set(domain: str, split: str, n: int) -> list[tuple[str, str]]:
    """The fixed `split` ('val' or 'test') examples of a domain: n distinct prompts; test excludes val."""
    key = (domain, split, n)
    if key not in _EVAL_CACHE:
        rng = random.Random(EVAL_SEED[split] + DOMAINS.index(domain))
        taken = set()
        if split == "test":
            taken = {p for p, _ in eval_set(domain, "val", n)}
        out = []
        while len(out) < n:
            p, a = example(domain, "hard", rng)
            if p not in taken:
                taken.add(p)
                out.append((p, a))
        _EVAL_CACHE[key] = out
    return _EVAL_CACHE[key]


class Sampler:
    """Infinite training examples from a weighted mixture of (task, level); eval prompts excluded."""

    def __init__(self, mixture: dict[tuple[str, str], float], seed: int, exclude: set[str]):
        self.items = list(mixture)
        self.weights = [mixture[k] for k in self.items]
        self.rng = random.Random(seed)
        self.exclude = exclude

    def __call__(self) -> tuple[str, str]:
        while True:
            task, level = self.rng.choices(self.items, self.weights)[0]
            p, a = example(task, level, self.rng)
            if p not in self.exclude:
                return p, a


def excluded_prompts(domains, n_val: int, n_test: int) -> set[str]:
    out = set()
    for d in domains:
        out |= {p for p, _ in eval_set(d, "val", n_val)}
        out |= {p for p, _ in eval_set(d, "test", n_test)}
    return out


def base_mixture(domains, hard_share: float = 0.0) -> dict[tuple[str, str], float]:
    """The general pre-training mixture: copying, the easy level of every domain, and a little of
    the hard level (`hard_share` of the easy weight), so the base is a weak generalist."""
    mix = {("copy", "easy"): 1.0}
    for d in domains:
        mix[(d, "easy")] = 1.0
        if hard_share > 0:
            mix[(d, "hard")] = hard_share
    return mix


def finetune_mixture(domain: str, replay: float = 0.0, domains=()) -> dict[tuple[str, str], float]:
    """A domain fine-tune: the hard level of one domain, plus a `replay` share of the base mixture
    (as fine-tuning recipes mix in general data so the model keeps what it knew)."""
    mix = {(domain, "hard"): 1.0 - replay}
    if replay > 0:
        base = base_mixture(domains)
        total = sum(base.values())
        for k, w in base.items():
            mix[k] = mix.get(k, 0.0) + replay * w / total
    return mix
