"""Every CUDA path of msrnn checked against its CPU-tested twin, plus the KV speed benchmarks on the GPU.

The suite runs on CPUs (CI has no GPU), so the paths that only exist on a GPU are checked here, in one short run
(``benchmarks/gpu_check.sh`` wraps it; it targets <= 8 minutes on one GPU):

1. KV eviction in bf16 with SDPA: the fast exact prefill against its readable per-query twin (kept positions and
   logits), for every policy, a left-padded batch included, ``generate()`` through the bounded cache, and the
   fixed-storage decode step under ``torch.compile`` against the eager one (one graph).
2. SUPRA: the flash-linear-attention Triton kernel against the torch chunked form, outputs, final states and
   gradients, fp32 and bf16; ``backend='auto'`` must pick it on CUDA. Reported as skipped when fla is missing.
3. S4D: the FFT convolution against the token-by-token recurrence at 16k tokens, fp32, and under bf16 autocast
   (the SSM parameters and the FFT stay fp32).
4. Speed: ``bench kv`` decode at 1k..16k context (with the compiled step beside the eager one), ``bench
   kv-prefill`` (exact vs oneshot vs full) and ``bench kv --throughput`` on a random model of the ``small`` shape.

    python benchmarks/gpu_check.py --out DIR          # on a CUDA machine; exit 1 if a check fails
    python benchmarks/gpu_check.py --device cpu --quick  # the same code on a CPU, small sizes (a smoke test)

Each check prints one line (PASS / FAIL / SKIP and its largest error); ``--out`` also writes ``gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

RESULTS: list[dict] = []


def record(name: str, ok: bool | None, **info) -> None:
    status = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    RESULTS.append({"check": name, "status": status, **info})
    print(f"{status}  {name}  " + "  ".join(f"{k}={v}" for k, v in info.items()), flush=True)


def small_llama(device: str, dtype: torch.dtype, quick: bool, seed: int = 0):
    from transformers import LlamaForCausalLM

    from msrnn.models.presets import preset_config

    cfg = preset_config("tiny" if quick else "small", 32768)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def check_kv(device: str, quick: bool) -> None:
    from msrnn.compat import cache_kwargs
    from msrnn.kv import KVSettings, make_cache, prepare_model

    model = prepare_model(small_llama(device, torch.bfloat16, quick))
    T, budget = (70, 16) if quick else (1500, 128)
    bounds = [0, T // 3, T // 3 + 1, (2 * T) // 3, T]  # odd chunks, one of a single token
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, model.config.vocab_size, (2, T), generator=g).to(device)
    mask = torch.ones(2, T, dtype=torch.long, device=device)
    x[1, :9], mask[1, :9] = 0, 0  # row 1 is left-padded
    for spec in ("window", "sink", "h2o", "h2o:per_head=false", "tova", "tova:per_head=true", "tova:keep_newest=true"):
        policy = KVSettings.from_spec(spec, budget).make_policy()
        runs = {}
        for reference in (False, True):
            cache = make_cache(model, policy, ref=reference)
            with torch.inference_mode():
                logits = [model(input_ids=x[:, lo:hi], attention_mask=mask[:, :hi], use_cache=True,
                                **cache_kwargs(cache, model)).logits.float()
                          for lo, hi in zip(bounds, bounds[1:], strict=False)]
            runs[reference] = (torch.cat(logits, 1), [layer.kept_positions() for layer in cache.layers])
        kept = all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1], strict=True))
        err = (runs[False][0] - runs[True][0]).abs().max().item()
        with torch.inference_mode():
            gen = [model.generate(x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  **cache_kwargs(make_cache(model, policy, ref=r), model)) for r in (False, True)]
        same_gen = torch.equal(gen[0], gen[1])
        # Both paths attend the same kept slots in bf16, so the logits agree to bf16 rounding of the attention.
        record(f"kv bf16 sdpa fast exact == readable twin [{spec}]", kept and same_gen and err < 5e-2,
               max_logit_err=f"{err:.2e}", kept_equal=kept, generate_equal=same_gen)


def check_kv_generate(device: str, quick: bool) -> None:
    from msrnn.compat import cache_kwargs
    from msrnn.kv import make_cache, make_policy, prepare_model

    model = small_llama(device, torch.bfloat16, quick)
    ids = torch.randint(0, model.config.vocab_size, (1, 40 if quick else 600), device=device)
    with torch.inference_mode():
        plain = model.generate(ids, max_new_tokens=20, do_sample=False)
        prepare_model(model)
        bounded = model.generate(ids, max_new_tokens=20, do_sample=False,
                                 **cache_kwargs(make_cache(model, make_policy("tova", 10**6)), model))
    record("kv generate(): budget >= length equals plain generate (bf16 sdpa)", torch.equal(plain, bounded))


def check_kv_compiled(device: str, quick: bool) -> None:
    """The fixed-storage decode step under torch.compile against the eager step, bf16 SDPA, a batch of 2."""
    from torch._dynamo.utils import counters

    from msrnn.kv import KVEvictionLM, make_policy

    model = small_llama(device, torch.bfloat16, quick)
    T, budget, steps = (40, 16, 12) if quick else (1200, 512, 48)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(1, model.config.vocab_size, (2, T + steps), generator=g).to(device)
    torch._dynamo.reset()
    counters.clear()
    runs = {}
    for compiled in (False, True):
        lm = KVEvictionLM(model, make_policy("tova", budget), storage="fixed", compile=compiled)
        with torch.inference_mode():
            logits, state = lm.forward_chunk(x[:, :T], lm.init_state(2))
            out = [logits[:, -1:]]
            for i in range(T, T + steps):
                logits, state = lm.forward_chunk(x[:, i : i + 1], state)
                out.append(logits)
        runs[compiled] = (torch.cat(out, 1), [layer.kept_positions() for layer in state.cache.layers])
    kept = all(torch.equal(a, b) for a, b in zip(runs[False][1], runs[True][1], strict=True))
    err = (runs[False][0] - runs[True][0]).abs().max().item()
    graphs = counters["stats"]["unique_graphs"]
    record("kv compiled fixed decode == eager (bf16 sdpa)", kept and err < 5e-2 and graphs == 1,
           max_logit_err=f"{err:.2e}", kept_equal=kept, graphs=graphs)


def check_supra(device: str) -> None:
    from msrnn.supra import chunked, fla_chunked, log_decay, resolve_backend
    from msrnn.supra.ops import fla_available

    if device != "cuda" or not fla_available():
        record("supra fla kernel vs torch forms", None, reason="needs CUDA and flash-linear-attention "
               "(carry its wheels: see the device notes)")
        return
    record("supra backend auto picks fla on CUDA", resolve_backend("auto", torch.device("cuda")) == "fla")
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 4, 1000, 64, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        s0 = (torch.randn(2, 4, 64, 64, generator=g) * 0.1).to(device).requires_grad_()
        lg = log_decay(4).to(device)
        res = {}
        for name, fn in (("torch", chunked), ("fla", fla_chunked)):
            o, s = fn(q, k, v, lg, initial_state=s0)
            (o.float().square().mean() + s.square().mean()).backward()
            res[name] = (o.float(), s, *(t.grad.float().clone() for t in (q, k, v, s0)))
            for t in (q, k, v, s0):
                t.grad = None
        errs = [((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()
                for a, b in zip(res["fla"], res["torch"], strict=True)]
        record(f"supra fla == torch chunked [{dtype}] (o, state, dq, dk, dv, ds0)", max(errs) < tol,
               max_rel_err=f"{max(errs):.2e}")


def check_s4d(device: str, quick: bool) -> None:
    from msrnn.ssm.s4d import S4DKernel, fft_conv, recurrent_scan

    L = 512 if quick else 16384
    torch.manual_seed(0)
    ssm = S4DKernel(8, 64).to(device)
    u = torch.randn(2, 8, L, device=device)
    with torch.no_grad():
        y_scan, s_scan = recurrent_scan(u, ssm)
        y_fft, s_fft = fft_conv(u, ssm)
        err = ((y_fft - y_scan).abs().max() / y_scan.abs().max()).item()
        serr = ((s_fft - s_scan).abs().max() / s_scan.abs().max()).item()
        record(f"s4d fft == scan at L={L} fp32", max(err, serr) < 1e-3, max_rel_err=f"{err:.2e}",
               state_rel_err=f"{serr:.2e}")
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            y_bf = fft_conv(u, ssm)[0]
        err = ((y_bf.float() - y_scan).abs().max() / y_scan.abs().max()).item()
        fp32 = all(p.dtype == torch.float32 for p in ssm.parameters())
        record(f"s4d fft under bf16 autocast at L={L} (params fp32)", fp32 and err < 1e-3,
               max_rel_err=f"{err:.2e}", params_fp32=fp32)


def run_benchmarks(device: str, quick: bool) -> dict:
    from msrnn.bench.kv import (
        KVBenchConfig,
        KVPrefillBenchConfig,
        KVThroughputBenchConfig,
        run_kv_bench,
        run_kv_prefill_bench,
        run_kv_throughput_bench,
    )

    model = small_llama(device, torch.bfloat16, quick)
    if quick:
        dec = KVBenchConfig(contexts=[64, 128], budget=16, steps=4, rounds=1)
        pre = KVPrefillBenchConfig(tokens=128, chunk=32, budget=16, rounds=1)
        thr = KVThroughputBenchConfig(context=128, budget=16, steps=4, rounds=1)
    else:
        dec = KVBenchConfig(contexts=[1024, 4096, 16384], budget=512, steps=64, rounds=3, compile=True)
        pre = KVPrefillBenchConfig(tokens=8192, chunk=512, budget=512, rounds=3)
        thr = KVThroughputBenchConfig(context=8192, budget=1024, steps=32, rounds=3, full_batch=8, max_batch=256)
    out = {}
    for name, fn, cfg in (("decode", run_kv_bench, dec), ("prefill", run_kv_prefill_bench, pre),
                          ("throughput", run_kv_throughput_bench, thr)):
        t0 = time.perf_counter()
        out[name] = fn(model, cfg)
        record(f"bench kv {name}", True, seconds=f"{time.perf_counter() - t0:.1f}")
    print(json.dumps({k: v.get("rows") for k, v in out.items()}, indent=1, default=str))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script itself)")
    ap.add_argument("--out", default=None, help="write gpu_check.json here")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --device cpu --quick for a smoke test", file=sys.stderr)
        return 2
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""), flush=True)
    t0 = time.perf_counter()
    check_kv(args.device, args.quick)
    check_kv_generate(args.device, args.quick)
    check_kv_compiled(args.device, args.quick)
    check_supra(args.device)
    check_s4d(args.device, args.quick)
    bench = run_benchmarks(args.device, args.quick)
    failed = [r for r in RESULTS if r["status"] == "FAIL"]
    print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} checks not failed, {len(failed)} failed, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps({"checks": RESULTS, "bench": bench}, indent=1,
                                                                  default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
