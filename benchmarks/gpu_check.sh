#!/usr/bin/env bash
# The GPU check of issue 16, as one command: on a CUDA machine whose python3 has torch (CUDA), transformers,
# accelerate, pytest and safetensors, with nothing installed:
#
#     bash benchmarks/gpu_check.sh              # < 8 min; everything under $OUT (default out/gpu-check)
#     bash benchmarks/gpu_check.sh --dry-run    # any machine, CPU, tiny sizes: proves the script runs end to end
#     bash benchmarks/gpu_check.sh --fetch      # here, with pip: download the wheels below into benchmarks/vendor
#
# The repository needs no install: blockrt/, partitioners/ and pipelines/ are linked into the package layout the
# install makes (blockrt, blockrt.partitioners, blockrt.pipelines) under a temporary folder on PYTHONPATH.
# diffusers is not on that machine: its wheel (pure Python, importable as a zip) is carried with the tree in
# benchmarks/vendor/ (git-ignored; fetch with --fetch, carry the folder along): diffusers-0.42.1, importlib_metadata,
# zipp, and Pillow, which diffusers imports, used only if the machine lacks it (the wheel of its CPython, unpacked). Parts, each under its own timeout, each
# logged to $OUT/<part>.log; a failing part is recorded in $OUT/summary.txt and the next one runs:
#
#   1. gpu_tests  pytest -m gpu tests/test_cuda.py                                                   (60 s)
#   2. overlap    benchmarks/overlap.py --device cuda (prefetch vs sequential, throttled loads)      (45 s)
#   3. flux       benchmarks/gpu_flux.py: FLUX.1-dev-sized transformer, random bf16 (~24 GB) in host
#                 memory, GPU budget = a third of its bytes: blockrt vs resident (target <= 1.10x) and
#                 vs diffusers' streamed group offloading (target >= 1.2x faster), peak GPU memory     (210 s)
#   4. decode     benchmarks/decode.py --device cuda: TinyLlama's shape in bf16, budget 50% = GPU memory given to
#                 blockrt, weights from host memory (warm page cache) and from disk (cold), against
#                 diffusers' group offloading with CUDA streams and accelerate's cpu_offload            (140 s)
#                 (rows are saved after each regime: a timeout keeps the warm ones and each worker's JSON)
set -u
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENDOR="$REPO/benchmarks/vendor"
PY="${PYTHON:-python3}"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  --fetch)
    mkdir -p "$VENDOR"
    pip download diffusers==0.42.1 importlib_metadata zipp --no-deps -d "$VENDOR"
    for v in 310 311 312 313; do
      pip download Pillow==11.3.0 --no-deps --only-binary=:all: --python-version "$v" \
        --platform manylinux_2_28_x86_64 -d "$VENDOR"
    done
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run | --fetch]" >&2; exit 2 ;;
esac
[ "${GPU_CHECK_DRY_RUN:-0}" = 1 ] && DRY=1
OUT="${OUT:-$REPO/out/gpu-check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
say() { echo "$*" | tee -a "$SUMMARY"; }

# -- the package layout and the vendored wheels on PYTHONPATH -------------------------------------------
SCRATCH="$(mktemp -d /tmp/gpu-check.XXXXXX)"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/pkg/blockrt"
for f in "$REPO"/blockrt/*; do ln -s "$f" "$SCRATCH/pkg/blockrt/$(basename "$f")"; done
ln -s "$REPO/partitioners" "$SCRATCH/pkg/blockrt/partitioners"
ln -s "$REPO/pipelines" "$SCRATCH/pkg/blockrt/pipelines"
PP="$SCRATCH/pkg:$REPO/benchmarks:$REPO/tests"
# GPU_CHECK_FORCE_WHEEL=1: use the vendored wheels even where diffusers is installed (to test them)
if [ "${GPU_CHECK_FORCE_WHEEL:-0}" = 1 ] || ! "$PY" -c "import diffusers" 2>/dev/null; then
  for w in "$VENDOR"/diffusers-*.whl "$VENDOR"/importlib_metadata-*.whl "$VENDOR"/zipp-*.whl; do
    [ -f "$w" ] && PP="$PP:$w"
  done
  if ! "$PY" -c "import PIL" 2>/dev/null; then
    tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    for w in "$VENDOR"/pillow-*-"$tag"-*.whl; do
      [ -f "$w" ] && "$PY" -m zipfile -e "$w" "$SCRATCH/pil" && PP="$PP:$SCRATCH/pil"
    done
  fi
fi
export PYTHONPATH="$PP${PYTHONPATH:+:$PYTHONPATH}"
export OUT HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error TQDM_DISABLE=1 PYTHONWARNINGS=ignore
export MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072

{
  echo "gpu_check: $(date -u +%FT%TZ), dry run: $DRY, repo $REPO"
  "$PY" - <<'EOF'
import sys, torch, transformers, accelerate
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.cuda.is_available()}"
      f"{' (' + torch.cuda.get_device_name(0) + ')' if torch.cuda.is_available() else ''}, "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}")
try:
    import diffusers, blockrt, blockrt.partitioners, blockrt.pipelines
    print(f"diffusers {diffusers.__version__} from {diffusers.__file__}; blockrt {blockrt.__version__} from {blockrt.__file__}")
except Exception as e:
    print(f"import problem: {type(e).__name__}: {e}")
EOF
} 2>&1 | tee -a "$SUMMARY"
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device: run with --dry-run to check the script on the CPU"; exit 1
fi
DEVICE=cuda; [ "$DRY" = 1 ] && DEVICE=cpu

# part NAME SECONDS CMD...: run under a timeout, log to $OUT/NAME.log, one summary line; never stops the script
part() {
  local name="$1" limit="$2"; shift 2
  local t=$(date +%s)
  (cd "$REPO" && timeout --signal=TERM --kill-after=10 "$limit" "$@") > "$OUT/$name.log" 2>&1
  local rc=$?
  local what="ok"; [ $rc = 124 ] && what="TIMED OUT after ${limit} s"; [ $rc != 0 ] && [ $rc != 124 ] && what="FAILED (exit $rc)"
  say "[$name] $what in $(( $(date +%s) - t )) s; log $OUT/$name.log"
  tail -n "${TAIL:-25}" "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY" > /dev/null
}

part gpu_tests 60 "$PY" -m pytest -q -m gpu tests/test_cuda.py -o addopts="" -p no:cacheprovider -W ignore
if [ "$DRY" = 1 ]; then
  part overlap 120 "$PY" benchmarks/overlap.py --quick --device cpu --out "$OUT/overlap"
  part flux 200 "$PY" benchmarks/gpu_flux.py --dry-run --steps 1 --out "$OUT/flux" --store "$SCRATCH/flux-store"
  # in one process (fresh processes are what the real run pays for; here only the script's path is checked)
  part decode 300 "$PY" benchmarks/decode.py --size tiny --device cpu --batches 1 --budgets 100 --regimes warm,cold \
    --new-tokens 4 --threads 1 --in-process \
    --contenders resident,diffusers_group_offload,accelerate_cpu_offload,blockrt,blockrt_int4 \
    --cache "$SCRATCH/weights" --out "$OUT/decode"
else
  part overlap 45 "$PY" benchmarks/overlap.py --device cuda --passes 3 --out "$OUT/overlap"
  part flux 210 "$PY" benchmarks/gpu_flux.py --steps 3 --out "$OUT/flux" --store "$SCRATCH/flux-store"
  part decode 140 "$PY" benchmarks/decode.py --size tinyllama --dtype bfloat16 --device cuda --batches 1,16 \
    --budgets 50 --regimes warm,cold --threads 8 \
    --contenders resident,blockrt,diffusers_group_offload,accelerate_cpu_offload,blockrt_int4,blockrt_sequential \
    --cache "$SCRATCH/weights" --out "$OUT/decode"
fi
# the generated outputs, offload folders and converted stores are large and not results (the workers' JSON stay)
[ -d "$OUT/decode/work" ] && find "$OUT/decode/work" -mindepth 1 \( -name '*.safetensors' -o -type d \) -prune -exec rm -rf {} +
say "gpu_check: done in $(( $(date +%s) - T0 )) s; results under $OUT (summary.txt, */results.json, flux/flux.json)"
exit 0
