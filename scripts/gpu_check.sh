#!/usr/bin/env bash
# The accelerator check, in one call of at most ~8 minutes on a fresh single-GPU machine
# whose image has jax (CUDA), flax, optax, orbax, numpy, scipy, scikit-image, Pillow and
# onnxruntime but no TensorFlow, tfds, clu or ml_collections (nothing is compiled here;
# pure-Python wheels are unpacked from .whl/):
#
#   1. the real job end to end on the device: configs/tiny.py on three generated demo
#      categories x 2 seeds (6 jobs) on automatic slots, whose plan line states the
#      per-slot memory estimate and the device limit; evaluation and results.md;
#   2. python -m skrd4ad_jax.predict on a few test images of that run;
#   3. python -m skrd4ad_jax.export --format=onnx and its runner
#      (python -m skrd4ad_jax.export.run) on the same images;
#   4. the tests marked `gpu` (bf16 maps rank pixels like float32, bf16 training lowers the
#      loss, vmapped slots equal single steps, float32 and bf16);
#   5. scripts/benchmark.py for WideResNet-50-2, 256 px, batch 16, K = 1 and 15 jobs at
#      once, bfloat16 then float32, MFU against 790 TFLOP/s (H100/H200 dense bf16).
#
# Each step gets at most its own time and never more than what is left of $BUDGET
# seconds (default 460); a step that runs out is recorded as such and the next goes on.
# SKIP="pytest_gpu bench_bfloat16 bench_float32" leaves steps out and TRAIN_FLAGS adds
# flags to the training run: the shell logic runs on CPU too, e.g.
#   JAX_PLATFORMS=cpu SKIP="pytest_gpu bench_bfloat16 bench_float32" \
#     TRAIN_FLAGS=--config.parallel.device_memory_gb=4 scripts/gpu_check.sh
# Everything lands in $OUT (default gpu_check_out/): one log per step, the run's
# results.md, and one gpu_check.json with every step's status and seconds, the memory
# plan line, the predictions, the export check and both benchmarks.
#
# The wheels in .whl/ (carry it: *.whl is git-ignored), made on a machine with PyPI:
#   pip download --no-deps --only-binary=:all: -d .whl ml_collections==1.1.0 clu==0.0.12 \
#       absl-py==2.5.1
#   pip download --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
#       --python-version 3.12 --implementation cp -d .whl onnx==1.19.1 protobuf==6.31.1
# (the onnx wheel must match the image's Python: change --python-version; without it the
# export steps fail and are recorded as such). Each is unpacked into /tmp/site only when
# its import fails.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
BUDGET=${BUDGET:-460}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

# -- pure-Python wheels, unpacked only where the import fails ------------------------------
need() {  # need MODULE WHEEL-GLOB...
  local module=$1
  shift
  "$PY" -c "import $module" 2>/dev/null && return 0
  local wheels=()
  for w in "$@"; do
    for f in .whl/$w; do [ -e "$f" ] && wheels+=("$f"); done
  done
  [ ${#wheels[@]} -gt 0 ] || { echo "missing: $module (no wheel in .whl/)"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "${wheels[@]}" \
    && case ":$PYTHONPATH:" in *:/tmp/site:*) ;; *) export PYTHONPATH="$PYTHONPATH:/tmp/site" ;; esac
}
need absl absl_py-*.whl
need ml_collections ml_collections-*.whl
need clu clu-*.whl
need onnx onnx-*.whl protobuf-*.whl

nvidia-smi -L 2>/dev/null || true
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

# -- steps ---------------------------------------------------------------------------------
: >"$OUT/steps.tsv"
step() {  # step NAME MAX_SECONDS COMMAND...: runs with the smaller of MAX and what is left
  local name=$1 max=$2
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    printf '%s\tskipped (SKIP)\t0\n' "$name" >>"$OUT/steps.tsv"
    echo "== $name: skipped (SKIP)"
    return 0
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((max < left ? max : left))
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped (budget spent)\t0\n' "$name" >>"$OUT/steps.tsv"
    echo "== $name: skipped, the budget is spent"
    return 0
  fi
  echo "== $name (at most ${limit} s)"
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local status="ok"
  [ $rc -eq 124 ] && status="timed out after ${limit} s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
  printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" >>"$OUT/steps.tsv"
  grep -v "^[WI][0-9]\{4\} " "$OUT/$name.log" | tail -n 15
  echo "== $name: $status"
}

WORK=${WORK:-/tmp/gpu_check_work}
rm -rf "$WORK"
mkdir -p "$WORK"
RUN="$WORK/run"
step demo_data 60 "$PY" -c "
from skrd4ad_jax.data import demo_data
print(demo_data.ensure_demo_dataset('$WORK/data', seed=0, image_size=64, num_train=16,
                                    num_test_good=4, num_test_per_defect=1))"
DATA=$(tail -n 1 "$OUT/demo_data.log")
step train 150 "$PY" -m skrd4ad_jax.main --config=configs/tiny.py:brick,grass,gravel \
  --config.data.root="$DATA" --workdir="$RUN" --config.train.seeds=2 \
  --config.train.epochs=3 --config.parallel.slots_per_device=0 ${TRAIN_FLAGS:-}
cp "$RUN/results.md" "$RUN/results.csv" "$OUT/" 2>/dev/null
cp "$RUN/error.log" "$OUT/train_error.log" 2>/dev/null
mkdir -p "$WORK/few"
for f in $(find "$DATA/brick/test" -name '*.png' 2>/dev/null | sort | head -n 4); do
  cp "$f" "$WORK/few/$(basename "$(dirname "$f")")_$(basename "$f")"
done
step predict 60 "$PY" -m skrd4ad_jax.predict --workdir="$RUN" --category=brick \
  --input="$WORK/few" --output="$OUT/predict"
step export_onnx 90 "$PY" -m skrd4ad_jax.export --workdir="$RUN" --category=brick \
  --format=onnx --output="$WORK/export"
step export_run 40 "$PY" -m skrd4ad_jax.export.run --model="$WORK/export" \
  --input="$WORK/few" --output="$OUT/export_run"

step pytest_gpu 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
  tests/test_bf16.py

for dtype in bfloat16 float32; do
  step "bench_$dtype" 150 "$PY" scripts/benchmark.py --config=configs/mvtec.py \
    --categories=1,15 --steps=5 --peak_tflops=790 --config.model.dtype="$dtype" \
    --json="$OUT/bench_$dtype.json"
done

# -- one JSON ------------------------------------------------------------------------------
"$PY" - "$OUT" "$((($(date +%s) - START)))" <<'PYEOF'
import csv, glob, json, os, sys

out, seconds = sys.argv[1], int(sys.argv[2])


def read(name, tail=2000):
  path = os.path.join(out, name)
  return open(path, errors="replace").read()[-tail:] if os.path.exists(path) else None


merged = {"seconds": seconds, "steps": {}}
for line in open(os.path.join(out, "steps.tsv")):
  name, status, secs = line.rstrip("\n").split("\t")
  merged["steps"][name] = {"status": status, "seconds": int(secs)}
train_log = read("train.log", 10**7) or ""
merged["plan_lines"] = [l for l in train_log.splitlines() if "useful work" in l]
merged["memory_lines"] = [l for l in train_log.splitlines() if "per slot" in l or "lowered" in l]
if os.path.exists(os.path.join(out, "results.csv")):
  merged["results"] = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
merged["train_tail"] = train_log[-2000:]
pred = os.path.join(out, "predict", "predictions.csv")
merged["predict"] = list(csv.DictReader(open(pred))) if os.path.exists(pred) else read("predict.log")
merged["export_tail"] = read("export_onnx.log")
run_csv = os.path.join(out, "export_run", "predictions.csv")
merged["export_run"] = (
  list(csv.DictReader(open(run_csv))) if os.path.exists(run_csv) else read("export_run.log")
)
merged["pytest_tail"] = read("pytest_gpu.log")
for p in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
  merged[os.path.basename(p)[: -len(".json")]] = json.load(open(p))
json.dump(merged, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print(f"gpu_check: {seconds} s")
for name, s in merged["steps"].items():
  print(f"  {name}: {s['status']} ({s['seconds']} s)")
for line in merged["plan_lines"]:
  print(" ", line[-400:])
for key, bench in merged.items():
  if key.startswith("bench_"):
    for r in bench["runs"]:
      print(" ", key[6:], "K=%d" % r["categories"], r.get("skipped") or
            "%.0f img/s, MFU %.1f %%, estimate %.1f GiB, peak %.1f GiB" % (
              r["images_per_second"], 100 * (r.get("mfu") or float("nan")),
              (r.get("memory_estimate_bytes") or 0) / 2**30,
              (r.get("peak_memory_bytes") or 0) / 2**30))
PYEOF
