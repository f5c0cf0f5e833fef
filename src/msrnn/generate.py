"""Generation written once against the StatefulLM protocol (greedy or sampled), for every family."""

from __future__ import annotations

import math
from typing import Any

import torch

from msrnn.errors import ConfigError, NumericsError
from msrnn.protocol import StatefulLM, fork_state, prefill

MIN_TEMPERATURE = 1e-4


@torch.inference_mode()
def generate(lm: StatefulLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id: int | None = None,
             prefill_chunk: int = 512) -> torch.Tensor:
    """Continue ``input_ids`` [B, T]; returns the new tokens [B, <= max_new_tokens].

    ``temperature=0`` is greedy. The prompt is prefilled in chunks of ``prefill_chunk`` tokens and each new
    token is fed alone, so the state stays whatever size the family bounds it to.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ConfigError(f"need a finite temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, "
                          f"{top_k})")
    if 0 < temperature < MIN_TEMPERATURE:  # logits / 1e-45 overflow to inf: NaN probabilities
        raise ConfigError(f"temperature {temperature:g} is below {MIN_TEMPERATURE:g}, where sampling overflows; use 0 "
                          "for greedy decoding")
    if temperature == 0 and (top_k or top_p < 1):
        raise ConfigError("top_k and top_p shape sampling, but temperature 0 is greedy and would ignore them; give a "
                          "temperature > 0 or drop them")
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ConfigError("the prompt must be a non-empty [batch, tokens] tensor; give a non-empty --prompt")
    limit = getattr(lm, "max_positions", None) if getattr(lm, "learned_positions", False) else None
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:  # refuse before generating, not midway
        raise ConfigError(f"prompt ({input_ids.shape[1]} tokens) plus max_new_tokens ({max_new_tokens}) is past this "
                          f"model's {limit} learned positions; shorten the prompt or lower --max-new-tokens")
    next_logits, state = prefill(lm, input_ids, prefill_chunk)
    return continue_from(lm, next_logits, state, max_new_tokens, temperature, top_k, top_p, seed, eos_token_id)


@torch.inference_mode()
def continue_from(lm: StatefulLM, next_logits: torch.Tensor, state: Any, max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  eos_token_id: int | None = None) -> torch.Tensor:
    """The new tokens [B, <= max_new_tokens] after a read stream: ``next_logits`` [B, V] are the logits after its last
    token and ``state`` the state after it (updated in place: pass a :func:`~msrnn.protocol.fork_state` copy to keep
    it). Each new token is fed alone."""
    gen = torch.Generator().manual_seed(seed)
    B = next_logits.shape[0]
    logits = next_logits[:, None]
    out = []
    done = torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        if not bool(torch.isfinite(logits[:, -1]).all()):
            raise NumericsError(f"the model's logits are NaN or infinite (new token {step}); its weights are broken, "
                                "most often by a diverged training run: retrain with a lower --lr")
        nxt = _pick(logits[:, -1].float().cpu(), temperature, top_k, top_p, gen)  # [B]
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        out.append(nxt)
        if (eos_token_id is not None and bool(done.all())) or step == max_new_tokens - 1:
            break  # the last token needs no forward: nothing reads its logits
        logits, state = lm.forward_chunk(nxt[:, None], state)
    return torch.stack(out, dim=1) if out else torch.zeros((B, 0), dtype=torch.long)


@torch.inference_mode()
def answer_questions(lm: StatefulLM, context_ids: torch.Tensor, questions: list[torch.Tensor], max_new_tokens: int,
                     prefill_chunk: int = 512, eos_token_id: int | None = None) -> list[torch.Tensor]:
    """Read ``context_ids`` [1, T] once, then answer each question ([1, q] ids) greedily from its own copy of that
    state: the context is processed once however many questions follow, and each answer equals reading context +
    question from scratch (for families whose chunking does not change the function: exact KV prefill, SUPRA, BST,
    RMT, the full cache). Returns each answer's new tokens [1, <= max_new_tokens]."""
    if not questions:
        raise ConfigError("give at least one question")
    if context_ids.dim() != 2 or context_ids.shape[0] != 1 or context_ids.shape[1] < 1:
        raise ConfigError("the context must be one non-empty sequence [1, tokens]")
    _, read = prefill(lm, context_ids, prefill_chunk)
    answers = []
    for q in questions:
        if q.dim() != 2 or q.shape[0] != 1 or q.shape[1] < 1:
            raise ConfigError("each question must be one non-empty sequence [1, tokens]")
        next_logits, state = prefill(lm, q, prefill_chunk, fork_state(read))
        answers.append(continue_from(lm, next_logits, state, max_new_tokens, eos_token_id=eos_token_id))
    return answers


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0; otherwise sample from the logits warped by transformers' own temperature, top-k and
    top-p warpers, in the order ``generate(do_sample=True)`` applies them (so sampling here and there agree)."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(warp(logits, temperature, top_k, top_p).softmax(-1), 1, generator=gen)[:, 0]


def warp(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [B, V] -> the logits sampling draws from: transformers' ``TemperatureLogitsWarper``,
    ``TopKLogitsWarper`` and ``TopPLogitsWarper`` (masked tokens at -inf)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    steps = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        steps.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        steps.append(TopPLogitsWarper(top_p))
    no_ids = torch.zeros(logits.shape[0], 0, dtype=torch.long)  # the warpers used here do not read past tokens
    return steps(no_ids, logits.float())
