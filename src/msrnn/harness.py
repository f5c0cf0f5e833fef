"""An lm-evaluation-harness model for every msrnn family (``pip install 'msrnn[harness]'``).

Importing this module registers the model name ``msrnn`` with lm-eval; ``msrnn eval harness`` does that and
calls ``lm_eval.simple_evaluate``. Scoring streams context + continuation through the StatefulLM protocol from a
fresh state, so a KV policy, SUPRA, BST or RMT is scored with exactly the state it would hold in use.

Batching: ``batch_size`` requests of log-likelihood scoring stream through the model together, longest first,
right-padded. Every family is causal, so a token's logits never see the padding after it, and each sequence's
state evolves as it would alone (eviction is per sequence). Generation runs one request at a time: prompts of
different lengths would need left padding, which the recurrent families' states do not take.

Shared contexts: requests that share a context (a multiple-choice question's choices, several questions about one
long context) read it once; each continuation is scored from its own copy of that state. That is the same number as
reading context + continuation anew wherever chunking does not change the function (the family spec's
``chunk_invariant``: every family, and KV eviction with exact prefill); elsewhere (KV ``oneshot`` or ``chunked:C``
prefill, where a chunk boundary changes what is evicted) each request is read from scratch.
"""

from __future__ import annotations

import logging
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval fills its own model names only into an empty registry: load them first)
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from msrnn.errors import ConfigError
from msrnn.generate import generate
from msrnn.protocol import split, stream_chunks

log = logging.getLogger(__name__)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_bool(value: Any) -> bool | None:
    """lm-eval passes ``key=true`` through as a string or a bool, depending on its version."""
    if value is None or isinstance(value, bool):
        return value
    low = str(value).lower()
    if low not in ("true", "false"):
        raise ConfigError(f"expected true or false, got {value!r}")
    return low == "true"


@register_model("msrnn")
class MsrnnHarnessLM(LM):
    """Any msrnn model as an lm-evaluation-harness ``LM`` (``--model msrnn``)."""

    # A key lm-eval adds to every model's arguments; it only sizes batch_size=auto, which is refused.
    _LM_EVAL_EXTRAS = ("max_batch_size",)

    def __init__(self, pretrained: str, policy: str | None = None, budget: int | None = None,
                 chunk_size: int = 512, max_gen_toks: int = 64, device: str = "cpu", sinks: int | None = None,
                 recent: int | None = None, per_head: bool | str | None = None, keep_newest: bool | str | None = None,
                 prefill: str = "exact", positions: str = "original", storage: str = "naive",
                 compile: bool | str | None = None, batch_size: int | str = 1, **extra: Any) -> None:
        super().__init__()
        from msrnn.models import load_lm

        unknown = sorted(k for k in extra if k not in self._LM_EVAL_EXTRAS)
        if unknown:
            raise ConfigError(f"msrnn's harness model takes no argument {', '.join(unknown)}; it takes pretrained, "
                              "policy, budget, sinks, recent, per_head, keep_newest, prefill, positions, storage, "
                              "compile, chunk_size, max_gen_toks, batch_size and device")
        if str(batch_size).startswith("auto"):
            raise ConfigError("msrnn's harness model takes a number as batch_size, not auto (requests are scored "
                              "together up to it)")
        if isinstance(batch_size, bool) or not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        from msrnn.kv import apply_kv, settings_or_none

        settings = settings_or_none(policy, "policy", budget=_opt_int(budget) or None, sinks=_opt_int(sinks),
                                    recent=_opt_int(recent), per_head=_opt_bool(per_head),
                                    keep_newest=_opt_bool(keep_newest), prefill=prefill, positions=positions,
                                    storage=storage, compile=bool(_opt_bool(compile)))
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line defaults to cuda; its own hf model falls back the same way, saying so.
            log.warning("device %s asked for but no CUDA GPU is visible: running on cpu", device)
            device = "cpu"
        self.lm = load_lm(pretrained, device=device)
        if settings is not None:
            self.lm = apply_kv(self.lm, settings)
        self.tok = self.lm.tokenizer
        self.chunk_size, self.max_gen_toks = int(chunk_size), int(max_gen_toks)

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def _score_batch(self, rows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each id list: log p(ids[t+1] | ids[:t+1]) and whether ids[t+1] is the greedy token, t = 0 .. len-2,
        streamed from a fresh state with every row in one batch, right-padded (see the module docstring)."""
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long)  # [B, T]: padding after each row's end
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        logps, greedy = [], []
        for step in stream_chunks(self.lm, split(ids, self.chunk_size)):
            # Only the targets are kept, so memory is one chunk's logits, not [B, T, V].
            target = ids[:, step.start + 1 : step.start + 1 + step.logits.shape[1]].to(step.logits.device)
            logits = step.logits[:, : target.shape[1]].float()  # [B, c, V]: the last position has no target
            logps.append(F.log_softmax(logits, dim=-1).gather(2, target[..., None])[..., 0].cpu())
            greedy.append((logits.argmax(-1) == target).cpu())
        lp, gr = torch.cat(logps, 1), torch.cat(greedy, 1)  # [B, T - 1]
        return [(lp[i, : len(r) - 1], gr[i, : len(r) - 1]) for i, r in enumerate(rows)]

    def _score(self, rows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`_score_batch` over ``batch_size`` rows at a time, longest first (less padding), in input order."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out: list[Any] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, scored in zip(batch, self._score_batch([rows[i] for i in batch]), strict=True):
                out[i] = scored
        return out

    def _prefix(self) -> list[int]:
        eos = self.tok.eos_token_id
        return [eos if eos is not None else 0]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context, and whether it is the greedy one, streamed."""
        from msrnn.families import lm_family

        pairs = [(self._encode(req.args[0]) or self._prefix(), self._encode(req.args[1])) for req in requests]
        out: list[Any] = [None] * len(pairs)
        groups: dict[tuple[int, ...], list[int]] = {}
        if lm_family(self.lm).chunk_invariant(self.lm):
            for i, (ctx, _) in enumerate(pairs):
                groups.setdefault(tuple(ctx), []).append(i)
        for ctx, members in groups.items():
            if len(members) > 1:  # one read of the context for all of its continuations
                for i, scored in zip(members, self._score_shared(list(ctx), [pairs[i][1] for i in members]),
                                     strict=True):
                    out[i] = scored
        alone = [i for i in range(len(pairs)) if out[i] is None]
        rows = [pairs[i][0] + pairs[i][1] for i in alone]
        for i, (lp, gr) in zip(alone, self._score(rows), strict=True):
            start, n = len(pairs[i][0]) - 1, len(pairs[i][1])  # the positions predicting the continuation
            out[i] = (float(lp[start : start + n].sum()), bool(gr[start : start + n].all()))
        return out

    def _score_shared(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each continuation after ``ctx``, the context read once into a state that each
        continuation continues on a copy of."""
        from msrnn.evaluate.longctx import continuation_score, read

        next_logits, state, _ = read(self.lm, ctx, self.chunk_size)
        return [continuation_score(self.lm, state, next_logits, cont, self.chunk_size) for cont in conts]

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Log-likelihood of each whole text, streamed."""
        rows = [self._prefix() + self._encode(req.args[0]) for req in requests]
        return [float(lp.sum()) for lp, _ in self._score(rows)]

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Generation until a stop string or the token limit: greedy unless the task asks to sample
        (``do_sample``/``temperature``/``top_k``/``top_p`` are honoured; any other generation option is refused)."""
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
            top_k, top_p = int(kwargs.pop("top_k", 0) or 0), float(kwargs.pop("top_p", 1.0) or 1.0)
            if kwargs:
                raise ConfigError(f"msrnn's harness model cannot honour the generation option(s) {sorted(kwargs)}; "
                                  "it takes until, max_gen_toks, do_sample, temperature, top_k and top_p")
            temperature = temperature if (sample or temperature > 0) else 0.0
            if temperature == 0:  # greedy, as lm-eval's hf model: a task's top_k/top_p only shape sampling
                top_k, top_p = 0, 1.0
            new = generate(self.lm, torch.tensor([self._encode(context) or self._prefix()]), max_new,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_token_id=self.tok.eos_token_id, prefill_chunk=self.chunk_size)
            text = self.tok.decode(new[0].tolist())
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> int:
    """``python -m msrnn.harness ...``: lm-eval's own command line with the ``msrnn`` model registered; an msrnn
    refusal (a model that fails verification, a bad model argument, an unsupported transformers) is one line."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    from msrnn.errors import MsrnnError

    try:
        cli_evaluate()
    except MsrnnError as exc:
        print(f"msrnn: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # `python -m msrnn.harness run --model msrnn --model_args pretrained=DIR,policy=tova,budget=512 --tasks ...` is
    # lm-eval's own command line with the `msrnn` model registered (lm-eval releases before model plugins need
    # this import; newer ones also find `--model msrnn` through the `lm_eval.models` entry point).
    raise SystemExit(main())
