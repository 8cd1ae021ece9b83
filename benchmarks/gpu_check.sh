#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (from the repository root, with the venv set up):
#   bash benchmarks/gpu_check.sh
# 1. the GPU-only tests (no host sync in packed steps, bf16 vs fp32), 2. a 3-epoch study with
# --pack 16 on synthetic data, 3. benchmarks/pack.py --device cuda. Last line: one summary.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=$(mktemp -d)
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/tests.log"
tests=$( grep -qE "passed" "$out/tests.log" && ! grep -qE "failed|error|skipped" "$out/tests.log" \
         && echo ok || echo FAIL )
cat > "$out/space.yaml" <<'YAML'
fixed: {optimizer: sgdm, epochs: 3, dataset: synthetic, augment: final, device: cuda, diverge_factor: 1.0e9}
params:
  lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
  momentum: {type: float, low: 0.5, high: 0.95}
YAML
start=$(date +%s)
( cd "$out" && $PY -m search run --space space.yaml --pack 16 --n-trials 32 --pruner none \
    2> study.err | tail -1 ) | tee "$out/study.log"
study_s=$(( $(date +%s) - start ))
study=$( grep -q "32 complete" "$out/study.log" && echo ok || echo FAIL )
$PY benchmarks/pack.py --device cuda 2>&1 | tee "$out/pack.log"
echo "gpu_check: tests=$tests study_pack16=$study (${study_s}s, 32 trials x 3 epochs) $(tail -1 "$out/pack.log")"
