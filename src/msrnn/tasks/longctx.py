"""The field's long-context probes, generated offline: passkey retrieval, needles in a haystack (single, multi-key,
multi-value, multi-query), variable tracking, and common / frequent word extraction.

The probes follow RULER's task families (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?") and the passkey test of Mohtashami & Jaggi (2023); the templates here are our own
wording of them. Deviations: the haystack is prose sentences from any data spec (the standard library's docstrings by
default, cut in the evaluated model's own tokens) instead of Paul Graham's essays; values are 7-digit numbers and
keys are common English words; every sample has an exact token length, so a length means the same input for every
family.

Every sample records its length in tokens, the needle's depth (its start as a fraction of the haystack; None for
tasks without one), the token spans of its needles and of the answer values inside them, and a candidate list for
log-likelihood ranking (the true answer first in ``candidates``'s order is at ``label``), so even a small model's
results say something: the rank accuracy has a chance level of ``1 / len(candidates)``.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msrnn.errors import ConfigError
from msrnn.registry import Registry

KEYS = ("apple", "river", "candle", "garden", "mirror", "pencil", "window", "forest", "ladder", "basket", "rocket",
        "violin", "marble", "saddle", "harbor", "lantern", "meadow", "pillow", "tunnel", "anchor", "button", "carpet",
        "dragon", "feather", "glacier", "helmet", "island", "jacket", "kettle", "lemon", "magnet", "needle")
COMMON_WORDS = ("table", "chair", "paper", "stone", "cloud", "bread", "horse", "field", "music", "light", "water",
                "sugar", "glass", "plant", "metal", "tiger", "ocean", "smile", "train", "money", "heart", "grape",
                "storm", "queen", "brick", "flame", "spoon", "towel", "cable", "pearl", "wheel", "shelf", "clock",
                "globe", "crown", "fence", "brush", "drum", "nest", "coin")
N_CANDIDATES = 8  # answer candidates per sample for rank accuracy: chance is 1/8


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _var(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


@dataclass(frozen=True)
class Episode:
    """What one sample says: the needles (each inserted whole; the first at the sample's depth, the rest at random
    depths), the answer values (each inside a needle), the question (ending where the answer starts), and the
    candidate answers (the true one first). ``context`` replaces the haystack for tasks that bring their own."""

    needles: tuple[str, ...]
    values: tuple[str, ...]
    question: str
    candidates: tuple[str, ...]
    context: tuple[str, ...] | None = None  # whole-context tasks (word lists): their sentences, no haystack


def _distractors(truth: str, make: Callable[[random.Random], str], rng: random.Random) -> tuple[str, ...]:
    out = [truth]
    while len(out) < N_CANDIDATES:
        c = make(rng)
        if c not in out:
            out.append(c)
    return tuple(out)


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def passkey(rng: random.Random) -> Episode:
    """One pass key in the haystack (Mohtashami & Jaggi's test)."""
    v = _number(rng)
    return Episode((f"The pass key is {v}. Remember it. {v} is the pass key.",), (v,),
                   "What is the pass key? The pass key is", _distractors(v, _number, rng))


def niah_single(rng: random.Random) -> Episode:
    """One key-value needle, its key asked (RULER's niah_single)."""
    k, v = rng.choice(KEYS), _number(rng)
    return Episode((_magic(k, v),), (v,), f"What is the special magic number for {k} mentioned in the provided text? "
                   f"The special magic number for {k} mentioned in the provided text is", _distractors(v, _number, rng))


def niah_multikey(rng: random.Random) -> Episode:
    """Four needles with different keys; the one at the depth is asked, the others distract (niah_multikey)."""
    keys = rng.sample(KEYS, 4)
    values = [_number(rng) for _ in keys]
    k, v = keys[0], values[0]
    others = tuple(values[1:])
    cands = (v, *others, *_distractors(v, _number, rng)[1 : N_CANDIDATES - len(others)])
    return Episode(tuple(_magic(a, b) for a, b in zip(keys, values, strict=True)), (v,),
                   f"What is the special magic number for {k} mentioned in the provided text? The special magic "
                   f"number for {k} mentioned in the provided text is", cands)


def _lists(values: list[str], rng: random.Random) -> tuple[str, ...]:
    """The true list first, then lists with one value replaced (the answer must be complete and exact)."""
    truth = ", ".join(values)
    out = [truth]
    while len(out) < N_CANDIDATES:
        wrong = list(values)
        wrong[rng.randrange(len(wrong))] = _number(rng)
        if ", ".join(wrong) not in out:
            out.append(", ".join(wrong))
    return tuple(out)


def niah_multivalue(rng: random.Random) -> Episode:
    """Four needles with the same key and different values; all are asked (niah_multivalue)."""
    k = rng.choice(KEYS)
    values = [_number(rng) for _ in range(4)]
    return Episode(tuple(_magic(k, v) for v in values), tuple(values),
                   f"What are all the special magic numbers for {k} mentioned in the provided text? The special "
                   f"magic numbers for {k} mentioned in the provided text are", _lists(values, rng))


def niah_multiquery(rng: random.Random) -> Episode:
    """Four needles with different keys; two are asked at once (niah_multiquery)."""
    keys = rng.sample(KEYS, 4)
    values = [_number(rng) for _ in keys]
    asked = values[:2]
    return Episode(tuple(_magic(a, b) for a, b in zip(keys, values, strict=True)), tuple(asked),
                   f"What are all the special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided "
                   f"text? The special magic numbers for {keys[0]} and {keys[1]} mentioned in the provided text are",
                   _lists(asked, rng))


def variable_tracking(rng: random.Random, hops: int = 4) -> Episode:
    """A chain of assignments ``VAR A = 1234567. VAR B = VAR A. ...`` and a distractor chain; every variable
    holding the first chain's value is asked (RULER's vt)."""
    names = set()
    while len(names) < 2 * (hops + 1):
        names.add(_var(rng))
    names = list(names)
    chain, other = names[: hops + 1], names[hops + 1 :]
    v, w = _number(rng), _number(rng)
    needles = [f"VAR {chain[0]} = {v}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:], strict=False)]
    needles += [f"VAR {other[0]} = {w}."] + [f"VAR {b} = VAR {a}." for a, b in zip(other, other[1:], strict=False)]
    truth = " ".join(chain)
    cands = [truth, " ".join(other)]
    while len(cands) < N_CANDIDATES:
        wrong = list(chain)
        wrong[rng.randrange(len(wrong))] = rng.choice(other)
        if " ".join(wrong) not in cands:
            cands.append(" ".join(wrong))
    return Episode(tuple(needles), tuple(chain), f"Find all variables that are assigned the value {v} in the text "
                   f"above. Answer: According to the chain of variable assignments in the text above, {hops + 1} "
                   f"variables are assigned the value {v}, they are:", tuple(cands))


def _top3(counts: dict[str, int], rng: random.Random) -> tuple[tuple[str, ...], tuple[str, ...]]:
    order = sorted(counts, key=lambda w: -counts[w])
    truth = order[:3]
    cands = [", ".join(truth)]
    rest = order[3:]
    while len(cands) < N_CANDIDATES:
        wrong = list(truth)
        wrong[rng.randrange(3)] = rng.choice(rest)
        if ", ".join(wrong) not in cands:
            cands.append(", ".join(wrong))
    return tuple(truth), tuple(cands)


def common_words(rng: random.Random, items: int = 60) -> Episode:
    """A numbered list of ``items`` words where three words appear far more often than the rest (each 10% of the
    list); the three are asked (RULER's cwe). The list fills the context (no haystack)."""
    words = rng.sample(COMMON_WORDS, len(COMMON_WORDS))
    top = max(4, items // 10)
    counts = {w: top for w in words[:3]}
    rest = max(0, items - 3 * top)
    for i in range(rest):  # the other words share the rest, each at most top - 2 times
        w = words[3 + i % (len(words) - 3)]
        counts[w] = counts.get(w, 0) + 1
    if max((n for w, n in counts.items() if w not in words[:3]), default=0) > top - 2:
        raise ConfigError(f"{items} list items are too many for {len(COMMON_WORDS)} words; use a shorter length")
    pool = [w for w, n in counts.items() for _ in range(n)]
    rng.shuffle(pool)
    truth, cands = _top3(counts, rng)
    lines = tuple(f"{i + 1}. {w}" for i, w in enumerate(pool))
    return Episode((), truth, "Question: What are the 3 most common words in the above list? Answer: The top 3 words "
                   "that appear most often in the list are:", cands,
                   context=("Below is a numbered list of words. Some appear more often than others. Remember the ones "
                            "that appear most often.", *lines))


def frequent_words(rng: random.Random, items: int = 120) -> Episode:
    """``items`` coded words drawn from a Zipf distribution; the three most frequent are asked (RULER's fwe). The
    text fills the context."""
    vocab = sorted({"".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5))) for _ in range(40)})
    rng.shuffle(vocab)
    weights = [1.0 / (i + 1) ** 1.5 for i in range(len(vocab))]
    draws = rng.choices(vocab, weights=weights, k=max(items, 8))
    counts = {w: draws.count(w) for w in vocab}
    ranked = sorted(vocab, key=lambda w: -counts[w])
    if counts[ranked[2]] == counts[ranked[3]]:  # a tie at the cut would make the answer ambiguous: break it
        draws += [ranked[2]]
        counts[ranked[2]] += 1
    truth, cands = _top3(counts, rng)
    return Episode((), truth, "Question: Do not count the dots. What are the three most frequently appeared coded "
                   "words in the above coded text? Answer: According to the coded text above, the three most "
                   "frequently appeared words are:", cands,
                   context=("Read the following coded text and track the frequency of each coded word.",
                            " ".join(draws) + " ..."))


@dataclass(frozen=True)
class LongTask:
    """A long-context probe: how to draw an episode, and whether it has a needle depth. A whole-context task
    (no depth) takes its size in items, about ``tokens_per_item`` tokens each."""

    name: str
    make: Callable[..., Episode]
    uses_depth: bool = True
    tokens_per_item: int = 0


LONGCTX_TASKS: Registry[LongTask] = Registry("long-context task")
for _t, _help in (
    (LongTask("passkey", passkey), "a pass key in the haystack"),
    (LongTask("niah_single", niah_single), "one key-value needle, its key asked"),
    (LongTask("niah_multikey", niah_multikey), "four needles with different keys, one asked"),
    (LongTask("niah_multivalue", niah_multivalue), "four values of one key, all asked"),
    (LongTask("niah_multiquery", niah_multiquery), "four keys, two asked"),
    (LongTask("vt", variable_tracking), "variable tracking: every variable a chain of assignments gives a value"),
    (LongTask("cwe", common_words, uses_depth=False, tokens_per_item=4), "the three most common words of a list"),
    (LongTask("fwe", frequent_words, uses_depth=False, tokens_per_item=2), "the three most frequent coded words"),
):
    LONGCTX_TASKS.add(_t.name, _t, _help)


@dataclass
class Probe:
    """One long-context sample: its prompt (context, question, answer prefix) and what a correct answer is."""

    task: str
    input_ids: list[int]
    answers: tuple[str, ...]  # every value the answer must contain
    candidates: tuple[str, ...]  # answers for log-likelihood ranking; the true one is ``candidates[label]``
    label: int
    length: int  # tokens of the prompt
    depth: float | None  # where the first needle starts, as a fraction of the haystack (None: no needle depth)
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # token [start, end) of each needle
    value_spans: list[tuple[int, int]] = field(default_factory=list)  # token [start, end) of each answer value
    question_start: int = 0


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _span_of(needle_ids: list[int], value_ids: list[int]) -> tuple[int, int] | None:
    """Where ``value_ids`` sit inside ``needle_ids`` (the first match), or None (the tokenizer merged it)."""
    n = len(value_ids)
    for i in range(len(needle_ids) - n + 1):
        if needle_ids[i : i + n] == value_ids:
            return i, i + n
    return None


class LongCtxGenerator:
    """Draws samples of one long-context task at any token length and depth, reproducibly from a seed.

    ``sentences`` is the haystack (see :func:`msrnn.tasks.noise.noise_sentences`); each is tokenized once."""

    def __init__(self, task: str | LongTask, tokenizer: Any, sentences: list[str]) -> None:
        self.task = LONGCTX_TASKS.get(task) if isinstance(task, str) else task
        if not sentences:
            raise ConfigError("the haystack is empty; name text with English sentences (--data PATH)")
        self.tokenizer = tokenizer
        self.hay = [ids for ids in (_encode(tokenizer, " " + s) for s in sentences) if ids]

    def _fill(self, n: int, rng: random.Random) -> list[list[int]]:
        """Consecutive haystack sentences (from a random one, wrapping) totalling exactly ``n`` tokens."""
        out, total, i = [], 0, rng.randrange(len(self.hay))
        while total < n:
            s = self.hay[i % len(self.hay)][: n - total]
            out.append(s)
            total += len(s)
            i += 1
        return out

    def sample(self, length: int, depth: float | None, rng: random.Random) -> Probe:
        """A sample of exactly ``length`` prompt tokens with its first needle at ``depth`` (0 = the haystack's
        start, 1 = its end; ignored by tasks without a needle depth)."""
        if self.task.uses_depth:
            ep = self.task.make(rng)
        else:  # sized to the length: a first guess, then scaled by what the tokenizer made of it, until it fits
            seed, items = rng.randrange(2**31), max(8, length // self.task.tokens_per_item)
            while True:
                ep = self.task.make(random.Random(seed), items)
                used = sum(len(_encode(self.tokenizer, " " + line)) for line in ep.context or ()) + len(
                    _encode(self.tokenizer, " " + ep.question))
                if used <= length or items <= 8:
                    break
                items = max(8, min(items - 1, int(items * length / used * 0.97)))
        question = _encode(self.tokenizer, " " + ep.question)
        if self.task.uses_depth:
            if depth is None or not 0.0 <= depth <= 1.0:
                raise ConfigError(f"a needle depth is a fraction in [0, 1], got {depth!r}")
            needles = [_encode(self.tokenizer, " " + n) for n in ep.needles]
            hay_n = length - len(question) - sum(map(len, needles))
            if hay_n < 1:
                raise ConfigError(f"{length} tokens cannot hold the {self.task.name} needles and question "
                                  f"({length - hay_n + 1} tokens); use longer lengths")
            hay = [t for sentence in self._fill(hay_n, rng) for t in sentence]
            # The first needle at the depth's exact token position (not snapped to a sentence end, so a depth means
            # the same place at every length), the others at random positions; needles at one position keep order.
            places = [round(depth * hay_n)] + [rng.randrange(hay_n + 1) for _ in needles[1:]]
            pieces: list[tuple[str, list[int]]] = []
            last = 0
            for at, k in sorted((at, k) for k, at in enumerate(places)):
                pieces += [("hay", hay[last:at]), (f"needle{k}", needles[k])]
                last = at
            pieces.append(("hay", hay[last:]))
        else:
            depth = None
            lines = [_encode(self.tokenizer, " " + line) for line in ep.context or ()]
            budget = length - len(question) - sum(map(len, lines))
            if budget < 0:
                raise ConfigError(f"{length} tokens cannot hold the smallest {self.task.name} list and question "
                                  f"({length - budget} tokens); use longer lengths")
            # Haystack sentences in front make up the exact length (the list is sized to nearly fill it).
            pieces = [("hay", s) for s in (self._fill(budget, rng) if budget else [])] + [("hay", t) for t in lines]
            needles = []
        ids: list[int] = []
        needle_spans: list[tuple[int, int]] = [(0, 0)] * len(needles)
        for kind, toks in pieces:
            if kind.startswith("needle"):
                needle_spans[int(kind[6:])] = (len(ids), len(ids) + len(toks))
            ids.extend(toks)
        value_spans = []
        for v in ep.values:  # where each answer value sits, for retention (needles the tokenizer split cleanly)
            for (a, _), toks in zip(needle_spans, needles, strict=True):
                for form in (" " + v, v):
                    span = _span_of(toks, _encode(self.tokenizer, form))
                    if span is not None:
                        value_spans.append((a + span[0], a + span[1]))
                        break
                else:
                    continue
                break
        question_start = len(ids)
        ids.extend(question)
        assert len(ids) == length, (len(ids), length)  # noqa: S101 - a generator bug, not user input
        order = list(range(len(ep.candidates)))
        rng.shuffle(order)
        candidates = tuple(ep.candidates[i] for i in order)
        return Probe(self.task.name, ids, ep.values, candidates, order.index(0), length, depth, needle_spans,
                     value_spans, question_start)
