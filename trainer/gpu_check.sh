#!/usr/bin/env bash
# Smoke-and-speed check of the trainer on one CUDA GPU (H100/H200), offline, in < 10 minutes:
# prepares the stdlib data set at the gpu profile's vocabulary (8192), checks that the CUDA
# dataloader delivers the CPU loader's batches, runs the seed train.py on the gpu profile with a
# reduced training budget, and prints val_bpb, MFU, tokens/s and peak memory (the stdlib data is
# far smaller than a run reads, so that val_bpb measures speed and health, not the seed).
# Needs torch (CUDA build), numpy, rustbpe, tiktoken, pyarrow already installed
# (trainer/requirements.txt); it downloads nothing. Measured figures: README, "The trainer".
#
#   bash trainer/gpu_check.sh                 # defaults: 120 s of training
#   BUDGET=300 bash trainer/gpu_check.sh      # the full gpu budget (then ~7 minutes in all)
#
# Env: PYTHON (default python3), BUDGET (training seconds, default 120),
#      NIGHTSHIFT_CACHE (default: a fresh temp folder, removed at the end), OUT (log folder).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET="${BUDGET:-120}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
if [[ -z "${NIGHTSHIFT_CACHE:-}" ]]; then
    NIGHTSHIFT_CACHE="$(mktemp -d)/cache"
    trap 'rm -rf "$(dirname "$NIGHTSHIFT_CACHE")"' EXIT
fi
export NIGHTSHIFT_CACHE NIGHTSHIFT_PROFILE=gpu NIGHTSHIFT_SOURCE=stdlib
export NIGHTSHIFT_TIME_BUDGET="$BUDGET"
unset NIGHTSHIFT_SEED

t0=$(date +%s)
echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'PY'
import sys
import torch, numpy, rustbpe, tiktoken, pyarrow  # noqa: F401  (all must import offline)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}")
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"device: {torch.cuda.get_device_name(0)}")
PY

echo "== prepare (stdlib source, gpu profile: vocab 8192)"
(cd "$here" && timeout 300 "$PYTHON" prepare.py) 2>&1 | tee "$OUT/prepare.log"
echo "prepare took $(( $(date +%s) - t0 ))s"

echo "== dataloader: CUDA batches equal the CPU loader's while the GPU lags behind"
# The host->GPU copy is asynchronous; a loader that rewrote its pinned buffer too early would
# hand the model a corrupted batch exactly when the CPU runs ahead (seen: 5 of 8 batches).
(cd "$here" && timeout 120 "$PYTHON" - <<'PY'
import time
import torch
import prepare
tok = prepare.Tokenizer.from_directory()
B, T, n = 128, prepare.MAX_SEQ_LEN, 8
cpu = prepare.make_dataloader(tok, B, T, "train", device="cpu")
expected = [torch.cat([x, y]).clone() for x, y, _ in (next(cpu) for _ in range(n))]
t = time.time()
for _ in range(5):
    next(cpu)
ms = (time.time() - t) / 5 * 1000
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
cuda = prepare.make_dataloader(tok, B, T, "train", device="cuda")
got = []
for _ in range(n):
    for _ in range(150):  # ~0.2 s of GPU work per batch: the CPU runs ahead
        a = (a @ a).clamp_(-1, 1)
    x, y, _ = next(cuda)
    got.append(torch.cat([x, y]).clone())  # ordered on the stream after the batch's copy
torch.cuda.synchronize()
bad = sum(not torch.equal(g.cpu(), e) for g, e in zip(got, expected))
print(f"dataloader: {ms:.0f} ms of CPU per {B}x{T} batch; {bad}/{n} CUDA batches differ")
assert bad == 0, "the CUDA dataloader delivered corrupted batches"
PY
) 2>&1 | tee "$OUT/dataloader.log"

echo "== train (gpu profile, NIGHTSHIFT_TIME_BUDGET=${BUDGET}s)"
run="$(mktemp -d)"  # a scratch copy, as the launcher makes one per run
cp "$here/prepare.py" "$here/train.py" "$run/"
t1=$(date +%s)
set +e
(cd "$run" && timeout $(( BUDGET + 420 )) "$PYTHON" train.py) > "$OUT/train.log" 2>&1
rc=$?
set -e
wall=$(( $(date +%s) - t1 ))
rm -rf "$run"
grep -E '^(Profile|Model config|Parameters):' "$OUT/train.log" || true
grep -E '^step ' "$OUT/train.log" | tail -n 3 || true

echo "== result (exit code $rc, run wall ${wall}s, log $OUT/train.log)"
if [[ $rc -ne 0 ]] || ! grep -q '^val_bpb:' "$OUT/train.log"; then
    echo "FAILED: last lines of the log:"
    tail -n 40 "$OUT/train.log"
    exit 1
fi
sed -n '/^---$/,$p' "$OUT/train.log"
# Steady-state throughput: median tok/sec of the timed steps (after step 10)
grep -E '^step ' "$OUT/train.log" | awk -F'tok/sec: ' 'NR > 11 { split($2, a, " "); gsub(",", "", a[1]); print a[1] }' \
    | sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "tokens_per_sec:   %d (median of %d timed steps)\n", v[int((NR + 1) / 2)], NR }'
echo "gpu_check: OK in $(( $(date +%s) - t0 ))s"
