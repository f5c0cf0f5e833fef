#!/usr/bin/env bash
# Every CUDA path of msrnn in one short run (<= 8 minutes on one GPU): the CUDA-only tests, then
# benchmarks/gpu_check.py (KV fast path vs its readable twin in bf16 + SDPA, SUPRA's fla kernel vs the torch forms,
# S4D FFT vs scan at 16k, and the KV decode / prefill / throughput benchmarks on the GPU).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Uses the machine's python3 with its own torch (a CUDA build) and msrnn from src/ (no install, no network).
# flash-linear-attention, if not installed there, can be carried as wheels in .whl/ (pip download them where
# pip works); without it the SUPRA kernel checks report SKIP, not PASS.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/msrnn-site .whl/*.whl
  export PYTHONPATH="/tmp/msrnn-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible to torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
set -o pipefail
# The suite's CUDA-only tests (skipped on CPUs): fla's Triton kernel, and anything else marked for CUDA.
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_supra_fla.py -rs 2>&1 | tee "$out/pytest_cuda.log"
timeout 360 python3 benchmarks/gpu_check.py --out "$out" 2>&1 | tee "$out/gpu_check.log"
# Sharded training (FSDP2 over NCCL): pretrain a tiny model on 2 GPUs with --fsdp, uptrain its SUPRA conversion
# sharded, and resume the SUPRA run on one GPU (DCP reshards it). One GPU: the same on a mesh of one. Not yet run
# on GPUs by msrnn's developers (no multi-GPU machine); CPU gloo runs of the same code are in tests/test_fsdp.py.
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
n=$(( gpus >= 2 ? 2 : 1 ))
fsdp="$out/fsdp"
rm -rf "$fsdp"
common=(--seq-len 128 --batch-size 2 --eval-every 2 --save-every 2 --fsdp --quiet --json)
{
  timeout 120 torchrun --nproc_per_node "$n" -m msrnn.cli.main pretrain --preset tiny --out "$fsdp/base" \
    --max-steps 4 "${common[@]}" &&
  python3 -m msrnn.cli.main convert supra --from "$fsdp/base" --out "$fsdp/supra" --quiet &&
  timeout 120 torchrun --nproc_per_node "$n" -m msrnn.cli.main train supra --from "$fsdp/supra" \
    --out "$fsdp/up" --max-steps 4 "${common[@]}" &&
  timeout 120 python3 -m msrnn.cli.main train supra --from "$fsdp/supra" --out "$fsdp/up" --max-steps 6 \
    --grad-accum "$n" --resume "${common[@]}" &&
  echo "PASS fsdp: $n GPU(s) pretrain + SUPRA uptraining sharded, resumed on 1 GPU"
} 2>&1 | tee "$out/fsdp.log" || echo "FAIL fsdp (see $out/fsdp.log)"
