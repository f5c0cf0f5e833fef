"""An lm-evaluation-harness model for every msrnn family (``pip install 'msrnn[harness]'``).

Importing this module registers the model name ``msrnn`` with lm-eval; ``msrnn eval harness`` does that and
calls ``lm_eval.simple_evaluate``. Scoring streams context + continuation through the StatefulLM protocol from a
fresh state, so a KV policy, SUPRA, BST or RMT is scored with exactly the state it would hold in use.
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
from msrnn.protocol import stream_logits

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

    # Keys lm-eval itself adds to every model's arguments; a batch of one sequence at a time is what streaming
    # scoring does, so they are accepted (batch sizes are not honoured: scoring is per request either way).
    _LM_EVAL_EXTRAS = ("batch_size", "max_batch_size")

    def __init__(self, pretrained: str, policy: str | None = None, budget: int | None = None,
                 chunk_size: int = 512, max_gen_toks: int = 64, device: str = "cpu", sinks: int | None = None,
                 recent: int | None = None, per_head: bool | str | None = None, keep_newest: bool | str | None = None,
                 prefill: str = "exact", positions: str = "original", storage: str = "naive",
                 compile: bool | str | None = None, **extra: Any) -> None:
        super().__init__()
        from msrnn.models import load_lm

        unknown = sorted(k for k in extra if k not in self._LM_EVAL_EXTRAS)
        if unknown:
            raise ConfigError(f"msrnn's harness model takes no argument {', '.join(unknown)}; it takes pretrained, "
                              "policy, budget, sinks, recent, per_head, keep_newest, prefill, positions, storage, "
                              "compile, chunk_size, max_gen_toks and device")
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
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-probabilities [T, V] of every next token of ``ids``, streamed from a fresh state."""
        logits = stream_logits(self.lm, torch.tensor([ids]), self.chunk_size)[0].float()
        return F.log_softmax(logits, dim=-1)

    def _prefix(self) -> list[int]:
        eos = self.tok.eos_token_id
        return [eos if eos is not None else 0]

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """Log-likelihood of each continuation given its context, streamed."""
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context) or self._prefix()
            cont = self._encode(continuation)
            lp = self._logprobs(ctx + cont)[len(ctx) - 1 : len(ctx) - 1 + len(cont)]  # rows predicting cont
            target = torch.tensor(cont)
            out.append((float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Log-likelihood of each whole text, streamed."""
        out = []
        for req in requests:
            ids = self._prefix() + self._encode(req.args[0])
            lp = self._logprobs(ids)[:-1]
            out.append(float(lp.gather(1, torch.tensor(ids[1:])[:, None]).sum()))
        return out

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
            new = generate(self.lm, torch.tensor([self._encode(context) or self._prefix()]), max_new,
                           temperature=temperature if (sample or temperature > 0) else 0.0, top_k=top_k, top_p=top_p,
                           eos_token_id=self.tok.eos_token_id, prefill_chunk=self.chunk_size)
            text = self.tok.decode(new[0].tolist())
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


if __name__ == "__main__":
    # `python -m msrnn.harness run --model msrnn --model_args pretrained=DIR,policy=tova,budget=512 --tasks ...` is
    # lm-eval's own command line with the `msrnn` model registered (lm-eval releases before model plugins need
    # this import; newer ones also find `--model msrnn` through the `lm_eval.models` entry point).
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
