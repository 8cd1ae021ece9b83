#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine (from the repository root, with the venv set up):
#   bash benchmarks/gpu_check.sh
# 1. the GPU-only tests (no host sync in packed steps, bf16 vs fp32), 2. a 3-epoch study with
# --pack 16 on synthetic data (and how many of its trials were drawn ahead: --sample-ahead
# auto), 3. the same study with --pack auto (the default: its choice), 4. benchmarks/pack.py
# --device cuda (epoch seconds at P = 1, 4, 16, 64). Last line: one summary.
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
# --sample-ahead auto is on for a GPU: the first pack and the refill after it come drawn ahead
ahead=$( cd "$out" && $PY -c "import optuna; from search.study.storage import open_storage; \
s = optuna.load_study(study_name='space', storage=open_storage('search-journal.log')); \
print(sum(bool(t.user_attrs.get('drawn_ahead')) for t in s.get_trials()))" 2>/dev/null || echo FAIL )
start=$(date +%s)
( cd "$out" && $PY -m search run --space space.yaml --study auto-pack --n-trials 32 \
    --pruner none 2> auto.err | tail -1 ) | tee "$out/auto.log"
auto_s=$(( $(date +%s) - start ))
auto=$( grep -o -- "--pack auto: [0-9]* trials" "$out/auto.err" | head -1 | grep -o "[0-9]*" )
$PY benchmarks/pack.py --device cuda 2>&1 | tee "$out/pack.log"
echo "gpu_check: tests=$tests study_pack16=$study (${study_s}s, 32 trials x 3 epochs," \
     "drawn ahead: ${ahead}/32)" \
     "pack_auto=${auto:-FAIL} (${auto_s}s) $(tail -1 "$out/pack.log")"
