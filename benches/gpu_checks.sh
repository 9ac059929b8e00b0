#!/usr/bin/env bash
# The checks to run on a CUDA machine (performance notes §7.4), as one script with a time limit per
# section, so that one slow or failing part leaves the others' results in place.
#
#   bash benches/gpu_checks.sh [OUT_DIR]
#
# Sections, most important first: environment; step time of the Adam family and of AdaFactor at
# ~500 M parameters (transformer layout) against torch.optim.Adam fused/foreach and
# torch.optim.Adafactor, with the copy/triad roof measured in the same process; the many-small
# layout (launch overhead); ChildTuning F/D against the unmasked step; EG against its base; then the
# kernel and conformance tests on CUDA, then the pytest-benchmark step suite (its JSON is what the
# docs' benchmark page draws); a scan of the generated PTX for 128-bit accesses comes before the tests.
#
# Knobs (environment): DEVICE (cuda), LARGE (500M parameters), SCALE (4: the preset scale of the
# ChildTuning and EG tables, ~206 M parameters), ROUNDS (10 interleaved rounds), PYTEST_WORKERS (8),
# SKIP (space-separated section keys to leave out: adam guard adafactor many-small child-tuning eg ptx
# kernels conformance step-bench), STEP_BENCH_OPTIMIZERS (the pytest-benchmark suite's entries).
set -u
OUT=${1:-${OUT:-gpu-checks}}
mkdir -p "$OUT"
LOG=$OUT/log.txt
DEVICE=${DEVICE:-cuda}
LARGE=${LARGE:-500M}
SCALE=${SCALE:-4}
ROUNDS=${ROUNDS:-10}
WORKERS=${PYTEST_WORKERS:-8}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OPTIMFX_BENCH_DEVICE=$DEVICE

SKIP=" ${SKIP:-} "
want() { [[ "$SKIP" != *" $1 "* ]]; }
section() { echo "=== $* ($(date -u +%H:%M:%S))" | tee -a "$LOG"; }
run() {  # run LIMIT_S CMD...: the command's output goes to the log and the terminal
    local limit=$1; shift
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || echo "--- exit $rc (124: time limit of ${limit}s)" | tee -a "$LOG"
}

section environment
run 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
run 60 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
if ! "$PY" -c "import optimfx._kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1 \
        || { ln -sfn ../kernels optimfx/_kernels; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; }
fi
run 60 "$PY" -c "import optimfx, optimfx._kernels.adax; print('optimfx', optimfx.__version__, 'from', optimfx.__file__)"

BENCH=("$PY" -m optimfx bench --device "$DEVICE" --race-steps 0 --no-plot --no-progress --steps "$ROUNDS")

if want adam; then
section "Adam family, transformer layout, $LARGE parameters"
run 170 "${BENCH[@]}" --preset transformer-50m --params "$LARGE" --out "$OUT/adam-family" \
    --optimizers torch.Adam:fused,torch.Adam:foreach,AdamW:triton,AdaX:triton,AdaXW:triton
fi

if want guard; then
section "cost of the non-finite guard (skip_nonfinite), transformer layout, $LARGE parameters"
run 120 "$PY" -m benches.nonfinite_check_cost "$LARGE" "$ROUNDS"
fi

if want adafactor; then
section "AdaFactor, transformer layout, $LARGE parameters"
run 120 "${BENCH[@]}" --preset transformer-50m --params "$LARGE" --out "$OUT/adafactor" \
    --optimizers AdaFactor:triton,torch.Adafactor:foreach,torch.Adafactor:single,torch.Adam:fused
fi

if want many-small; then
section "many small tensors (1024 x 128x128)"
run 90 "${BENCH[@]}" --preset many-small --out "$OUT/many-small" \
    --optimizers torch.Adam:fused,torch.Adam:foreach,AdamW:triton,AdaX:triton,AdaFactor:triton,torch.Adafactor:foreach
fi

if want child-tuning; then
section "ChildTuning F/D vs unmasked, transformer layout x$SCALE"
OPTIMFX_BENCH_SCALE=$SCALE run 120 "$PY" -m benches.test_child_tuning transformer-50m "$ROUNDS"
fi

if want eg; then
section "EG vs its base, transformer layout x$SCALE"
run 120 "$PY" -m benches.test_eg transformer-50m "$SCALE" "$ROUNDS"
fi

if want ptx; then
section "PTX: 128-bit global loads/stores per generated kernel"
for f in "${TRITON_CACHE_DIR:-$HOME/.triton/cache}"/*/*.ptx; do
    [ -e "$f" ] || continue
    printf '%-40s ld.v4 %4d  st.v4 %4d  ld.scalar %4d\n' "$(basename "$f" .ptx)" \
        "$(grep -c 'ld.global[.a-z0-9]*\.v4' "$f")" "$(grep -c 'st.global[.a-z0-9]*\.v4' "$f")" \
        "$(grep -Ec 'ld.global(\.[a-z]+)*\.(b32|f32) ' "$f")"
done | sort | uniq | tee -a "$LOG"
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short)
"$PY" -c "import xdist" 2>/dev/null && [ "$WORKERS" -gt 1 ] && PYTEST+=(-n "$WORKERS")

if want kernels; then
section "kernel tests (Triton compiled for $DEVICE)"
run 200 "${PYTEST[@]}" tests/kernels
fi

if want conformance; then
section "conformance suite on $DEVICE (reference and Triton backends)"
run 200 "${PYTEST[@]}" tests/conformance -k "$DEVICE and not compiled"
fi

if want step-bench; then
section "pytest-benchmark step suite (benches/test_step.py) on $DEVICE"
OPTIMFX_BENCH_OPTIMIZERS=${STEP_BENCH_OPTIMIZERS:-torch.Adam:single,torch.Adam:foreach,torch.Adam:fused,torch.Adafactor:foreach,AdaFactor:auto,AdamW:auto,AdaX:auto,AdaXW:auto,ChildTuningAdamW:auto} \
    run 240 "$PY" -m pytest benches/test_step.py -q -p no:cacheprovider -p no:xdist \
    --benchmark-json="$OUT/step-bench-$DEVICE.json"
fi

section done
