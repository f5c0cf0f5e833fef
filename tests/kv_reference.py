"""An independent dense reference for KV eviction, for tests only.

It runs a Llama-family model (Llama, Mistral, Qwen2) one token at a time with full-length K/V arrays and a
boolean "kept" mask per layer (and per KV head for per-head policies), recomputing attention by hand and
applying each policy's rule as plainly as possible. It shares no code with msrnn.kv.
"""

from __future__ import annotations

import torch


def _rope(x, pos, inv_freq):
    ang = pos * inv_freq  # [D/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()]), torch.cat([ang.sin(), ang.sin()])
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _choose(rule, kept_idx, k, sinks, recent, acc, last, keep_newest=False):
    """kept_idx: list of currently visible token positions (ascending). Returns the k to keep."""
    if len(kept_idx) <= k:
        return kept_idx
    if rule == "window":
        return kept_idx[-k:]
    if rule == "sink":
        first = [i for i in kept_idx if i < sinks]
        rest = [i for i in kept_idx if i >= sinks]
        return first + rest[len(rest) - (k - len(first)):]
    if rule == "h2o":
        rec = kept_idx[-recent:] if recent else []
        others = [i for i in kept_idx if i not in rec]
        heavy = sorted(others, key=lambda i: -acc[i])[: k - len(rec)]
        return sorted(heavy + rec)
    if rule == "tova":
        protected = [i for i in kept_idx if i < sinks or (keep_newest and i == kept_idx[-1])]
        others = sorted((i for i in kept_idx if i not in protected), key=lambda i: -last[i])
        return sorted(protected + others[: k - len(protected)])
    raise ValueError(rule)


@torch.no_grad()
def dense_stream(model, ids, rule, k, sinks=4, recent=None, per_head=False, keep_newest=False):
    """Feed ids [T] (batch 1) token by token. Returns logits [T, V] and per layer the kept positions per group."""
    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    n_rep = H // Hkv
    G = Hkv if per_head else 1
    recent = k // 2 if recent is None else recent
    inv_freq = model.model.rotary_emb.inv_freq.float()
    L = cfg.num_hidden_layers
    T = len(ids)
    K = [torch.zeros(Hkv, T, D) for _ in range(L)]
    V = [torch.zeros(Hkv, T, D) for _ in range(L)]
    kept = [[[] for _ in range(G)] for _ in range(L)]
    acc = [torch.zeros(G, T, dtype=torch.float64) for _ in range(L)]
    out_logits = []
    for t in range(T):
        h = model.model.embed_tokens(torch.tensor([ids[t]]))[0]  # [hidden]
        for li, layer in enumerate(model.model.layers):
            att = layer.self_attn
            a = layer.input_layernorm(h)
            q = att.q_proj(a).view(H, D)
            kk = att.k_proj(a).view(Hkv, D)
            v = att.v_proj(a).view(Hkv, D)
            q, kk = _rope(q, t, inv_freq), _rope(kk, t, inv_freq)
            K[li][:, t], V[li][:, t] = kk, v
            for g in range(G):
                kept[li][g].append(t)
            heads_out, probs = [], torch.zeros(H, T, dtype=torch.float64)
            for hd in range(H):
                kvh = hd // n_rep
                g = kvh if per_head else 0
                idx = torch.tensor(kept[li][g])
                logits = (K[li][kvh, idx] @ q[hd]) / D**0.5
                p = logits.double().softmax(0)
                probs[hd, idx] = p
                heads_out.append(p.float() @ V[li][kvh, idx])
            h = h + att.o_proj(torch.cat(heads_out))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            for g in range(G):
                rows = probs[g * (H // G) : (g + 1) * (H // G)]
                acc[li][g] += rows.sum(0)
                last = rows.mean(0)
                kept[li][g] = _choose(rule, kept[li][g], k, sinks, recent, acc[li][g], last, keep_newest)
        out_logits.append(model.lm_head(model.model.norm(h)))
    return torch.stack(out_logits), kept
