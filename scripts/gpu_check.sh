#!/usr/bin/env bash
# The accelerator check, in one call of at most ~8 minutes on a fresh single-GPU machine
# whose image has jax, flax, optax and orbax but no TensorFlow (nothing is installed or
# compiled here beyond the one pure-Python wheel below):
#
#   1. the tests marked `gpu` (bf16 maps rank pixels like float32, bf16 training lowers the
#      loss, vmapped slots equal single steps, float32 and bf16) on the default backend;
#   2. scripts/benchmark.py for WideResNet-50-2, 256 px, batch 16, K = 1 and 15 jobs at
#      once, float32 and bfloat16, MFU against 790 TFLOP/s (H100/H200 dense bf16).
#
# Everything lands in $OUT (default gpu_check_out/): pytest.log, bench_<dtype>.log and
# one gpu_check.json with both benchmarks.
#
# ml_collections is not in that image: carry its wheel in .whl/ (made here with
#   pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0
# ); it is unpacked into /tmp/site when the import fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/ml_collections-*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi -L 2>/dev/null || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_bf16.py \
  2>&1 | tee "$OUT/pytest.log"

for dtype in float32 bfloat16; do
  timeout 200 "$PY" scripts/benchmark.py --config=configs/mvtec.py --categories=1,15 --steps=5 \
    --peak_tflops=790 --config.model.dtype="$dtype" --json="$OUT/bench_$dtype.json" \
    2>&1 | grep -v "^W\|^I0" | tee "$OUT/bench_$dtype.log"
done

"$PY" - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
merged = {os.path.basename(p)[len("bench_"):-len(".json")]: json.load(open(p))
          for p in sorted(glob.glob(os.path.join(out, "bench_*.json")))}
with open(os.path.join(out, "pytest.log")) as f:
  merged["pytest_tail"] = f.read()[-2000:]
json.dump(merged, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
for dtype, bench in merged.items():
  if dtype == "pytest_tail":
    continue
  for r in bench["runs"]:
    print(dtype, "K=%d" % r["categories"], r.get("skipped") or
          "%.0f img/s, MFU %.1f %%" % (r["images_per_second"], 100 * r.get("mfu", float("nan"))))
PYEOF
